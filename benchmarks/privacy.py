"""Accuracy versus epsilon on breast_cancer: client-level DP under 2048-bit Paillier.

    .venv/bin/python benchmarks/privacy.py [extra overrides]

Distributed noise (each sampled client adds its share before encrypting), 5 of 10
clients per round (Poisson rate 0.5), 30 rounds, delta = 1e-5, for several noise
multipliers, plus the no-DP baseline. Writes benchmarks/results/privacy.csv and
privacy.png and prints a markdown table.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _jobs import embedded_ray, run_job  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ["clients_per_round=5", "rounds=30", "checkpoint.every=0", "progress=false"]
SIGMAS = [0.5, 0.8, 1.2, 2.0, 4.0]


def _run(overrides: list[str]) -> dict:
    return run_job([*BASE, *overrides, *sys.argv[1:]])[0]


def main() -> None:
    rows = []
    with embedded_ray():
        base = _run([])
        for sigma in SIGMAS:
            s = _run(["privacy=dp", f"privacy.noise_multiplier={sigma}", "privacy.clip_norm=1.0"])
            rows.append(
                {
                    "noise_multiplier": sigma,
                    "epsilon": round(s["epsilon"], 3),
                    "accuracy": round(s["final_accuracy"], 4),
                }
            )
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "privacy.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["noise_multiplier", "epsilon", "accuracy"])
        w.writeheader()
        w.writerows(rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(
        [r["epsilon"] for r in rows],
        [r["accuracy"] for r in rows],
        "o-",
        label="DP-FedAvg, distributed noise",
    )
    for r in rows:
        ax.annotate(
            f"σ={r['noise_multiplier']}",
            (r["epsilon"], r["accuracy"]),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=8,
        )
    ax.axhline(base["final_accuracy"], color="gray", ls="--", label="no DP")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([2, 5, 10, 20, 50, 100])
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylim(min(r["accuracy"] for r in rows) - 0.05, 1.0)
    ax.set_xlabel("ε at δ = 1e-5 (30 rounds, q = 0.5)")
    ax.set_ylabel("test accuracy")
    ax.set_title("breast_cancer, 10 clients, 2048-bit Paillier")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "privacy.png", dpi=120)
    print(f"no DP: accuracy {base['final_accuracy']:.4f}")
    print("| noise multiplier σ | ε at δ=1e-5 | test accuracy |")
    print("|---:|---:|---:|")
    for r in rows:
        print(f"| {r['noise_multiplier']} | {r['epsilon']:.2f} | {r['accuracy']:.4f} |")


if __name__ == "__main__":
    main()
