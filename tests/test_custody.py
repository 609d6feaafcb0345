"""Threshold key custody: a curious server, with only what it holds, learns no update.

The key holder's rules are tested on the plain class first, then every attack is played
from *inside* a real server actor of a real federation (real Ray, real keys, the driver's
own set-up code), so each has exactly the server's reach.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import ray
import ray.cloudpickle

import tests.curious_server as curious
from fedray.crypto.codec import PackedPaillierCodec
from fedray.crypto.secure_aggregation import ClientEncryptor, EncryptedSum, UpdateLayout
from fedray.crypto.threshold import DecryptionShare
from fedray.data.datasets import dataset_info
from fedray.runtime.client import client_actor_class
from fedray.runtime.cluster import plan_placement
from fedray.runtime.custody import set_up_keys
from fedray.runtime.keys import (
    Contribution,
    HostIdentity,
    KeyHolder,
    cohort_message,
    digest,
    find_key_material,
    registration_message,
    round_ticket_message,
)
from fedray.runtime.server import server_actor_class
from tests.conftest import compose

ray.cloudpickle.register_pickle_by_value(curious)

SMALL_KEY = ["crypto.key_bits=512", "crypto.allow_insecure_keys=true"]


# -- the key holder's rules, on the plain class -------------------------------------------
class _Site:
    """A host's side of a deposit: its identity, and an encryptor for the test key."""

    def __init__(self, key, index):
        self.key, self.index = key, index
        self.identity = HostIdentity()
        codec = PackedPaillierCodec.for_key(key.public, num_values=8, max_summands=6)
        self.layout = UpdateLayout.for_key(key.public, codec)
        self.enc = ClientEncryptor(key, self.layout)

    def contribute(self, round_num, client_ids, update_id, model="w0"):
        update, shares = self.enc.encrypt_sum(
            [(np.full(8, 0.1), 1.0, None, {}) for _ in client_ids]
        )
        c = Contribution(
            self.key.fingerprint,
            round_num,
            update_id,
            self.index,
            tuple(client_ids),
            digest(update.ciphertexts),
            tuple(digest(b) for b in shares),
            model_sha256=model,
        )
        return self.identity.sign(c), shares, update


class _ApprovedHolder(KeyHolder):
    """A holder whose sums every site approves (honest hosts signing the list they are
    shown): the rules below are the holder's own; approvals are tested in
    tests/test_collusion.py."""

    sites: list[_Site] = []

    def _approvals(self, round_num, update_ids):
        message = cohort_message(self.key.fingerprint, round_num, update_ids)
        return {s.index: s.identity.sign_bytes(message) for s in self.sites}

    def share_sum(self, round_num, update_ids, approvals=None):
        approvals = approvals or self._approvals(round_num, update_ids)
        return super().share_sum(round_num, update_ids, approvals)

    def partial_decrypt(self, round_num, update_ids, payloads, start=0, stop=None):
        approvals = self._approvals(round_num, update_ids)
        return super().partial_decrypt(round_num, update_ids, approvals, payloads, start, stop)


