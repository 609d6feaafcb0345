"""Predict with an exported model: ``python -m fedray.predict OUT data.csv``.

``OUT`` is what :mod:`fedray.export` wrote (``model.safetensors`` and
``fedray_model.json``). The table (CSV, or Parquet by suffix) is read by column name
with the same reader as training (:func:`fedray.data.tables.read_table`): columns in any
order, extra columns ignored, the declared categories one-hot; then scaled as the run
was (``scaling`` in the spec file). No Ray, no fedray job: torch and this package only.

In Python::

    from fedray.predict import load_model
    model = load_model("exported/")
    labels = model.predict_file("new_patients.csv")      # numpy int64, one per row
    probs = model.predict_proba(x)                        # x already prepared
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedray.errors import DataError, FedrayError

MISSING = ("error", "drop_rows", "impute_mean")


@dataclass
class ExportedModel:
    """A model and its preprocessing, as :func:`fedray.export.export_run` wrote them."""

    module: Any  # torch.nn.Module, in eval mode
    spec: dict[str, Any]

    @property
    def features(self) -> list[str]:
        return list(self.spec["features"])

    def table_spec(self, missing: str = "error"):
        from fedray.data.tables import TableSpec

        return TableSpec(
            label=self.spec["label"],
            features=tuple(self.spec["features"]),
            categorical={k: tuple(v) for k, v in self.spec.get("categorical", {}).items()},
            missing=missing,
            extra_columns="ignore",
        )

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Scale a feature matrix (columns in :attr:`features` order) as the run did."""
        scaling = self.spec["scaling"]
        mode, impute = scaling["mode"], scaling.get("impute_mean")
        x = np.asarray(x, dtype=np.float32)
        if mode == "divide":
            return (x / np.float32(scaling["divisor"])).astype(np.float32)
        if mode == "per_table" and len(x) < 2:
            raise DataError(
                "this model was trained on tables each scaled by its own mean and "
                "deviation (dataset.standardize=site): predict needs a table of at least "
                "2 rows, scaled the same way"
            )
        if mode == "global" or impute is not None:
            # the federation's statistics from training, applied as the sites applied them
            from fedray.data.datasets import FeatureScaling

            mean = scaling.get("mean") or impute
            return FeatureScaling(
                {"per_table": "site"}.get(mode, mode),
                impute is not None,
                tuple(mean),
                tuple(scaling.get("std") or [1.0] * len(mean)),
            ).apply(x)
        if mode == "per_table":
            from fedray.data.datasets import _standardize

            return _standardize(x, x)
        return x

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of prepared rows (see :meth:`prepare`)."""
        import torch

        with torch.no_grad():
            logits = self.module(torch.as_tensor(np.asarray(x, dtype=np.float32)))
            return torch.softmax(logits, dim=1).numpy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class ids of prepared rows (the argmax of the logits, as training evaluated)."""
        import torch

        with torch.no_grad():
            logits = self.module(torch.as_tensor(np.asarray(x, dtype=np.float32)))
            return logits.argmax(1).numpy().astype(np.int64)

    def read(self, path: str, missing: str = "error") -> tuple[np.ndarray, np.ndarray | None]:
        """A table's prepared features, and its labels if it has the label column."""
        from fedray.data.tables import read_table, table_columns

        labelled = self.spec["label"] in table_columns(path)
        if missing == "impute_mean" and self.spec["scaling"].get("impute_mean") is None:
            raise DataError(
                "--missing impute_mean needs the federation's means, which only a run with "
                "dataset.missing=impute_mean exports; use --missing error|drop_rows"
            )
        try:
            x, y = read_table(path, self.table_spec(missing), labelled=labelled)
        except DataError as exc:  # the fixing option is predict's own here
            raise DataError(
                str(exc).replace("dataset.missing=drop_rows", "--missing drop_rows")
            ) from None
        return self.prepare(x), y

    def predict_file(self, path: str, missing: str = "error") -> np.ndarray:
        return self.predict(self.read(path, missing)[0])


def load_model(directory: str | Path) -> ExportedModel:
    """Load what :mod:`fedray.export` wrote into ``directory``."""
    from safetensors.torch import load_file

    from fedray.data.datasets import DatasetInfo
    from fedray.export import FORMAT, MODEL_FILE, SPEC_FILE
    from fedray.models import build_model

    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / MODEL_FILE
    for p in (spec_path, weights_path):
        if not p.is_file():
            raise DataError(
                f"{directory}: no {p.name} (a folder written by `python -m fedray.export "
                "RUN_DIR OUT`)"
            )
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != FORMAT:
        raise DataError(
            f"{spec_path}: format {spec.get('format')!r}; this fedray reads format {FORMAT}"
        )
    from fedray.config import ModelConfig

    m = spec["model"]
    if m["name"] == "hf":
        raise DataError(
            f"{directory}: a Hugging Face export (model=hf): load it with transformers/peft "
            "(docs/how-to/export-and-predict.md), not fedray.predict"
        )
    cfg = ModelConfig(name=m["name"], **({"hidden": m["hidden"]} if m.get("hidden") else {}))
    module = build_model(cfg, DatasetInfo(m["num_features"], m["num_classes"]), seed=0)
    module.load_state_dict(load_file(str(weights_path)), strict=True)
    module.eval()
    return ExportedModel(module, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fedray.predict",
        description="Predict the class of each row of a table (CSV or Parquet) with a model "
        "written by python -m fedray.export. Prints one 'row,prediction' line per row (or "
        "writes them to --output); with the label column present, also the accuracy.",
    )
    ap.add_argument("model", help="the folder python -m fedray.export wrote")
    ap.add_argument("table", help="the rows to predict (CSV, or .parquet)")
    ap.add_argument("--output", help="write 'row,prediction' to this CSV instead of stdout")
    ap.add_argument(
        "--missing",
        choices=MISSING,
        default="error",
        help="a row with an empty cell: error (default), drop_rows, or impute_mean (the "
        "federation's means, for a model trained with dataset.missing=impute_mean)",
    )
    args = ap.parse_args(argv)
    try:
        model = load_model(args.model)
        x, y = model.read(args.table, args.missing)
        predicted = model.predict(x)
    except FedrayError as exc:
        print(f"fedray: error: {exc}", file=sys.stderr)
        return 2
    out = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        writer = csv.writer(out)
        writer.writerow(["row", "prediction"])
        writer.writerows(enumerate(predicted.tolist()))
    finally:
        if args.output:
            out.close()
    if y is not None:
        accuracy = float((predicted == y).mean())
        print(f"accuracy {accuracy:.4f} on {len(y)} rows ({model.spec['label']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
