"""Model lineage: a host trains only on the model it recomputes from attested sums.

The key holder's attestation and the host's chain are tested on the plain classes with a
real (small) threshold key; then each crafted model is played from inside a real server
actor of a real federation (tests/crafting_server.py), with exactly the server's reach.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import ray.cloudpickle

import tests.crafting_server as crafting
from fedray.crypto.threshold import Unmasker, ints_to_bytes, opens_product
from fedray.errors import ClusterError
from fedray.runtime.driver import run_experiment
from fedray.runtime.keys import HostIdentity, digest, round_ticket_message, verify
from fedray.runtime.lineage import (
    Lineage,
    LineageError,
    Release,
    min_client_weight,
    model_digest,
    plaintext_width,
    release_message,
    step,
    why_not_verifiable,
)
from fedray.strategies import build_strategy
from tests.conftest import compose
from tests.test_custody import _approved_holder, _Site

ray.cloudpickle.register_pickle_by_value(crafting)

SMALL_KEY = ["crypto=paillier", "crypto.key_bits=512", "crypto.allow_insecure_keys=true"]
W0 = np.zeros(8, dtype=np.float32)


def _holders_of_round_1(key, shares, sites):
    """Holders 1 and 2 of the test key (any 2 decrypt), round 1 opened by the driver."""
    authority = HostIdentity()
    holders = [_approved_holder(key, shares, j, sites, authority) for j in (1, 2)]
    for h in holders:
        assert h.open_round(1, authority.sign_bytes(round_ticket_message(key.fingerprint, 1)))
    return holders


@pytest.fixture
def opened(threshold_key):
    """Round 1 of a 2-site federation opened by the fast path: the holders (1, 2 of 3,
    any 2 decrypt), the sum's update ids, payloads, exponents X and plaintexts M."""
    key, shares = threshold_key
    sites = [_Site(key, 0), _Site(key, 1)]
    holders = _holders_of_round_1(key, shares, sites)
    model = model_digest(W0)
    payloads, ids = [], []
    for site, clients, uid in [(sites[0], (0, 1, 2), "h0-a"), (sites[1], (3, 4, 5), "h1-b")]:
        signed, blobs, update = site.contribute(1, clients, uid, model)
        for h in holders:
            assert h.deposit(signed, blobs[h.index - 1])
        payloads.append(update.ciphertexts)
        ids.append(uid)
    sums = {h.index: h.share_sum(1, ids) for h in holders}
    unmasker = Unmasker(key, 2)
    exponents = unmasker.exponents(sums, 2)
    product = holders[0]._product(1, [holders[0]._deposits[u] for u in ids], payloads, 0, None)
    plaintexts = unmasker.unmask(product, exponents)
    assert plaintexts is not None
    return key, holders, ids, payloads, exponents, plaintexts, sites[0].layout


def _attest(holder, ids, payloads, plaintexts, exponents, key):
    approvals = holder._approvals(1, ids)
    data = ints_to_bytes(plaintexts, plaintext_width(key.public.n))
    return holder.attest(1, ids, approvals, payloads, data, exponents)


def test_key_holders_attest_only_the_true_opening(opened):
    key, holders, ids, payloads, exponents, plaintexts, _ = opened
    holder = holders[0]
    forged = [plaintexts[0] + 1, *plaintexts[1:]]  # one slot, one unit
    with pytest.raises(PermissionError, match="not the decryption"):
        _attest(holder, ids, payloads, forged, exponents, key)
    with pytest.raises(PermissionError, match="not the decryption"):  # X moved to match
        _attest(holder, ids, payloads, plaintexts, [exponents[0] + 1, *exponents[1:]], key)
    with pytest.raises(PermissionError, match="no summed exponents"):
        _attest(holder, ids, payloads, plaintexts, None, key)
    with pytest.raises(PermissionError, match="signed digest"):  # a payload swapped
        _attest(holder, ids, [payloads[1], payloads[0]], plaintexts, exponents, key)
    sig = _attest(holder, ids, payloads, plaintexts, exponents, key)
    data = ints_to_bytes(plaintexts, plaintext_width(key.public.n))
    message = release_message(key.fingerprint, 1, model_digest(W0), 6, digest(data))
    assert verify(holder.attestation_key(), sig, message)
    assert not verify(holders[1].attestation_key(), sig, message)  # its own key only


