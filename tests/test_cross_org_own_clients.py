"""A site's own-clients rule against a colluding site (review of 2026-12-04, second stop).

Site a's policy signs a sum holding any of its clients only if at least
``min_sum.clients - max_colluding_clients`` of them are in it (its noise is sized for
that). Approvals name update ids only, so a colluding site c could show a, for its
approval, statements other than those the key holders later sum: one of its own naming
a's clients (a counts more of its own clients than the sum holds), or one under a's own
update id naming c as host (a counts none of its own and skips the rule). Site a's agent
now checks, before its policy counts anything, what the key holders check at deposit: the
id's namespace, the clients' host, and that an id it filed is relayed as filed.

Federation a (5 clients), b (3), c (3); 2-of-3 key; max_colluding_sites null (sums of 3
sites). Plain classes and the real SiteAgent.handle, ``ray.get`` returning its argument.
"""

from __future__ import annotations

import secrets
import threading
import types

import numpy as np
import pytest


@pytest.fixture
def federation(tmp_path, monkeypatch):
    import ray
    from cryptography.hazmat.primitives import serialization

    from fedray.crypto.codec import PackedPaillierCodec
    from fedray.crypto.secure_aggregation import ClientEncryptor, UpdateLayout
    from fedray.crypto.threshold import deal_threshold_key
    from fedray.federation import channel as ch
    from fedray.federation import federation_pb2 as pb
    from fedray.federation import messages as m
    from fedray.federation.site import RoundRecord, SiteAgent
    from fedray.runtime.keys import CohortApprover, Contribution, HostIdentity, KeyHolder, digest
    from fedray.tools import certs
    from tests.test_site_policy import make_policy

    monkeypatch.setattr(ray, "get", lambda x, **k: x)
    sites = ["a", "b", "c"]
    certs.make_federation(tmp_path / "certs", "hub", sites, clients={"a": 5, "b": 3, "c": 3})
    manifest = ch.Manifest.load(tmp_path / "certs/federation.json")
    key, shares = deal_threshold_key(512, holders=3, threshold=2)
    codec = PackedPaillierCodec.for_key(key.public, num_values=8, max_summands=12)
    enc = ClientEncryptor(key, UpdateLayout.for_key(key.public, codec))
    ident = {
        s: HostIdentity.from_private_key(
            serialization.load_pem_private_key(
                (tmp_path / f"certs/{s}/signing.key").read_bytes(), None
            )
        )
        for s in sites
    }
    clients = {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7], "c": [8, 9, 10]}
    assignment = {c: sites.index(s) for s in sites for c in clients[s]}

    def sign(site, cids, uid=None, host=None, like=None):
        if like is None:
            e, blobs = enc.encrypt_sum([(np.full(8, 0.1), 1.0, None, {})])
            cts, share_digests = digest(e.ciphertexts), tuple(digest(b) for b in blobs)
        else:
            cts, share_digests = like.ciphertext_sha256, like.share_sha256
        host = sites.index(site) if host is None else host
        uid = uid or f"h{host}-{secrets.token_hex(16)}"
        c = Contribution(key.fingerprint, 1, uid, host, tuple(cids), cts, share_digests, "m" * 64)
        return ident[site].sign(c)

    # round 1's cohort holds ONE of a's clients (0); b and c train theirs
    real = {"a": sign("a", [0]), "b": sign("b", [5, 6, 7]), "c": sign("c", [8])}
    uid = {s: real[s].contribution.update_id for s in sites}

    class Remote:
        def __init__(self, f):
            self.f = f

        def remote(self, *a):
            return self.f(*a)

    policy = make_policy(
        site="a",
        min_sum={"clients": 4, "sites": 2},
        privacy={
            "mode": "client",
            "noise_multiplier": 1.0,
            "clip_norm": 1.0,
            "delta": 1e-5,
            "max_epsilon_vs_server": None,
            "max_colluding_clients": 1,
        },
    )
    agent = SiteAgent.__new__(SiteAgent)
    agent.job_sha256 = ""  # what the contributions below declare (none)
    agent.rounds = RoundRecord(tmp_path / "a.rounds.json", key.fingerprint)
    agent.cfg = types.SimpleNamespace(federation=types.SimpleNamespace(max_colluding_sites=None))
    agent.policy, agent.key, agent.index, agent.site_id = policy, key, 0, "a"
    agent.paths = types.SimpleNamespace(manifest_obj=manifest, sites=sites)
    agent.client_ids, agent.assignment = clients["a"], assignment
    agent._deposited, agent._opened, agent._trained = {uid["a"]}, 0, 1
    agent._lock, agent._certificates, agent._without_share = threading.Lock(), {}, set()
    agent._filed = {uid["a"]: real["a"].contribution.message()}
    agent.authority = HostIdentity()
    peers = {h: manifest.sites[s].signing_key for h, s in enumerate(sites)}
    holder = KeyHolder(1, peers, assignment, 2, agent.authority.public_bytes(), max_rounds=3)
    holder.install(key, shares[0])
    agent.holder = types.SimpleNamespace(open_round=Remote(holder.open_round))
    approver = CohortApprover(ident["a"])
    agent.host = types.SimpleNamespace(
        approve=Remote(lambda r, ids: approver.approve(key.fingerprint, r, ids, [uid["a"]]))
    )
    agent._open_round(1)

    def approve(statements: dict):
        """Site a's answer to an approve request of the round's sum with ``statements``
        (update id -> signed contribution): the refusal's line, or None if it signed."""
        ids = sorted(statements)
        body = pb.ApproveRequest(
            round=1,
            update_ids=ids,
            contributions=[
                pb.SignedStatement(
                    statement=statements[u].contribution.message(),
                    signature=statements[u].signature,
                )
                for u in ids
            ],
        )
        env = pb.Envelope(
            protocol=m.PROTOCOL_VERSION, sender="hub", recipient="a", seq=1, approve_request=body
        )
        try:
            agent.handle(ch.Message(m.check_envelope(env), body, env, {}))
        except ch.Refused as exc:
            return str(exc)
        return None

    return types.SimpleNamespace(real=real, uid=uid, sign=sign, approve=approve)


