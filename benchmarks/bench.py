"""Run the benchmarks behind README's figures and write one results file (JSON) per run.

    make bench                                   # all of them (long: about an hour on 2 cores)
    make bench BENCH_ARGS="--only crypto --only noise"
    .venv/bin/python benchmarks/bench.py --only noise --args noise="--size 100000"

Each benchmark runs as its own process, its output shown as it comes; the figures it
marks (``benchmarks/_report.py``) go into ``benchmarks/results/runs/<UTC time>-<commit>.json``
(``--out`` for another folder) with the commit (and whether the tree had changes), the
machine, the installed versions and the load average before and after each benchmark,
since a shared machine's figures mean little without it. A failed benchmark is recorded
with its exit code and the last lines of its output; the others still run and the file is
still written; the exit code is then 1. Compare two files with ``benchmarks/compare.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import parse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# name -> (script, what README quotes from it); the order is the order they run in.
BENCHMARKS = {
    "crypto": ("crypto.py", "values per ciphertext, bytes per value, values/s, opening 1M"),
    "round_overhead": ("round_overhead.py", "encrypted / plaintext round of the default job"),
    "setup": ("setup.py", "a job's set-up against ray.init()'s own time"),
    "scaling": ("scaling.py", "round of 100 of 1000 clients, 1 -> 2 cores"),
    "memory": ("memory.py", "peak memory of a 1000-client simulation"),
    "noise": ("noise.py", "DP noise from the OS CSPRNG against numpy"),
    "cross_org_rounds": (
        "cross_org_rounds.py",
        "3 site clusters against one cluster: federation set-up, round-time ratio",
    ),
}
TAIL_LINES = 30


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("fedray", "torch", "ray", "numpy", "gmpy2", "phe"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": bool(os.environ.get("CUDA_VISIBLE_DEVICES")),
    }


def run_one(name: str, script: str, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *extra]
    print(f"== {name}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    load_before = list(os.getloadavg())
    t0 = time.monotonic()
    lines: list[str] = []
    with subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(line, end="", flush=True)
    seconds = time.monotonic() - t0
    output = "\n".join(lines)
    record = {
        "command": " ".join(shlex.quote(c) for c in ["python", *cmd[1:]]),
        "exit_code": proc.returncode,
        "seconds": round(seconds, 2),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "figures": parse(output),
    }
    if proc.returncode != 0:
        record["output_tail"] = lines[-TAIL_LINES:]
        print(f"== {name} FAILED (exit {proc.returncode}) after {seconds:.0f} s", flush=True)
    else:
        print(f"== {name}: {len(record['figures'])} figures in {seconds:.0f} s", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only", action="append", choices=list(BENCHMARKS), help="run only this (repeatable)"
    )
    ap.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help='extra arguments for one benchmark, e.g. noise="--size 100000"',
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/runs")
    args = ap.parse_args(argv)
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, sep, value = item.partition("=")
        if not sep or name not in BENCHMARKS:
            ap.error(
                f"--args {item!r}: expected NAME=ARGS with NAME one of {', '.join(BENCHMARKS)}"
            )
        extra[name] = shlex.split(value)
    chosen = [n for n in BENCHMARKS if not args.only or n in args.only]
    commit = _git("rev-parse", "HEAD")
    started = dt.datetime.now(dt.UTC)
    result = {
        "format": 1,
        "started": started.isoformat(timespec="seconds"),
        "commit": commit,
        "tree_changed": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": machine(),
        "versions": _versions(),
        "benchmarks": {},
    }
    for name in chosen:
        script, _ = BENCHMARKS[name]
        result["benchmarks"][name] = run_one(name, script, extra.get(name, []))
    result["seconds"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started:%Y%m%dT%H%M%SZ}-{(commit or 'nogit')[:8]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    failed = [n for n, r in result["benchmarks"].items() if r["exit_code"] != 0]
    print(f"results: {path}" + (f" (failed: {', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
