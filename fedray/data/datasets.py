"""Loading each client's data inside its actor, and the server's central test set.

Bundled scikit-learn data sets are split deterministically from the seed, so every actor
computes the same split and keeps only its own clients' rows. Features are standardised
with the federation-wide mean and deviation (``dataset.standardize=global``: the sums are
opened once before round 1 by secure aggregation, and every party applies one
:class:`FeatureScaling`), or per site with the site's own statistics (``site``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedray.config import SCALED_DATASETS, DatasetConfig
from fedray.data.partition import partition_indices
from fedray.data.synthetic import synthetic_client
from fedray.data.tables import (
    TableSpec,
    check_columns,
    read_table,
    resolve_features,
    table_columns,
)
from fedray.errors import ConfigError, DataError

log = logging.getLogger("fedray")


@dataclass
class ClientData:
    """One client's local data: a training split and a held-out split for federated eval."""

    client_id: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def num_examples(self) -> int:
        return len(self.y_train)


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about the data: feature width and class count."""

    num_features: int
    num_classes: int


# The bundled sets' shapes, so a job's driver knows the model's without loading the data
# (importing scikit-learn costs ~1.3 s of CPU; tests/test_data_models.py checks each
# against scikit-learn's own loader).
BUNDLED = {
    "breast_cancer": DatasetInfo(num_features=30, num_classes=2),
    "digits": DatasetInfo(num_features=64, num_classes=10),
    "wine": DatasetInfo(num_features=13, num_classes=3),
}


@lru_cache(maxsize=4)
def _bundled(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    loader = {
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
    }[name]
    bunch = loader()
    x = bunch.data.astype(np.float32)
    if name == "digits":
        x = x / 16.0  # pixel intensities 0..16: a fixed scale, not data-dependent
    return x, bunch.target.astype(np.int64)


def bundled_feature_names(name: str) -> list[str]:
    """A bundled dataset's column names (scikit-learn's), in the model's input order."""
    from sklearn import datasets

    loader = {
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
    }[name]
    return [str(n) for n in loader().feature_names]


SPLIT_CACHE_FORMAT = 1  # bump when _bundled or the split changes what it returns


