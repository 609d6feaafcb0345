"""What the server actually receives in a round, recorded inside the real server actor.

With crypto on, everything the server receives from client hosts and key holders is
checked against an explicit allow-list: each kind of answer it may get, each field of
each object in it (a ``ClientResult``, the ``EncryptedUpdate`` inside), and for each
field the values it may hold. Those are values the server knows anyway (the clients it
asked, the key, the layout, the cluster's nodes), sizes fixed by the key and layout,
the sealed ciphertexts, answers about the *sum*, and per-call timings; nothing per
client in the clear. A field the list does not name, a kind of answer it does not
name, or a per-client value in a named field (an example count, a weight, a loss)
fails the check.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray.cloudpickle

import tests.test_server_view as this
from fedray.crypto.codec import STATS_FIELDS
from fedray.crypto.secure_aggregation import EncryptedUpdate
from fedray.runtime.client import ClientResult
from fedray.runtime.driver import run_experiment
from fedray.runtime.keys import find_key_material
from fedray.runtime.server import Server
from tests.conftest import compose

ray.cloudpickle.register_pickle_by_value(this)

SMALL_KEY = ["crypto=paillier", "crypto.key_bits=512", "crypto.allow_insecure_keys=true"]


class RecordingServer(Server):
    """Pickles everything it receives from hosts and key holders into ``record_dir``,
    with where it came from: the server method that fetched it (``_collect``: a host's
    train call, with the clients it was asked to train and when it was dispatched;
    ``_approvals``: a host's signature of the sum's update list, with the host and the
    list; ``_lost_contributors``: whether a host still holds its sealed updates, a
    bool; ``_ask_holders``: a key holder, with the method and how many updates the sum
    has; ``_decrypt_with_private_key``: a shared-custody holder's range of the sum).
    ``facts.pkl``: what the server holds anyway (public key, layout, assignment, the
    hosts' public signing keys), to check the values against."""

    record_dir = ""

    def set_up(self, hosts, assignment, key=None, privacy=None, key_holders=None):
        done = super().set_up(hosts, assignment, key, privacy, key_holders)
        if key is not None:
            import ray

            facts = {
                "key": key,  # the public key (ThresholdPublicKey): the server's own
                "num_ciphertexts": self.layout.num_ciphertexts,
                "num_values": self.view.size,
                "host_of": dict(assignment),
                "identities": [ray.get(h.identity.remote())[0] for h in hosts],
                "attestation_keys": ray.get([h.attestation_key.remote() for h in key_holders]),
            }
            from fedray.config import needs_feature_statistics

            if needs_feature_statistics(self.cfg):  # round 0: the federation's feature sums
                from fedray.crypto.secure_aggregation import feature_sums_codec

                codec = feature_sums_codec(self.cfg, key.public, self.info.num_features)
                facts["feature_ciphertexts"] = codec.num_ciphertexts
                facts["feature_values"] = codec.num_values
            (Path(self.record_dir) / "facts.pkl").write_bytes(pickle.dumps(facts))
        return done

    def _dispatch(self, ray, cohort):
        sent = time.monotonic()
        pending = super()._dispatch(ray, cohort)
        self._calls = {ref: (list(chunk), sent) for ref, chunk in pending.items()}
        return pending

    def _approvals(self, acc):
        self._approving = (list(acc.update_ids), iter(sorted(set(acc.sources))))
        return super()._approvals(acc)

    def _ask_holders(self, method, *args, need, check=None):
        self._asked = (method, len(args[0]), None)
        if method == "attest":  # the message an attestation signs: what the server holds
            from fedray.runtime.keys import digest
            from fedray.runtime.lineage import release_message

            message = release_message(
                self.key.fingerprint,
                self.round,
                self._round_model_sha256,
                self._count,
                digest(self._opened_bytes),
            )
            self._asked = (method, len(args[0]), message)
        return super()._ask_holders(method, *args, need=need, check=check)

    def _attest(self, acc, plaintexts):
        self._count = acc.count
        return super()._attest(acc, plaintexts)

    def _fetch(self, ref):
        obj = super()._fetch(ref)
        received = time.monotonic()
        channel = _server_caller()
        chunk, sent = getattr(self, "_calls", {}).get(ref, (None, None))
        record = {
            "round": self.round,
            "channel": channel,
            "chunk": chunk,
            "window_s": None if sent is None else received - sent,
            "asked": getattr(self, "_asked", None) if channel == "_ask_holders" else None,
            "approving": None,
            "obj": obj,
        }
        if channel == "_approvals":
            ids, hosts = self._approving
            record["approving"] = (ids, next(hosts, None))
        self._seq = getattr(self, "_seq", 0) + 1
        path = Path(self.record_dir) / f"{self._seq:05d}.pkl"
        path.write_bytes(pickle.dumps(record))
        return obj


def _server_caller() -> str:
    """The name of the server method (fedray/runtime/server.py) that called ``_fetch``;
    Ray's wrappers around actor methods are skipped."""
    server_file = sys.modules[Server.__module__].__file__
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename != server_file:
        frame = frame.f_back
    return frame.f_code.co_name if frame is not None else "?"


def _record(tmp_path, overrides):
    record = tmp_path / "received"
    record.mkdir()
    server = type("Recording", (RecordingServer,), {"record_dir": str(record)})
    # global standardisation: round 0, the federation's feature sums, is recorded too
    cfg = compose([*overrides, "rounds=2", "checkpoint.every=0", "dataset.standardize=global"])
    run_experiment(cfg, tmp_path / "run", server_class=server)
    received = [pickle.loads(p.read_bytes()) for p in sorted(record.glob("0*.pkl"))]
    facts = record / "facts.pkl"
    return cfg, received, pickle.loads(facts.read_bytes()) if facts.exists() else None


def _walk(obj):
    yield obj
    if isinstance(obj, list | tuple):
        for v in obj:
            yield from _walk(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _walk(v)


# -- the allow-list ------------------------------------------------------------------------
def _is(kind):
    return lambda v: type(v) is kind


def _fields(obj) -> dict[str, Any]:
    """Every attribute of ``obj``: its instance dict and any slots."""
    out = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if hasattr(obj, slot):
                out[slot] = getattr(obj, slot)
    return out


def _check_fields(obj, allowed: dict[str, Any], where: str) -> list[str]:
    """Problems: a field of ``obj`` not in ``allowed``, or a value its rule refuses."""
    problems = []
    for name, value in _fields(obj).items():
        rule = allowed.get(name)
        if rule is None:
            problems.append(f"{where}.{name}={value!r}: a field the server may not receive")
        elif not rule(value):
            problems.append(f"{where}.{name}={value!r}: not a value the server may receive")
    return problems


def _update_problems(enc, r: ClientResult, chunk: list[int], facts, where: str) -> list[str]:
    """An encrypted update: the key, the layout's sizes, the ciphertexts, whom it covers
    (clients of this call), and the id of its signed contribution. Nothing else."""
    if type(enc) is not EncryptedUpdate:
        return [f"{where}: a {type(enc).__name__} where an EncryptedUpdate may be"]
    key = facts["key"]
    size = facts["num_ciphertexts"] * key.public.ciphertext_bytes
    ids = enc.client_ids
    allowed = {
        "key_id": lambda v: v == key.fingerprint,
        "num_values": lambda v: type(v) is int and v == facts["num_values"],
        "ciphertexts": lambda v: type(v) is bytes and len(v) == size,
        "count": lambda v: type(v) is int and v == len(ids),
        "client_ids": lambda v: (
            type(v) is tuple
            and all(type(c) is int for c in v)
            and len(set(v)) == len(v) >= 1
            and r.client_id in v
            and set(v) <= set(chunk)
        ),
        # In the namespace of the host that made it (h<host>-), then 128 random bits.
        "update_id": lambda v: (
            type(v) is str
            and re.fullmatch(f"h{facts['host_of'][r.client_id]}-[0-9a-f]{{32}}", v) is not None
        ),
    }
    return _check_fields(enc, allowed, where)


def _result_problems(r, chunk, nodes, facts, cfg, where) -> list[str]:
    """One client's result with crypto on: who it is, whether it failed, where it ran,
    and only on the result that carries an update, that update and its sizes."""
    if type(r) is not ClientResult:
        return [f"{where}: a {type(r).__name__} where a ClientResult may be"]
    key = facts["key"]
    carrier = r.encrypted is not None
    shares = cfg.crypto.custody == "threshold" and cfg.crypto.fast_decrypt
    ciphertext_bytes = facts["num_ciphertexts"] * key.public.ciphertext_bytes
    share_bytes = facts["num_ciphertexts"] * key.share_width() if shares else 0
    # A host sends each key holder but its own site's (holder i is at host i) its shares.
    host = facts["host_of"][r.client_id]
    to_holders = share_bytes * (key.holders - (1 if host < key.holders else 0))
    allowed = {
        "client_id": lambda v: type(v) is int and v in chunk,
        "weight": lambda v: type(v) is float and v == 0.0,  # inside the ciphertexts only
        "delta": lambda v: v is None,
        "encrypted": lambda v: True,  # checked field by field below
        "compressed": lambda v: v is None,
        "stats": lambda v: v is None,  # inside the ciphertexts only
        # Timings: per host call (on its first carrier) and per update, no other value.
        "train_seconds": lambda v: type(v) is float and (v == 0.0 or (carrier and v > 0)),
        "encrypt_seconds": lambda v: type(v) is float and (v > 0 if carrier else v == 0.0),
        "bytes_up": lambda v: type(v) is int and v == (ciphertext_bytes if carrier else 0),
        "bytes_to_key_holders": lambda v: type(v) is int and v == (to_holders if carrier else 0),
        "node_id": lambda v: type(v) is str and v in nodes,
        "error": lambda v: v is None,  # a clean run
    }
    problems = _check_fields(r, allowed, where)
    if carrier:
        problems += _update_problems(r.encrypted, r, chunk, facts, f"{where}.encrypted")
    return problems


def _train_call_problems(rec, nodes, facts, cfg, where) -> list[str]:
    """One host call's answer: one result per client it was asked to train, in order;
    each client covered by exactly one update; timings that fit inside the call (a count
    or size sent as a "timing" would not)."""
    batch, chunk = rec["obj"], rec["chunk"]
    if type(batch) is not list or chunk is None:
        return [f"{where}: a {type(batch).__name__} from a call the server did not make"]
    problems = [f"{where}: clients {[getattr(r, 'client_id', r) for r in batch]}, asked {chunk}"]
    if [getattr(r, "client_id", None) for r in batch] == chunk:
        problems = []
    for i, r in enumerate(batch):
        problems += _result_problems(r, chunk, nodes, facts, cfg, f"{where}[{i}]")
    if problems:
        return problems
    covered = [c for r in batch if r.encrypted is not None for c in r.encrypted.client_ids]
    if sorted(covered) != sorted(chunk):
        problems.append(f"{where}: updates cover {sorted(covered)}, the call's clients {chunk}")
    if cfg.crypto.host_sum and sum(r.encrypted is not None for r in batch) != 1:
        problems.append(f"{where}: a host sum is one update per call")
    if sum(r.train_seconds > 0 for r in batch) != 1:
        problems.append(f"{where}: train_seconds on {[r.train_seconds for r in batch]}")
    busy = sum(r.train_seconds + r.encrypt_seconds for r in batch)
    if busy > rec["window_s"] + 1e-3:  # disjoint intervals of the call, which ran inside
        problems.append(f"{where}: {busy:.3f} s of timings in a {rec['window_s']:.3f} s call")
    return problems


def _feature_sums_problems(rec, nodes, facts, where) -> list[str]:
    """A host's feature sums (round 0): one sealed update of the feature-sums layout,
    covering exactly the host's clients, and nothing in the clear beside it."""
    r, key = rec["obj"], facts["key"]
    if type(r) is not ClientResult or "feature_ciphertexts" not in facts:
        return [f"{where}: a {type(r).__name__} where a host's sealed feature sums may be"]
    enc = r.encrypted
    if type(enc) is not EncryptedUpdate:
        return [f"{where}: feature sums that are not one EncryptedUpdate"]
    host = facts["host_of"].get(r.client_id)
    own = sorted(c for c, h in facts["host_of"].items() if h == host)
    allowed = {
        "client_id": lambda v: type(v) is int and v == own[0],
        "weight": lambda v: type(v) is float and v == 0.0,
        "delta": lambda v: v is None,
        "encrypted": lambda v: True,  # checked below
        "compressed": lambda v: v is None,
        "stats": lambda v: v is None,
        "train_seconds": lambda v: type(v) is float and v == 0.0,
        "encrypt_seconds": lambda v: type(v) is float and v == 0.0,
        "bytes_up": lambda v: type(v) is int and v == 0,
        "bytes_to_key_holders": lambda v: type(v) is int and v == 0,
        "node_id": lambda v: type(v) is str and v in nodes,
        "error": lambda v: v is None,
    }
    size = facts["feature_ciphertexts"] * key.public.ciphertext_bytes
    on_update = {
        "key_id": lambda v: v == key.fingerprint,
        "num_values": lambda v: type(v) is int and v == facts["feature_values"],
        "ciphertexts": lambda v: type(v) is bytes and len(v) == size,
        "count": lambda v: type(v) is int and v == 1,
        "client_ids": lambda v: type(v) is tuple and list(v) == own,
        "update_id": lambda v: (
            type(v) is str and re.fullmatch(f"h{host}-[0-9a-f]{{32}}", v) is not None
        ),
    }
    return _check_fields(r, allowed, where) + _check_fields(enc, on_update, f"{where}.encrypted")


def _holder_answer_problems(rec, facts, where) -> list[str]:
    """A key holder's answer: about the sum only, and of the size the key fixes."""
    key, obj, num = facts["key"], rec["obj"], facts["num_ciphertexts"]
    if rec["round"] == 0:  # the federation's feature sums
        num = facts.get("feature_ciphertexts", -1)
    n2 = key.n * key.n
    if rec["channel"] == "_attest":  # a key holder's attestation key: 32 public bytes
        if type(obj) is bytes and len(obj) == 32:
            return []
        return [f"{where}: an attestation key that is a {type(obj).__name__}"]
    if rec["channel"] == "_ask_holders":
        method, updates, message = rec["asked"]
        if method == "attest":  # an Ed25519 signature of the release (deterministic)
            from fedray.runtime.keys import verify

            keys = facts.get("attestation_keys", [])
            if type(obj) is bytes and any(verify(k, obj, message) for k in keys):
                return []
            return [f"{where}: attest answered something other than a holder's signature"]
        allowed = {  # per method, what its answer may be
            # its share of the summed exponents of the sum, of the width the key fixes
            "share_sum": type(obj) is bytes and len(obj) == num * key.share_width(updates),
            # c^(s_j) of each ciphertext of the sum
            "partial_decrypt": type(obj) is list
            and len(obj) == num
            and all(type(x) is int and 0 < x < n2 for x in obj),
        }
        if allowed.get(method, False):
            return []
        return [f"{where}: {method} answered a {type(obj).__name__} not on the allow-list"]
    # Shared custody: a holder's range of the decrypted *sum*.
    if type(obj) is list and all(type(x) is int and 0 <= x < key.n for x in obj):
        return []
    return [f"{where}: a shared-custody holder answered {type(obj).__name__}"]


def _approval_problems(rec, facts, where) -> list[str]:
    """A host's approval: its signature of the key, the round and the sum's update list
    (Ed25519 is deterministic: one valid signature, no room for anything else)."""
    from fedray.runtime.keys import cohort_message, verify

    ids, host = rec["approving"]
    sig = rec["obj"]
    message = cohort_message(facts["key"].fingerprint, rec["round"], ids)
    if host is None or type(sig) is not bytes:
        return [f"{where}: a {type(sig).__name__} from no host in the sum"]
    if not verify(facts["identities"][host], sig, message):
        return [f"{where}: host {host} answered {sig!r}, not its signature of the sum"]
    return []


def server_view_problems(cfg, received, facts, nodes) -> list[str]:
    """Everything the server received, against the allow-list; [] when all is allowed."""
    problems = []
    ranges: dict[int, int] = {}
    for i, rec in enumerate(received):
        where = f"answer {i} (round {rec['round']}, {rec['channel']})"
        if rec["channel"] == "_collect":
            problems += _train_call_problems(rec, nodes, facts, cfg, where)
        elif rec["channel"] == "open_feature_sums" and rec["round"] == 0:
            problems += _feature_sums_problems(rec, nodes, facts, where)
        elif rec["channel"] == "_approvals":
            problems += _approval_problems(rec, facts, where)
        elif rec["channel"] == "_lost_contributors":  # before approvals: one bit, "holds"
            if type(rec["obj"]) is not bool:
                problems.append(f"{where}: holds answered a {type(rec['obj']).__name__}")
        elif rec["channel"] in ("_ask_holders", "_decrypt_with_private_key", "_attest"):
            problems += _holder_answer_problems(rec, facts, where)
            if rec["channel"] == "_decrypt_with_private_key" and type(rec["obj"]) is list:
                ranges[rec["round"]] = ranges.get(rec["round"], 0) + len(rec["obj"])
        else:
            problems.append(f"{where}: a kind of answer not on the allow-list")
    for r, count in ranges.items():  # the ranges make up one sum, once
        expected = facts["num_ciphertexts"] if r else facts.get("feature_ciphertexts")
        if count != expected:
            problems.append(f"round {r}: {count} values decrypted, a sum has {expected}")
    return problems


@pytest.mark.parametrize(
    "extra",
    [[], ["crypto.custody=shared"], ["crypto.host_sum=false", "crypto.fast_decrypt=false"]],
    ids=["threshold-host-sums", "shared", "per-client-partial-decryptions"],
)
def test_with_crypto_everything_the_server_receives_is_on_the_allow_list(
    ray_2cpus, tmp_path, extra
):
    cfg, received, facts = _record(tmp_path, [*SMALL_KEY, *extra])
    nodes = {node["NodeID"] for node in ray.nodes()}
    assert server_view_problems(cfg, received, facts, nodes) == []
    # The list was exercised: every client's answer in both rounds, and the sums' openings.
    batches = [rec for rec in received if rec["channel"] == "_collect"]
    assert sum(len(rec["obj"]) for rec in batches) == 2 * 10
    opened_by = "_decrypt_with_private_key" if cfg.crypto.custody == "shared" else "_ask_holders"
    # round 0: the federation's feature sums (dataset.standardize=global)
    assert {rec["round"] for rec in received if rec["channel"] == opened_by} == {0, 1, 2}
    sums = [rec for rec in received if rec["channel"] == "open_feature_sums"]
    assert len(sums) == 2 and all(rec["obj"].encrypted is not None for rec in sums)
    for obj in (o for rec in received for o in _walk(rec["obj"])):
        assert not isinstance(obj, np.ndarray), "an array reached the server"
    assert find_key_material([rec["obj"] for rec in received], facts["key"].n) == []


def _sealed_batch(cfg, facts, tweak=None):
    """A well-formed host-sum answer of a call for clients 0 and 1 on host 0 (as the
    recorder stores it), with ``tweak`` applied to its results."""
    key = facts["key"]
    size = facts["num_ciphertexts"] * key.public.ciphertext_bytes
    shares = facts["num_ciphertexts"] * key.share_width() * (key.holders - 1)
    enc = EncryptedUpdate(
        key.fingerprint, facts["num_values"], b"\1" * size, 2, (0, 1), "h0-" + "a" * 32
    )
    batch = [
        ClientResult(
            0,
            encrypted=enc,
            train_seconds=0.5,
            encrypt_seconds=0.25,
            bytes_up=size,
            bytes_to_key_holders=shares,
            node_id="node",
        ),
        ClientResult(1, node_id="node"),
    ]
    if tweak is not None:
        tweak(batch)
    return {"round": 1, "channel": "_collect", "chunk": [0, 1], "window_s": 2.0, "obj": batch}


def _set(i, name, value, on_update=False):
    def tweak(batch):
        obj = batch[i].encrypted if on_update else batch[i]
        object.__setattr__(obj, name, value)

    return tweak


@pytest.mark.parametrize(
    ("tweak", "complaint"),
    [
        (_set(1, "num_examples", 42), "num_examples=42: a field"),
        (_set(0, "num_examples", 42, on_update=True), "encrypted.num_examples=42: a field"),
        (_set(0, "bytes_to_key_holders", 42), "bytes_to_key_holders=42: not a value"),
        (_set(1, "bytes_to_key_holders", 42), "bytes_to_key_holders=42: not a value"),
        (_set(1, "bytes_up", 42), "bytes_up=42: not a value"),
        (_set(0, "weight", 0.7), "weight=0.7: not a value"),
        (_set(1, "stats", {"weight": 0.7}), "stats="),
        (_set(1, "train_seconds", 0.5), "train_seconds=0.5: not a value"),
        (_set(0, "train_seconds", 42.0), "of timings in a 2.000 s call"),
        (_set(0, "encrypt_seconds", 42), "encrypt_seconds=42: not a value"),
        (_set(1, "node_id", "42"), "node_id='42': not a value"),
        (_set(1, "delta", np.zeros(2, np.float32)), "delta="),
        (_set(0, "count", 42, on_update=True), "count=42: not a value"),
        (_set(0, "client_ids", (0, 1, 7), on_update=True), "client_ids=(0, 1, 7)"),
        (_set(0, "update_id", "42", on_update=True), "update_id='42': not a value"),
        (_set(0, "update_id", "a" * 32, on_update=True), "update_id='aaaa"),
        (_set(0, "update_id", "h1-" + "a" * 32, on_update=True), "update_id='h1-aaaa"),
    ],
)
def test_the_allow_list_refuses_a_new_field_or_a_per_client_value(tweak, complaint):
    """The check itself, on hand-made answers: a well-formed one passes; a count or a
    weight smuggled into a new field or into an allowed one fails (no Ray, a fake key)."""
    key = type(
        "Key",
        (),
        {
            "fingerprint": "f" * 16,
            "holders": 2,
            "n": 2**511 + 1,
            "public": type("Public", (), {"ciphertext_bytes": 128})(),
            "share_width": lambda self, summands=1: 70,
        },
    )()
    facts = {"key": key, "num_ciphertexts": 3, "num_values": 10, "host_of": {0: 0, 1: 0}}
    cfg = compose(SMALL_KEY)
    nodes = {"node"}
    assert server_view_problems(cfg, [_sealed_batch(cfg, facts)], facts, nodes) == []
    problems = server_view_problems(cfg, [_sealed_batch(cfg, facts, tweak)], facts, nodes)
    assert any(complaint in p for p in problems), problems
    stray = {"round": 1, "channel": "_some_new_call", "obj": 42}
    assert "not on the allow-list" in server_view_problems(cfg, [stray], facts, nodes)[0]


def test_the_allow_list_takes_only_a_hosts_signature_of_the_sum_as_its_approval():
    from fedray.runtime.keys import HostIdentity, cohort_message

    host = HostIdentity()
    facts = {
        "key": type("Key", (), {"fingerprint": "f" * 16})(),
        "identities": [host.public_bytes()],
    }
    good = host.sign_bytes(cohort_message("f" * 16, 1, ["a", "b"]))
    other = host.sign_bytes(cohort_message("f" * 16, 1, ["a"]))
    cfg = compose(SMALL_KEY)

    def approval(sig, host_index=0):
        rec = {"round": 1, "channel": "_approvals", "approving": (["b", "a"], host_index)}
        return [{**rec, "obj": sig}]

    assert server_view_problems(cfg, approval(good), facts, set()) == []
    for bad in (other, good[:-1] + bytes([good[-1] ^ 1]), good + b"\0", 42):
        assert "not its signature" in server_view_problems(cfg, approval(bad), facts, set())[0] or (
            "from no host" in server_view_problems(cfg, approval(bad), facts, set())[0]
        )
    assert "from no host" in server_view_problems(cfg, approval(good, None), facts, set())[0]


def test_the_recorder_sees_plaintext_updates_when_crypto_is_off(ray_2cpus, tmp_path):
    """The same recorder in a plaintext run: it does see the deltas (the check can fail),
    and each client's statistics: its weight and weight-weighted figures, no example count
    (the same definition as the encrypted statistics)."""
    _, received, _ = _record(tmp_path, ["crypto=none"])
    assert {rec["channel"] for rec in received} == {"_collect", "open_feature_sums"}
    # Without crypto each host's feature sums (round 0) come in the clear too.
    sums = [rec["obj"] for rec in received if rec["channel"] == "open_feature_sums"]
    assert len(sums) == 2 and all(r.delta.shape == (90,) for r in sums)
    received = [rec for rec in received if rec["channel"] == "_collect"]
    results = [r for rec in received for r in rec["obj"]]
    assert all(isinstance(r.delta, np.ndarray) for r in results)
    assert all(set(r.stats) == set(STATS_FIELDS) for r in results)
    assert all(r.stats["weight"] == r.weight > 0 for r in results)
    assert {f.name for f in dataclasses.fields(ClientResult)} >= {"weight", "stats", "delta"}


def _feature_sums_record(tweak=None):
    key = type(
        "Key",
        (),
        {"fingerprint": "f" * 16, "public": type("Public", (), {"ciphertext_bytes": 128})()},
    )()
    facts = {
        "key": key,
        "host_of": {0: 0, 1: 0, 2: 1},
        "feature_ciphertexts": 4,
        "feature_values": 90,
    }
    enc = EncryptedUpdate(key.fingerprint, 90, b"\1" * 512, 1, (0, 1), "h0-" + "b" * 32)
    res = ClientResult(0, encrypted=enc, node_id="node")
    if tweak is not None:
        tweak(res)
    return facts, {"round": 0, "channel": "open_feature_sums", "obj": res}


@pytest.mark.parametrize(
    ("tweak", "complaint"),
    [
        (lambda r: setattr(r, "delta", np.zeros(90)), "delta="),
        (lambda r: setattr(r, "weight", 0.5), "weight=0.5: not a value"),
        (lambda r: setattr(r.encrypted, "client_ids", (0,)), "client_ids=(0,)"),
        (lambda r: setattr(r.encrypted, "num_values", 30), "num_values=30"),
        (lambda r: setattr(r, "encrypted", None), "not one EncryptedUpdate"),
    ],
)
def test_the_allow_list_takes_a_hosts_sealed_feature_sums_only(tweak, complaint):
    """Round 0 (the federation's feature sums): a host's sealed sums over exactly its own
    clients pass; plaintext sums, a weight, or an update of other clients fail."""
    cfg = compose(SMALL_KEY)
    facts, good = _feature_sums_record()
    assert server_view_problems(cfg, [good], facts, {"node"}) == []
    facts, bad = _feature_sums_record(tweak)
    problems = server_view_problems(cfg, [bad], facts, {"node"})
    assert any(complaint in p for p in problems), problems


def test_the_allow_list_takes_a_single_bit_as_a_hosts_holds_answer():
    """Before the approvals the server asks each host whether it still holds its sealed
    updates: one bit; any other answer (a count, bytes) is refused (no Ray)."""

    def problems(obj):
        rec = {"round": 2, "channel": "_lost_contributors", "obj": obj}
        return server_view_problems(None, [rec], {}, {})

    assert problems(True) == [] and problems(False) == []
    assert "holds answered a int" in problems(5)[0]
    assert "holds answered a bytes" in problems(b"\x01")[0]
