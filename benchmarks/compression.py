"""Compression of plaintext updates: bytes sent against accuracy (issue 14).

    .venv/bin/python benchmarks/compression.py [--update-results] [extra overrides]

Runs the same job with compression=none, int8 and topk (compression.topk_fraction 0.01 and
0.1) on one embedded Ray and prints, per variant: bytes each client sends per round, its
ratio to float32 updates, and the final test accuracy. The job is digits with a
Dirichlet(0.5) label skew over 20 clients (10 a round, 30 rounds): small enough for 2 cores,
hard enough for lost precision to show. Writes compression.csv and compression.txt into
results_tmp/ (untracked), or benchmarks/results/ with --update-results.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

from _jobs import DIGITS_SKEW, embedded_ray, run_job, write_csv

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    *DIGITS_SKEW,
    "rounds=30",
    "lr=0.05",
    "crypto=none",
    "checkpoint.every=0",
    "progress=false",
]
VARIANTS = {
    "none": ["compression=none"],
    "int8": ["compression=int8"],
    "topk 10%": ["compression=topk", "compression.topk_fraction=0.1"],
    "topk 1%": ["compression=topk", "compression.topk_fraction=0.01"],
}


def main() -> None:
    args = sys.argv[1:]
    update = "--update-results" in args
    extra = [a for a in args if a != "--update-results"]
    rows = []
    with embedded_ray():
        for name, over in VARIANTS.items():
            t0 = time.perf_counter()
            summary, _ = run_job([*BASE, *over, *extra])
            per_update = summary["bytes_up"] / max(summary["updates_up"], 1)
            rows.append(
                {
                    "compression": name,
                    "bytes_per_client_round": round(per_update),
                    "vs_float32": round(per_update / (4 * summary["num_parameters"]), 4),
                    "final_accuracy": round(summary["final_accuracy"], 4),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(rows[-1], flush=True)
    out = ROOT / ("benchmarks/results" if update else "results_tmp")
    write_csv(rows, out / "compression.csv")
    lines = [
        f"<!-- {platform.machine()}, {time.strftime('%Y-%m-%d')}: "
        f"python benchmarks/compression.py {' '.join(extra)} -->",
        "| compression | bytes per client per round | vs float32 | final accuracy |",
        "|---|---|---|---|",
        *(
            f"| {r['compression']} | {r['bytes_per_client_round']:,} | {r['vs_float32']:.3f} "
            f"| {r['final_accuracy']:.4f} |"
            for r in rows
        ),
    ]
    (out / "compression.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
