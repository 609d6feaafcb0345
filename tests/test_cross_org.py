"""federation=cross_org end to end: a coordinator and three sites, each site in its own
process with its own Ray cluster, over the mTLS channel (issue #23).

The sites are started by fixtures (one after another: ``python -m fedray.site``, each
``ray.init(address="local")`` with a short temp dir of its own); the coordinator runs in
this process on the tests' embedded Ray. A hostile coordinator (this test, holding the
coordinator's certificate and signing key and speaking the real protocol) is refused by
a live site.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose, free_port

ROOT = Path(__file__).resolve().parents[1]
SITES = ("a", "b", "c")
JOB = [
    "num_clients=6",
    "rounds=2",
    "crypto.key_bits=512",
    "crypto.allow_insecure_keys=true",
    "dataset.weight_ref=80",
    "checkpoint.every=0",
]


@pytest.fixture(scope="module")
def federation_dir(tmp_path_factory):
    """A CA, a manifest of sites a, b, c (2 clients each) and a key dealt at site a."""
    from fedray.tools.certs import make_federation
    from fedray.tools.keys import deal

    w = tmp_path_factory.mktemp("federation")
    make_federation(w / "certs", "hub", list(SITES), clients={s: 2 for s in SITES})
    deal(w / "certs", "a", w / "keys", bits=512, allow_insecure=True)
    return w


def _files(w: Path) -> list[str]:
    return [f"federation.certs={w / 'certs'}", f"federation.keys={w / 'keys'}"]


def _start_site(w: Path, site: str, port: int, log: Path, extra=()) -> subprocess.Popen:
    """`python -m fedray.site` for ``site``, dialling 127.0.0.1:port; returns once its
    Ray cluster, host and key holder are up (the next site starts after it)."""
    env = {**os.environ, "HOME": str(log.parent / f"home_{site}")}
    Path(env["HOME"]).mkdir(exist_ok=True)
    args = [*JOB, *_files(w), f"federation.party={site}", f"federation.connect=127.0.0.1:{port}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedray.site", "ray.num_cpus=1", *args, *extra],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while "clients ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            pytest.fail(f"site {site} did not start:\n{tail}", pytrace=False)
        time.sleep(0.5)
    return proc


def _stop(procs: list[subprocess.Popen]) -> None:
    import signal

    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def three_sites(federation_dir, tmp_path_factory):
    """Sites a, b and c, each in its own process and Ray cluster, dialling one port."""
    logs = tmp_path_factory.mktemp("sites")
    port = free_port()
    procs = []
    try:
        for site in SITES:
            procs.append(_start_site(federation_dir, site, port, logs / f"{site}.log"))
        yield port, procs, logs
    finally:
        _stop(procs)


def _listing_server(record: Path):
    """The real Server, recording at each round (to ``record``, one JSON line) the classes
    of the actors alive in the coordinator's Ray cluster and what it holds as hosts and
    key holders."""
    from fedray.runtime.server import Server

    class Listing(Server):
        def run_round(self):
            import ray._private.state as state

            alive = [
                a.get("ActorClassName") or a.get("ClassName") or ""
                for a in state.actors().values()
                if a.get("State") in ("ALIVE", 2)
            ]
            handles = self.hosts + self.key_holders
            entry = {
                "actors": alive,
                "hosts": sorted({type(h).__name__ for h in handles}),
                "hubs": len({h._hub._actor_id.hex() for h in handles}),
            }
            with open(record, "a") as f:
                f.write(json.dumps(entry) + "\n")
            return super().run_round()

    return Listing


def test_three_site_clusters_train_the_single_cluster_model(
    ray_2cpus, federation_dir, three_sites, tmp_path
):
    """Bit-identical final weights to the same job in one cluster (DP off: the sums are
    exact integers whoever adds them), with the key held by the sites (2 of 3 open a
    sum), every site reached only through the channel, and the sites stopping when the
    coordinator says the run is over."""
    from fedray.runtime.driver import run_experiment

    port, procs, logs = three_sites
    cfg = compose(
        [
            "federation=cross_org",
            *JOB,
            *_files(federation_dir),
            f"federation.listen=127.0.0.1:{port}",
        ]
    )
    record = tmp_path / "seen.jsonl"
    summary = run_experiment(cfg, tmp_path / "cross", server_class=_listing_server(record))
    assert summary["rounds_completed"] == 2
    assert summary["mode"] == "cross_org"
    assert summary["key_holder_nodes"] == ["site:a", "site:b", "site:c"]
    assert summary["key_dealer_node"] == "site:a" and summary["threshold"] == 2

    single = compose([*JOB, "cluster.num_actors=3", "client.num_cpus=0.5", "checkpoint.every=1"])
    run_experiment(single, tmp_path / "single")
    cross = np.load(tmp_path / "cross/checkpoints/round_00002/arrays.npz")["weights"]
    one = np.load(tmp_path / "single/checkpoints/round_00002/arrays.npz")["weights"]
    assert cross.dtype == one.dtype and np.array_equal(cross, one)

    # The coordinator's cluster ran the server and the hub, no site actor; the server's
    # hosts and key holders were site handles, all through the one hub.
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(seen) == 2
    for entry in seen:
        assert "FederationHub" in entry["actors"], entry
        assert not {"SiteHost", "ClientHost", "KeyHolder"} & set(entry["actors"]), entry
        assert entry["hosts"] == ["SiteHandle"] and entry["hubs"] == 1, entry
    for proc, site in zip(procs, SITES, strict=True):  # the goodbye stops every site
        assert proc.wait(timeout=60) == 0, (logs / f"{site}.log").read_text()[-2000:]
        assert "said goodbye" in (logs / f"{site}.log").read_text()
