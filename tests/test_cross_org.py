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
    "privacy=dp",
    "privacy.reproducible_noise=true",
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
    """Bit-identical final weights to the same job in one cluster (client-level DP on with
    reproducible noise: the sums are exact integers whoever adds them), with the key held
    by the sites (2 of 3 open a sum), every site reached only through the channel, and the sites stopping when the
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
    # Client-level DP on: each site's host adds its noise share (seeded here, so the two
    # deployments can be compared bit for bit), the coordinator's accountant counts.
    # (Seeded noise protects nothing against the server: epsilon_vs_server is reported inf.)
    assert summary["privacy"] == "dp" and 0 < summary["epsilon"] < float("inf")
    assert summary["epsilon_vs_server"] == float("inf")

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


# --- a hostile coordinator against one live site --------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """This test as the coordinator (its certificate and signing key, the real protocol)
    and site a (3 of the federation's 6 clients) dialling it from its own Ray cluster."""
    from fedray.federation import channel as ch
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
    )
    site = _start_site(w, "a", coord.port, w / "a.log")
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


def _train_request(round_num, clients, weights, **kw):
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
        **kw,
    )
    return request, [blob]


def test_a_site_refuses_what_a_hostile_coordinator_asks(hostile):
    """Every request outside what the site runs is refused with one line, nothing of the
    site leaving: others' clients, another task, a hyper-parameter it does not take,
    weights of another shape; a second list to approve in a round; a sum it cannot check
    (forged approval, ciphertexts that are not the signed ones, a second sum of a round).
    What does leave for a good request is ciphertexts and statements signed with the
    site's manifest key."""
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

    reply = peer.call("train_request", *_train_request(1, [0, 1, 2], weights), timeout=300)
    body = reply.body
    statement = json.loads(body.contribution)
    assert statement["client_ids"] == [0, 1, 2] and statement["host"] == 0
    assert verify(site_key, bytes(body.contribution_signature), bytes(body.contribution))
    cts = bytes(reply.blob(body.ciphertexts).ciphertexts(key.public.ciphertext_bytes))
    uid = body.update_id

    # Site b's update (this test holds every party's files, so it can play a colluding
    # site b): any valid ciphertexts of the right length under b's signature.
    from cryptography.hazmat.primitives import serialization

    from fedray.runtime.keys import Contribution, HostIdentity, digest

    b_key = serialization.load_pem_private_key((w / "certs/b/signing.key").read_bytes(), None)
    b_identity = HostIdentity.from_private_key(b_key)
    ub = "b" * 32
    b_signed = b_identity.sign(
        Contribution(key.fingerprint, 1, ub, 1, (3, 4), digest(cts), (), statement["model_sha256"])
    )
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
    both = sorted([uid, ub])
    approval = peer.call("approve_request", approve_request(both), timeout=60).body
    assert approval.host == 0
    assert verify(site_key, bytes(approval.signature), cohort_message(key.fingerprint, 1, both))
    other = sorted([uid, "c" * 32])
    statements["c" * 32] = (
        b_identity.sign(
            Contribution(key.fingerprint, 1, "c" * 32, 1, (5,), digest(cts), (), "")
        ).contribution.message(),
        statements[ub][1],
    )
    refused("approve_request", approve_request(other), match="not signed by its host")
    b_again = b_identity.sign(
        Contribution(
            key.fingerprint, 1, "c" * 32, 1, (5,), digest(cts), (), statement["model_sha256"]
        )
    )
    statements["c" * 32] = (b_again.contribution.message(), b_again.signature)
    refused("approve_request", approve_request(other), match="already approved a different sum")

    b_approval = b_identity.sign_bytes(cohort_message(key.fingerprint, 1, both))

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
    assert site.poll() is None  # refusals are answers: the site is still serving
