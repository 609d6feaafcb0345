"""federation=cross_org end to end: a coordinator and three sites, each site in its own
process with its own Ray cluster, over the mTLS channel (issue #23).

The sites are started by fixtures (one after another: ``python -m fedray.site``, each
``ray.init(address="local")`` with a short temp dir of its own); the coordinator runs in
this process on the tests' embedded Ray. A hostile coordinator (this test, holding the
coordinator's certificate and signing key and speaking the real protocol) is refused by
a live site.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import secrets
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
    "privacy=dp",
    "privacy.reproducible_noise=true",
    "federation.reconnect_max_s=1",  # a site dials the coordinator again within ~1 s
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


def _start_site(
    w: Path, site: str, port: int, log: Path, extra=(), until: str = "clients ready"
) -> subprocess.Popen:
    """`python -m fedray.site` for ``site``, dialling 127.0.0.1:port; returns once its log
    says ``until``: by default once its Ray cluster, host and key holder are up, or ("Ray
    is up") once its Ray cluster is (the next site's Ray starts after it; see
    :func:`_wait_until`)."""
    env = {**os.environ, "HOME": str(log.parent / f"home_{site}")}
    Path(env["HOME"]).mkdir(exist_ok=True)
    args = [*JOB, *_files(w), f"federation.party={site}", f"federation.connect=127.0.0.1:{port}"]
    # each test's run is a new run of the job under the module's key: its own record of
    # the rounds each site took part in (a restarted site in one test keeps its own)
    args.append(f"federation.state={log.parent / f'{site}.rounds.json'}")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedray.site", "ray.num_cpus=1", *args, *extra],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_until(proc, site, log, until)
    return proc


def _wait_until(proc: subprocess.Popen, site: str, log: Path, said: str) -> None:
    deadline = time.monotonic() + 180
    while said not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            pytest.fail(f"site {site} did not start:\n{tail}", pytrace=False)
        time.sleep(0.2)


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


@contextlib.contextmanager
def _sites(w: Path, logs: Path, extra=()):
    """Sites a, b and c, each in its own process and Ray cluster, dialling one port. Their
    Rays start one after another; a site's actors start while the next site's Ray does."""
    port = free_port()
    procs = []
    try:
        for site in SITES:
            procs.append(_start_site(w, site, port, logs / f"{site}.log", extra, "Ray is up"))
        for proc, site in zip(procs, SITES, strict=True):
            _wait_until(proc, site, logs / f"{site}.log", "clients ready")
        yield port, procs, logs
    finally:
        _stop(procs)


@pytest.fixture(scope="module")
def three_sites(federation_dir, tmp_path_factory):
    """The three sites with the job's defaults (the fast path: sealed exponent shares)."""
    with _sites(federation_dir, tmp_path_factory.mktemp("sites")) as sites:
        yield sites


@pytest.fixture(scope="module")
def single_cluster_weights(ray_2cpus, tmp_path_factory) -> np.ndarray:
    """The job's final weights in one Ray cluster (3 hosts of 2 clients, the fast path)."""
    from fedray.runtime.driver import run_experiment

    out = tmp_path_factory.mktemp("single")
    single = compose([*JOB, "cluster.num_actors=3", "client.num_cpus=0.5", "checkpoint.every=1"])
    run_experiment(single, out)
    return np.load(out / "checkpoints/round_00002/arrays.npz")["weights"]


PADDED_S = 8.0  # a site's answer_after_s: above this test's natural round (2-4 s)


def _opened_by(run_dir: Path) -> list[str]:
    with (run_dir / "metrics.csv").open() as f:
        return [row["decrypted_by"] for row in csv.DictReader(f)]


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


# The coordinator in its own process (its own embedded Ray, in its own session): inside
# round 2, once every site has trained, sealed its upload and deposited its shares with
# the key holders, and before any site approves the sum, its server kills the whole
# process group (driver, Ray, server, hub) as a power cut would.
_KILLED_COORDINATOR = """
import os, signal, sys, time
from fedray.runtime.driver import run_experiment
from fedray.runtime.server import Server
from tests.conftest import compose
GROUP = os.getpgid(0)
class PowerCut(Server):
    def _approvals(self, acc):
        if self.round == 2:
            os.killpg(GROUP, signal.SIGKILL)
            time.sleep(60)
        return super()._approvals(acc)
run_experiment(compose(sys.argv[2:]), sys.argv[1], server_class=PowerCut)
"""


