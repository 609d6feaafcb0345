"""The 2t - h coalition: c >= 2t - h key holders colluding with the server.

Two t-sets of h key holders meet in 2t - h holders, so with c >= 2t - h colluders (one
for every odd h, two for every even h >= 4, always fewer than t) the server can have one
t-set open a cohort without a victim and a second t-set, meeting the first only in the
colluders, open it with the victim, and subtract. Holders that each release one sum per
round do not stop it: the honest holders of the second set never saw the first sum.

What stops it is the data owners' rule: each host signs the sorted list of update ids of
one sum per round (``CohortApprover``), and a holder opens a sum only if every host in it
signed exactly that list. These tests play the server and the colluders with what they
hold: the colluders' deposits and shares (they compute share sums without any check), the
honest holders' and hosts' public methods, and the hosts' answers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray.cloudpickle

import tests.test_collusion as this
from fedray.crypto.codec import PackedPaillierCodec
from fedray.crypto.secure_aggregation import ClientEncryptor, EncryptedSum, UpdateLayout
from fedray.crypto.threshold import Unmasker, add_share_blobs, deal_threshold_key
from fedray.errors import ClusterError
from fedray.runtime.client import model_digest
from fedray.runtime.driver import run_experiment
from fedray.runtime.keys import (
    CohortApprover,
    Contribution,
    HostIdentity,
    KeyHolder,
    cohort_message,
    digest,
    registration_message,
    round_ticket_message,
)
from fedray.runtime.server import Server
from tests.conftest import compose

ray.cloudpickle.register_pickle_by_value(this)  # the server subclass below, by value

VALUES = 8
MIN_CLIENTS = 3
# Hosts 0, 1, 2 with clients {0, 1}, {2, 3}, {4, 5}; the victim is client 4 (host 2).
ASSIGNMENT = {c: c // 2 for c in range(6)}
VICTIM = 4
COALITIONS = [(3, 2, 1), (4, 3, 2), (5, 3, 1), (10, 6, 2), (11, 6, 1)]  # (h, t, c), c >= 2t - h


class _Host:
    """An honest host: its identity, its approver, an encryptor for the test key."""

    def __init__(self, key, index, layout):
        self.key, self.index = key, index
        self.identity = HostIdentity()
        self.approver = CohortApprover(self.identity)
        self.enc = ClientEncryptor(key, layout)
        self.sealed: dict[str, int] = {}  # update id -> client, this round

    def seal(self, holders, round_num, client, delta):
        update, shares = self.enc.encrypt_sum([(delta, 1.0, None, {})])
        update.update_id = f"h{self.index}-r{round_num}c{client}"
        c = Contribution(
            self.key.fingerprint,
            round_num,
            update.update_id,
            self.index,
            (client,),
            digest(update.ciphertexts),
            tuple(digest(b) for b in shares),
            model_sha256="w0",
        )
        signed = self.identity.sign(c)
        for holder in holders:
            assert holder.deposit(signed, shares[holder.index - 1])
        self.sealed[update.update_id] = client
        return update, shares

    def approve(self, round_num, update_ids):
        return self.approver.approve(self.key.fingerprint, round_num, update_ids, self.sealed)


def _federation(h, t):
    key, shares = deal_threshold_key(512, holders=h, threshold=t)
    codec = PackedPaillierCodec.for_key(key.public, num_values=VALUES, max_summands=6)
    layout = UpdateLayout.for_key(key.public, codec)
    hosts = [_Host(key, i, layout) for i in range(3)]
    authority = HostIdentity()
    holders = []
    for j in range(1, h + 1):
        holder = KeyHolder(
            j,
            {x.index: x.identity.public_bytes() for x in hosts},
            ASSIGNMENT,
            min_clients=MIN_CLIENTS,
            authority=authority.public_bytes(),
            max_rounds=5,
        )
        assert holder.install(key, shares[j - 1])
        assert holder.open_round(2, authority.sign_bytes(round_ticket_message(key.fingerprint, 2)))
        holders.append(holder)
    return key, layout, codec, hosts, holders


def _colluder_share_sum(holder, update_ids):
    """What a colluding holder hands the server: its share sum, no check made."""
    return add_share_blobs(holder.key, [holder._deposits[u].shares for u in update_ids])


def _open(key, layout, codec, updates, share_sums):
    acc = EncryptedSum(key.public, layout)
    for u in updates:
        acc.add(u)
    unmasker = Unmasker(key, codec.max_summands)
    exponents = unmasker.exponents(share_sums, len(updates))
    plaintexts = unmasker.unmask(acc.ciphertexts(), exponents)
    assert plaintexts is not None
    total, _ = layout.decode_sum(plaintexts, len(updates))
    return total


def _approvals(hosts, round_num, update_ids):
    """Every approval of ``update_ids`` the server can get from the hosts."""
    out = {}
    for host in hosts:
        try:
            out[host.index] = host.approve(round_num, update_ids)
        except PermissionError:
            continue
    return out


def _attack(h, t, c, *, honest_hosts: bool):
    """Play the server with c colluding holders: open A (no victim) with one t-set and B
    (A + the victim) with another. Returns (A's total, B's total or the honest holders'
    refusals, the victim's delta). ``honest_hosts=False``: the hosts sign whatever they
    are shown (what holders alone faced before), the control that the attack is real."""
    assert c >= 2 * t - h and c < t
    key, layout, codec, hosts, holders = _federation(h, t)
    rng = np.random.default_rng(h * 100 + t * 10 + c)
    deltas = {cid: rng.uniform(-0.5, 0.5, VALUES) for cid in range(6)}
    updates = {}
    for cid in range(6):
        updates[cid], _ = hosts[ASSIGNMENT[cid]].seal(holders, 1, cid, deltas[cid])
    colluders, honest = holders[:c], holders[c:]
    set_a = colluders + honest[: t - c]
    set_b = colluders + honest[t - c : 2 * (t - c)]
    assert len(set_b) == t and not set(set_a[c:]) & set(set_b[c:])  # meet in the colluders
    cohort_a = [cid for cid in range(6) if cid not in (VICTIM, VICTIM + 1)]  # hosts 0, 1
    cohort_b = [*cohort_a, VICTIM]
    ids_a = [updates[cid].update_id for cid in cohort_a]
    ids_b = [updates[cid].update_id for cid in cohort_b]

    approvals_a = _approvals(hosts, 1, ids_a)
    sums_a = {x.index: _colluder_share_sum(x, ids_a) for x in colluders}
    sums_a.update({x.index: x.share_sum(1, ids_a, approvals_a) for x in set_a[c:]})
    total_a = _open(key, layout, codec, [updates[cid] for cid in cohort_a], sums_a)

    if honest_hosts:
        approvals_b = _approvals(hosts, 1, ids_b)
    else:  # hosts with no memory of what they signed: any list is signed
        message = cohort_message(key.fingerprint, 1, ids_b)
        approvals_b = {x.index: x.identity.sign_bytes(message) for x in hosts}
    sums_b = {x.index: _colluder_share_sum(x, ids_b) for x in colluders}
    refusals = []
    for x in set_b[c:]:
        try:
            sums_b[x.index] = x.share_sum(1, ids_b, approvals_b)
        except PermissionError as exc:
            refusals.append(str(exc))
    if refusals:
        return total_a, refusals, deltas[VICTIM]
    total_b = _open(key, layout, codec, [updates[cid] for cid in cohort_b], sums_b)
    return total_a, total_b, deltas[VICTIM]


@pytest.mark.parametrize("h,t,c", COALITIONS)
def test_the_2t_minus_h_coalition_opens_at_most_one_sum_of_a_round(h, t, c):
    total_a, refused, _ = _attack(h, t, c, honest_hosts=True)
    assert np.all(np.isfinite(total_a))  # the first sum opened, as the round's release
    assert len(refused) == t - c  # every honest holder of the second set refused
    assert all("host 0 did not approve exactly this sum" in r for r in refused)


@pytest.mark.parametrize("h,t,c", [COALITIONS[0], COALITIONS[-1]])
def test_the_coalition_is_real_when_hosts_sign_any_list(h, t, c):
    """The control: with hosts that sign every list they are shown, the honest holders
    of both sets release, and B - A is the victim's update (to the codec's grid)."""
    total_a, total_b, victim = _attack(h, t, c, honest_hosts=False)
    assert np.allclose(total_b - total_a, victim, atol=1e-3)


def test_a_host_approves_one_list_per_round_and_only_one_holding_its_update():
    identity = HostIdentity()
    approver = CohortApprover(identity)
    own = {"u1"}
    with pytest.raises(PermissionError, match="no update of this host"):
        approver.approve("k", 1, ["u2", "u3"], own)
    first = approver.approve("k", 1, ["u3", "u1"], own)
    assert approver.approve("k", 1, ["u1", "u3"], own) == first  # the same list, any order
    with pytest.raises(PermissionError, match="different sum"):
        approver.approve("k", 1, ["u1", "u3", "u4"], own)
    with pytest.raises(PermissionError, match="different sum"):
        approver.approve("k", 1, ["u1"], own)
    with pytest.raises(PermissionError, match="distinct"):
        approver.approve("k", 2, ["u1", "u1"], {"u1"})
    assert approver.approve("k", 2, ["u1"], {"u1"})  # a new round: a new list
    with pytest.raises(PermissionError, match="older"):
        approver.approve("k", 1, ["u3", "u1"], own)


def test_holders_check_each_approval_against_the_identity_that_signed_the_update():
    """An approval signed by another host, for another round or list, or by a host's new
    identity for updates its old one deposited, opens nothing; a restarted host's new
    identity deposits only from the round the driver registered it for."""
    key, layout, codec, hosts, holders = _federation(3, 2)
    holder = holders[0]
    ups = {
        cid: hosts[ASSIGNMENT[cid]].seal(holders, 1, cid, np.zeros(VALUES))[0] for cid in (0, 2, 4)
    }
    ids = [ups[cid].update_id for cid in (0, 2, 4)]
    good = _approvals(hosts, 1, ids)
    assert set(good) == {0, 1, 2}
    swapped = {**good, 2: good[1]}  # host 1's signature offered for host 2
    with pytest.raises(PermissionError, match="host 2 did not approve"):
        holder.share_sum(1, ids, swapped)
    other_round = {**good, 0: hosts[0].identity.sign_bytes(cohort_message(key.fingerprint, 2, ids))}
    with pytest.raises(PermissionError, match="host 0 did not approve"):
        holder.share_sum(1, ids, other_round)
    missing = {k: v for k, v in good.items() if k != 1}
    with pytest.raises(PermissionError, match="host 1 did not approve"):
        holder.share_sum(1, ids, missing)
    # Host 0 restarts: the driver registers its new identity from round 2. Its new
    # identity's approval of round 1 does not match the identity that signed the update.
    new = HostIdentity()
    authority = HostIdentity()
    holder._authority = authority.public_bytes()  # the test plays the driver
    signature = authority.sign_bytes(
        registration_message(key.fingerprint, 0, new.public_bytes(), 1, 2)
    )
    assert holder.register(0, new.public_bytes(), 1, 2, signature)
    forged = {**good, 0: new.sign_bytes(cohort_message(key.fingerprint, 1, ids))}
    with pytest.raises(PermissionError, match="host 0 did not approve"):
        holder.share_sum(1, ids, forged)
    late = Contribution(key.fingerprint, 1, "h0-late", 0, (1,), "00", (), model_sha256="w0")
    with pytest.raises(PermissionError, match="takes part again from round 3"):  # opened: 2
        holder.deposit(new.sign(late), None)
    assert holder.share_sum(1, ids, good)  # the dead identity's own approval still holds


# -- a server that shows hosts different models ---------------------------------------------
class SplitViewServer(Server):
    """In round 2, sends host 0 other weights than the rest (a crafted model meant to
    zero its update and leave another site's alone in a "sum")."""

    def _dispatch(self, ray, cohort):
        if self.round != 2:
            return super()._dispatch(ray, cohort)
        from fedray.runtime.client import RoundTask

        pending = {}
        for cid in cohort:
            host = self.assignment[cid]
            weights = self.weights + np.float32(1e-3) if host == 0 else self.weights
            pending[self.hosts[host].train.remote(RoundTask(self.round, [cid], {}), weights)] = [
                cid
            ]
        return pending


def test_holders_refuse_a_sum_of_updates_trained_from_different_models(ray_2cpus, tmp_path):
    over = [
        "crypto=paillier",
        "crypto.key_bits=512",
        "crypto.allow_insecure_keys=true",
        "num_clients=4",
        "clients_per_round=4",
        "cluster.num_actors=2",
        "client.num_cpus=0.5",
        "rounds=2",
        "checkpoint.every=0",
        "max_round_retries=0",
        # The holders' own rule, with the hosts' model checks (tests/test_lineage.py) off:
        # with them on, host 0 refuses the off-by-1e-3 model before it trains.
        "cluster.verify_models=false",
    ]
    with pytest.raises(ClusterError, match="different global models"):
        run_experiment(compose(over), tmp_path / "run", server_class=SplitViewServer)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2  # round 1 released; round 2 opened by no holder


def test_hosts_sign_the_exact_bytes_of_the_weights_they_received():
    """The model digest covers dtype, shape and every byte: the same values as float64,
    or one value changed in its last bit, give another digest."""
    w = np.linspace(-1, 1, 17, dtype=np.float32)
    assert model_digest(w) == model_digest(w.copy())
    assert model_digest(w) != model_digest(w.astype(np.float64))
    assert model_digest(w) != model_digest(w.reshape(1, 17))
    bumped = w.copy()
    bumped[3] = np.nextafter(bumped[3], np.float32(2))
    assert model_digest(w) != model_digest(bumped)


def test_holders_take_only_rounds_the_driver_opened_and_restarted_hosts_after_them():
    """The server cannot run ahead of the driver: deposits and sums of a round the driver
    has not opened (a ticket signed with its set-up key) are refused, so it cannot have
    hosts approve a round early, kill them, and have their successors (registered for
    "the next round") deposit again in it. A registration never reaches back into a round
    already opened, whatever round the driver names."""
    key, _, _, hosts, holders = _federation(3, 2)
    holder = holders[0]
    authority = HostIdentity()
    holder._authority = authority.public_bytes()  # the test plays the driver
    with pytest.raises(PermissionError, match="round 3 was not opened by the driver"):
        hosts[0].seal([holder], 3, 0, np.zeros(VALUES))
    forged = HostIdentity().sign_bytes(round_ticket_message(key.fingerprint, 3))
    with pytest.raises(PermissionError, match="ticket not signed"):
        holder.open_round(3, forged)
    assert holder.open_round(3, authority.sign_bytes(round_ticket_message(key.fingerprint, 3)))
    hosts[0].seal([holder], 3, 0, np.zeros(VALUES))  # now it is taken
    new = HostIdentity()
    stale = authority.sign_bytes(registration_message(key.fingerprint, 0, new.public_bytes(), 1, 2))
    assert holder.register(0, new.public_bytes(), 1, 2, stale)  # "from round 2", while 3 is open
    late = Contribution(key.fingerprint, 3, "h0-late", 0, (1,), "00", (), model_sha256="w0")
    with pytest.raises(PermissionError, match="takes part again from round 4"):
        holder.deposit(new.sign(late), None)


class FailingOpenServer(Server):
    """Round 2's sum fails after the key holders were asked (as a sum a colluding host
    overflowed fails the packing check once it is opened)."""

    def _decrypt(self, acc):
        if self.round == 2:
            super()._decrypt(acc)  # the holders answer: the sum is released
            raise ClusterError("round 2: the decrypted sum does not fit the packing")
        return super()._decrypt(acc)


def test_a_round_that_fails_after_its_release_is_still_counted(ray_2cpus, tmp_path):
    """The server counts a release before it asks the key holders to open the sum, and the
    driver saves that count when the round fails, so a resume counts the release (and its
    replay) rather than only the checkpoint's rounds."""
    over = [
        "crypto=paillier",
        "crypto.key_bits=512",
        "crypto.allow_insecure_keys=true",
        "privacy=dp",
        "num_clients=4",
        "clients_per_round=4",
        "cluster.num_actors=2",
        "client.num_cpus=0.5",
        "rounds=3",
        "checkpoint.every=1",
    ]
    with pytest.raises(ClusterError, match="does not fit the packing"):
        run_experiment(compose(over), tmp_path / "run", server_class=FailingOpenServer)
    checkpoints = tmp_path / "run" / "checkpoints"
    from fedray.runtime.driver import PRIVACY_LEDGER
    from fedray.runtime.outputs import load_checkpoint

    assert load_checkpoint(checkpoints)["privacy"]["steps"] == 1
    ledger = json.loads((checkpoints / PRIVACY_LEDGER).read_text())
    assert ledger["privacy"]["steps"] == 2  # round 2 was released: counted
    assert ledger["privacy"]["participation"] == {str(c): 2 for c in range(4)}
