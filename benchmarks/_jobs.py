"""One embedded Ray for a benchmark's runs, and one fedray job run in-process on it."""

from __future__ import annotations

import contextlib
import csv
import tempfile
from pathlib import Path

import ray
from hydra import compose, initialize_config_dir

from fedray.config import register_configs, to_config
from fedray.runtime.cluster import loopback_node_ip
from fedray.runtime.driver import run_experiment

CONF = Path(__file__).resolve().parents[1] / "conf"
# Digits with a Dirichlet(0.5) label skew over 20 clients, 10 a round: the workload of
# benchmarks/strategies.py and benchmarks/compression.py.
DIGITS_SKEW = [
    "dataset=digits",
    "dataset.partition=dirichlet",
    "dataset.dirichlet_alpha=0.5",
    "num_clients=20",
    "clients_per_round=10",
]


@contextlib.contextmanager
def embedded_ray(num_cpus: int = 2):
    """A fresh local Ray on loopback (address="local": never a stale `ray start`; not
    127.0.0.1, which Ray turns into this machine's reachable address)."""
    register_configs()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address=loopback_node_ip(),
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


def run_job(overrides: list[str]) -> tuple[dict, list[dict]]:
    """Compose the config as the launcher does, run it; its summary and metrics rows."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = to_config(compose("config", overrides=overrides))
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_experiment(cfg, tmp)
        with (Path(tmp) / "metrics.csv").open() as fh:
            rows = list(csv.DictReader(fh))
    return summary, rows


def write_csv(rows: list[dict], path: Path) -> None:
    """``rows`` (dicts with the same keys) as a CSV file at ``path``, folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
