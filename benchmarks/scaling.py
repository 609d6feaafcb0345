"""Scaling study: seconds per round and client updates per second, with peak memory.

    .venv/bin/python benchmarks/scaling.py              # every sweep (~10 minutes on 2 cores)
    .venv/bin/python benchmarks/scaling.py --only cpus  # one sweep: clients|cpus|crypto|model
                                                        # (other sweeps kept from scaling.csv)

Each point runs ``python -m fedray.launch`` in its own process tree on FedProx Synthetic
(MLP 60-128-10, 100 samples per client, 1 local epoch, batch 32) and samples the peak
memory of all its processes (PSS). Round 1 (actor warm-up) is left out of the means.
Writes benchmarks/results/scaling.csv and scaling.png and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import run_and_measure  # noqa: E402
from _report import figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
BASE = [
    "dataset=synthetic",
    "dataset.samples_per_client=100",
    "local_epochs=1",
    "batch_size=32",
    "lr=0.05",
    "checkpoint.every=0",
    "crypto=none",
]


def sweeps() -> dict[str, list[tuple[str, list[str]]]]:
    per_round = lambda n: min(100, n)  # noqa: E731
    return {
        "clients": [
            (f"{n} clients", [f"num_clients={n}", f"clients_per_round={per_round(n)}", "rounds=6"])
            for n in (10, 100, 1000, 5000)
        ],
        # The whole process tree (driver, Ray, server, actors) is pinned to the cores with
        # taskset, so "1 CPU" really is one core, not one Ray CPU beside a free second core.
        "cpus": [
            (label, ["num_clients=1000", "clients_per_round=100", "rounds=10", *extra])
            for label, extra in (
                ("1 core, 1 actor", ["@cores=0", "ray.num_cpus=1"]),
                ("2 cores, 2 actors", ["@cores=0,1", "ray.num_cpus=2"]),
                ("2 cores, 4 actors", ["@cores=0,1", "ray.num_cpus=2", "client.num_cpus=0.5"]),
            )
        ],
        "crypto": [
            (label, ["num_clients=1000", "clients_per_round=100", "rounds=4", *extra])
            for label, extra in (
                ("none", []),
                ("paillier 2048", ["crypto=paillier", "crypto.key_bits=2048"]),
                ("paillier 3072", ["crypto=paillier", "crypto.key_bits=3072"]),
                # One update per client, as if each were its own site: the per-client cost.
                ("paillier 2048 per client", ["crypto=paillier", "crypto.host_sum=false"]),
            )
        ],
        "model": [
            (
                f"hidden {h}",
                ["num_clients=1000", "clients_per_round=100", "rounds=5", f"model.hidden={h}"],
            )
            for h in (32, 128, 512, 2048)
        ],
    }


def run_point(sweep: str, label: str, overrides: list[str]) -> dict:
    cores = [o.split("=", 1)[1] for o in overrides if o.startswith("@cores=")]
    overrides = [o for o in overrides if not o.startswith("@cores=")]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedray.launch", *BASE, *overrides, f"hydra.run.dir={tmp}"]
        if cores:
            cmd = ["taskset", "-c", cores[0], *cmd]
        res = run_and_measure(cmd, cwd=ROOT)
        if res["returncode"] != 0:
            print(res["output"][-2000:])
            raise SystemExit(f"{label}: exit code {res['returncode']}")
        with (Path(tmp) / "metrics.csv").open() as fh:
            rows = list(csv.DictReader(fh))[1:]
        import json

        summary = json.loads((Path(tmp) / "summary.json").read_text())
    seconds = statistics.mean(float(r["seconds"]) for r in rows)
    clients = statistics.mean(int(r["clients_ok"]) for r in rows)
    return {
        "sweep": sweep,
        "point": label,
        "num_clients": summary["num_clients"],
        "num_parameters": summary["num_parameters"],
        "num_actors": summary["num_actors"],
        "seconds_per_round": round(seconds, 4),
        "updates_per_second": round(clients / seconds, 1),
        "peak_pss_gib": round(res["pss"] / 2**30, 3),
        "peak_rss_gib": round(res["rss"] / 2**30, 3),
        "accuracy": round(summary["final_accuracy"], 4),
    }


def plot(rows: list[dict]) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    by = lambda s: [r for r in rows if r["sweep"] == s]  # noqa: E731
    if by("clients"):
        ax = axes[0][0]
        pts = by("clients")
        ax.plot(
            [r["num_clients"] for r in pts],
            [r["seconds_per_round"] for r in pts],
            "o-",
            label="s / round",
        )
        ax.set_xscale("log")
        ax.set_xlabel("clients (100 sampled per round; 10 for 10)")
        ax.set_ylabel("seconds per round")
        ax2 = ax.twinx()
        ax2.plot(
            [r["num_clients"] for r in pts],
            [r["peak_pss_gib"] for r in pts],
            "s--",
            color="C1",
            label="peak GiB",
        )
        ax2.set_ylabel("peak memory, all processes (GiB PSS)")
        ax.set_title("clients")
    for ax, sweep, title in (
        (axes[0][1], "cpus", "cores and actors (1000 clients, 100/round)"),
        (axes[1][0], "crypto", "encryption (1000 clients, 100/round)"),
    ):
        pts = by(sweep)
        if not pts:
            continue
        ax.bar(range(len(pts)), [r["updates_per_second"] for r in pts], color="C0")
        ax.set_xticks(range(len(pts)))
        ax.set_xticklabels([r["point"] for r in pts], rotation=15, fontsize=8)
        ax.set_ylabel("client updates per second")
        ax.set_yscale("log" if sweep == "crypto" else "linear")
        ax.set_title(title)
        for i, r in enumerate(pts):
            ax.annotate(
                f"{r['updates_per_second']:,.0f}",
                (i, r["updates_per_second"]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    if by("model"):
        ax = axes[1][1]
        pts = by("model")
        ax.plot([r["num_parameters"] for r in pts], [r["seconds_per_round"] for r in pts], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("model parameters (MLP hidden width 32..2048)")
        ax.set_ylabel("seconds per round")
        ax.set_title("model size (1000 clients, 100/round)")
    fig.suptitle("fedray on 2 cores (x86_64, 24 GiB, no GPU)")
    fig.tight_layout()
    fig.savefig(OUT / "scaling.png", dpi=110)


def _line(row: dict) -> str:
    return (
        f"{row['sweep']:<7} {row['point']:<32} {row['seconds_per_round']:>8.3f} s/round "
        f"{row['updates_per_second']:>9,.0f} updates/s  peak {row['peak_pss_gib']:.2f} GiB"
    )


def _typed(row: dict) -> dict:
    """A row read back from scaling.csv, with its numbers as numbers."""
    out = dict(row)
    for key in ("num_clients", "num_parameters", "num_actors"):
        out[key] = int(row[key])
    for key in ("seconds_per_round", "updates_per_second", "peak_pss_gib", "peak_rss_gib"):
        out[key] = float(row[key])
    out["accuracy"] = float(row["accuracy"]) if row["accuracy"] else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", choices=list(sweeps()), action="append")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    fresh = {}
    for sweep, points in sweeps().items():
        if args.only and sweep not in args.only:
            continue
        fresh[sweep] = []
        for label, overrides in points:
            row = run_point(sweep, label, overrides)
            fresh[sweep].append(row)
            print(f"(measured) {_line(row)}", flush=True)
            figure(f"{sweep}: {label}", row["seconds_per_round"], "s per round")
    # --only keeps the other sweeps' rows from the last full run.
    kept = {}
    if args.only and (OUT / "scaling.csv").exists():
        with (OUT / "scaling.csv").open() as fh:
            for r in csv.DictReader(fh):
                if r["sweep"] not in fresh:
                    kept.setdefault(r["sweep"], []).append(_typed(r))
    rows = [r for sweep in sweeps() for r in fresh.get(sweep, kept.get(sweep, []))]
    print()
    for row in rows:
        print(_line(row))
    with (OUT / "scaling.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows)
    cpus = {r["point"]: r["updates_per_second"] for r in rows if r["sweep"] == "cpus"}
    if "1 core, 1 actor" in cpus and "2 cores, 2 actors" in cpus:
        ratio = cpus["2 cores, 2 actors"] / cpus["1 core, 1 actor"]
        print(f"1 -> 2 cores at 1000 clients: {ratio:.2f}x client updates per second")
        if "cpus" in fresh:
            figure("1 -> 2 cores, client updates per second", ratio, "ratio", better="higher")


if __name__ == "__main__":
    main()