def test_the_honest_relay_of_a_sum_with_one_own_client_is_refused(federation):
    f = federation
    refusal = f.approve({f.uid[s]: f.real[s] for s in "abc"})
    assert refusal and "1 of this site's own clients is below" in refusal


def test_a_colluders_statement_naming_this_sites_clients_is_refused(federation):
    """c shows a a second statement under its own id claiming a's clients 1 and 2 (a
    would count 3 of its own); the holders would sum c's real one."""
    f = federation
    forged = f.sign("c", [1, 2, 8], uid=f.uid["c"], like=f.real["c"].contribution)
    shown = {f.uid["a"]: f.real["a"], f.uid["b"]: f.real["b"], f.uid["c"]: forged}
    refusal = f.approve(shown)
    assert refusal and "names clients it does not host (1, 2)" in refusal


def test_a_colluders_statement_under_this_sites_id_is_refused(federation):
    """c signs, as host c, a statement under a's own update id naming one of c's clients:
    a would count none of its own clients and skip its rule."""
    f = federation
    squat = f.sign("c", [9], uid=f.uid["a"])
    shown = {f.uid["a"]: squat, f.uid["b"]: f.real["b"], f.uid["c"]: f.real["c"]}
    refusal = f.approve(shown)
    assert refusal and "is not in its host c's namespace" in refusal


def test_this_sites_own_id_relayed_as_another_statement_is_refused(federation):
    """a's own update id, relayed as a statement a's host never filed (here: a's own key
    cannot be used by c, so the test signs as a, with other clients): refused by the filed
    statement, whatever it claims."""
    f = federation
    other = f.sign("a", [0, 1, 2], uid=f.uid["a"])
    shown = {f.uid["a"]: other, f.uid["b"]: f.real["b"], f.uid["c"]: f.real["c"]}
    refusal = f.approve(shown)
    assert refusal and "relayed as another contribution than the one filed" in refusal