def _approved_holder(key, shares, index, sites, authority) -> _ApprovedHolder:
    """Holder ``index`` of the test key (its share installed), min 3 clients, rounds 1..5;
    ``sites`` 0 (clients 0-2) and 1 (3-5) approve its sums."""
    holder = _ApprovedHolder(
        index,
        {s.index: s.identity.public_bytes() for s in sites},
        {c: c // 3 for c in range(6)},
        min_clients=3,
        authority=authority.public_bytes(),
        max_rounds=5,
    )
    assert holder.install(key, shares[index - 1])
    holder.sites = sites
    return holder


@pytest.fixture
def ledger(threshold_key):
    """Holder 1 of 3 (any 2 decrypt), min 3 clients; sites 0 (clients 0-2) and 1 (3-5)."""
    key, shares = threshold_key
    sites = [_Site(key, 0), _Site(key, 1)]
    authority = HostIdentity()
    holder = _approved_holder(key, shares, 1, sites, authority)
    # The test plays the driver: it opens the job's rounds (tickets: tests/test_collusion.py).
    assert holder.open_round(5, authority.sign_bytes(round_ticket_message(key.fingerprint, 5)))
    return holder, sites, authority, key, shares


def _flip_last(data: bytes) -> bytes:
    """``data`` with its last byte changed (setting it to 0 changed nothing one run in 256)."""
    return data[:-1] + bytes([data[-1] ^ 1])


def _deposit(holder, site, round_num, clients, uid, model="w0"):
    signed, shares, update = site.contribute(round_num, clients, uid, model)
    assert holder.deposit(signed, shares[holder.index - 1])
    return update


def test_holder_refuses_forged_contributions(ledger):
    holder, sites, _, key, _ = ledger
    signed, shares, _ = sites[0].contribute(1, [0, 1], "h0-a")
    mine = shares[0]
    server = HostIdentity()  # the server signs with the only key it has: its own
    c = signed.contribution
    with pytest.raises(PermissionError, match="not signed by host 0"):
        holder.deposit(server.sign(c), mine)
    bigger = Contribution(
        c.key_id, 1, "h0-a", 0, (0, 1, 2, 3, 4), c.ciphertext_sha256, c.share_sha256
    )
    with pytest.raises(PermissionError, match="not signed"):  # a real signature, edited
        holder.deposit(type(signed)(bigger, signed.signature), mine)
    other = sites[1].identity.sign(Contribution(c.key_id, 1, "h1-b", 1, (0,), "", c.share_sha256))
    with pytest.raises(PermissionError, match="does not host"):  # host 1 vouching for 0
        holder.deposit(other, mine)
    with pytest.raises(PermissionError, match="digest"):
        holder.deposit(signed, _flip_last(mine))
    # Update-id squatting: host 1 signs a contribution of its own client under an id of
    # host 0's namespace (an honest host's id, filed first, would have the squatter's
    # shares summed in its place); and an id in no namespace at all.
    own_signed, own_shares, _ = sites[1].contribute(1, [3], "h0-a")
    with pytest.raises(PermissionError, match="not in host 1's namespace"):
        holder.deposit(own_signed, own_shares[0])
    bare_signed, bare_shares, _ = sites[1].contribute(1, [3], "a")
    with pytest.raises(PermissionError, match="not in host 1's namespace"):
        holder.deposit(bare_signed, bare_shares[0])
    assert holder.deposit(signed, mine)
    with pytest.raises(PermissionError, match="already deposited"):
        holder.deposit(signed, mine)


def test_holder_counts_clients_itself_and_releases_one_sum_per_round(ledger):
    holder, sites, _, _, _ = ledger
    _deposit(holder, sites[0], 1, [0, 1], "h0-a")
    _deposit(holder, sites[1], 1, [3], "h1-b")
    _deposit(holder, sites[1], 1, [3, 4], "h1-b2")  # client 3 a second time
    with pytest.raises(PermissionError, match="sum of 2 clients"):
        holder.share_sum(1, ["h0-a"])  # one host's update of 2 clients: below min 3
    with pytest.raises(PermissionError, match="client twice"):
        holder.share_sum(1, ["h0-a", "h1-b", "h1-b2"])
    with pytest.raises(PermissionError, match="distinct updates"):
        holder.share_sum(1, ["h0-a", "h0-a", "h1-b"])
    with pytest.raises(PermissionError, match="not deposited for round 2"):
        holder.share_sum(2, ["h0-a", "h1-b"])
    first = holder.share_sum(1, ["h0-a", "h1-b"])
    assert holder.share_sum(1, ["h0-a", "h1-b"]) == first  # the same sum again: same answer
    with pytest.raises(PermissionError, match="different sum"):
        holder.share_sum(1, ["h0-a", "h1-b2"])
    _deposit(holder, sites[0], 2, [0, 1, 2], "h0-c")
    holder.share_sum(2, ["h0-c"])
    with pytest.raises(PermissionError, match="older than round 2"):  # a replay
        holder.share_sum(1, ["h0-a", "h1-b"])


def test_holder_opens_no_sum_beyond_the_jobs_rounds(ledger):
    """A server that asks for more rounds than the job has (to average fresh DP noise away
    over many sums of the same model, or to difference more cohorts than the accountant
    counted) is refused, even with properly signed deposits; so is a round 0."""
    holder, sites, _, _, _ = ledger  # max_rounds=5
    _deposit(holder, sites[0], 5, [0, 1, 2], "h0-u5")
    for r in (6, 10**9, 0):
        signed, shares, _ = sites[0].contribute(r, [0, 1, 2], f"h0-u{r}", "w0")
        with pytest.raises(PermissionError, match=r"outside this job's rounds 1\.\.5"):
            holder.deposit(signed, shares[0])  # not even kept
        with pytest.raises(PermissionError, match=r"outside this job's rounds 1\.\.5"):
            holder.share_sum(r, [f"h0-u{r}"])
        with pytest.raises(PermissionError, match=r"outside this job's rounds 1\.\.5"):
            holder.partial_decrypt(r, [f"h0-u{r}"], [b""])
    holder.share_sum(5, ["h0-u5"])  # the last round of the job opens


def test_holder_window_only_narrows(ledger):
    """restrict() narrows the rounds a holder opens: a resumed job's new holders refuse
    the rounds the old key released, and a privacy target ends the window early. The
    server holds this handle too, so no call may widen it again."""
    holder, sites, _, _, _ = ledger  # rounds 1..5
    assert holder.restrict(3, 4)
    assert holder.restrict(1, 5)  # a wider window changes nothing
    for r in (1, 2, 5):
        signed, shares, _ = sites[0].contribute(r, [0, 1, 2], f"h0-u{r}", "w0")
        with pytest.raises(PermissionError, match=r"outside this job's rounds 3\.\.4"):
            holder.deposit(signed, shares[0])
        with pytest.raises(PermissionError, match=r"outside this job's rounds 3\.\.4"):
            holder.share_sum(r, [f"h0-u{r}"])
    _deposit(holder, sites[0], 4, [0, 1, 2], "h0-u4")
    holder.share_sum(4, ["h0-u4"])


def test_holder_sums_only_updates_of_one_global_model(ledger):
    """Model inconsistency: the server sends one site crafted weights whose update is
    zero; a sum of that update and the victim's would be the victim's alone."""
    holder, sites, _, _, _ = ledger
    _deposit(holder, sites[0], 1, [0, 1], "h0-victim", model="honest")
    _deposit(holder, sites[1], 1, [3, 4], "h1-padding", model="crafted")
    with pytest.raises(PermissionError, match="different global models"):
        holder.share_sum(1, ["h0-victim", "h1-padding"])


def _two_deposits(ledger):
    """Round 1: site 0's update of clients 0, 1 ("h0-a") and site 1's of client 3 ("h1-b"), their
    bytes, and holder 1's partial decryption of their product, computed here."""
    import gmpy2

    from fedray.crypto.paillier import from_bytes
    from fedray.crypto.threshold import partial_decrypt

    holder, sites, _, key, shares = ledger
    a = _deposit(holder, sites[0], 1, [0, 1], "h0-a").ciphertexts
    b = _deposit(holder, sites[1], 1, [3], "h1-b").ciphertexts
    n2 = gmpy2.mpz(key.n) ** 2
    pairs = zip(from_bytes(key.public, a), from_bytes(key.public, b), strict=True)
    return holder, a, b, partial_decrypt(shares[0], [x * y % n2 for x, y in pairs])


def test_holder_multiplies_payloads_chunk_by_chunk_and_refuses_a_wrong_digest(ledger, monkeypatch):
    """Slow path on the plain class: the holder checks each payload against the signed
    digest and folds it a chunk at a time (chunks of 1 here) into the product, or the
    range of it asked for."""
    holder, a, b, expected = _two_deposits(ledger)
    assert len(expected) == 3  # 8 values, then 8 statistics in two ciphertexts
    monkeypatch.setattr("fedray.runtime.keys.FOLD_CHUNK", 1)
    with pytest.raises(PermissionError, match="signed digest"):
        holder.partial_decrypt(1, ["h0-a", "h1-b"], [a, a])
    with pytest.raises(PermissionError, match="signed digest"):
        holder.partial_decrypt(1, ["h0-a", "h1-b"], [a, _flip_last(b)])
    with pytest.raises(PermissionError, match="one ciphertext payload per update"):
        holder.partial_decrypt(1, ["h0-a", "h1-b"], [a])
    assert holder.partial_decrypt(1, ["h0-a", "h1-b"], [a, b]) == expected
    assert holder.partial_decrypt(1, ["h0-a", "h1-b"], [a, b], 1, 3) == expected[1:]
    assert holder.partial_decrypt(1, ["h0-a", "h1-b"], [a, b], 0, 1) == expected[:1]


@pytest.mark.parametrize("bad", ["zero", "n_squared", "non_unit"])
def test_holder_refuses_to_multiply_an_invalid_ciphertext_a_host_signed(ledger, bad):
    """Every ciphertext is validated by the key holder too, not only by the server: a
    (faulty or malicious) host that signs a payload with a ciphertext outside Z*_(n^2)
    gets no partial decryption of a product containing it."""
    from fedray.crypto.paillier import from_bytes, to_bytes

    holder, sites, _, key, _ = ledger
    a = _deposit(holder, sites[0], 1, [0, 1], "h0-a").ciphertexts
    signed, shares, update = sites[1].contribute(1, [3], "h1-b")
    cts = from_bytes(key.public, update.ciphertexts)
    cts[1] = {"zero": 0, "n_squared": key.n**2, "non_unit": key.n}[bad]  # gcd(n, n) = n
    payload = to_bytes(key.public, cts)
    c = signed.contribution
    forged = Contribution(
        c.key_id,
        1,
        "h1-b",
        c.host,
        c.client_ids,
        digest(payload),
        c.share_sha256,
        model_sha256="w0",
    )
    assert holder.deposit(sites[1].identity.sign(forged), shares[0])
    with pytest.raises(PermissionError, match=r"ciphertext 1 is (outside|not a unit)"):
        holder.partial_decrypt(1, ["h0-a", "h1-b"], [a, payload])


def test_holder_fetches_refs_and_refuses_one_to_the_wrong_bytes(ledger, ray_2cpus):
    """The server keeps no update's bytes: it passes the holders ObjectRefs to the sealing
    hosts' copies. The holder fetches each, refuses one whose bytes do not match the
    signed digest (or are not bytes), and says which round could not be fetched again."""
    holder, a, b, expected = _two_deposits(ledger)

    @ray.remote
    def gone():
        raise LookupError("this host holds no sealed update")

    for wrong, match in [
        ([ray.put(b), ray.put(a)], "signed digest"),  # refs to the other update's bytes
        ([ray.put(a), ray.put(_flip_last(b))], "signed digest"),
        ([ray.put(a), ray.put(str(b))], "not bytes"),
    ]:
        with pytest.raises(PermissionError, match=match):
            holder.partial_decrypt(1, ["h0-a", "h1-b"], wrong)
    with pytest.raises(LookupError, match="round 1: .* no longer on its host"):
        holder.partial_decrypt(1, ["h0-a", "h1-b"], [ray.put(a), gone.remote()])
    assert holder.partial_decrypt(1, ["h0-a", "h1-b"], [ray.put(a), ray.put(b)]) == expected
    assert holder.partial_decrypt(1, ["h0-a", "h1-b"], [a, ray.put(b)], 1, 3) == expected[1:]


def test_threshold_must_be_a_majority():
    """With t <= h/2, two disjoint groups of t holders could each release a different sum
    of one round, and their difference is one client's update."""
    from fedray.errors import ConfigError
    from fedray.runtime.custody import threshold_for

    assert threshold_for(compose(["crypto.threshold=3"]), 4) == 3
    assert threshold_for(compose([]), 4) == 3
    with pytest.raises(ConfigError, match=r"crypto.threshold=2 must be more than half"):
        threshold_for(compose(["crypto.threshold=2"]), 4)
    with pytest.raises(ConfigError, match="at least 2 key holders"):
        threshold_for(compose([]), 1)


def test_install_is_once_and_registration_needs_the_drivers_signature(ledger):
    holder, sites, authority, key, shares = ledger
    with pytest.raises(PermissionError, match="already holds"):
        holder.install(key, shares[0])
    new = HostIdentity().public_bytes()
    server = HostIdentity()
    forged = server.sign_bytes(registration_message(key.fingerprint, 0, new, 1, 1))
    with pytest.raises(PermissionError, match="set-up key"):
        holder.register(0, new, 1, 1, forged)
    good = authority.sign_bytes(registration_message(key.fingerprint, 0, new, 1, 1))
    with pytest.raises(PermissionError, match="set-up key"):  # its round bar, edited
        holder.register(0, new, 1, 0, good)
    assert holder.register(0, new, 1, 1, good)
    with pytest.raises(PermissionError, match="not new"):  # replaying an old registration
        holder.register(0, new, 1, 1, good)
    fresh = KeyHolder(2, {0: new}, {0: 0, 1: 0}, 2, authority.public_bytes(), max_rounds=5)
    with pytest.raises(ValueError, match="another key, holder"):
        fresh.install(key, shares[0])  # holder 1's share offered to holder 2


def test_find_key_material_sees_keys_shares_and_factors(small_keypair, threshold_key):
    public, private = small_keypair
    key, shares = threshold_key
    assert find_key_material({"a": [1, 2.0, "x", public]}, public.n) == []
    assert find_key_material({"deep": [(private,)]}, public.n)
    assert find_key_material([shares[0]], key.n)
    assert find_key_material({"p": private.p}, public.n)
    assert find_key_material([private.q.to_bytes(32, "big")], public.n)
    p, q = private.p, private.q
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    assert "group order" in find_key_material([lam], public.n)[0]
    assert "group order" in find_key_material({"phi": (p - 1) * (q - 1)}, public.n)[0]
    assert "p + q" in find_key_material(p + q, public.n)[0]
    assert find_key_material({"hex": hex(p)[2:], "dec": str(q)}, public.n)
    assert find_key_material(np.array([1, p], dtype=object), public.n)
    assert (
        "secret share"
        in find_key_material([shares[0].value], key.n, known_secrets={shares[0].value})[0]
    )


# -- a real federation ---------------------------------------------------------------------
def _federation(overrides, host_class=None):
    """Hosts, key custody and server exactly as the driver sets them up."""
    cfg = compose([*SMALL_KEY, *overrides])
    placement = plan_placement(cfg, ray.cluster_resources())
    info = dataset_info(cfg.dataset)
    authority = HostIdentity()
    hosts = [
        client_actor_class(host_class)
        .options(**opts)
        .remote(cfg, cids, info, 1.0, authority.public_bytes())
        for cids, opts in zip(placement.host_clients, placement.host_options, strict=True)
    ]
    assert ray.get([h.ready.remote() for h in hosts]) == [True] * len(hosts)
    custody = set_up_keys(cfg, hosts, placement.assignment, authority)
    custody.open_round(cfg.rounds)  # the test plays the driver, which opens each round
    server = server_actor_class().remote(
        cfg, info, hosts, placement.assignment, custody.key, None, key_holders=custody.holders
    )
    return cfg, hosts, custody, server


@pytest.fixture(scope="module")
def federation(ray_2cpus):
    """6 clients on 3 hosts, each host's site runs a key holder; any 2 of 3 decrypt;
    one update per client, min 3 clients per sum."""
    cfg, hosts, custody, server = _federation(
        [
            "num_clients=6",
            "clients_per_round=6",
            "min_clients_per_round=3",
            "cluster.num_actors=3",
            "client.num_cpus=0.5",
            "crypto.host_sum=false",
            # The key holders' own rules, played with fresh rounds the server makes the
            # hosts train; with the hosts' model checks on, a host refuses round r + 1
            # before round r's sum is released (tests/test_lineage.py), which would stop
            # these attacks before they reach the holders.
            "cluster.verify_models=false",
        ]
    )
    outcome = ray.get(server.run_round.remote())
    assert outcome.metrics["clients_ok"] == 6
    assert outcome.metrics["decrypted_by"] == "share_sums"
    yield cfg, hosts, custody, server
    for actor in [*hosts, *custody.holders, server]:
        ray.kill(actor)


def test_no_process_but_the_holders_holds_key_material(federation):
    """After set-up: the dealer is dead; the server, the hosts and the driver's custody
    record hold no share; each holder holds exactly its own."""
    _, hosts, custody, server = federation
    from ray._private.state import actors

    dealers = [a for a in actors().values() if a["ActorClassName"] == "KeyDealer"]
    assert dealers and all(a["State"] == "DEAD" for a in dealers)
    n = custody.key.n
    assert ray.get(server.__ray_call__.remote(curious.custody_findings)) == []
    for h in hosts:
        assert ray.get(h.__ray_call__.remote(lambda self, n: find_key_material(self, n), n)) == [
            "root._impl._identity: HostIdentity"  # its own signing key, nothing else
        ]
    # The driver keeps the public key, the handles and its own set-up signing key only.
    assert find_key_material(custody, n) == ["root.authority: HostIdentity"]
    held = ray.get([h.__ray_call__.remote(lambda self: self._secret) for h in custody.holders])
    assert [s.index for s in held] == [1, 2, 3]


def test_every_method_the_server_can_call_returns_no_key_material(federation):
    """Curious-server test 1 (and 2: the old forged-deposit factoring oracle): call every
    public method of every handle the server holds or can list, with forged arguments."""
    _, _, custody, server = federation
    report = ray.get(server.__ray_call__.remote(curious.probe_every_method))
    assert report["findings"] == []
    called = {(cls, m) for cls, m, _ in report["calls"]}
    for method in ("deposit", "share_sum", "partial_decrypt", "install", "register"):
        assert ("KeyHolder", method) in called
    for method in ("train", "configure_crypto", "install_private_key", "identity"):
        assert ("ClientHost", method) in called
    refused = {(c, m): outcome for c, m, outcome in report["calls"] if outcome != "ok"}
    assert "not signed" in refused[("KeyHolder", "deposit")]
    assert "already holds" in refused[("KeyHolder", "install")]
    assert "set-up key" in refused[("KeyHolder", "register")]
    assert "not signed" in refused[("ClientHost", "configure_crypto")]
    assert "shared" in refused[("ClientHost", "install_private_key")]
    assert "not signed" in refused[("ClientHost", "set_weight_ref")]  # a victim's 1e12
    assert "set-up is over" in refused[("ClientHost", "running_max_examples")]
    # A list of updates that are not the host's own is never signed.
    assert "holds no update of this host" in refused[("ClientHost", "approve")]
    # Nothing the server can call tells it a site's size or labels.
    assert not any(
        "examples" in str(answer) or "labels" in str(answer) for answer in report["answers"]
    )
    assert ("KeyHolder", "partial_decrypt") in refused  # the oracle payload: refused


def test_holders_refuse_single_updates_small_sums_replays_and_double_counts(federation):
    """Curious-server test 3, with real deposits: the server makes the hosts train a new
    round, then asks the holders to open what it should not."""
    _, _, _, server = federation
    fresh = ray.get(server.__ray_call__.remote(curious.deposits_of_a_fresh_round))
    r, updates = fresh["round"], fresh["updates"]
    ids = [u.update_id for u in updates]
    assert len(ids) == 6 and all(u.count == 1 for u in updates)

    def ask(round_num, chosen, approvals=None):
        return ray.get(
            server.__ray_call__.remote(curious.ask_share_sum, round_num, chosen, approvals)
        )

    # The holders' own counts come first (with no host approval asked for: a host
    # approves one list per round, so these would spend it).
    assert all("sum of 1 clients" in a for a in ask(r, ids[:1], {}))  # one client's update
    assert all("sum of 2 clients" in a for a in ask(r, ids[:2], {}))  # below min 3
    assert all("distinct" in a for a in ask(r, [ids[0], ids[0], ids[1]], {}))  # twice
    # One client in two different updates: its host, asked to train it again this round,
    # signs and deposits a second update of it (a valid deposit); a sum of both counts
    # that client twice (its update doubled: 2 u_c + u_x is not a sum of 3 clients).
    again = ray.get(server.__ray_call__.remote(curious.second_update_of, 0))
    first = next(u for u in updates if u.client_ids == (0,))
    assert again is not None and again.client_ids == (0,) and again.update_id != first.update_id
    other = next(u for u in updates if u.client_ids == (3,))  # another client
    double = [first.update_id, again.update_id, other.update_id]
    assert all("counts a client twice" in a for a in ask(r, double, {}))
    assert all("did not approve" in a for a in ask(r, ids[:3], {}))  # no host signed it
    assert ask(r, ids[:3]) == ["released"] * 3
    assert all("different sum" in a for a in ask(r, ids[1:4]))  # a second, overlapping sum
    assert all("different sum" in a for a in ask(r, ids[3:]))  # even a disjoint one
    assert all("older than" in a for a in ask(r - 1, ids))  # a replay of an earlier round


def test_t_minus_1_colluding_holders_and_the_server_cannot_open_one_update(federation):
    """Curious-server test 4: holder 1 colludes (t - 1 = 1): its exponent shares of one
    client's update plus everything the server has do not open that update."""
    _, hosts, custody, server = federation
    fresh = ray.get(server.__ray_call__.remote(curious.deposits_of_a_fresh_round))
    update = fresh["updates"][0]
    share_1 = ray.get(
        custody.holders[0].__ray_call__.remote(
            lambda self, uid: self._deposits[uid].shares, update.update_id
        )
    )
    opened = ray.get(server.__ray_call__.remote(curious.open_with_colluders, update, {1: share_1}))
    assert opened is None
    # With the shares of t = 2 holders the same attempt does open it: the attack is real.
    share_2 = ray.get(
        custody.holders[1].__ray_call__.remote(
            lambda self, uid: self._deposits[uid].shares, update.update_id
        )
    )
    opened = ray.get(
        server.__ray_call__.remote(curious.open_with_colluders, update, {1: share_1, 2: share_2})
    )
    assert opened is not None and np.all(np.isfinite(opened))
    # Holder 1's decryption share alone does not decrypt either (partial decryption path).
    from fedray.crypto.paillier import from_bytes
    from fedray.crypto.threshold import combine_partial_decryptions, partial_decrypt

    share = ray.get(custody.holders[0].__ray_call__.remote(lambda self: self._secret))
    cts = from_bytes(custody.key.public, update.ciphertexts)
    lone = type(custody.key)(custody.key.public, custody.key.hs, custody.key.holders, 1)
    with pytest.raises(ValueError, match="do not combine"):
        combine_partial_decryptions(lone, {1: partial_decrypt(share, cts)})
    other = ray.get(custody.holders[1].__ray_call__.remote(lambda self: self._secret))
    truth = combine_partial_decryptions(
        custody.key, {1: partial_decrypt(share, cts), 2: partial_decrypt(other, cts)}
    )
    assert len(truth) == len(cts)  # two holders' shares do decrypt it


@pytest.mark.parametrize("loot", ["t_shares", "one_share", "raw_share_values"])
def test_custody_check_goes_red_when_the_server_is_given_key_material(federation, loot):
    """Curious-server test 5, the mutation: hand the server what a broken custody would,
    and the same check that passes above must fail."""
    _, _, custody, server = federation
    shares = ray.get([h.__ray_call__.remote(lambda self: self._secret) for h in custody.holders])
    assert all(isinstance(s, DecryptionShare) for s in shares)
    known = frozenset(s.value for s in shares)
    assert ray.get(server.__ray_call__.remote(curious.custody_findings, known)) == []
    stolen = {
        "t_shares": shares[:2],
        "one_share": [shares[0]],
        "raw_share_values": {"cache": [shares[0].value, shares[1].value]},
    }[loot]
    ray.get(server.__ray_call__.remote(curious.steal, stolen))
    try:
        findings = ray.get(server.__ray_call__.remote(curious.custody_findings, known))
        assert findings
        assert all(("DecryptionShare" in f) or ("secret share" in f) for f in findings)
    finally:
        ray.get(server.__ray_call__.remote(curious.steal, None))


def test_custody_check_sees_a_shared_private_key_or_its_factor(ray_2cpus):
    """The same check catches the whole key, or one prime of it, on a shared-custody server
    (where hosts hold the private key, so the test has one to hand over)."""
    cfg, hosts, custody, server = _federation(
        ["num_clients=4", "clients_per_round=4", "crypto.custody=shared", "client.num_cpus=0.2"]
        + ["cluster.mode=simulation", "cluster.num_actors=2"]
    )
    try:
        assert ray.get(server.__ray_call__.remote(curious.custody_findings)) == []
        private = ray.get(hosts[0].__ray_call__.remote(lambda self: self._private))
        for loot in (private, {"nested": [private.p]}):
            ray.get(server.__ray_call__.remote(curious.steal, loot))
            assert ray.get(server.__ray_call__.remote(curious.custody_findings))
        outcome = ray.get(server.__ray_call__.remote(lambda self: self.run_round()))
        assert outcome.metrics["decrypted_by"] == "private_key"
    finally:
        for actor in [*hosts, *custody.holders, server]:
            ray.kill(actor)


def test_a_site_takes_its_dp_plan_from_its_own_config_not_the_server():
    """A server that sends a victim a plan with no clipping (or no noise) changes nothing:
    the site clips to its own privacy.clip_norm (plain class, no Ray)."""
    from fedray.data.datasets import dataset_info
    from fedray.privacy.dp import ClientPlan
    from fedray.runtime.client import ClientHost, RoundTask

    cfg = compose(["crypto=none", "privacy=dp", "privacy.clip_norm=0.01", "lr=0.5"])
    host = ClientHost(cfg, [0], dataset_info(cfg.dataset))
    assert host.ready() is True
    weights = host.view.get()
    forged = ClientPlan(clip_norm=1e9, noise_std=0.0, quant_step=0.0, reproducible_noise=True)
    (result,) = host.train(RoundTask(1, [0], {"privacy": forged, "proximal_mu": 0.0}), weights)
    assert result.error is None
    assert np.linalg.norm(result.delta) <= 0.01 * (1 + 1e-4)


def test_the_2t_minus_h_coalition_opens_at_most_one_sum_of_a_round_in_a_live_job(federation):
    """h = 3 holders, t = 2: holder 1 colludes (c = 1 = 2t - h), so the sets {1, 2} and
    {1, 3} meet only in it. The server opens the cohort without the victim (client 4,
    host 2) with holders 1 and 2, then asks holder 3 for the cohort with the victim. Every
    call is one the server (or the colluding holder) can really make; holder 3 refuses,
    because hosts 0 and 1 signed the first list and sign no other this round (tests/
    test_collusion.py plays it for more (h, t, c) and shows the attack without this rule)."""
    from fedray.crypto.threshold import Unmasker, add_share_blobs

    _, _, custody, server = federation
    fresh = ray.get(server.__ray_call__.remote(curious.deposits_of_a_fresh_round))
    r = fresh["round"]
    by_client = {u.client_ids[0]: u for u in fresh["updates"]}
    ids_a = [by_client[c].update_id for c in (0, 1, 2, 3)]
    ids_b = [*ids_a, by_client[4].update_id]

    def colluder_sum(self, ids):  # the colluding holder's share sum, no check made
        return add_share_blobs(self.key, [self._deposits[u].shares for u in ids])

    approvals_a = ray.get(server.__ray_call__.remote(curious.host_approvals, r, ids_a))
    assert sorted(approvals_a) == [0, 1]  # host 2 has no update in it: it signs nothing
    sums = {
        1: ray.get(custody.holders[0].__ray_call__.remote(colluder_sum, ids_a)),
        2: ray.get(custody.holders[1].share_sum.remote(r, ids_a, approvals_a)),
    }
    layout = ray.get(server.__ray_call__.remote(lambda self: self.layout))
    acc = EncryptedSum(custody.key.public, layout)
    for c in (0, 1, 2, 3):
        acc.add(by_client[c])
    unmasker = Unmasker(custody.key, layout.codec.max_summands)
    opened = unmasker.unmask(acc.ciphertexts(), unmasker.exponents(sums, 4))
    assert opened is not None and layout.fits(opened)  # the first sum is the release

    approvals_b = ray.get(server.__ray_call__.remote(curious.host_approvals, r, ids_b))
    assert sorted(approvals_b) == [2]  # hosts 0 and 1 already signed this round's list
    with pytest.raises(ray.exceptions.RayTaskError, match="host 0 did not approve"):
        ray.get(custody.holders[2].share_sum.remote(r, ids_b, approvals_b))
    with pytest.raises(ray.exceptions.RayTaskError, match="different sum"):
        ray.get(custody.holders[1].share_sum.remote(r, ids_b, approvals_b))


def test_hosts_and_holders_expose_only_their_public_methods(federation):
    """Ray makes every method of an actor class remote, underscore ones too: a handle to
    the real KeyHolder would run ``_authorize`` (and return a holder's exponent shares
    of any update), one to the real ClientHost ``_train_many`` (training past ``train``'s
    guard). The actors are facades with the public methods only."""
    _, hosts, custody, _ = federation
    for handle, private in (
        (custody.holders[0], "_authorize"),
        (custody.holders[0], "_release"),
        (hosts[0], "_train_many"),
        (hosts[0], "_train_one"),
        (hosts[0], "_seal"),
    ):
        with pytest.raises(AttributeError):
            getattr(handle, private)
    assert ray.get(hosts[0].trainable.remote()) is True  # the public ones still answer


def test_the_failure_oracle_tells_the_server_how_many_failed_never_which(federation):
    """Curious-server test (last in this module: it leaves a crafted model behind): the
    review's NaN oracle. The server crafts a model that fails training exactly at the
    clients holding an example above a threshold in one feature. Every host's answer for a
    failing client is the same as for any other (a sealed update of the same size, no
    error, no weight, no figure); the opened sum counts how many failed."""
    _, hosts, _, server = federation
    maxima = {}
    for h in hosts:
        maxima.update(
            ray.get(
                h.__ray_call__.remote(
                    lambda self: {
                        c: tr.x.max(dim=0).values.numpy() for c, (tr, _) in self.data.items()
                    }
                )
            )
        )
    assert sorted(maxima) == list(range(6))
    table = np.stack([maxima[c] for c in range(6)])  # client x feature
    # A feature and a threshold that split the clients 2 | 4 with room either side.
    order = np.sort(table, axis=0)[::-1]
    gaps = order[1] - order[2]
    feature = int(np.argmax(gaps))
    assert gaps[feature] > 0.2
    threshold = float((order[1, feature] + order[2, feature]) / 2)
    failing = {c for c in range(6) if table[c, feature] > threshold}
    assert len(failing) == 2

    report = ray.get(
        server.__ray_call__.remote(curious.failure_oracle, feature, threshold), timeout=300
    )
    seen, m = report["seen"], report["metrics"]
    assert sorted(seen) == list(range(6))
    assert len(set(seen.values())) == 1, seen  # a failing client's answer is any client's
    assert seen[min(failing)][0] is None  # no error line reaches the server
    assert (m["clients_failed"], m["clients_ok"]) == (2, 4)  # how many, from the sum
