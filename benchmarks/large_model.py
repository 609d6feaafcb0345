"""Federated LoRA on the tiny local BERT: plaintext against Paillier, per round phase.

    .venv/bin/python benchmarks/large_model.py                 # r = 4, 8, 16; 5 rounds each
    .venv/bin/python benchmarks/large_model.py rounds=3        # extra overrides for every job

For each LoRA rank and each of crypto=none|paillier it runs the 10-site text_synthetic job
(`python -m fedray.launch`, embedded Ray) and reports per-round seconds by phase (train,
encrypt, aggregate, decrypt: means over rounds, summed over a round's clients for train and
encrypt), bytes sent per client per round, exchanged values, final accuracy, and the peak
RSS of the largest client-host process (a "host"). Writes benchmarks/results/large_model.csv,
large_model.txt and large_model.png.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RANKS = (4, 8, 16)
CRYPTO = ("none", "paillier")
PHASES = ("train_seconds", "encrypt_seconds", "aggregate_seconds", "decrypt_seconds")
BASE = ["dataset=text_synthetic", "model=hf", "num_clients=10", "clients_per_round=10",
        "rounds=5", "checkpoint.every=0"]  # fmt: skip


def run_measuring_hosts(cmd: list[str], interval: float = 1.0) -> tuple[int, str, int]:
    """Run ``cmd``; (exit code, output, peak RSS of its largest ClientHost process)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    peak = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                if "ClientHost" in " ".join(p.cmdline()):
                    peak = max(peak, p.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(interval)
    reader.join(timeout=5)
    return proc.returncode, "".join(out), peak


def run(model_dir: Path, rank: int, crypto: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*BASE, f"model.path={model_dir}", f"model.lora.r={rank}",
                     f"crypto={crypto}", *extra, f"hydra.run.dir={tmp}"]  # fmt: skip
        code, output, peak = run_measuring_hosts(
            [sys.executable, "-m", "fedray.launch", *overrides]
        )
        if code != 0:
            print(output[-3000:])
            raise SystemExit(f"lora r={rank} crypto={crypto} failed (exit {code})")
        import json

        summary = json.loads((Path(tmp) / "summary.json").read_text())
        with (Path(tmp) / "metrics.csv").open() as fh:
            rows = list(csv.DictReader(fh))
    rounds = len(rows)
    later = rows[1:] or rows  # round 1 pays for warm-up
    row = {
        "lora_r": rank,
        "crypto": crypto,
        "exchanged_values": summary["num_parameters"],
        "model_parameters": summary["num_model_parameters"],
        "round_seconds": sum(float(r["seconds"]) for r in later) / len(later),
        **{p: sum(float(r[p] or 0) for r in later) / len(later) for p in PHASES},
        "bytes_per_client_round": summary["bytes_up"] / rounds / summary["clients_per_round"],
        "final_accuracy": summary["final_accuracy"],
        "host_peak_rss_mib": peak / 2**20,
    }
    print(row, flush=True)
    return row


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "large_model.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = ("| r | crypto | exchanged | % of model | round s | train | encrypt | aggregate "
              "| decrypt | bytes/client/round | accuracy | host peak RSS MiB |")  # fmt: skip
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['lora_r']} | {r['crypto']} | {r['exchanged_values']:,} | "
            f"{100 * r['exchanged_values'] / r['model_parameters']:.1f} | "
            f"{r['round_seconds']:.2f} | {r['train_seconds']:.2f} | {r['encrypt_seconds']:.3f} | "
            f"{r['aggregate_seconds']:.3f} | {r['decrypt_seconds']:.3f} | "
            f"{r['bytes_per_client_round']:,.0f} | {r['final_accuracy']:.3f} | "
            f"{r['host_peak_rss_mib']:.0f} |"
        )
    table = "\n".join(lines)
    (RESULTS / "large_model.txt").write_text(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"r={r['lora_r']}\n{r['crypto']}" for r in rows]
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        values = [r[phase] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=phase.removesuffix("_seconds"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds per round (train summed over clients)")
    ax.set_title("Federated LoRA on the tiny BERT: where a round's time goes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "large_model.png", dpi=120)


def main() -> None:
    from fedray.tools.tiny_model import write_tiny_model

    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as model_dir:
        write_tiny_model(model_dir)
        rows = [run(Path(model_dir), r, c, extra) for r in RANKS for c in CRYPTO]
    write(rows)


if __name__ == "__main__":
    main()
