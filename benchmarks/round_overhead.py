"""Seconds per round of the default job, encrypted (2048-bit) versus plaintext.

    .venv/bin/python benchmarks/round_overhead.py [extra overrides]

Runs both jobs on one embedded Ray with the same seed; round 1 (warm-up: actors import
torch, build tables) is excluded from the means. Prints where an encrypted round goes.
"""

from __future__ import annotations

import csv
import statistics
import sys
import tempfile
from pathlib import Path

import ray
from hydra import compose, initialize_config_dir

from fedray.config import register_configs, to_config
from fedray.runtime.driver import run_experiment

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    register_configs()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    results = {}
    try:
        for crypto in ("none", "paillier"):
            with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
                raw = compose(
                    "config", overrides=[f"crypto={crypto}", "progress=false", *sys.argv[1:]]
                )
            cfg = to_config(raw)
            with tempfile.TemporaryDirectory() as tmp:
                summary = run_experiment(cfg, tmp)
                rows = list(csv.DictReader((Path(tmp) / "metrics.csv").open()))[1:]
            results[crypto] = (summary, rows)
    finally:
        ray.shutdown()
    plain = statistics.mean(float(r["seconds"]) for r in results["none"][1])
    enc_rows = results["paillier"][1]
    enc = statistics.mean(float(r["seconds"]) for r in enc_rows)
    print(
        f"plaintext round: {plain * 1e3:.1f} ms   accuracy {results['none'][0]['final_accuracy']:.4f}"
    )
    print(
        f"encrypted round: {enc * 1e3:.1f} ms   accuracy {results['paillier'][0]['final_accuracy']:.4f}"
    )
    print(f"ratio: {enc / plain:.1f}x")
    for key in ("encrypt_seconds", "aggregate_seconds", "decrypt_seconds"):
        mean = statistics.mean(float(r[key]) for r in enc_rows)
        print(f"  {key:<18} {mean * 1e3:7.1f} ms (summed over clients for encrypt)")


if __name__ == "__main__":
    main()
