"""Cost of drawing DP noise from the OS CSPRNG (the default) versus numpy's seeded PCG64.

.venv/bin/python benchmarks/noise.py

The issue's budget: the CSPRNG path costs at most 2x numpy per million values. Prints the
best of ``repeats`` timings for each and their ratio (the machine may be shared: the
best-of figure is the least disturbed one).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _report import figure

from fedray.privacy.mechanisms import os_random_bytes, secure_standard_normal


def best_ms(draw, repeats: int) -> float:
    draw()  # warm-up: first-call imports and page faults
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        draw()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main(size: int = 1_000_000, repeats: int = 15) -> None:
    rng = np.random.default_rng(0)
    numpy_ms = best_ms(lambda: rng.standard_normal(size), repeats)
    secure_ms = best_ms(lambda: secure_standard_normal(size), repeats)
    rows = [
        ("numpy PCG64, seeded (privacy.reproducible_noise=true)", numpy_ms),
        ("AES-CTR keyed by os.urandom + Box-Muller (default)", secure_ms),
        (
            "  of which random bytes (AES-CTR, 12 B per pair)",
            best_ms(lambda: os_random_bytes(6 * size), repeats),
        ),
        (
            "  os.urandom for the same bytes, for comparison",
            best_ms(lambda: os.urandom(6 * size), repeats),
        ),
    ]
    for name, ms in rows:
        print(f"{name:<58} {ms:8.2f} ms per {size:,} values")
    print(f"ratio default / numpy: {secure_ms / numpy_ms:.2f}x (budget: 2x)")
    per_million = 1e6 / size
    figure("csprng normal draws", secure_ms * per_million, "ms per 1M values")
    figure("numpy normal draws", numpy_ms * per_million, "ms per 1M values")
    figure("csprng / numpy", secure_ms / numpy_ms, "ratio")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="values per draw")
    parser.add_argument("--repeats", type=int, default=15, help="timings, the best is kept")
    args = parser.parse_args()
    main(args.size, args.repeats)
