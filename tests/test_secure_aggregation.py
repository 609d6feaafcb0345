"""Secure aggregation, unit by unit: the codec a job derives from its config, the layout's
weights and bounds, every encryption path of a host, and every refusal of the server's sum.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedray.crypto.codec import PackedPaillierCodec
from fedray.crypto.paillier import Decryptor, from_bytes, to_bytes
from fedray.crypto.parallel import ParallelCrypto
from fedray.crypto.secure_aggregation import (
    ClientEncryptor,
    EncryptedSum,
    EncryptedUpdate,
    RejectedUpdate,
    UpdateLayout,
    codec_for,
)
from fedray.crypto.threshold import (
    Unmasker,
    add_share_blobs,
    combine_partial_decryptions,
    partial_decrypt,
    shared_public_key,
)
from tests.conftest import compose

STATS = {"weighted_train_loss": 0.75, "values_clipped": 3}


def _exactly(message: str) -> str:
    """A ``pytest.raises(match=)`` pattern for the whole message, not a part of it."""
    return f"^{re.escape(message)}$"


def _layout(public, num_values=60, max_summands=4):
    """512-bit key, 16-bit quantization: 18-bit slots, 28 per ciphertext (504 bits)."""
    codec = PackedPaillierCodec.for_key(public, num_values=num_values, max_summands=max_summands)
    return UpdateLayout.for_key(public, codec)


def _entries(num_values=60):
    """Two clients' (update, weight, noise, stats): weights 0.25 and 1."""
    rng = np.random.default_rng(3)
    updates = [rng.uniform(-0.9, 0.9, num_values) for _ in range(2)]
    return [(updates[0], 0.25, None, STATS), (updates[1], 1.0, None, STATS)]


def _check_opened(layout, plaintexts, entries):
    """The opened sum is the weighted sum of the updates (within one half step each) and
    the statistics summed exactly, with the weights among them."""
    total, stats = layout.decode_sum(plaintexts, len(entries))
    expected = sum(w * u for u, w, _, _ in entries)
    assert np.max(np.abs(total - expected)) <= len(entries) * layout.codec.step / 2 + 1e-12
    assert stats["weight"] == sum(w for _, w, _, _ in entries)
    assert stats["weighted_train_loss"] == 0.75 * len(entries)
    assert stats["values_clipped"] == 3 * len(entries)


def _open_by_shares(key, update, shares, holders=(1, 3)):
    one = Unmasker(key, 4)
    sums = {j: add_share_blobs(key, [shares[j - 1]]) for j in holders}
    return one.unmask(from_bytes(key.public, update.ciphertexts), one.exponents(sums, 1))


def _open_by_partials(key, holder_shares, ciphertexts, holders=(2, 3)):
    partials = {j: partial_decrypt(holder_shares[j - 1], ciphertexts) for j in holders}
    return combine_partial_decryptions(key, partials)


@pytest.fixture(scope="module")
def shared_key():
    """Shared custody: a 512-bit key every host holds, and its private half."""
    return shared_public_key(512, holders=2)


@pytest.fixture(scope="module")
def workers(threshold_key):
    """A host's one-process crypto pool for the threshold key (spawned once, ~0.3 s)."""
    with ParallelCrypto(threshold_key[0], 1) as pool:
        yield pool


# -- codec_for: what every host and the server derive from the config ----------------------
def test_codec_for_without_dp_takes_the_crypto_settings(small_keypair):
    public, _ = small_keypair
    cfg = compose(
        ["num_clients=20", "clients_per_round=7", "crypto.clip=0.5", "crypto.quant_bits=12"]
    )
    codec = codec_for(cfg, public, 123)
    assert codec == PackedPaillierCodec(
        key_bits=512, num_values=123, max_summands=7, quant_bits=12, clip=0.5
    )


