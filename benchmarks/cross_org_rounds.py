"""A federation of three site clusters against one cluster: set-up and round time (#23).

    .venv/bin/python benchmarks/cross_org_rounds.py            # 2048-bit key, 6 rounds
    .venv/bin/python benchmarks/cross_org_rounds.py --rounds 10 --key-bits 3072

The default encrypted job (breast cancer, 10 clients, threshold Paillier, model checks
on) across organisations: sites a, b and c (4, 3 and 3 clients), each
``python -m fedray.site`` in its own process with its own embedded Ray (one CPU), started
one after another, dialling a coordinator (this process, ``run_experiment`` with
``federation=cross_org`` on its own embedded Ray, two CPUs). Then the same job in one
cluster (three client actors). Everything on this machine, over 127.0.0.1 with mTLS.

Prints the set-up (the key dealt at site a; each site's start, its Ray included; the
coordinator's ``setup_seconds``, from its start to round 1 while the sites start; the
wall clock from the dealing to round 1) and the median round time after round 1 of each
deployment, with their ratio, and the machine's load. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _jobs import embedded_ray, run_job
from _report import figure

ROOT = Path(__file__).resolve().parents[1]

SITES = {"a": 4, "b": 3, "c": 3}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_site(site: str, job: list[str], home: Path, log: Path) -> subprocess.Popen:
    """One site agent; returns once its Ray, host and key holder are up."""
    home.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedray.site", "ray.num_cpus=1", f"federation.party={site}",
             *job],
            cwd=ROOT,
            env={**os.environ, "HOME": str(home)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while "clients ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"site {site} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def _median_round(rows: list[dict]) -> float:
    return statistics.median(float(r["seconds"]) for r in rows[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--key-bits", type=int, default=2048)
    args = parser.parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds must be at least 2 (round 1 is left out of the median)")
    from fedray.tools.certs import make_federation
    from fedray.tools.keys import deal

    load_start = os.getloadavg()[0]
    job = [
        f"num_clients={sum(SITES.values())}",
        f"rounds={args.rounds}",
        f"crypto.key_bits={args.key_bits}",
        "dataset.weight_ref=80",
        "checkpoint.every=0",
        "progress=false",
    ]
    with tempfile.TemporaryDirectory(prefix="fr-bench-") as tmp:
        w = Path(tmp)
        make_federation(w / "certs", "hub", list(SITES), clients=SITES)
        t_start = time.perf_counter()
        deal(w / "certs", "a", w / "keys", bits=args.key_bits)
        deal_s = time.perf_counter() - t_start
        port = _free_port()
        files = [f"federation.certs={w / 'certs'}", f"federation.keys={w / 'keys'}"]
        site_job = [*job, *files, f"federation.connect=127.0.0.1:{port}"]
        procs, site_s, done = [], {}, {}
        coordinator = [
            "federation=cross_org",
            *job,
            *files,
            f"federation.listen=127.0.0.1:{port}",
        ]
        try:
            with embedded_ray():
                # The coordinator first (as a deployment would start it), so the sites
                # need not wait out their dial-again backoff; then the sites.
                t_coordinator = time.perf_counter()
                thread = threading.Thread(
                    target=lambda: done.update(
                        zip(("summary", "rows"), run_job(coordinator), strict=True)
                    ),
                    daemon=True,  # a site that fails to start ends the benchmark, not this
                )
                thread.start()
                for site in SITES:
                    t = time.perf_counter()
                    home, log = w / f"home_{site}", w / f"{site}.log"
                    procs.append(_start_site(site, site_job, home, log))
                    site_s[site] = time.perf_counter() - t
                thread.join()
                if "summary" not in done:
                    raise SystemExit("the coordinator's run failed (see above)")
                cross, cross_rows = done["summary"], done["rows"]
                wall_s = t_coordinator - t_start + cross["setup_seconds"]
        finally:
            for p in procs:
                try:
                    p.wait(timeout=60)  # the coordinator's goodbye stops each site
                except subprocess.TimeoutExpired:
                    p.kill()
        with embedded_ray():
            single, single_rows = run_job([*job, "cluster.num_actors=3", "client.num_cpus=0.5"])
    load_end = os.getloadavg()[0]

    cross_round, single_round = _median_round(cross_rows), _median_round(single_rows)
    setup = wall_s
    print(f"key dealt at site a ({args.key_bits}-bit, 2 of 3): {deal_s:.2f} s")
    for site, s in site_s.items():
        print(f"site {site} started, one after another (its Ray, host and key holder): "
              f"{s:.2f} s")  # fmt: skip
    print(f"coordinator set-up (its start to round 1: its Ray, the hub, waiting for the "
          f"three sites): {cross['setup_seconds']:.2f} s")  # fmt: skip
    print(f"federation set-up, wall clock from the key's dealing to round 1 (every Ray "
          f"started in it): {setup:.2f} s; one cluster's job: "
          f"{single['setup_seconds']:.2f} s")  # fmt: skip
    print(f"median round after round 1: 3 site clusters {cross_round:.3f} s, one cluster "
          f"{single_round:.3f} s: ratio {cross_round / single_round:.2f}x "
          f"(target <= 1.5x)")  # fmt: skip
    print(f"final accuracy: 3 site clusters {cross['final_accuracy']:.4f}, one cluster "
          f"{single['final_accuracy']:.4f}")  # fmt: skip
    print(f"load average (1 min): {load_start:.2f} at start, {load_end:.2f} at end; "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    with (ROOT / "benchmarks" / "results" / "cross_org_rounds.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["deployment", "setup_seconds", "median_round_seconds", "final_accuracy"])
        out.writerow(["3 site clusters", round(setup, 3), round(cross_round, 4),
                      cross["final_accuracy"]])  # fmt: skip
        out.writerow(["one cluster", round(single["setup_seconds"], 3), round(single_round, 4),
                      single["final_accuracy"]])  # fmt: skip
    figure("cross_org_round_ratio", cross_round / single_round, "x")
    figure("cross_org_setup_seconds", setup, "s")
    figure("cross_org_key_deal_seconds", deal_s, "s")


if __name__ == "__main__":
    main()
