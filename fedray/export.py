"""``python -m fedray.export RUN_DIR OUT``: a finished run's model, ready to predict.

A checkpoint is one flat float32 vector of the exchanged weights; this turns it into what
a user loads without fedray's training stack or Ray:

* ``OUT/model.safetensors``: the model's ``state_dict`` (safetensors, no pickle);
* ``OUT/fedray_model.json``: how to rebuild the module (``model.name``, its sizes) and
  how to prepare a table for it: the feature names in the model's input order, the
  declared categories (one-hot, in this order), the label column, the class ids, and the
  scaling the run trained with (see :data:`SCALING`).

:mod:`fedray.predict` reads both (``python -m fedray.predict OUT data.csv``).

``model=hf`` (a local Hugging Face checkpoint, LoRA or full fine-tuning): a folder that
``transformers``/``peft`` load directly, see :func:`_export_hf`. A user's own
``task._target_`` is refused with one line: its model is the task's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedray.errors import ConfigError, DataError, FedrayError

FORMAT = 1
MODEL_FILE = "model.safetensors"
SPEC_FILE = "fedray_model.json"
# How a run scaled its features (``scaling.mode`` in the spec file):
#   none       the values as the table holds them (dataset.standardize=none, synthetic)
#   global     z-scored with the federation-wide ``mean`` and ``std`` (per feature) the run
#              opened before round 1 (dataset.standardize=global, the default)
#   per_table  each table z-scored with its own mean and deviation: every site's clients
#              and the server's test set were, in training (dataset.standardize=site); so
#              a table to predict is scaled with its own statistics too and needs at
#              least 2 rows
#   divide     a fixed divisor (digits: pixel intensities 0..16 divided by 16)
# ``impute_mean`` (dataset.missing=impute_mean): the federation-wide means empty cells
# were filled with, before scaling; null otherwise.
SCALING = ("none", "global", "per_table", "divide")


def _saved_config(run_dir: Path):
    from omegaconf import OmegaConf

    from fedray.config import register_configs, to_config

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{run_dir}: no .hydra/config.yaml (export needs a run directory written by "
            "`python -m fedray.launch`, e.g. outputs/DATE/TIME)"
        )
    register_configs()
    return to_config(OmegaConf.load(path))


def _features(cfg: Any, summary: dict[str, Any]) -> list[str]:
    """The model's input columns by name, in order (one-hot columns as ``col=value``)."""
    from fedray.data.datasets import BUNDLED, bundled_feature_names

    ds = cfg.dataset
    if ds.name in BUNDLED:
        return bundled_feature_names(ds.name)
    if ds.name == "synthetic":
        return [f"x{i}" for i in range(ds.num_features)]
    features = summary.get("features") or ds.features
    if not features:
        raise DataError(
            "the run recorded no feature names (summary.json 'features': runs of fedray "
            "before export existed); rerun with dataset.features=[...] set"
        )
    return list(features)


def _scaling(cfg: Any, run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    from fedray.config import needs_feature_statistics, standardization

    ds = cfg.dataset
    if ds.name == "digits":
        return {"mode": "divide", "divisor": 16.0}
    mode = standardization(cfg)
    if not needs_feature_statistics(cfg):
        return {"mode": "per_table", "min_std": 1e-8} if mode == "site" else {"mode": "none"}
    if "feature_scaling" not in state:  # a run of fedray before it: every table by its own
        return {"mode": "per_table", "min_std": 1e-8}
    opened = state["feature_scaling"]
    if opened is None:
        raise DataError(
            f"{run_dir}: the checkpoint holds no feature scaling, though the run's "
            "settings (dataset.standardize=global or dataset.missing=impute_mean) open one"
        )
    out: dict[str, Any] = {"mode": {"site": "per_table"}.get(mode, mode)}
    if mode == "global":
        out.update(mean=list(opened["mean"]), std=list(opened["std"]))
    if mode == "site":
        out["min_std"] = 1e-8
    out["impute_mean"] = list(opened["mean"]) if opened["impute"] else None
    return out


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False) -> dict[str, Any]:
    """Write ``OUT/model.safetensors`` and ``OUT/fedray_model.json`` from ``run_dir``'s
    latest checkpoint; return the spec written. ``model=hf``: a Hugging Face folder
    instead (see :func:`_export_hf`)."""
    from safetensors.torch import save_file

    from fedray.data.datasets import DatasetInfo
    from fedray.models import build_model
    from fedray.runtime.outputs import load_checkpoint

    run_dir, out = Path(run_dir), Path(out)
    cfg = _saved_config(run_dir)
    if cfg.task._target_ or cfg.model.name not in ("mlp", "logreg", "cnn", "hf"):
        raise ConfigError(
            f"export supports the built-in tasks' models (model=mlp|logreg|cnn|hf); this run "
            f"has model={cfg.model.name}"
            + (
                f", task._target_={cfg.task._target_} (a task of your own saves its own model)"
                if cfg.task._target_
                else ""
            )
        )
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    checkpoints = Path(cfg.checkpoint.path) if cfg.checkpoint.path else run_dir / "checkpoints"
    try:
        state = load_checkpoint(checkpoints)
    except FileNotFoundError:
        raise DataError(
            f"{run_dir}: no checkpoint in {checkpoints} (the run wrote none, or it is not a "
            "finished run's directory)"
        ) from None
    if cfg.model.name == "hf":
        return _export_hf(cfg, run_dir, state, summary, out, merge)
    from fedray.data.tables import TableSpec

    names = _features(cfg, summary)
    spec = TableSpec(
        label="", categorical={k: tuple(v) for k, v in (cfg.dataset.categorical or {}).items()}
    )
    width = spec.width(names)
    num_classes = summary.get("num_classes")
    if num_classes is None:
        from fedray.data.datasets import dataset_info

        num_classes = dataset_info(cfg.dataset).num_classes
    info = DatasetInfo(width, int(num_classes))
    model = build_model(cfg.model, info, cfg.seed)
    _set_weights(
        model,
        cfg,
        state,
        lambda got, want: (
            f"{run_dir}: the checkpoint holds {got} values, model={cfg.model.name} "
            f"for {width} features and {num_classes} classes has {want}"
        ),
    )
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / MODEL_FILE), metadata={"format": "fedray-model-1"})
    written = {
        "format": FORMAT,
        "model": {
            "name": cfg.model.name,
            "hidden": cfg.model.hidden if cfg.model.name == "mlp" else None,
            "num_features": width,
            "num_classes": int(num_classes),
        },
        "features": names,
        "categorical": {k: list(v) for k, v in spec.categorical.items()},
        "label": cfg.dataset.label if cfg.dataset.name == "csv" else "target",
        "classes": list(range(int(num_classes))),
        "scaling": _scaling(cfg, run_dir, state),
        "source": _source(cfg, run_dir, state, summary),
    }
    (out / SPEC_FILE).write_text(json.dumps(written, indent=2) + "\n")
    return written