def test_codec_for_dp_widens_the_range_and_the_headroom(small_keypair):
    """privacy=dp (per-participant mode): the range is clip_norm plus 10 noise-share
    stds, C + 10 sigma C / sqrt(m_min) = 0.5 + 10 * 1.0 * 0.5 / 2 = 3.0; the headroom is
    the Poisson cohort cap, ceil(qN + 6 sqrt(qN (1 - q)) + 1) = ceil(10 + 18 + 1) = 29."""
    public, _ = small_keypair
    cfg = compose(
        [
            "privacy=dp",
            "privacy.clip_norm=0.5",
            "num_clients=100",
            "clients_per_round=10",
            "min_clients_per_round=4",
            "crypto.clip=0.25",
        ]
    )
    codec = codec_for(cfg, public, 50)
    assert codec == PackedPaillierCodec(
        key_bits=512, num_values=50, max_summands=29, quant_bits=16, clip=3.0
    )


def test_codec_for_dp_sample_mode_keeps_the_crypto_settings(small_keypair):
    """Opacus DP-SGD noises inside training: the codec is the one without DP."""
    public, _ = small_keypair
    cfg = compose(["privacy=dp", "privacy.mode=sample", "clients_per_round=6", "crypto.clip=2.0"])
    codec = codec_for(cfg, public, 9)
    assert (codec.clip, codec.max_summands, codec.quant_bits) == (2.0, 6, 16)


# -- UpdateLayout --------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [0.0, -0.5, 1.5, 1.0000001, float("nan")])
def test_weights_outside_zero_to_one_are_refused(small_keypair, weight):
    layout = _layout(small_keypair[0])
    entries = [(np.zeros(60), 1.0, None, {}), (np.zeros(60), weight, None, {})]
    with pytest.raises(ValueError, match=_exactly(f"weight={weight} must be in (0, 1]")):
        layout.encode_sum(entries)


def test_a_failed_clients_zero_update_adds_its_weight_and_its_count_only(small_keypair):
    """A client whose training failed is sealed as a zero update with its usual weight,
    counting 1 in ``clients_failed``: the summed update is the others' sum, and the
    summed weight is that of a round where it trained."""
    layout = _layout(small_keypair[0])
    ok = (np.full(60, 0.25), 0.5, None, {"weighted_train_loss": 0.5})
    failed = (np.zeros(60), 0.5, None, {"clients_failed": 1.0})
    with_it = layout.decode_sum(layout.encode_sum([ok, failed, ok]), 3)
    without = layout.decode_sum(layout.encode_sum([ok, ok]), 2)
    trained = layout.decode_sum(layout.encode_sum([ok, ok, ok]), 3)
    np.testing.assert_allclose(with_it[0], without[0], atol=1e-6)
    assert with_it[1]["weight"] == trained[1]["weight"] == 1.5
    assert with_it[1] == {**without[1], "weight": 1.5, "clients_failed": 1.0}


def test_weights_are_multiplied_in_and_summed_among_the_stats(small_keypair):
    layout = _layout(small_keypair[0])
    plain = layout.encode_sum(
        [(np.full(60, 0.8), 0.5, None, {}), (np.full(60, -0.2), 1.0, None, {})]
    )
    total, stats = layout.decode_sum(plain, 2)
    np.testing.assert_allclose(total, np.full(60, 0.8 * 0.5 - 0.2), atol=layout.codec.step)
    assert stats["weight"] == 1.5


def test_a_float32_update_is_weighted_in_float64(small_keypair):
    """Models hand float32 deltas. Weighted in float32, some products round across a
    half grid step and land one step off; weighted in float64, every value is within
    half a step of the exact weighted value."""
    layout = _layout(small_keypair[0], num_values=20_000)
    step, weight = layout.codec.step, 0.3
    update = np.random.default_rng(11).uniform(-1, 1, 20_000).astype(np.float32)
    exact = update.astype(np.float64) * weight
    assert np.any(np.rint((update * weight).astype(np.float64) / step) != np.rint(exact / step))
    total, _ = layout.decode_sum(layout.encode_sum([(update, weight, None, {})]), 1)
    assert np.max(np.abs(total - exact)) <= step / 2 + 1e-15