def _split_cache_path(name: str, test_fraction: float, seed: int) -> Path | None:
    """Where a bundled set's split is cached: ``$FEDRAY_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/fedray`` or ``~/.cache/fedray``; keyed by scikit-learn's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        sklearn_version = version("scikit-learn")
    except PackageNotFoundError:
        return None
    root = os.environ.get("FEDRAY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fedray"
    )
    key = f"{name}-{test_fraction!r}-{seed}-sklearn{sklearn_version}-v{SPLIT_CACHE_FORMAT}"
    return Path(root) / "bundled" / f"{key}.npz"


@lru_cache(maxsize=4)
def _bundled_split(name: str, test_fraction: float, seed: int):
    """(train_x, train_y, test_x, test_y): the central test set is a stratified holdout.

    Every actor of a job computes the same split of the same public data, and importing
    scikit-learn costs about a second of CPU per actor; so the split is cached on disk
    (public data only) and an actor that finds it there does not import scikit-learn."""
    path = _split_cache_path(name, test_fraction, seed)
    if path is not None and path.is_file():
        try:
            with np.load(path) as z:
                return z["xtr"], z["ytr"], z["xte"], z["yte"]
        except (OSError, KeyError, ValueError) as exc:  # damaged: compute it again
            log.debug("ignoring the cached split %s: %s", path, exc)
    from sklearn.model_selection import train_test_split

    x, y = _bundled(name)
    if test_fraction == 0:
        split = x, y, x[:0], y[:0]
    else:
        xtr, xte, ytr, yte = train_test_split(
            x, y, test_size=test_fraction, random_state=seed, stratify=y
        )
        split = xtr, ytr, xte, yte
    if path is not None:
        _write_split(path, split)
    return split


def _write_split(path: Path, split) -> None:
    """Write atomically (other actors may read or write the same file meanwhile); a
    cache that cannot be written is only slower."""
    import tempfile

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **dict(zip(("xtr", "ytr", "xte", "yte"), split, strict=True)))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("could not cache the split in %s: %s", path, exc)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def site_scales(cfg: DatasetConfig) -> bool:
    """Whether a site z-scores its features with its own statistics when it loads them
    (what a direct call does; a job that opens federation-wide sums loads them raw)."""
    return cfg.standardize != "none" and cfg.name in SCALED_DATASETS


def feature_sums(x: np.ndarray) -> np.ndarray:
    """One table's per-feature sums, what a site adds to the federation's: the count of
    non-empty cells, their sum and their sum of squares (``3 * width`` values)."""
    x = np.asarray(x, dtype=np.float64)
    present = ~np.isnan(x)
    v = np.where(present, x, 0.0)
    return np.concatenate([present.sum(axis=0), v.sum(axis=0), (v * v).sum(axis=0)])


@dataclass(frozen=True)
class FeatureScaling:
    """How every party prepares features once the federation's sums are opened: empty
    cells filled with the federation-wide mean (``impute``), then z-scored with the
    federation-wide mean and deviation (``mode="global"``), each table's own (``site``),
    or left as they are (``none``). The same object at every site, the server (its test
    set) and in the exported model."""

    mode: str
    impute: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_sums(
        cls, sums: np.ndarray, mode: str, impute: bool, max_cells: float | None = None
    ) -> FeatureScaling:
        """From the federation's summed :func:`feature_sums` (population deviation); the
        sums may be in any common unit (each site divides its own by weight_ref, so the
        non-empty cells of a column are at most ``max_cells``, the number of clients).
        Sums no honest sites give (no cell, more cells than clients, a negative variance
        beyond rounding) are refused: DataError."""
        count, total, squares = np.asarray(sums, dtype=np.float64).reshape(3, -1)
        empty = np.flatnonzero(count <= 0)
        if empty.size:
            raise DataError(
                f"feature column(s) {', '.join(str(int(j)) for j in empty[:5])} (0-based, "
                "in the job's feature order) have no value at any site: drop them from "
                "dataset.features"
            )
        mean = total / count
        var = squares / count - mean * mean
        # a crafted site: more cells than clients, or sums of squares below the square of
        # the sums (Cauchy-Schwarz) by more than the fixed-point grid explains
        slack = 1e-6 * (squares / count + 1.0)
        if (max_cells is not None and (count > max_cells * (1 + 1e-9)).any()) or (
            var < -slack
        ).any():
            raise DataError(
                "the opened feature sums are not what honest sites send (more non-empty "
                "cells than clients, or a negative variance): a site crafted its sums"
            )
        std = np.sqrt(np.maximum(var, 0.0))
        std[std < 1e-8] = 1.0
        return cls(mode, bool(impute), tuple(map(float, mean)), tuple(map(float, std)))

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "impute": self.impute,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureScaling:
        """From :meth:`to_dict`'s form; DataError unless it is one (a mode, finite means,
        deviations > 0, one of each per feature)."""
        try:
            mode, impute = str(d["mode"]), d["impute"]
            mean = tuple(float(v) for v in d["mean"])
            std = tuple(float(v) for v in d["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"a feature scaling without its fields ({exc})") from None
        if (
            mode not in ("global", "site", "none")
            or not isinstance(impute, bool)
            or len(mean) != len(std)
            or not all(math.isfinite(v) for v in mean + std)
            or min(std, default=1.0) <= 0
        ):
            raise DataError(
                "a feature scaling that is not one (mode, finite means, deviations > 0)"
            )
        return cls(mode, impute, mean, std)

    def apply(self, x: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
        """``x`` prepared (float32); with ``mode="site"`` z-scored by ``ref``'s statistics
        (a client's training rows; default ``x`` itself), after both are imputed."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise DataError(
                f"a table of {x.shape[-1]} feature columns; the federation's statistics "
                f"have {len(self.mean)}"
            )
        mean = np.asarray(self.mean)
        x = self._imputed(x)
        if self.mode == "global":
            return ((x - mean) / np.asarray(self.std)).astype(np.float32)
        if self.mode == "site":
            return _standardize(x, x if ref is None else self._imputed(ref))
        return x.astype(np.float32)

    def _imputed(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.where(np.isnan(x), np.asarray(self.mean), x) if self.impute else x


def _standardize(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    mean = ref.mean(axis=0)
    std = ref.std(axis=0)
    std[std < 1e-8] = 1.0
    return ((x - mean) / std).astype(np.float32)


def _standardize_site(data: ClientData) -> None:
    """Z-score a site's features with its own training statistics (in place)."""
    ref = data.x_train
    data.x_train, data.x_val = _standardize(data.x_train, ref), _standardize(data.x_val, ref)


def _holdout(client_id: int, x, y, fraction: float, seed: int) -> ClientData:
    rng = np.random.default_rng([seed, client_id, 7])
    order = rng.permutation(len(y))
    n_val = int(round(len(y) * fraction)) if len(y) > 2 else 0
    n_val = min(n_val, len(y) - 1)
    val, train = order[:n_val], order[n_val:]
    return ClientData(client_id, x[train], y[train], x[val], y[val])


def load_client_data(
    cfg: DatasetConfig, client_ids: list[int], num_clients: int, seed: int, *, raw: bool = False
) -> dict[int, ClientData]:
    """Load the given clients' data. Runs inside a client actor; nothing is shipped.

    ``raw``: not standardised (and, with ``dataset.missing=impute_mean``, with NaN in
    empty cells): the job prepares it with the federation's :class:`FeatureScaling`."""
    out: dict[int, ClientData] = {}
    if cfg.name in BUNDLED:
        xtr, ytr, _, _ = _bundled_split(cfg.name, cfg.test_fraction, seed)
        parts = partition_indices(
            ytr,
            num_clients,
            scheme=cfg.partition,
            seed=seed,
            dirichlet_alpha=cfg.dirichlet_alpha,
            shards_per_client=cfg.shards_per_client,
        )
        for cid in client_ids:
            x, y = xtr[parts[cid]], ytr[parts[cid]]
            data = _holdout(cid, x, y, cfg.holdout_fraction, seed)
            if site_scales(cfg) and not raw:
                _standardize_site(data)
            out[cid] = data
    elif cfg.name == "synthetic":
        for cid in client_ids:
            x, y = synthetic_client(
                cid,
                alpha=cfg.alpha,
                beta=cfg.beta,
                num_samples=cfg.samples_per_client,
                num_features=cfg.num_features,
                num_classes=cfg.num_classes,
                seed=seed,
            )
            out[cid] = _holdout(cid, x, y, cfg.holdout_fraction, seed)
    elif cfg.name == "csv":
        spec = job_table_spec(cfg)
        for cid in client_ids:
            x, y = read_table(cfg.path.format(client_id=cid), spec)
            data = _holdout(cid, x, y, cfg.holdout_fraction, seed)
            if site_scales(cfg) and not raw:
                _standardize_site(data)
            out[cid] = data
    else:  # guarded by the config schema
        raise DataError(f"unknown dataset {cfg.name!r}")
    return out


def load_test_set(cfg: DatasetConfig, num_clients: int, seed: int, *, raw: bool = False):
    """The server's central test set, or (None, None) when the job has none (``raw``: as
    in :func:`load_client_data`)."""
    if cfg.name in BUNDLED:
        _, _, xte, yte = _bundled_split(cfg.name, cfg.test_fraction, seed)
        if len(yte) == 0:
            return None, None
        if site_scales(cfg) and not raw:
            xte = _standardize(xte, xte)
        return xte, yte
    if cfg.name == "synthetic":
        # Fresh draws (stream 1) from a spread of clients' distributions, at most 2,000 rows
        # (about 1% standard error on accuracy; the server evaluates every round).
        per = max(1, cfg.test_samples_per_client)
        count = min(num_clients, max(1, 2_000 // per))
        ids = np.linspace(0, num_clients - 1, count).astype(int)
        xs, ys = [], []
        for cid in np.unique(ids):
            x, y = synthetic_client(
                int(cid),
                alpha=cfg.alpha,
                beta=cfg.beta,
                num_samples=per,
                num_features=cfg.num_features,
                num_classes=cfg.num_classes,
                seed=seed,
                stream=1,
            )
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)
    if cfg.name == "csv" and cfg.test_path:
        x, y = read_table(cfg.test_path, job_table_spec(cfg))
        return (_standardize(x, x) if site_scales(cfg) and not raw else x), y
    return None, None


def dataset_info(cfg: DatasetConfig, observed_classes: int = 0, num_features: int = 0):
    """Feature width and class count; for csv from what the clients observed."""
    if cfg.name in BUNDLED:
        return BUNDLED[cfg.name]
    if cfg.name == "synthetic":
        return DatasetInfo(cfg.num_features, cfg.num_classes)
    return DatasetInfo(num_features, max(2, observed_classes))


def check_site_files(path_template: str, num_clients: int) -> None:
    """All sites' files are on this machine (embedded Ray): one per client id, or one line."""
    missing = [
        path_template.format(client_id=cid)
        for cid in range(num_clients)
        if not os.path.isfile(path_template.format(client_id=cid))
    ]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise DataError(
            f"data file not found: {shown} (dataset.path={path_template!r} needs one file per "
            f"client id 0..{num_clients - 1}: {len(missing)} of num_clients={num_clients} "
            "missing; or set num_clients to the number of files)"
        )


def check_site_tables(cfg: DatasetConfig, num_clients: int) -> list[str]:
    """Embedded Ray, before it starts: every site's file (and the test file) has the job's
    columns by name. Reads headers only, never a value. Returns the job's features
    (``dataset.features``, else client 0's columns but the label, logged once)."""
    check_site_files(cfg.path, num_clients)
    spec = TableSpec.from_config(cfg)
    first = cfg.path.format(client_id=0)
    features = resolve_features(spec, first, table_columns(first))
    spec = replace(spec, features=tuple(features))
    paths = [cfg.path.format(client_id=cid) for cid in range(num_clients)]
    for path in paths + ([cfg.test_path] if cfg.test_path else []):
        check_columns(path, table_columns(path), spec)
    return features


def site_columns(path_template: str, client_id: int) -> list[str]:
    """One site's column names (its header, no value): run at client 0's site to take the
    job's features from its file when ``dataset.features`` is null."""
    return table_columns(path_template.format(client_id=client_id))


def job_table_spec(cfg: DatasetConfig) -> TableSpec:
    """The spec every site's table is read with; features resolved from client 0's file
    if the driver has not resolved them (a direct call, outside a job)."""
    spec = TableSpec.from_config(cfg)
    if spec.features is None:
        first = cfg.path.format(client_id=0)
        spec = replace(spec, features=tuple(resolve_features(spec, first, table_columns(first))))
    return spec


def agreed_csv_info(cfg: DatasetConfig) -> DatasetInfo:
    """Across organisations no party reads another's tables: the model's shape comes from
    what the job declares, the same at the coordinator and every site: the width of
    ``dataset.features`` (categorical columns one-hot over their declared vocabulary) and
    ``dataset.num_classes`` labels (0..num_classes-1)."""
    spec = TableSpec.from_config(cfg)
    if spec.features is None:
        raise ConfigError(
            "federation=cross_org with dataset=csv needs dataset.features, the column names "
            "every site agreed on (e.g. dataset.features=[age,bmi,sex]), and "
            "dataset.num_classes: no party reads another's tables"
        )
    return DatasetInfo(spec.width(spec.features), int(cfg.num_classes))


def csv_metadata(cfg: DatasetConfig, client_ids: list[int]) -> tuple[int, int]:
    """(feature width, largest label) of these sites' tables, read and checked in full at
    the site before any training (types, missing cells, categories): metadata only."""
    spec = job_table_spec(cfg)
    width, max_label = spec.width(spec.features), 0
    for cid in client_ids:
        path = cfg.path.format(client_id=cid)
        x, y = read_table(path, spec)
        if x.shape[1] != width:  # the same spec gives the same width: a broken reader
            raise DataError(f"{path}: has {x.shape[1]} feature columns, the job has {width}")
        max_label = max(max_label, int(y.max()))
    return width, max_label


def read_csv(path: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one numeric table (CSV, or Parquet by suffix) whose features are all its
    columns but ``label``, in the file's order. Errors name the file, row and column."""
    return read_table(path, TableSpec(label=label))