def test_the_batch_check_refuses_every_wrong_claim_whatever_the_exponents(opened):
    """A key holder checks a claimed opening of all ciphertexts at once with fresh random
    64-bit weights (``opens_product``): the true opening passes; one slot off by one, two
    slots off by +d and -d (equal weights would cancel them), the slots in reverse order,
    or the true plaintexts with one exponent moved, never pass in 40 tries each (a wrong
    claim passes with probability at most 2^-64)."""
    key, holders, ids, payloads, exponents, plaintexts, _ = opened
    product = holders[0]._product(1, [holders[0]._deposits[u] for u in ids], payloads, 0, None)
    assert opens_product(key, product, plaintexts, exponents)
    n = key.public.n
    wrong = [
        [(plaintexts[0] + 1) % n, *plaintexts[1:]],
        [(plaintexts[0] + 5) % n, (plaintexts[1] - 5) % n, *plaintexts[2:]],
        [(plaintexts[0] + 1) % n, (plaintexts[1] - 1) % n, *plaintexts[2:]],
        list(reversed(plaintexts)),  # every slot another's
    ]
    for claim in wrong:
        assert claim != list(plaintexts)
        assert not any(opens_product(key, product, claim, exponents) for _ in range(40))
    moved = [exponents[0] + 1, *exponents[1:]]
    assert not any(opens_product(key, product, plaintexts, moved) for _ in range(40))
    # The check is sound mod n only: a claim must be the plaintext itself, in [0, n)
    for claim in ([plaintexts[0] + n, *plaintexts[1:]], [plaintexts[0] - n, *plaintexts[1:]]):
        assert not opens_product(key, product, claim, exponents)
    assert not opens_product(key, product, plaintexts, [-1, *exponents[1:]])
    # With 1-bit weights the same compensating claim passes about half the time: the
    # weights' length is the check's whole strength.
    two = wrong[2]
    passes = sum(opens_product(key, product, two, exponents, bits=1) for _ in range(200))
    assert 40 < passes < 160


def _release(opened, plaintexts=None, signers=(0, 1), model=None, count=6):
    key, holders, ids, payloads, exponents, true_plaintexts, _ = opened
    plaintexts = true_plaintexts if plaintexts is None else plaintexts
    data = ints_to_bytes(plaintexts, plaintext_width(key.public.n))
    sigs = {}
    for i in signers:
        sigs[holders[i].index] = _attest(holders[i], ids, payloads, true_plaintexts, exponents, key)
    return Release(1, model or model_digest(W0), count, data, sigs)


def _lineage(opened):
    key, holders, *_, layout = opened
    cfg = compose(SMALL_KEY)
    keys = {h.index: h.attestation_key() for h in holders}
    return Lineage(cfg, key, layout, keys, W0), cfg


def _next_model(opened, cfg):
    *_, plaintexts, layout = opened
    total, stats = layout.decode_sum(plaintexts, 6)
    return step(build_strategy(cfg.strategy), W0, total, stats["weight"], None)


def test_a_host_trains_only_the_model_it_recomputes(opened):
    lineage, cfg = _lineage(opened)
    w1 = _next_model(opened, cfg)
    assert np.any(w1 != W0)
    lineage.check(1, W0, [])  # round 1 starts from the host's own initial model
    with pytest.raises(LineageError, match="round 1: lineage check failed"):
        lineage.check(1, W0 + np.float32(1e-3), [])
    release = _release(opened)
    for crafted in [
        np.nextafter(w1, np.float32(np.inf)),  # every value one ulp off
        np.where(np.arange(8) == 7, np.float32("nan"), w1),  # the NaN trap
        w1.astype(np.float64),  # the same values, another dtype
    ]:
        fresh, _ = _lineage(opened)
        with pytest.raises(LineageError, match="round 2: lineage check failed"):
            fresh.check(2, crafted, [release])
    nudged = w1.copy()
    nudged[3] = np.nextafter(nudged[3], np.float32(np.inf))  # one value, one ulp
    with pytest.raises(LineageError, match="bit for bit"):
        lineage.check(2, nudged, [release])
    lineage.check(2, w1, [release])  # the true model, bit for bit
    lineage.check(2, w1, [release])  # again (a second call of the same round)
    assert lineage.round == 1