def test_three_site_clusters_train_the_single_cluster_model_across_a_coordinator_restart(
    ray_2cpus, federation_dir, single_cluster_weights, three_sites, tmp_path
):
    """Bit-identical final weights to the same job in one cluster (client-level DP on with
    reproducible noise: the sums are exact integers whoever adds them), with the key held
    by the sites (2 of 3 open a sum) and every sum opened by the fast path (each site's
    exponent shares sealed to the other sites' holders, relayed by the coordinator; the
    holders answer share sums), every site reached only through the channel, and the
    sites stopping when the coordinator says the run is over.

    Across a power cut: the coordinator dies (SIGKILL to its process group) inside round
    2, after the sites' uploads and before their approvals; the sites keep running and
    dial again with backoff. A new coordinator process resumes from round 1's checkpoint
    (resume=true) and gives the sites round 1's attested sum from the checkpoints folder:
    their hosts check round 2's model against it (model checks on), and they train round
    2 again, as a retry."""
    from fedray.runtime.driver import run_experiment
    from fedray.runtime.outputs import load_checkpoint

    port, procs, logs = three_sites
    job = [
        "federation=cross_org",
        *JOB,
        *_files(federation_dir),
        f"federation.listen=127.0.0.1:{port}",
        "checkpoint.every=1",
    ]
    run_dir = tmp_path / "cross"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_COORDINATOR, str(run_dir), *job, "ray.num_cpus=2"],
        cwd=ROOT,
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        start_new_session=True,
        timeout=400,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert load_checkpoint(run_dir / "checkpoints")["round"] == 1
    assert (run_dir / "checkpoints/releases/round_00001.json").is_file()

    record = tmp_path / "seen.jsonl"
    cfg = compose([*job, "resume=true"])
    summary = run_experiment(cfg, run_dir, server_class=_listing_server(record))
    assert summary["rounds_completed"] == 2 and summary["resumed_from_round"] == 1
    assert summary["mode"] == "cross_org"
    assert summary["key_holder_nodes"] == ["site:a", "site:b", "site:c"]
    assert summary["key_dealer_node"] == "site:a" and summary["threshold"] == 2
    # Every site recomputed round 2's model from round 1's opened sum, which t holders
    # attested after multiplying the uploads themselves (the hostile tests below: refused)
    assert summary["models_checked"] is True
    # Client-level DP on: each site's host adds its noise share (seeded here, so the two
    # deployments can be compared bit for bit), the coordinator's accountant counts.
    # (Seeded noise protects nothing against the server: epsilon_vs_server is reported inf.)
    assert summary["privacy"] == "dp" and 0 < summary["epsilon"] < float("inf")
    assert summary["epsilon_vs_server"] == float("inf")

    assert _opened_by(run_dir) == ["share_sums", "share_sums"]
    assert summary["bytes_to_key_holders"] > 0  # the sealed shares the coordinator relayed
    cross = np.load(run_dir / "checkpoints/round_00002/arrays.npz")["weights"]
    one = single_cluster_weights
    assert cross.dtype == one.dtype and np.array_equal(cross, one)

    # The coordinator's cluster ran the server and the hub, no site actor; the server's
    # hosts and key holders were site handles, all through the one hub.
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(seen) == 1  # round 2, after the restart
    for entry in seen:
        assert "FederationHub" in entry["actors"], entry
        assert not {"SiteHost", "ClientHost", "KeyHolder"} & set(entry["actors"]), entry
        assert entry["hosts"] == ["SiteHandle"] and entry["hubs"] == 1, entry
    for proc, site in zip(procs, SITES, strict=True):  # the goodbye stops every site
        assert proc.wait(timeout=60) == 0, (logs / f"{site}.log").read_text()[-2000:]
        said = (logs / f"{site}.log").read_text()
        assert "said goodbye" in said
        assert said.count("joined the federation") == 2  # one process, two sessions


