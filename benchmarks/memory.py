"""Peak memory of a 1000-client simulation, all processes together (driver, Ray, actors).

    .venv/bin/python benchmarks/memory.py            # the issue's run
    .venv/bin/python benchmarks/memory.py num_clients=5000

Prints peak summed RSS (counts shared pages once per process) and PSS (shared pages
split between processes: the honest "all processes together" figure).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import run_and_measure  # noqa: E402
from _report import figure  # noqa: E402

DEFAULT = [
    "dataset=synthetic",
    "num_clients=1000",
    "clients_per_round=100",
    "rounds=10",
    "crypto=none",
]


def main() -> None:
    overrides = DEFAULT + sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedray.launch", *overrides, f"hydra.run.dir={tmp}"]
        res = run_and_measure(cmd)
    if res["returncode"] != 0:
        print(res["output"][-3000:])
        raise SystemExit(f"run failed with exit code {res['returncode']}")
    tail = [ln for ln in res["output"].splitlines() if ln.startswith("[fedray] done")]
    print(" ".join(overrides))
    print(tail[-1] if tail else "")
    print(f"peak PSS, all processes: {res['pss'] / 2**30:.2f} GiB")
    print(f"peak RSS, all processes: {res['rss'] / 2**30:.2f} GiB")
    print(f"processes at peak: {res['processes']}, wall time {res['seconds']:.1f}s")
    figure("peak PSS, all processes", res["pss"] / 2**30, "GiB")
    figure("peak RSS, all processes", res["rss"] / 2**30, "GiB")


if __name__ == "__main__":
    main()