def test_a_host_refuses_a_sum_too_few_key_holders_attest(opened):
    key, holders, *_ = opened
    plaintexts = opened[5]
    lineage, cfg = _lineage(opened)
    w1 = _next_model(opened, cfg)
    with pytest.raises(LineageError, match="1 key holders attest"):
        lineage.check(2, w1, [_release(opened, signers=(0,))])
    # Both attest the true sum; the server hands on another one with their signatures.
    forged = [plaintexts[0] + (1 << 20), *plaintexts[1:]]
    with pytest.raises(LineageError, match="0 key holders attest"):
        lineage.check(2, w1, [_release(opened, plaintexts=forged)])
    true = _release(opened)
    doubled = dataclasses.replace(
        true, attestations={1: true.attestations[1], 3: true.attestations[1]}
    )
    with pytest.raises(LineageError, match="1 key holders attest"):  # one holder, twice
        lineage.check(2, w1, [doubled])
    with pytest.raises(LineageError, match="0 key holders attest"):  # count changed
        lineage.check(2, w1, [dataclasses.replace(true, count=5)])
    with pytest.raises(LineageError, match="another model"):
        lineage.check(2, w1, [_release(opened, model=model_digest(W0 + 1))])
    with pytest.raises(LineageError, match="missing"):
        lineage.check(3, w1, [dataclasses.replace(true, round=2)])
    assert lineage.round == 0


def test_models_are_verifiable_only_where_a_sum_can_be_checked():
    assert why_not_verifiable(compose(SMALL_KEY)) is None
    assert why_not_verifiable(compose([*SMALL_KEY, "crypto.custody=shared"])) is None
    assert "crypto=none" in why_not_verifiable(compose(["crypto=none"]))
    assert "fast_decrypt" in why_not_verifiable(compose([*SMALL_KEY, "crypto.fast_decrypt=false"]))
    from fedray.errors import ConfigError

    with pytest.raises(ConfigError, match="cluster.verify_models=true cannot check"):
        compose(["crypto=none", "cluster.verify_models=true"])
    with pytest.raises(ConfigError, match="choose one of: auto, true, false"):
        compose([*SMALL_KEY, "cluster.verify_models=maybe"])


# -- crafted models from inside a real server actor -----------------------------------------
@pytest.mark.parametrize(
    ("server_class", "refusal", "completed"),
    [
        (crafting.NaNTrapServer, r"round 1: a client host refused.*round 1: lineage check", 0),
        (crafting.NudgingServer, r"round 2: a client host refused.*round 2: lineage check", 1),
        (crafting.TrapLayerServer, r"round 2: a client host refused.*round 2: lineage check", 1),
        (
            crafting.ForgedReleaseServer,
            r"round 2: a client host refused.*round 1: attestation check failed",
            1,
        ),
        (crafting.FabricatedSumServer, r"round 1: .*not the decryption of the deposited", 0),
    ],
    ids=["nan-trap-initial", "one-ulp", "trap-layer", "forged-release", "fabricated-sum"],
)
def test_every_crafted_model_is_refused_before_training(
    ray_2cpus, tmp_path, server_class, refusal, completed
):
    """Every host refuses (before training) a model that is not the next link of its
    chain; the run stops with the host's line; the rounds before stay in metrics.csv."""
    cfg = compose([*SMALL_KEY, "rounds=3", "checkpoint.every=0"])
    with pytest.raises(ClusterError, match=refusal):
        run_experiment(cfg, tmp_path, server_class=server_class)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) - 1 == completed  # the rounds before the crafted one, none after


def test_a_holder_pushed_to_round_a_billion_still_serves_the_next_real_round(opened):
    """Round numbers are no lever: a holder takes deposits of, opens and attests only
    rounds the driver opened (signed tickets) inside the job's window, so a server (or a
    colluding host, which can sign a deposit) that names round 10**9 is refused, leaves
    nothing behind, and the real round is still served."""
    key, holders, ids, payloads, exponents, plaintexts, _ = opened
    holder = holders[1]
    site = holder.sites[0]
    kept = dict(holder._deposits)
    signed, blobs, _ = site.contribute(10**9, (0, 1, 2), "h0-far", model_digest(W0))
    with pytest.raises(PermissionError, match="outside this job's rounds"):
        holder.deposit(signed, blobs[holder.index - 1])
    with pytest.raises(PermissionError, match="not signed by the job's set-up key"):
        holder.open_round(10**9, b"\0" * 64)
    with pytest.raises(PermissionError, match="outside this job's rounds"):
        holder.share_sum(10**9, ids)
    with pytest.raises(PermissionError, match="outside this job's rounds"):
        holder.attest(10**9, ids, {}, payloads, b"", exponents)
    assert holder._deposits == kept and holder._last_round == 1
    signature = _attest(holder, ids, payloads, plaintexts, exponents, key)  # round 1 still
    assert isinstance(signature, bytes) and len(signature) == 64


