"""A job's set-up against ``ray.init()``'s own time, side by side (issue #25).

    .venv/bin/python benchmarks/setup.py [--repeats 3] [extra overrides]

Interleaved, ``--repeats`` times each, in fresh processes as a user starts them:

- ``ray.init()``: a new Python process imports ray and times ``ray.init()`` with the
  arguments fedray's embedded Ray uses (2 CPUs, no dashboard, loopback);
- the launcher: ``python -m fedray.launch rounds=1`` (plaintext and the default
  encrypted job), timed from the process's start to the start of round 1 (the moment
  round 1's progress line appears, less the round's own seconds that line reports).

The target: the launcher's set-up <= ray.init() + 2 s. One warm-up job first fills the
bundled data's split cache (``~/.cache/fedray``), as any second job of a user finds it.
Writes benchmarks/results/setup.txt.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import figure

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/setup.txt"
TARGET_S = 2.0
RAY_INIT = """
import time, logging, ray
from fedray.runtime.cluster import loopback_node_ip
t = time.perf_counter()
ray.init(address="local", num_cpus=2, include_dashboard=False,
         _node_ip_address=loopback_node_ip(), logging_level=logging.WARNING)
print(time.perf_counter() - t)
ray.shutdown()
"""
ROUND_1 = re.compile(r"round\s+1/\d+ .*\| ([0-9.]+)s$")
VARIANTS = {"plaintext": ["crypto=none"], "encrypted (default)": []}


def ray_init_seconds(env: dict[str, str]) -> float:
    out = subprocess.run(
        [sys.executable, "-c", RAY_INIT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"ray.init() failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def launcher_seconds(overrides: list[str], env: dict[str, str]) -> tuple[float, float]:
    """From the launcher's start to the start of round 1, and round 1's own seconds."""
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedray.launch",
                "rounds=1",
                *overrides,
                f"hydra.run.dir={run_dir}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen = None
        for line in proc.stdout:
            m = ROUND_1.search(line.rstrip())
            if m and seen is None:
                seen = time.perf_counter() - start - float(m.group(1)), float(m.group(1))
        if proc.wait() != 0 or seen is None:
            raise SystemExit(f"the job {overrides} failed or printed no round 1")
        return seen


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args, extra = ap.parse_known_args(argv)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    load_start = os.getloadavg()[0]
    launcher_seconds(["crypto=none", *extra], env)  # warm-up: the split cache
    time.sleep(5)
    times: dict[str, list[float]] = {"ray.init()": [], **{v: [] for v in VARIANTS}}
    first: dict[str, list[float]] = {v: [] for v in VARIANTS}  # round 1's own seconds
    for _ in range(args.repeats):
        times["ray.init()"].append(ray_init_seconds(env))
        for name, overrides in VARIANTS.items():
            setup, round_1 = launcher_seconds([*overrides, *extra], env)
            times[name].append(setup)
            first[name].append(round_1)
    load_end = os.getloadavg()[0]
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ray_init = medians["ray.init()"]
    lines = [
        f"Job set-up, {args.repeats} runs each, interleaved; median (all runs) in seconds",
        f"load average {load_start:.2f} -> {load_end:.2f} on {os.cpu_count()} cores",
        f"{'':28s} {'median':>7s}  {'over ray.init()':>15s}  runs",
    ]
    for name, ts in times.items():
        over = "" if name == "ray.init()" else f"+{medians[name] - ray_init:.2f}"
        runs = ", ".join(f"{t:.2f}" for t in ts)
        lines.append(f"{name:28s} {medians[name]:7.2f}  {over:>15s}  {runs}")
    for name in VARIANTS:
        lines.append(
            f"{name}: round 1 (actors' first training) {statistics.median(first[name]):.2f} s"
        )
    for name in VARIANTS:
        gap = medians[name] - ray_init
        verdict = "met" if gap <= TARGET_S else "NOT met"
        lines.append(
            f"target: {name} set-up <= ray.init() + {TARGET_S:g} s: +{gap:.2f} s, {verdict}"
        )
        figure(f"setup_over_ray_init_{name.split()[0]}", gap, "s")
    figure("ray_init_seconds", ray_init, "s")
    text = "\n".join(lines)
    print(text)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
