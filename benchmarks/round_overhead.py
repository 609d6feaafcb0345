"""Seconds per round of the default job, encrypted (2048-bit) versus plaintext.

    .venv/bin/python benchmarks/round_overhead.py [--repeats 3] [extra overrides]

Runs each variant ``--repeats`` times, interleaved, on one embedded 2-CPU Ray with the
same seed, and reports the median over runs of the mean round time (round 1, the
warm-up where actors import torch and build tables, is excluded). Variants:

- plaintext: ``crypto=none``;
- encrypted, the default (threshold custody): each host seals the sum of its clients once
  (``crypto.host_sum``) with the public key, and the key holders' share sums open the sum
  (``crypto.fast_decrypt``);
- encrypted, one update per client (``crypto.host_sum=false``): what each site does in a
  deployment, here all on 2 cores;
- encrypted, per client, partial decryptions (``crypto.fast_decrypt=false`` too);
- encrypted, shared custody (``crypto.custody=shared``): every host holds the key.

The acceptance targets: the default <= 5x a plaintext round, one update per client <= 8x.
Also prints where an encrypted round goes.
"""

from __future__ import annotations

import argparse
import statistics

from _jobs import embedded_ray, run_job
from _report import figure

TARGETS = {"encrypted (default)": 5.0, "encrypted, per-client updates": 8.0}
VARIANTS = {
    "plaintext": ["crypto=none"],
    "encrypted (default)": ["crypto=paillier"],
    "encrypted, per-client updates": ["crypto=paillier", "crypto.host_sum=false"],
    "encrypted, per-client, partial decryptions": [
        "crypto=paillier",
        "crypto.host_sum=false",
        "crypto.fast_decrypt=false",
    ],
    "encrypted, shared custody": ["crypto=paillier", "crypto.custody=shared"],
}
PHASES = ("train_seconds", "encrypt_seconds", "aggregate_seconds", "decrypt_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args, extra = parser.parse_known_args()
    means: dict[str, list[float]] = {name: [] for name in VARIANTS}
    last: dict[str, tuple[dict, list[dict]]] = {}
    with embedded_ray():
        for _ in range(args.repeats):
            for name, overrides in VARIANTS.items():
                summary, rows = run_job(["progress=false", *overrides, *extra])
                rows = rows[1:]  # round 1 is the warm-up
                means[name].append(statistics.mean(float(r["seconds"]) for r in rows))
                last[name] = (summary, rows)

    plain = statistics.median(means["plaintext"])
    print(f"default job, {args.repeats} runs per variant, median of per-run mean round time")
    print(f"{'variant':<44} {'round':>9} {'ratio':>7} {'accuracy':>9}  decrypted by")
    for name in VARIANTS:
        median = statistics.median(means[name])
        summary, rows = last[name]
        by = ",".join(sorted({r["decrypted_by"] for r in rows} - {""})) or "-"
        print(
            f"{name:<44} {median * 1e3:7.1f} ms {median / plain:6.1f}x "
            f"{summary['final_accuracy']:9.4f}  {by}"
        )
    print("\nwhere a round goes (ms, mean over rounds of the last run; train and encrypt are")
    print("summed over the hosts' calls, which run in parallel on the 2 cores):")
    print(f"{'variant':<44} " + " ".join(f"{p.split('_')[0]:>9}" for p in PHASES) + "  updates")
    for name in VARIANTS:
        rows = last[name][1]
        cells = " ".join(
            f"{statistics.mean(float(r[p] or 0) for r in rows) * 1e3:9.1f}" for p in PHASES
        )
        updates = statistics.mean(float(r["updates_up"]) for r in rows)
        print(f"{name:<44} {cells}  {updates:7.0f}")
    print()
    for name, target in TARGETS.items():
        ratio = statistics.median(means[name]) / plain
        verdict = "met" if ratio <= target else "NOT met"
        print(f"target: {name} <= {target:.0f}x plaintext: {ratio:.1f}x, {verdict}")
    figure("plaintext round", plain * 1e3, "ms")
    for name in VARIANTS:
        if name != "plaintext":
            figure(f"{name} / plaintext round", statistics.median(means[name]) / plain, "ratio")


if __name__ == "__main__":
    main()