def test_fits_exactly_the_slot_widths_of_delta_and_stats(small_keypair):
    """60 values at 28 per ciphertext: 3 delta plaintexts below 2^(28*18) = 2^504, then
    two of statistics: 8 fields of 64 + 2 bits, 7 per ciphertext, below 2^(7*66) = 2^462."""
    layout = _layout(small_keypair[0])
    assert (layout.codec.num_ciphertexts, layout.stats.num_ciphertexts) == (3, 2)
    assert layout.fits([0, 0, 0, 0, 0])
    assert layout.fits([2**504 - 1, 2**504 - 1, 2**504 - 1, 2**462 - 1, 2**462 - 1])
    assert not layout.fits([0, 2**504, 0, 0, 0])
    assert not layout.fits([0, 0, 0, 2**462, 0])
    assert not layout.fits([0, 0, 0, 0, 2**462])
    assert not layout.fits([-1, 0, 0, 0, 0])
    assert not layout.fits([0, 0, 0, 0, -1])
    assert not layout.fits([0, 0, 0, 0])  # one plaintext short
    assert not layout.fits([0, 0, 0, 0, 0, 0])


# -- ClientEncryptor: every path of a host -------------------------------------------------
def test_threshold_path_gives_each_holder_shares_that_open_the_sum(threshold_key):
    key, _ = threshold_key
    layout = _layout(key.public)
    entries = _entries()
    update, shares = ClientEncryptor(key, layout).encrypt_sum(entries)
    assert (update.key_id, update.num_values, update.count) == (key.public.fingerprint, 60, 2)
    assert update.nbytes == 5 * key.public.ciphertext_bytes
    assert [len(b) for b in shares] == [5 * key.share_width()] * 3
    _check_opened(layout, _open_by_shares(key, update, shares), entries)


def test_share_false_returns_no_shares_and_the_update_still_opens(threshold_key):
    key, holder_shares = threshold_key
    layout = _layout(key.public)
    entries = _entries()
    update, shares = ClientEncryptor(key, layout, share=False).encrypt_sum(entries)
    assert shares is None
    opened = _open_by_partials(key, holder_shares, from_bytes(key.public, update.ciphertexts))
    _check_opened(layout, opened, entries)


@pytest.mark.parametrize("obfuscator", [None, "standard"])
def test_shared_custody_encrypts_with_the_private_key_and_gives_no_shares(shared_key, obfuscator):
    """The host holds the whole key (``private=``): CRT encryption, with the default
    (fixed-base) or the standard obfuscators; nothing to share, even if asked to."""
    key, private = shared_key
    layout = _layout(key.public)
    entries = _entries()
    kwargs = {} if obfuscator is None else {"obfuscator": obfuscator}
    encryptor = ClientEncryptor(key, layout, private=private, share=True, **kwargs)
    update, shares = encryptor.encrypt_sum(entries)
    assert shares is None
    assert update.count == 2 and update.nbytes == 5 * key.public.ciphertext_bytes
    opened = Decryptor(private).decrypt_many(from_bytes(key.public, update.ciphertexts))
    _check_opened(layout, opened, entries)


def test_shared_custody_hosts_take_the_configured_obfuscator(shared_key):
    """crypto.obfuscator reaches the host's key-holder encryptor: an unknown name is
    refused there with the allowed values, not silently replaced by the default."""
    from fedray.errors import ConfigError

    key, private = shared_key
    with pytest.raises(
        ConfigError, match=r"^crypto.obfuscator='fast'; choose one of: fixed_base, standard$"
    ):
        ClientEncryptor(key, _layout(key.public), private=private, obfuscator="fast")


def test_precompute_fills_the_pool_until_told_to_stop(threshold_key, shared_key):
    for key, private in ((threshold_key[0], None), shared_key):
        encryptor = ClientEncryptor(key, _layout(key.public), private=private)
        assert encryptor.precompute(3) == 3 and encryptor.pool_size == 3
        assert encryptor.precompute(5, should_stop=lambda: True) == 0
        assert encryptor.pool_size == 3


def test_a_pool_of_workers_encrypts_and_shares_what_opens(threshold_key, workers):
    key, _ = threshold_key
    layout = _layout(key.public)
    entries = _entries()
    update, shares = ClientEncryptor(key, layout, pool=workers).encrypt_sum(entries)
    assert isinstance(update.ciphertexts, bytes) and update.count == 2
    assert [len(b) for b in shares] == [5 * key.share_width()] * 3
    _check_opened(layout, _open_by_shares(key, update, shares, holders=(2, 3)), entries)