def _set_weights(model: Any, cfg: Any, state: dict[str, Any], mismatch) -> None:
    """Put the checkpoint's exchanged values into ``model`` (as every party does with the
    global weights); a checkpoint of another size is one DataError line,
    ``mismatch(values held, values the model exchanges)``."""
    import numpy as np

    from fedray.models import ParamView

    params = ParamView(model, cfg.model.trainable)
    weights = np.asarray(state["weights"], dtype=np.float32)
    if weights.shape != (params.size,):
        raise DataError(mismatch(weights.size, params.size))
    params.set(weights)


def _source(cfg: Any, run_dir: Path, state: dict[str, Any], summary: dict[str, Any]) -> dict:
    return {
        "run_dir": str(run_dir.resolve()),
        "round": int(state["round"]),
        "dataset": cfg.dataset.name,
        "final_accuracy": summary.get("final_accuracy"),
        "privacy": cfg.privacy.name,
        "epsilon": summary.get("epsilon"),
        "delta": summary.get("delta"),
    }


def _export_hf(cfg, run_dir: Path, state, summary, out: Path, merge: bool) -> dict[str, Any]:
    """``model=hf``: the task's own model with the run's trained values, saved the way
    ``transformers``/``peft`` load it.

    With LoRA (``model.lora.r > 0``) ``OUT`` is a peft adapter folder
    (``adapter_config.json``, ``adapter_model.safetensors``: the adapters and the trained
    classification head), loaded with ``PeftModel.from_pretrained(base, OUT)`` on the base
    checkpoint at ``model.path``; with ``merge=True`` also ``OUT/merged``, the adapters
    merged into the base weights, a full ``AutoModelForSequenceClassification`` folder with
    its tokenizer. Full fine-tuning (``r=0``): ``OUT`` is that full folder.
    """

    from fedray.tasks.base import build_task, build_task_model

    task = build_task(cfg)
    model = build_task_model(task, cfg.seed)  # the same initial values as every party's
    _set_weights(
        model,
        cfg,
        state,
        lambda got, want: (
            f"{run_dir}: the checkpoint holds {got} values; the model at "
            f"model.path={cfg.model.path} with model.lora.r={cfg.model.lora.r} trains "
            f"{want} (the checkpoint at model.path changed since the run?)"
        ),
    )
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    lora = cfg.model.lora.r > 0
    if lora:
        model.save_pretrained(str(out))
    if merge or not lora:
        full = out / "merged" if lora else out
        merged = model.merge_and_unload() if lora else model
        merged.save_pretrained(str(full))
        task.tokenizer.save_pretrained(str(full))
    written = {
        "format": FORMAT,
        "model": {
            "name": "hf",
            "base": str(Path(cfg.model.path).resolve()),
            "lora_r": cfg.model.lora.r,
            "adapter": "." if lora else None,
            "merged": ("merged" if lora else ".") if (merge or not lora) else None,
            "num_classes": task.num_labels,
            "max_length": cfg.dataset.max_length,
        },
        "source": _source(cfg, run_dir, state, summary),
    }
    (out / SPEC_FILE).write_text(json.dumps(written, indent=2) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fedray.export",
        description="Write a finished run's model (safetensors) and its preprocessing "
        "(fedray_model.json) into OUT, for python -m fedray.predict.",
    )
    ap.add_argument("run_dir", help="the run directory (outputs/DATE/TIME)")
    ap.add_argument("out", help="the folder to write (created if missing)")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="model=hf with LoRA: also write OUT/merged, the adapters merged into the base "
        "weights (a full Hugging Face folder with its tokenizer)",
    )
    args = ap.parse_args(argv)
    try:
        spec = export_run(args.run_dir, args.out, merge=args.merge)
    except FedrayError as exc:
        print(f"fedray: error: {exc}", file=sys.stderr)
        return 2
    src, m = spec["source"], spec["model"]
    if m["name"] == "hf":
        what = (
            f"LoRA r={m['lora_r']} adapters on {m['base']}" if m["lora_r"] else "full model"
        ) + (", merged copy in merged/" if m["lora_r"] and m["merged"] else "")
    else:
        what = (
            f"{m['num_features']} features, {m['num_classes']} classes, "
            f"scaling {spec['scaling']['mode']}"
        )
    print(
        f"exported round {src['round']} of {args.run_dir} (model={m['name']}, {what}) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