def test_the_driver_checkpoints_only_the_model_the_attested_sums_give(ray_2cpus, tmp_path):
    """A resume's hosts start from the checkpoint: the driver checks the server's state
    against its own chain before writing it, and writes nothing crafted."""
    cfg = compose([*SMALL_KEY, "rounds=3", "checkpoint.every=1"])
    with pytest.raises(
        ClusterError,
        match="not the model the attested sums give.*round 2's opened sum.*no checkpoint written",
    ):
        run_experiment(cfg, tmp_path, server_class=crafting.LyingStateServer)
    from fedray.runtime.outputs import load_checkpoint

    saved = load_checkpoint(tmp_path / "checkpoints")
    assert saved["round"] == 1 and np.all(np.isfinite(saved["weights"]))


@pytest.mark.parametrize(
    ("grid_steps", "refusal"),
    [
        (0, "the summed weight 0 is not positive"),
        # one step of the statistics' grid: the sum times 2^24, a finite, wrecked model
        (1, "the summed weight 5.96046e-08 is below its 6 clients' least"),
        (7 << 24, "the summed weight 7 exceeds its 6 clients' 1 each"),
    ],
    ids=["weight_zero", "weight_one_grid_step", "weight_above_count"],
)
def test_a_host_refuses_an_attested_sum_of_weight_zero(threshold_key, grid_steps, refusal):
    """A colluding host deposits valid ciphertexts of out-of-range plaintexts (its right:
    no range proofs) that wrap the summed weight to 0, to one grid step (the step would
    multiply the sum by 2^24) or past the clients' count; honest holders attest the true
    opening, but every host refuses the step (found by the colluding-site reviews)."""
    from fedray.crypto.paillier import to_bytes
    from fedray.crypto.threshold import PublicEncryptor, share_exponents
    from fedray.runtime.keys import Contribution

    key, shares = threshold_key
    honest, colluding = _Site(key, 0), _Site(key, 1)
    holders = _holders_of_round_1(key, shares, [honest, colluding])
    layout, model = honest.layout, model_digest(W0)
    signed, blobs, update = honest.contribute(1, (0, 1, 2), "h0-a", model)  # weight 1.0 each
    for h in holders:
        assert h.deposit(signed, blobs[h.index - 1])
    stats = layout.stats
    # + the honest 3.0 = grid_steps mod 2^bits
    wrap = (1 << stats.slot_bits) - (3 << stats.frac_bits) + grid_steps
    crafted = (
        layout.codec.encode_sum([(np.zeros(8), None)] * 3)
        + [wrap]
        + [0] * (stats.num_ciphertexts - 1)
    )
    cts, xs = PublicEncryptor(key).encrypt_many(crafted)
    payload, crafted_blobs = to_bytes(key.public, cts), share_exponents(key, xs)
    c = Contribution(
        key.fingerprint, 1, "h1-c", 1, (3, 4, 5), digest(payload),
        tuple(digest(b) for b in crafted_blobs), model_sha256=model,
    )  # fmt: skip
    for h in holders:
        assert h.deposit(colluding.identity.sign(c), crafted_blobs[h.index - 1])
    ids, payloads = ["h0-a", "h1-c"], [update.ciphertexts, payload]
    sums = {h.index: h.share_sum(1, ids) for h in holders}
    unmasker = Unmasker(key, 2)
    exponents = unmasker.exponents(sums, 2)
    product = holders[0]._product(1, [holders[0]._deposits[u] for u in ids], payloads, 0, None)
    plaintexts = unmasker.unmask(product, exponents)
    data = ints_to_bytes(plaintexts, plaintext_width(key.public.n))
    sigs = {
        h.index: h.attest(1, ids, h._approvals(1, ids), payloads, data, exponents) for h in holders
    }
    assert layout.decode_sum(plaintexts, 6)[1]["weight"] == grid_steps / (1 << 24)  # wrapped
    lineage = Lineage(
        compose(SMALL_KEY), key, layout, {h.index: h.attestation_key() for h in holders}, W0
    )
    lineage.min_client_weight = min_client_weight(100.0, stats.frac_bits)  # the host's
    with pytest.raises(LineageError, match=f"round 1: sum check failed: {refusal}"):
        lineage.check(2, W0, [Release(1, model, 6, data, sigs)])
    assert lineage.round == 0


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_a_refused_sum_leaves_the_hosts_strategy_state_as_it_was(threshold_key):
    """FedAvgM keeps a momentum: a host that refuses an attested sum whose step overflows
    (colluding clients' out-of-range values, attested as the true opening) must not keep
    the momentum that step made, or the next, honest model would fail its check (found by
    the review of 2026-12-04). The layout here decodes to the overflowing total directly:
    the crafted ciphertexts behind it are the weight-zero test's."""
    import types

    key, _ = threshold_key
    cfg = compose([*SMALL_KEY, "strategy=fedavgm"])
    overflowing = np.full(8, 1e38, dtype=np.float64)

    class Decodes:
        codec = types.SimpleNamespace(max_summands=10)

        def decode_sum(self, plaintexts, count):
            return overflowing, {"weight": 1e-3}

    signers = {j: HostIdentity() for j in (1, 2)}
    lineage = Lineage(cfg, key, Decodes(), {j: s.public_bytes() for j, s in signers.items()}, W0)
    before = {k: np.array(v, copy=True) for k, v in lineage.strategy.state_dict().items()}
    data = ints_to_bytes([1, 2], plaintext_width(key.public.n))
    message = release_message(key.fingerprint, 1, model_digest(W0), 2, digest(data))
    release = Release(
        1, model_digest(W0), 2, data, {j: s.sign_bytes(message) for j, s in signers.items()}
    )
    with pytest.raises(LineageError, match="not finite"):
        lineage.advance(release)
    after = lineage.strategy.state_dict()
    assert lineage.round == 0 and sorted(after) == sorted(before)
    for k in before:
        assert np.array_equal(np.asarray(after[k]), before[k]), k


