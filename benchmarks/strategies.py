"""Every strategy on digits, Dirichlet(alpha=0.5) label skew over 20 clients.

    .venv/bin/python benchmarks/strategies.py [--update-results] [extra overrides]

Plaintext updates (the robust aggregators need them), one embedded Ray for all runs.
Prints a markdown table and writes strategies.csv into results_tmp/ (untracked); with
--update-results, into benchmarks/results/ (the tracked figures that
docs/benchmarks/strategies.md cites).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _jobs import DIGITS_SKEW, embedded_ray, run_job, write_csv

from fedray.config import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    *DIGITS_SKEW,
    "rounds=40",
    "local_epochs=2",
    "lr=0.05",
    "crypto=none",
    "checkpoint.every=0",
    "progress=false",
]


def main() -> None:
    args = sys.argv[1:]
    update = "--update-results" in args
    overrides = [a for a in args if a != "--update-results"]
    rows = []
    with embedded_ray():
        for name in STRATEGIES:
            t = time.perf_counter()
            summary, _ = run_job([*BASE, f"strategy={name}", *overrides])
            rows.append(
                {
                    "strategy": name,
                    "final_accuracy": round(summary["final_accuracy"], 4),
                    "final_fed_val_accuracy": round(summary["final_fed_val_accuracy"], 4),
                    "rounds": summary["rounds_completed"],
                    "seconds": round(time.perf_counter() - t, 1),
                }
            )
    out = (ROOT / "benchmarks" / "results" if update else ROOT / "results_tmp") / "strategies.csv"
    write_csv(rows, out)
    print(f"wrote {out.relative_to(ROOT)}")
    print(" ".join(BASE[:-2]))
    print("| strategy | test accuracy | clients' held-out accuracy | seconds |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['strategy']} | {r['final_accuracy']:.4f} | {r['final_fed_val_accuracy']:.4f} "
            f"| {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
