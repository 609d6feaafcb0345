"""Cost of drawing DP noise from the OS CSPRNG (privacy.secure_rng=true) versus numpy.

.venv/bin/python benchmarks/noise.py
"""

from __future__ import annotations

import time

import numpy as np

from fedray.privacy.mechanisms import secure_standard_normal


def main(size: int = 1_000_000, repeats: int = 5) -> None:
    rng = np.random.default_rng(0)
    for name, draw in (
        ("numpy PCG64 (default)", lambda: rng.standard_normal(size)),
        ("os.urandom + Box-Muller (secure_rng=true)", lambda: secure_standard_normal(size)),
    ):
        t = time.perf_counter()
        for _ in range(repeats):
            draw()
        per = (time.perf_counter() - t) / repeats
        print(f"{name:<45} {per * 1e3:8.1f} ms per {size:,} values")


if __name__ == "__main__":
    main()
