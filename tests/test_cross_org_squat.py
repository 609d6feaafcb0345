"""Update-id squatting across organisations (review of 2026-12-04): a colluding site signs
its own contributions under honest sites' update ids and the coordinator has them filed at
the victim's key holder first (requests that are then refused). Were they filed, the holder
would sum the colluder's shares in place of the honest sites' and, with the colluder's own
holder, open the victim's update. An update id is in its host's namespace (``h<host>-``):
the victim's key holder itself refuses them, and the real sum then opens as approved.

Federation a (victim), b, c (honest), d (colluder); 2-of-4 key (512 bits, unit speed);
``federation.max_colluding_sites=1``. Plain classes and the real SiteAgent.handle, with
``ray.get`` returning its argument (no Ray).
"""

from __future__ import annotations

import secrets
import types

import numpy as np


def test_a_squatted_update_id_is_refused_when_the_real_sum_comes(tmp_path, monkeypatch):
    import ray
    from cryptography.hazmat.primitives import serialization

    from fedray.crypto.codec import PackedPaillierCodec
    from fedray.crypto.secure_aggregation import ClientEncryptor, UpdateLayout
    from fedray.crypto.threshold import deal_threshold_key
    from fedray.federation import channel as ch
    from fedray.federation import federation_pb2 as pb
    from fedray.federation import messages as m
    from fedray.federation.shares import ShareContext, manifest_sha256, recipient_key, seal_share
    from fedray.federation.site import RoundRecord, SiteAgent
    from fedray.runtime.keys import CohortApprover, Contribution, HostIdentity, KeyHolder, digest
    from fedray.tools import certs
    from fedray.tools.keys import _site_private_key

    monkeypatch.setattr(ray, "get", lambda x, **k: x)
    SITES = ["a", "b", "c", "d"]
    tmp = tmp_path
    certs.make_federation(tmp / "certs", "hub", SITES, clients={s: 3 for s in SITES})
    manifest_path = tmp / "certs/federation.json"
    manifest = ch.Manifest.load(manifest_path)
    msha = manifest_sha256(manifest_path)
    key, dshares = deal_threshold_key(512, holders=4, threshold=2)
    codec = PackedPaillierCodec.for_key(key.public, num_values=8, max_summands=12)
    layout = UpdateLayout.for_key(key.public, codec)
    enc = ClientEncryptor(key, layout)
    ident = {
        s: HostIdentity.from_private_key(
            serialization.load_pem_private_key((tmp / f"certs/{s}/signing.key").read_bytes(), None)
        )
        for s in SITES
    }
    clients = {s: list(range(3 * i, 3 * i + 3)) for i, s in enumerate(SITES)}
    assignment = {c: i for i, s in enumerate(SITES) for c in clients[s]}
    R, MODEL = 1, "m" * 64

    def make_update(site, values, cids, uid=None):
        e, blobs = enc.encrypt_sum([(values, 1.0, None, {})])
        uid = uid or f"h{SITES.index(site)}-{secrets.token_hex(16)}"
        c = Contribution(
            key.fingerprint,
            R,
            uid,
            SITES.index(site),
            tuple(cids),
            digest(e.ciphertexts),
            tuple(digest(b) for b in blobs),
            MODEL,
        )
        return ident[site].sign(c), e.ciphertexts, blobs

    def seal(sender, recipient, uid, blob):
        j = SITES.index(recipient) + 1
        cert = manifest.sites[recipient].cert_sha256
        ctx = ShareContext(key.fingerprint, msha, R, uid, sender, recipient, j, cert)
        pem = (tmp / f"certs/{recipient}/cert.pem").read_bytes()
        return seal_share(recipient_key(pem, recipient, cert), ctx, blob)

    # --- victim site a's agent, built like SiteAgent.start() but without Ray ----------------
    secret_a = np.array([0.37, -0.21, 0.05, 0.44, -0.5, 0.12, 0.0, 0.3])

    class Cfg:
        pass

    cfg = types.SimpleNamespace(federation=types.SimpleNamespace(max_colluding_sites=1))
    agent = SiteAgent.__new__(SiteAgent)
    agent.job_sha256 = ""  # what the contributions below declare (none)
    agent.rounds = RoundRecord(tmp / "a.rounds.json", key.fingerprint)
    agent.cfg = cfg
    agent.policy = None
    agent.key = key
    agent.index = 0
    agent.site_id = "a"
    agent.paths = types.SimpleNamespace(manifest_obj=manifest, sites=SITES)
    agent.client_ids = clients["a"]
    agent._deposited = set()
    agent._opened = 0
    agent.authority = HostIdentity()
    agent.manifest_sha256 = msha
    import threading

    agent._lock = threading.Lock()
    agent._certificates = {}
    agent._without_share = set()
    agent._filed = {}
    agent.assignment = assignment
    agent._tls_key = _site_private_key(tmp / "certs/a/key.pem")

    class Remote:
        def __init__(self, f):
            self.f = f

        def remote(self, *a):
            return self.f(*a)

    holder = KeyHolder(
        1,
        {h: manifest.sites[s].signing_key for h, s in enumerate(SITES)},
        assignment,
        2,
        agent.authority.public_bytes(),
        max_rounds=3,
    )
    holder.install(key, dshares[0])
    agent.holder = types.SimpleNamespace(
        **{
            n: Remote(getattr(holder, n))
            for n in ("deposit", "share_sum", "open_round", "partial_decrypt")
        }
    )
    agent._open_round(R)

    # --- round 1: every site trains; a deposits its own update at home ------------------------
    upd = {}
    upd["a"] = make_update("a", secret_a, clients["a"])
    for s in "bc":
        upd[s] = make_update(s, np.random.uniform(-0.5, 0.5, 8), clients[s])
    upd["d"] = make_update("d", np.zeros(8), [9])
    agent.share_bytes = len(upd["a"][2][0])
    holder.deposit(upd["a"][0], upd["a"][2][0])
    agent._deposited.add(upd["a"][0].contribution.update_id)
    agent._filed[upd["a"][0].contribution.update_id] = upd["a"][0].contribution.message()
    uid = {s: upd[s][0].contribution.update_id for s in SITES}
    L = sorted(uid.values())

    # honest hosts approve the full list L (their agents' _check_sum: 4 sites >= 3)
    approvals = {}
    for s in SITES:
        approvals[SITES.index(s)] = CohortApprover(ident[s]).approve(
            key.fingerprint, R, L, [uid[s]]
        )

    # --- the colluder d squats b's and c's update ids with contributions it signs ------------
    squat = {}
    for s, cid in (("b", 10), ("c", 11)):
        squat[s] = make_update("d", np.zeros(8), [cid], uid=uid[s])

    def stmt(signed):
        return pb.SignedStatement(
            statement=signed.contribution.message(), signature=signed.signature
        )

    def request(entries, with_approvals=False):
        """entries: list of (signed contribution, sealed share or None) in id order."""
        blobs, sealed = {}, []
        ids = [e[0].contribution.update_id for e in entries]
        for n, (signed, sh) in enumerate(entries):
            if sh is None:
                continue
            out = ch.OutgoingBlob.from_array(f"s{n}", np.frombuffer(sh.sealed, dtype=np.uint8))
            blobs[out.header.blob_id] = ch.Blob(out.header, bytearray(out.data), "hub")
            sealed.append(
                pb.SealedShare(
                    update_id=signed.contribution.update_id,
                    holder=1,
                    ephemeral_public=sh.ephemeral_public,
                    nonce=sh.nonce,
                    sealed=out.ref,
                )
            )
        apps = (
            [
                pb.Approval(round=R, update_ids=ids, signature=sig, host=h)
                for h, sig in sorted(approvals.items())
            ]
            if with_approvals
            else []
        )
        body = pb.ShareSumRequest(
            round=R,
            update_ids=ids,
            approvals=apps,
            contributions=[stmt(e[0]) for e in entries],
            opening=pb.OPENING_SHARE_SUM,
            sealed_shares=sealed,
        )
        env = pb.Envelope(
            protocol=m.PROTOCOL_VERSION, sender="hub", recipient="a", seq=1, share_sum_request=body
        )
        kind = m.check_envelope(env)  # the site's schema check passes
        return ch.Message(kind, body, env, blobs)

    def send(msg):
        """The site's refusal of ``msg``, one line, or None if it was answered."""
        try:
            agent.handle(msg)
        except ch.Refused as exc:
            return str(exc)
        return None

    sealed_squat = {s: seal("d", "a", uid[s], squat[s][2][0]) for s in "bc"}
    x, y = sorted("bc", key=lambda s: uid[s])
    real = {s: upd[s][0] for s in SITES}

    # Request A: ids sorted; squat of x (with d's sealed share), real y with no share: the
    # loop would deposit the squat, then refuse at y. Hosts in the statements: {a, d, y}.
    ents = sorted(
        [(real["a"], None), (squat[x][0], sealed_squat[x]), (real[y], None)],
        key=lambda e: e[0].contribution.update_id,
    )
    refusals = [send(request(ents))]
    # Request B: real x (with its own sealed share), squat of y. Hosts {a, x, d}.
    ents = sorted(
        [
            (real["a"], None),
            (real[x], seal(x, "a", uid[x], upd[x][2][0])),
            (squat[y][0], sealed_squat[y]),
        ],
        key=lambda e: e[0].contribution.update_id,
    )
    refusals.append(send(request(ents)))
    # d's contributions under b's and c's ids are refused: they are not in d's namespace
    # (h3-...). The site agent refuses them before its holder is asked; the holder refuses
    # them itself too (tests/test_custody.py), whatever the agent checks.
    assert all(r is not None and "namespace" in r for r in refusals), refusals
    assert all(d.host != SITES.index("d") for u, d in holder._deposits.items() if u != uid["d"])

    # The real opening of the approved sum L, with the real statements and all approvals,
    # is answered, and the holder's share sum is of the real updates' shares.
    ents = sorted(
        [(real[s], seal(s, "a", uid[s], upd[s][2][0]) if s != "a" else None) for s in SITES],
        key=lambda e: e[0].contribution.update_id,
    )
    assert send(request(ents, with_approvals=True)) is None
    assert holder._released[R] == tuple(L)
    from fedray.crypto.threshold import add_share_blobs

    by_id = {uid[s]: upd[s][2][0] for s in SITES}
    expected = add_share_blobs(key, [by_id[u] for u in L])
    assert holder.share_sum(R, L, approvals) == expected  # the same sum again: same answer

    # Within its own namespace a host may sign a second statement under an id already
    # filed (only its own shares would be swapped: the sum then fails to open); the site
    # agent refuses it by the id it filed, before its holder is asked.
    restated = make_update("d", np.ones(8), [9], uid=uid["d"])
    ents = sorted(
        [(real[s], None) for s in "abc"]
        + [(restated[0], seal("d", "a", uid["d"], restated[2][0]))],
        key=lambda e: e[0].contribution.update_id,
    )
    refusal = send(request(ents, with_approvals=True))
    assert refusal is not None and "relayed as another contribution" in refusal, refusal