def test_a_pool_without_shares_encrypts_what_opens(threshold_key, workers):
    key, holder_shares = threshold_key
    layout = _layout(key.public)
    entries = _entries()
    update, shares = ClientEncryptor(key, layout, share=False, pool=workers).encrypt_sum(entries)
    assert shares is None and update.count == 2
    opened = _open_by_partials(key, holder_shares, from_bytes(key.public, update.ciphertexts))
    _check_opened(layout, opened, entries)


def test_precomputed_obfuscators_go_first_only_if_they_cover_the_update(threshold_key, workers):
    """5 ciphertexts: 5 precomputed obfuscators are used up in-process; with 4 the pool's
    workers encrypt the whole update and the 4 are kept for a later one."""
    key, _ = threshold_key
    layout = _layout(key.public)
    covered = ClientEncryptor(key, layout, pool=workers)
    covered.precompute(5)
    update, shares = covered.encrypt_sum(_entries())
    assert covered.pool_size == 0
    _check_opened(layout, _open_by_shares(key, update, shares), _entries())
    short = ClientEncryptor(key, layout, pool=workers)
    short.precompute(4)
    short.encrypt_sum(_entries())
    assert short.pool_size == 4


# -- EncryptedSum: the server's refusals and its payload -----------------------------------
@pytest.fixture
def sealed(threshold_key):
    """(key, layout with room for 3 updates, one encrypted update of one participant)."""
    key, _ = threshold_key
    layout = _layout(key.public, max_summands=3)
    update, _ = ClientEncryptor(key, layout).encrypt_sum(_entries()[:1])
    return key, layout, update


def _variant(update, **changes):
    fields = {k: getattr(update, k) for k in ("key_id", "num_values", "ciphertexts", "count")}
    return EncryptedUpdate(**{**fields, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"key_id": "someone-else"}, "encrypted under another key"),
        ({"num_values": 61}, "has 61 values, the sum has 60"),
        ({"count": 0}, "count 0 is not a positive integer"),
        ({"count": -2}, "count -2 is not a positive integer"),
        ({"count": 1.0}, "count 1.0 is not a positive integer"),
        ({"count": 4}, "the sum holds 0 updates; 4 more would exceed the maximum 3"),
        ({"ciphertexts": "text"}, "payload is a str, not bytes"),
        ({"ciphertexts": b"\x01" * 100}, "payload of 100 bytes, expected 640"),
    ],
)
def test_sum_refuses_a_bad_header_with_its_reason(sealed, changes, message):
    key, layout, update = sealed
    acc = EncryptedSum(key.public, layout)
    with pytest.raises(RejectedUpdate, match=_exactly(message)):
        acc.add(_variant(update, **changes))
    assert acc.count == 0
    with pytest.raises(ValueError, match=_exactly("no update was added")):
        acc.ciphertexts()


def test_sum_takes_updates_up_to_exactly_max_summands(sealed):
    key, layout, update = sealed
    acc = EncryptedSum(key.public, layout)
    acc.add(_variant(update, count=2))
    with pytest.raises(
        RejectedUpdate,
        match=_exactly("the sum holds 2 updates; 2 more would exceed the maximum 3"),
    ):
        acc.add(_variant(update, count=2))
    acc.add(update)
    assert acc.count == 3


def test_sum_accepts_a_bytearray_and_its_payload_is_the_bytes_of_the_sum(threshold_key):
    """One update: the sum's payload is the very bytes it came in (bytearray too); two:
    it is the product of the ciphertexts, which opens to the sum of both."""
    key, holder_shares = threshold_key
    layout = _layout(key.public)
    entries = _entries()
    encryptor = ClientEncryptor(key, layout)
    first, _ = encryptor.encrypt_sum(entries[:1])
    second, _ = encryptor.encrypt_sum(entries[1:])
    acc = EncryptedSum(key.public, layout)
    acc.add(_variant(first, ciphertexts=bytearray(first.ciphertexts)))
    assert acc.payload() == first.ciphertexts
    acc.add(second)
    assert acc.payload() == to_bytes(key.public, acc.ciphertexts())
    assert len(acc.payload()) == first.nbytes
    opened = _open_by_partials(key, holder_shares, from_bytes(key.public, acc.payload()))
    _check_opened(layout, opened, entries)