def test_a_sum_attested_in_another_job_is_no_release_of_this_one(threshold_key):
    """Holders sign the job with each attestation (across organisations, the declared
    job's digest): a host of job B refuses a sum t holders attested in job A, under the
    same key, round and model, and takes the same sum attested in its own job."""
    import types

    key, _ = threshold_key
    cfg = compose(SMALL_KEY)

    class Decodes:
        codec = types.SimpleNamespace(max_summands=10)

        def decode_sum(self, plaintexts, count):
            return np.full(8, 0.5), {"weight": 2.0}

    signers = {j: HostIdentity() for j in (1, 2)}
    keys = {j: s.public_bytes() for j, s in signers.items()}
    data = ints_to_bytes([1, 2], plaintext_width(key.public.n))

    def attested(job):
        message = release_message(key.fingerprint, 1, model_digest(W0), 2, digest(data), job)
        return Release(
            1, model_digest(W0), 2, data, {j: s.sign_bytes(message) for j, s in signers.items()}
        )

    job_b = Lineage(cfg, key, Decodes(), keys, W0, job_sha256="b" * 64)
    for other in ("a" * 64, ""):
        with pytest.raises(LineageError, match="0 key holders attest the opened sum, 2 needed"):
            job_b.advance(attested(other))
    assert job_b.round == 0
    job_b.advance(attested("b" * 64))
    assert job_b.round == 1 and not np.array_equal(job_b.weights, W0)


def test_a_host_checks_no_model_before_it_is_set_up_again():
    """Across organisations a site's agent asks ``check_model`` before its round counts:
    a host Ray restarted (no crypto yet) refuses it as ``train`` would, and one whose job
    has model checks but which holds no chain refuses too: neither passes a model."""
    from fedray.runtime.client import ClientHost, RoundTask

    host = ClientHost.__new__(ClientHost)
    host.cfg = compose(SMALL_KEY)
    host._identity, host._encryptor, host._awaiting_weight_ref, host._lineage = (
        HostIdentity(),
        None,
        False,
        None,
    )
    host._needs_scaling = False  # its data prepared (tests/test_feature_scaling.py)
    task = RoundTask(1, [0], {}, None)
    with pytest.raises(PermissionError, match="crypto is not configured"):
        host.check_model(task, W0)
    host._encryptor = object()
    with pytest.raises(PermissionError, match="model checks are not set up"):
        host.check_model(task, W0)
    host.cfg = compose([*SMALL_KEY, "cluster.verify_models=false"])
    assert host.check_model(task, W0) is True
