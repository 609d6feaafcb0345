"""The run directory's files: metrics.csv (a row per round), summary.json, checkpoints/.

Checkpoints are readable files (``.npz`` arrays and ``.json`` state), written to a
temporary folder and renamed into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

METRIC_COLUMNS = [
    "round",
    "seconds",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "epsilon",
    "clients_ok",
    "clients_failed",
    "bytes_up",
    "bytes_down",
    "fed_val_loss",
    "fed_val_accuracy",
    "clients_late",
    "clients_rejected",
    "retries",
    "train_seconds",
    "encrypt_seconds",
    "aggregate_seconds",
    "decrypt_seconds",
    "dispatch_seconds",
    "wait_seconds",
    "evaluate_seconds",
    "decrypted_by",
    "updates_up",
    "bytes_to_key_holders",
    "epsilon_vs_server",
    "values_clipped",
]


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (also inside lists and dicts)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _clean(value.item())
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def read_metrics(path: Path) -> list[dict[str, str]]:
    """metrics.csv's rows (strings), or [] if there is none."""
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


class MetricsWriter:
    """Appends one row per round to metrics.csv, flushed at once (safe to tail).

    On resume from round k it appends after the old rows; only rows past k (rounds run
    after the last checkpoint, which will run again) are dropped, by rewriting the file.
    """

    def __init__(self, path: Path, resume_round: int = 0):
        self.path = path
        rows = read_metrics(path) if resume_round else []
        kept = [r for r in rows if int(r["round"]) <= resume_round]
        append = bool(rows) and len(kept) == len(rows) and list(rows[0]) == METRIC_COLUMNS
        self._fh = path.open("a" if append else "w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        if not append:
            self._writer.writeheader()
            for row in kept:
                self._writer.writerow(row)
        self._fh.flush()

    def write(self, metrics: dict[str, Any]) -> None:
        row = {}
        for k in METRIC_COLUMNS:
            v = _clean(metrics.get(k))
            row[k] = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
        self._writer.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    # allow_nan=False: a NaN that slipped past _clean fails here, never as invalid JSON
    tmp.write_text(json.dumps(_clean(data), indent=2, default=_clean, allow_nan=False))
    os.replace(tmp, path)


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (Server.state_dict()) as round_NNNNN/ and point ``latest`` at it."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"round_{int(state['round']):05d}"
    tmp = directory / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    arrays = {"weights": state["weights"]}
    arrays.update({f"strategy.{k}": v for k, v in state["strategy"].items()})
    np.savez(tmp / "arrays.npz", **arrays)
    meta = {k: v for k, v in state.items() if k not in ("weights", "strategy")}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    final = directory / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = directory / ".latest.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, directory / "latest")
    return final


def checkpoint_folder(path: Path) -> Path | None:
    """The ``round_NNNNN`` folder ``path`` names, or None if there is none.

    ``path`` may be a checkpoints folder (its ``latest`` names the round), that
    ``latest`` file itself, or a round folder (one with a ``state.json``)."""
    path = Path(path)
    if path.name == "latest" and path.is_file():
        path = path.parent
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    return path if (path / "state.json").is_file() else None


def checkpoints_dir_of(path: Path) -> Path:
    """The checkpoints folder ``path`` is, or is in: where ``latest``, the round folders
    and the privacy ledger live, and where a resumed run writes its checkpoints. The
    parent of a round folder or of a ``latest`` file; ``path`` itself otherwise."""
    path = Path(path)
    if (path.name == "latest" and path.is_file()) or (path / "state.json").is_file():
        return path.parent
    return path


def later_privacy_state(
    ledger: dict[str, Any] | None, checkpoint: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Of two saved accountant states of one run, count by count the larger.

    Every count in an accountant's state (released rounds, rounds per client or site)
    only grows, so the larger count is the later one, whichever file is newer: the
    ledger, written after every released round, normally dominates the checkpoint; a
    checkpoint of a newer round than a (copied, stale) ledger dominates that. Taking the
    larger of each never forgets a release."""
    if ledger is None or checkpoint is None:
        return ledger if checkpoint is None else checkpoint
    out: dict[str, Any] = {}
    for key in sorted(ledger.keys() | checkpoint.keys()):
        a, b = ledger.get(key), checkpoint.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            a, b = a or {}, b or {}
            out[key] = {k: max(a.get(k, 0), b.get(k, 0)) for k in sorted(a.keys() | b.keys())}
        elif isinstance(a, int | float) and isinstance(b, int | float):
            out[key] = max(a, b)
        else:
            out[key] = a if a is not None else b
    return out


def latest_checkpoint_round(directory: Path) -> int | None:
    """The round of the checkpoint ``directory/latest`` names, or None if there is none."""
    latest = directory / "latest"
    if not latest.exists():
        return None
    state = directory / latest.read_text().strip() / "state.json"
    return int(json.loads(state.read_text())["round"]) if state.exists() else None


RELEASES_DIR = "releases"  # in a checkpoints folder: the attested sums, one file a round


def save_releases(directory: Path, releases: list[Any]) -> None:
    """Write each opened sum with its attestations (``lineage.Release``) once, as
    ``releases/round_NNNNN.json`` in the checkpoints folder: across organisations a
    resumed coordinator sends them to the sites, whose hosts check every model against
    them (the sites check the attestations; this file is not trusted)."""
    import base64

    folder = Path(directory) / RELEASES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for r in releases:
        path = folder / f"round_{int(r.round):05d}.json"
        write_json(
            path,
            {
                "round": int(r.round),
                "model_sha256": str(r.model_sha256),
                "count": int(r.count),
                "plaintexts": base64.b64encode(bytes(r.plaintexts)).decode(),
                "attestations": {
                    str(j): base64.b64encode(bytes(sig)).decode()
                    for j, sig in sorted(r.attestations.items())
                },
            },
        )


def load_releases(directory: Path, up_to: int) -> list[Any]:
    """The opened sums of rounds 1..``up_to`` that :func:`save_releases` wrote in the
    checkpoints folder ``directory``; ValueError naming the first one missing or
    unreadable (the sites check each one's attestations: nothing here is trusted)."""
    import base64
    import binascii

    from fedray.runtime.lineage import Release

    out = []
    for r in range(1, int(up_to) + 1):
        path = Path(directory) / RELEASES_DIR / f"round_{r:05d}.json"
        if not path.is_file():
            raise ValueError(f"the attested sum of round {r} ({path}) is not there")
        try:
            data = json.loads(path.read_text())
            release = Release(
                int(data["round"]),
                str(data["model_sha256"]),
                int(data["count"]),
                base64.b64decode(data["plaintexts"], validate=True),
                {
                    int(j): base64.b64decode(sig, validate=True)
                    for j, sig in data["attestations"].items()
                },
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
            raise ValueError(
                f"the attested sum of round {r} ({path}) is unreadable ({e})"
            ) from None
        if release.round != r:
            raise ValueError(f"{path} holds the attested sum of round {release.round}, not {r}")
        out.append(release)
    return out


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint folder, or the one a ``checkpoints/`` folder's ``latest`` (or
    that ``latest`` file) names."""
    folder = checkpoint_folder(path)
    if folder is None:
        raise FileNotFoundError(f"no checkpoint at {path}")
    path = folder
    with np.load(path / "arrays.npz") as arrays:
        state: dict[str, Any] = json.loads((path / "state.json").read_text())
        state["weights"] = arrays["weights"]
        state["strategy"] = {
            k.split(".", 1)[1]: arrays[k] for k in arrays.files if k.startswith("strategy.")
        }
    return state


class TensorBoardWriter:
    """Per-round scalars as TensorBoard event files in ``<run dir>/tensorboard``.

    Watch a run with ``tensorboard --logdir outputs/`` (tensorboard is not a dependency;
    the files are written with tensorboardX).
    """

    SCALARS = [c for c in METRIC_COLUMNS if c != "round"]

    def __init__(self, directory: Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=str(directory), flush_secs=5)

    def write(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["round"])
        for key in self.SCALARS:
            value = _clean(metrics.get(key))
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