def _wine_site_tables(folder: Path, reorder: bool) -> list[str]:
    """scikit-learn's wine table (13 features, 3 classes) split over the 6 clients, one CSV
    each, as three organisations would export it (``reorder``): site a's columns in the
    table's order, site b's reversed, site c's shuffled with an extra column; else all in
    the table's order. Returns the feature names."""
    from sklearn.datasets import load_wine

    data = load_wine()
    names = list(data.feature_names)
    columns = {n: data.data[:, k] for k, n in enumerate(names)} | {"y": data.target}
    rng = np.random.default_rng(7)
    order = rng.permutation(len(data.target))
    for cid, rows in enumerate(np.array_split(order, 6)):
        site = SITES[cid // 2]
        header = [*names, "y"]
        values = {**columns}
        if reorder and site == "b":
            header = ["y", *reversed(names)]
        elif reorder and site == "c":
            values["export_id"] = np.arange(len(data.target))
            header = list(rng.permutation([*names, "y", "export_id"]))
        with (folder / f"client_{cid}.csv").open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(header)
            for r in rows:
                out.writerow(
                    [repr(float(values[h][r])) if h != "y" else int(values[h][r]) for h in header]
                )
    return names


def test_sites_own_csv_tables_in_other_column_orders_train_the_single_cluster_model(
    ray_2cpus, federation_dir, tmp_path
):
    """dataset=csv across organisations: each site reads its own tables (columns matched
    by the declared names, in any order, an extra column ignored), the coordinator reads
    none (the model's shape is the declared features and dataset.num_classes), and the
    final weights are bit for bit those of one cluster on the same rows with every
    table's columns in one order."""
    from fedray.runtime.driver import run_experiment

    (tmp_path / "sites").mkdir()
    (tmp_path / "ordered").mkdir()
    names = _wine_site_tables(tmp_path / "sites", reorder=True)
    assert _wine_site_tables(tmp_path / "ordered", reorder=False) == names

    def table(folder=None):  # the coordinator has no folder: it reads no table
        path = [f"dataset.path='{tmp_path / folder}/client_{{client_id}}.csv'"] if folder else []
        return [
            "dataset=csv",
            *path,
            "dataset.label=y",
            "dataset.features=[" + ",".join(names) + "]",
            "dataset.num_classes=3",
        ]

    single_dir = tmp_path / "single"
    run_experiment(
        compose([*JOB, *table("ordered"), "cluster.num_actors=3", "client.num_cpus=0.5"]),
        single_dir,
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    with _sites(federation_dir, logs, table("sites")) as (port, procs, _):
        cfg = compose(
            [
                "federation=cross_org",
                *JOB,
                *table(),  # no dataset.path: it has no site's file
                *_files(federation_dir),
                f"federation.listen=127.0.0.1:{port}",
            ]
        )
        summary = run_experiment(cfg, tmp_path / "cross")
        assert summary["rounds_completed"] == 2 and summary["num_features"] == 13
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    assert "export_id" in (logs / "c.log").read_text()  # site c said it ignores the extra
    cross = np.load(tmp_path / "cross/checkpoints/round_00002/arrays.npz")["weights"]
    one = np.load(single_dir / "checkpoints/round_00002/arrays.npz")["weights"]
    assert np.array_equal(cross, one)


def test_partial_decryptions_across_organisations_give_the_same_model(
    ray_2cpus, federation_dir, single_cluster_weights, tmp_path
):
    """crypto.fast_decrypt=false at the coordinator and the sites: no exponent share is
    made or relayed, each holder multiplies the ciphertexts and answers its partial
    decryption; the final weights are bit for bit those of the fast path's run (above)
    and of one cluster. The sites also pad their answers (``federation.answer_after_s``):
    no update reaches the coordinator sooner, so when one comes does not tell how its
    clients' training went."""
    from fedray.runtime.driver import run_experiment

    slow = ["crypto.fast_decrypt=false"]
    logs = tmp_path / "logs"
    logs.mkdir()
    padded = [*slow, f"federation.answer_after_s={PADDED_S}"]
    with _sites(federation_dir, logs, padded) as (port, procs, _):
        cfg = compose(
            [
                "federation=cross_org",
                *JOB,
                *slow,
                *_files(federation_dir),
                f"federation.listen=127.0.0.1:{port}",
            ]
        )
        summary = run_experiment(cfg, tmp_path / "cross")
        assert summary["rounds_completed"] == 2
        assert summary["bytes_to_key_holders"] == 0  # no exponent share made or relayed
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    assert _opened_by(tmp_path / "cross") == ["partial_decryption", "partial_decryption"]
    with (tmp_path / "cross" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    waits = [float(row["wait_seconds"]) for row in rows]
    assert all(w >= PADDED_S for w in waits), waits
    # and no timing that would undo it
    assert all(float(r["train_seconds"]) == float(r["encrypt_seconds"]) == 0 for r in rows)
    cross = np.load(tmp_path / "cross/checkpoints/round_00002/arrays.npz")["weights"]
    assert np.array_equal(cross, single_cluster_weights)


def test_a_site_declaring_another_job_stops_the_run_at_once_with_one_line(
    ray_2cpus, federation_dir, tmp_path
):
    """The whole wiring of the job check: site a runs another model. The coordinator's
    start fails as soon as a connects (not after federation.connect_timeout_s), with one
    line naming the setting and both values; site a exits non-zero with that line."""
    from fedray.errors import FedrayError
    from fedray.runtime.driver import run_experiment

    port = free_port()
    site = _start_site(federation_dir, "a", port, tmp_path / "a.log", ["model.hidden=64"])
    try:
        cfg = compose(
            [
                "federation=cross_org",
                *JOB,
                *_files(federation_dir),
                f"federation.listen=127.0.0.1:{port}",
                "federation.connect_timeout_s=300",
            ]
        )
        start = time.monotonic()
        with pytest.raises(FedrayError, match="declare different jobs") as err:
            run_experiment(cfg, tmp_path / "run")
        assert time.monotonic() - start < 150
        assert site.wait(timeout=60) != 0
    finally:
        _stop([site])
    line = "hub and site a declare different jobs: model.hidden: 128 at hub, 64 at site a;"
    assert line in str(err.value) and "\n" not in str(err.value).strip()
    assert line in (tmp_path / "a.log").read_text()


@pytest.mark.parametrize(
    ("server_class", "refusal", "completed"),
    [
        (
            "NudgingServer",
            r"round 2: a client host refused the global model: .*site [abc]: refusing to train: "
            r"round 2: lineage check failed: the global model is not the one recomputed",
            1,
        ),
        ("FabricatedSumServer", r"round 1: .*not the decryption of the deposited updates", 0),
    ],
    ids=["crafted-model", "fabricated-sum"],
)
def test_sites_refuse_a_crafted_model_or_sum_and_the_run_stops(
    ray_2cpus, federation_dir, tmp_path, server_class, refusal, completed
):
    """The coordinator's own server, crafting: round 2's model one float32 ulp off the
    one round 1's attested sum gives (every site recomputes it and refuses before
    training), or round 1's opened sum claimed with one slot off (the sites' key holders
    multiply the uploads themselves and refuse to attest it). The run stops at the
    coordinator with the site's one line; the rounds before stay in metrics.csv; a
    refusing site logs the round and the check."""
    from fedray.errors import ClusterError
    from fedray.runtime.driver import run_experiment
    from tests import crafting_server

    logs = tmp_path / "logs"
    logs.mkdir()
    with _sites(federation_dir, logs) as (port, procs, _):
        cfg = compose(
            [
                "federation=cross_org",
                *JOB,
                *_files(federation_dir),
                f"federation.listen=127.0.0.1:{port}",
            ]
        )
        with pytest.raises(ClusterError, match=refusal) as err:
            run_experiment(
                cfg, tmp_path / "run", server_class=getattr(crafting_server, server_class)
            )
        assert "\n" not in str(err.value).strip()
        for proc in procs:  # the coordinator said goodbye: each site stops, cleanly
            assert proc.wait(timeout=60) == 0
    rows = (tmp_path / "run/metrics.csv").read_text().splitlines()
    assert len(rows) - 1 == completed
    said = "".join((logs / f"{s}.log").read_text() for s in SITES)
    if server_class == "NudgingServer":
        assert "refusing to train: round 2: lineage check failed" in said
    else:
        assert "round 1: the opened sum is not the decryption of the deposited updates" in said


def _site_loss_server(c_pid: int):
    """The real Server; before round 3 it kills site c's process group (its agent, Ray
    cluster, host and key holder: a site lost for good), and before round 4 it waits until
    a new site c (the test starts one) has dialled in again."""
    from fedray.runtime.server import Server

    class SiteLoss(Server):
        def run_round(self):
            import os
            import signal
            import time

            if self.round == 2:
                os.killpg(c_pid, signal.SIGKILL)
            if self.round == 3:
                deadline = time.monotonic() + 240
                while not self._fetch(self.hosts[2].ready.remote()):
                    if time.monotonic() > deadline:
                        raise RuntimeError("site c did not dial in again")
                    time.sleep(0.5)
            return super().run_round()

    return SiteLoss


def test_a_killed_site_is_left_out_and_a_restarted_one_rejoins_the_run(
    ray_2cpus, federation_dir, tmp_path
):
    """Site c dies (SIGKILL to its process group) after round 2: round 3 runs without its
    clients, its key holder's share and its attestation (2 of 3 holders open and attest
    every sum). A new site c process then dials in: a new session, a new key holder and a
    host whose chain of models starts again at round 0; the coordinator sends it every
    attested sum again (not only those since the round the old process last trained), it
    recomputes round 4's model from them and its clients train in round 4. Model checks
    stay on throughout."""
    import threading

    from fedray.runtime.driver import run_experiment

    extra = ["federation.max_colluding_sites=0", "rounds=4"]  # sums of 2 of the 3 sites
    logs = tmp_path / "logs"
    logs.mkdir()
    with _sites(federation_dir, logs, extra) as (port, procs, _):
        old_c = procs[2]
        restarted: list[subprocess.Popen] = []

        def restart_c():
            old_c.wait(timeout=600)
            restarted.append(_start_site(federation_dir, "c", port, logs / "c2.log", extra))

        thread = threading.Thread(target=restart_c, daemon=True)
        thread.start()
        cfg = compose(
            [
                "federation=cross_org",
                *JOB,
                *_files(federation_dir),
                f"federation.listen=127.0.0.1:{port}",
                "rounds=4",
            ]
        )
        try:
            summary = run_experiment(
                cfg, tmp_path / "run", server_class=_site_loss_server(old_c.pid)
            )
            thread.join(timeout=300)
            assert summary["rounds_completed"] == 4 and summary["models_checked"] is True
            assert len(restarted) == 1
            for proc in procs[:2] + restarted:  # the coordinator's goodbye stops each
                assert proc.wait(timeout=60) == 0
        finally:
            thread.join(timeout=300)
            _stop(restarted)
    with (tmp_path / "run/metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["clients_ok"]) for r in rows] == [6, 6, 4, 6]
    assert [int(r["clients_failed"]) for r in rows] == [0, 0, 2, 0]
    assert [r["decrypted_by"] for r in rows] == ["share_sums"] * 4
    assert "clients ready" in (logs / "c2.log").read_text()


@pytest.mark.parametrize(
    ("damage", "refusal"),
    [
        ("removed", "the attested sum of round 1 .* is not there"),
        ("truncated", "the attested sum of round 1 .* is unreadable"),
        ("renumbered", "holds the attested sum of round 2, not 1"),
    ],
)
def test_a_resume_across_organisations_without_the_attested_sums_is_refused(
    tmp_path, damage, refusal
):
    """The sites' hosts outlive the coordinator and check each model against attested
    sums: a checkpoint whose releases/ lacks one (removed, cut short by a crash, another
    round's) cannot be resumed; one line, no traceback."""
    from fedray.errors import FedrayError
    from fedray.runtime.driver import _resume_state
    from fedray.runtime.lineage import Release
    from fedray.runtime.outputs import RELEASES_DIR, save_checkpoint, save_releases

    cfg = compose(["federation=cross_org", *JOB, "resume=true", "privacy=none"])
    state = {"round": 1, "weights": np.zeros(3, np.float32), "strategy": {}, "privacy": None}
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, state)
    save_releases(folder, [Release(1, "ab" * 32, 6, b"\x01" * 64, {1: b"s", 2: b"t"})])
    assert len(_resume_state(cfg, tmp_path)["releases"]) == 1  # intact: it loads
    path = folder / RELEASES_DIR / "round_00001.json"
    if damage == "removed":
        path.unlink()
    elif damage == "truncated":
        path.write_text(path.read_text()[:40])
    else:
        path.write_text(path.read_text().replace('"round": 1', '"round": 2'))
    with pytest.raises(FedrayError, match=refusal) as err:
        _resume_state(cfg, tmp_path)
    assert "\n" not in str(err.value)


# --- a hostile coordinator against one live site --------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """This test as the coordinator (its certificate and signing key, the real protocol)
    and site a (3 of the federation's 6 clients) dialling it from its own Ray cluster."""
    from fedray.federation import channel as ch
    from fedray.federation.site import agreed_job
    from fedray.tools.certs import make_federation
    from fedray.tools.keys import deal

    w = tmp_path_factory.mktemp("hostile")
    certs = w / "certs"
    make_federation(certs, "hub", list(SITES), clients={"a": 3, "b": 2, "c": 1})
    deal(certs, "a", w / "keys", bits=512, allow_insecure=True)
    coord = ch.listen(
        "127.0.0.1:0",
        certs / "hub/cert.pem",
        certs / "hub/key.pem",
        certs / "ca.pem",
        manifest=certs / "federation.json",
        signing_key=certs / "hub/signing.key",
        job=agreed_job(compose(["federation=cross_org", *JOB])),  # the site's: it can copy it
    )
    # Site a defends against no colluding site here (null would be t - 1 = 1, sums of all
    # 3 sites): the requests below are two-site sums, the smallest a site may sign.
    site = _start_site(w, "a", coord.port, w / "a.log", ["federation.max_colluding_sites=0"])
    try:
        peer = coord.wait_for(["a"], 120)["a"]
        yield w, peer, site
    finally:
        coord.close()
        _stop([site])


def _global_weights() -> np.ndarray:
    from fedray.data.datasets import dataset_info
    from fedray.models import ParamView
    from fedray.tasks.base import build_task, build_task_model

    cfg = compose(JOB)
    model = build_task_model(build_task(cfg, dataset_info(cfg.dataset)), cfg.seed)
    return ParamView(model, None).get()


def _train_request(round_num, clients, weights, certificates=None, **kw):
    from fedray.federation import channel as ch
    from fedray.federation import federation_pb2 as pb

    blob = ch.OutgoingBlob.from_array(f"w{round_num}", weights)
    request = pb.TrainRequest(
        round=round_num,
        task_id=kw.pop("task_id", "fedray"),
        task_version="1",
        model_fingerprint=b"m" * 32,
        global_weights=blob.ref,
        client_ids=clients,
        site_certificates=certificates or {},
        **kw,
    )
    return request, [blob]


def _share_context(w: Path, key, sender: str, recipient: str, update_id: str, round_num=1):
    from fedray.federation.channel import Manifest
    from fedray.federation.shares import ShareContext, manifest_sha256

    manifest = Manifest.load(w / "certs/federation.json")
    return ShareContext(
        key.fingerprint,
        manifest_sha256(w / "certs/federation.json"),
        round_num,
        update_id,
        sender,
        recipient,
        SITES.index(recipient) + 1,
        manifest.sites[recipient].cert_sha256,
    )


def test_a_site_refuses_what_a_hostile_coordinator_asks(hostile):
    """Every request outside what the site runs is refused with one line, nothing of the
    site leaving: others' clients, another task, a hyper-parameter it does not take,
    weights of another shape, no (or another site's) certificate to seal the other sites'
    exponent shares to; a second list to approve in a round; a sum it cannot check
    (forged approval, ciphertexts that are not the signed ones, a second sum of a round;
    on the fast path an exponent share for another holder, sealed for another update,
    missing, or not the one its host signed). What does leave for a good request is
    ciphertexts, statements signed with the site's manifest key and exponent shares each
    sealed to its site (the coordinator cannot open one)."""
    from fedray.crypto.paillier import to_bytes  # noqa: F401 - the width below
    from fedray.federation import channel as ch
    from fedray.federation import federation_pb2 as pb
    from fedray.runtime.keys import cohort_message, verify
    from fedray.tools.keys import load_federation_key

    w, peer, site = hostile
    key = load_federation_key(
        w / "keys/federation_key.json", w / "certs/federation.json", allow_insecure=True
    )
    site_key = ch.Manifest.load(w / "certs/federation.json").sites["a"].signing_key
    weights = _global_weights()

    def refused(kind, body, blobs=(), match=""):
        with pytest.raises(ch.PeerRefused, match=match):
            peer.call(kind, body, blobs, timeout=120)

    refused("train_request", *_train_request(1, [0, 3], weights), match="not this site's")
    refused("train_request", *_train_request(1, [0], weights, task_id="other"), match="task")
    bad_hp = _train_request(1, [0], weights, hyperparameters={"lr": pb.Number(real=5.0)})
    refused("train_request", *bad_hp, match="hyper-parameter lr")
    refused("train_request", *_train_request(1, [0], weights[:-1]), match="shape")
    pems = {s: (w / "certs" / s / "cert.pem").read_bytes() for s in SITES}
    no_cert = _train_request(1, [0], weights, {"a": pems["a"], "c": pems["c"]})
    refused("train_request", *no_cert, match="no certificate of site b")
    swapped_cert = _train_request(1, [0], weights, {**pems, "b": pems["c"]})
    refused("train_request", *swapped_cert, match="not site b's certificate of the manifest")
    # Model checks: the site's host builds the initial model itself (its installed task,
    # the job's seed) and trains on nothing else; one float32 ulp off is refused.
    nudged = weights.copy()
    nudged[0] = np.nextafter(nudged[0], np.float32(np.inf))
    refused(
        "train_request",
        *_train_request(1, [0], nudged, pems),
        match="refusing to train: round 1: lineage check failed: the global model is not",
    )
    # A request of the next round without its opened sum too: both are refused before the
    # round counts in the site's record of rounds (or its policy) or opens at its holder.
    refused(
        "train_request",
        *_train_request(2, [0], weights, pems),
        match="refusing to train: round 2: lineage check failed: the opened sums up to round 1",
    )
    record = w / "a.rounds.json"
    assert not record.exists() or max(json.loads(record.read_text()).values(), default=0) == 0

    reply = peer.call("train_request", *_train_request(1, [0, 1, 2], weights, pems), timeout=300)
    assert list(json.loads(record.read_text()).values()) == [1]  # recorded before it left
    body = reply.body
    statement = json.loads(body.contribution)
    assert statement["client_ids"] == [0, 1, 2] and statement["host"] == 0
    assert verify(site_key, bytes(body.contribution_signature), bytes(body.contribution))
    cts = bytes(reply.blob(body.ciphertexts).ciphertexts(key.public.ciphertext_bytes))
    uid = body.update_id

    # The exponent shares for holders 2 and 3, each sealed to its site: b opens its own,
    # whose digest is the one a signed for holder 2; the coordinator (this test's hub key)
    # opens neither.
    from fedray.federation.shares import SealedShare, ShareSealError, open_share, seal_share
    from fedray.federation.shares import recipient_key as _recipient
    from fedray.runtime.keys import digest as _digest
    from fedray.tools.keys import _site_private_key

    assert sorted(s.holder for s in body.sealed_shares) == [2, 3]
    num_cts = len(cts) // key.public.ciphertext_bytes
    share_bytes = num_cts * key.share_width()
    for s in body.sealed_shares:
        to = SITES[s.holder - 1]
        data = bytes(reply.blob(s.sealed).array(np.uint8, (share_bytes + 16,)))
        sealed = SealedShare(s.holder, bytes(s.ephemeral_public), bytes(s.nonce), data)
        context = _share_context(w, key, "a", to, uid)
        opened = open_share(_site_private_key(w / "certs" / to / "key.pem"), context, sealed)
        assert _digest(opened) == statement["share_sha256"][s.holder - 1]
        with pytest.raises(ShareSealError, match="does not open"):
            open_share(_site_private_key(w / "certs/hub/key.pem"), context, sealed)

    # Site b's update (this test holds every party's files, so it can play a colluding
    # site b): any valid ciphertexts of the right length under b's signature.
    from cryptography.hazmat.primitives import serialization

    from fedray.runtime.keys import Contribution, HostIdentity, digest

    b_key = serialization.load_pem_private_key((w / "certs/b/signing.key").read_bytes(), None)
    b_identity = HostIdentity.from_private_key(b_key)
    ub, uc = "h1-" + "b" * 32, "h1-" + "c" * 32  # ids in host 1's namespace (b)
    from fedray.crypto.threshold import ints_to_bytes

    # b's shares for holders 1, 2, 3: random values within an honest sharing's bound (a
    # holder refuses larger ones at deposit)
    width = key.share_width()
    b_shares = [
        ints_to_bytes(
            [
                secrets.randbelow(key.exponent_share_bound() + 1)
                for _ in range(share_bytes // width)
            ],
            width,
        )
        for _ in SITES
    ]
    b_signed = b_identity.sign(
        Contribution(
            key.fingerprint,
            1,
            ub,
            1,
            (3, 4),
            digest(cts),
            tuple(digest(x) for x in b_shares),
            statement["model_sha256"],
            statement["job_sha256"],  # the job a declared, which b declared too
        )
    )
    from fedray.federation.site import job_digest

    assert statement["job_sha256"] == job_digest(compose(["federation=cross_org", *JOB]))
    statements = {
        uid: (bytes(body.contribution), bytes(body.contribution_signature)),
        ub: (b_signed.contribution.message(), b_signed.signature),
    }

    def signed_list(ids, override=None):
        chosen = {**statements, **(override or {})}
        return [pb.SignedStatement(statement=chosen[u][0], signature=chosen[u][1]) for u in ids]

    def approve_request(ids, round_num=1):
        ids = sorted(ids)
        return pb.ApproveRequest(round=round_num, update_ids=ids, contributions=signed_list(ids))

    refused("approve_request", approve_request([uid], round_num=2**40), match="trained round 1")
    # The coordinator alone would have one site's update opened: a sum of one site is not
    # signed, nor opened (below), by any site.
    refused("approve_request", approve_request([uid]), match="at least 2 sites")
    # A site told another job by the coordinator (which can echo each site's own back)
    # signs that job's digest into its update: site a sums nothing with it.
    other_job = job_digest(compose(["federation=cross_org", *JOB, "lr=0.05"]))
    assert other_job != statement["job_sha256"]
    elsewhere = b_identity.sign(dataclasses.replace(b_signed.contribution, job_sha256=other_job))
    ids = sorted([uid, ub])
    moved = {ub: (elsewhere.contribution.message(), elsewhere.signature)}
    refused(
        "approve_request",
        pb.ApproveRequest(round=1, update_ids=ids, contributions=signed_list(ids, moved)),
        match="was made under another job than this site's",
    )
    both = sorted([uid, ub])
    approval = peer.call("approve_request", approve_request(both), timeout=60).body
    assert approval.host == 0
    assert verify(site_key, bytes(approval.signature), cohort_message(key.fingerprint, 1, both))
    other = sorted([uid, uc])
    statements[uc] = (
        b_identity.sign(
            Contribution(key.fingerprint, 1, uc, 1, (4,), digest(cts), (), "")
        ).contribution.message(),
        statements[ub][1],
    )
    refused("approve_request", approve_request(other), match="not signed by its host")
    b_again = b_identity.sign(
        Contribution(
            key.fingerprint,
            1,
            uc,
            1,
            (4,),
            digest(cts),
            (),
            statement["model_sha256"],
            statement["job_sha256"],
        )
    )
    statements[uc] = (b_again.contribution.message(), b_again.signature)
    refused("approve_request", approve_request(other), match="already approved a different sum")

    b_approval = b_identity.sign_bytes(cohort_message(key.fingerprint, 1, both))
    both_approvals = [
        pb.Approval(round=1, update_ids=both, signature=approval.signature, host=0),
        pb.Approval(round=1, update_ids=both, signature=b_approval, host=1),
    ]

    # The fast path: b's exponent share for holder 1, sealed to site a, relayed.
    a_public = _recipient(
        pems["a"], "a", ch.Manifest.load(w / "certs/federation.json").sites["a"].cert_sha256
    )

    def b_share(share=b_shares[0], update_id=ub, holder=1):
        ctx = _share_context(w, key, "b", "a", update_id)
        return seal_share(a_public, dataclasses.replace(ctx, holder=holder), share)

    def fast_request(sealed_list):
        blobs, shares = [], []
        for n, (update_id, sealed) in enumerate(sealed_list):
            blob = ch.OutgoingBlob.from_array(f"s{n}", np.frombuffer(sealed.sealed, np.uint8))
            blobs.append(blob)
            shares.append(
                pb.SealedShare(
                    update_id=update_id,
                    holder=sealed.holder,
                    ephemeral_public=sealed.ephemeral_public,
                    nonce=sealed.nonce,
                    sealed=blob.ref,
                )
            )
        request = pb.ShareSumRequest(
            round=1,
            update_ids=both,
            approvals=both_approvals,
            contributions=signed_list(both),
            opening=pb.OPENING_SHARE_SUM,
            sealed_shares=shares,
        )
        return request, blobs

    refused("share_sum_request", *fast_request([]), match="no exponent share of update")
    refused(
        "share_sum_request",
        *fast_request([(ub, b_share(holder=2))]),
        match="an exponent share for holder 2; this site's key holder is holder 1",
    )
    moved = b_share(update_id=uc)  # sealed for another update, relayed under ub
    refused("share_sum_request", *fast_request([(ub, moved)]), match="does not open")
    other = b_share(share=b_shares[1])  # sealed right, but not the share b signed for 1
    refused("share_sum_request", *fast_request([(ub, other)]), match="do not match the signed")
    answer = peer.call("share_sum_request", *fast_request([(ub, b_share())]), timeout=120)
    assert answer.body.WhichOneof("answer") == "exponent_share_sum"
    total = answer.blob(answer.body.exponent_share_sum).ciphertexts(key.share_width(2))
    assert len(total) == num_cts  # one share sum per ciphertext; no partial decryption

    def open_request(a_sig, payload, ids=both, override=None):
        blobs = [
            ch.OutgoingBlob.from_ciphertexts(f"c{i}", payload, key.public.ciphertext_bytes)
            for i in range(len(ids))
        ]
        approvals = [pb.Approval(round=1, update_ids=list(ids), signature=a_sig, host=0)]
        if ub in ids:
            approvals.append(
                pb.Approval(round=1, update_ids=list(ids), signature=b_approval, host=1)
            )
        request = pb.ShareSumRequest(
            round=1,
            update_ids=list(ids),
            approvals=approvals,
            contributions=signed_list(ids, override),
            ciphertexts=[b.ref for b in blobs],
        )
        return request, blobs

    refused("share_sum_request", *open_request(approval.signature, cts, [uid]), match="2 sites")
    forged = HostIdentity().sign_bytes(cohort_message(key.fingerprint, 1, both))
    refused("share_sum_request", *open_request(forged, cts), match="did not approve")
    flipped = cts[:-1] + bytes([cts[-1] ^ 1])
    refused("share_sum_request", *open_request(approval.signature, flipped), match="digest")
    # Its own statement with more clients in it (a policy counts clients from statements):
    # checked against the site's manifest key before anything counts it.
    more = dict(statement, client_ids=[0, 1, 2, 3, 4, 5])
    inflated = json.dumps(more, sort_keys=True, separators=(",", ":")).encode()
    refused(
        "share_sum_request",
        *open_request(approval.signature, cts, override={uid: (inflated, statements[uid][1])}),
        match="not signed by its host's manifest key",
    )
    answer = peer.call("share_sum_request", *open_request(approval.signature, cts), timeout=120)
    partial = answer.blob(answer.body.partial_decryption).ciphertexts(key.public.ciphertext_bytes)
    assert len(partial) == len(cts) // key.public.ciphertext_bytes  # one per ciphertext

    # Model checks. Attesting a claimed opening: site a's holder multiplies the two
    # updates itself and refuses plaintexts and exponents that do not open the product.
    from fedray.federation.coordinator import exponent_sum_width
    from fedray.runtime.lineage import model_digest, plaintext_width, release_message

    pt_width = plaintext_width(key.public.n)

    def attest_request(plaintexts: bytes, exponents: bytes):
        request, blobs = open_request(approval.signature, cts)
        request.opening = pb.OPENING_ATTEST
        m = ch.OutgoingBlob.from_array("m", np.frombuffer(plaintexts, np.uint8))
        x = ch.OutgoingBlob.from_array("x", np.frombuffer(exponents, np.uint8))
        request.plaintexts.CopyFrom(m.ref)
        request.exponents.CopyFrom(x.ref)
        return request, [*blobs, m, x]

    x_width = exponent_sum_width(key, 2)
    fabricated = bytes(num_cts * pt_width)
    refused(
        "share_sum_request",
        *attest_request(fabricated, bytes(num_cts * x_width)),
        match="not the decryption of the deposited updates",
    )
    refused("share_sum_request", *attest_request(fabricated[:-1], b"\0"), match="shape")

    # Round 2 needs round 1's opened sum, attested by t = 2 key holders' manifest keys: a
    # request without it, or with a sum only one holder (colluding site b) signed beside a
    # signature of the coordinator's own key, is refused before anything is trained.
    refused(
        "train_request",
        *_train_request(2, [0], weights, pems),
        match="refusing to train: round 2: lineage check failed: the opened sums up to round 1",
    )
    hub_key = serialization.load_pem_private_key((w / "certs/hub/signing.key").read_bytes(), None)
    assert statement["model_sha256"] == model_digest(weights)
    claim = release_message(
        key.fingerprint, 1, model_digest(weights), 4, digest(fabricated), statement["job_sha256"]
    )
    blob = ch.OutgoingBlob.from_array("m1", np.frombuffer(fabricated, np.uint8))
    release = pb.Release(
        round=1,
        model_sha256=model_digest(weights),
        count=4,
        attestations=[
            pb.Attestation(holder=2, signature=b_identity.sign_bytes(claim)),
            pb.Attestation(
                holder=3, signature=HostIdentity.from_private_key(hub_key).sign_bytes(claim)
            ),
        ],
    )
    request, blobs = _train_request(
        2, [0], weights, pems, releases=[release], release_plaintexts=blob.ref
    )
    refused(
        "train_request",
        request,
        [*blobs, blob],
        match="round 1: attestation check failed: 1 key holders attest the opened sum, 2 needed",
    )
    assert site.poll() is None  # refusals are answers: the site is still serving
