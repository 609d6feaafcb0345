"""Packed Paillier: exact sums under real keys, threshold decryption, bad ciphertexts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedray.crypto.codec import PackedPaillierCodec, StatsCodec
from fedray.crypto.paillier import (
    Decryptor,
    KeyHolderEncryptor,
    check_ciphertexts,
    from_bytes,
    public_encrypt,
    to_bytes,
)
from fedray.crypto.secure_aggregation import (
    ClientEncryptor,
    EncryptedSum,
    RejectedUpdate,
    UpdateLayout,
)
from fedray.crypto.threshold import (
    PublicEncryptor,
    Unmasker,
    add_share_blobs,
    combine_partial_decryptions,
    deal_threshold_key,
    partial_decrypt,
    shared_public_key,
)

MAX_CLIENTS = 12


def _layout(public, **kwargs):
    return UpdateLayout.for_key(public, PackedPaillierCodec.for_key(public, **kwargs))


def _seal(key, layout, groups):
    """Encrypt each group of (update, weight, noise, stats) entries as one update; sum them.

    Returns the server's EncryptedSum and each update's exponent-share blobs."""
    enc = ClientEncryptor(key, layout)
    acc = EncryptedSum(key.public, layout)
    blobs = []
    for i, entries in enumerate(groups):
        update, shares = enc.encrypt_sum(entries)
        update.update_id = f"u{i}"
        acc.add(update)
        blobs.append(shares)
    return acc, blobs


def _open_both_ways(key, shares, acc, blobs, holders):
    """Open the sum with the share sums of ``holders`` and with their partial decryptions;
    both must give the same plaintexts."""
    sums = {j: add_share_blobs(key, [b[j - 1] for b in blobs]) for j in holders}
    unmasker = Unmasker(key, acc.layout.codec.max_summands)
    plain = unmasker.unmask(acc.ciphertexts(), unmasker.exponents(sums, len(blobs)))
    partials = {j: partial_decrypt(shares[j - 1], acc.ciphertexts()) for j in holders}
    assert combine_partial_decryptions(key, partials) == plain
    return plain


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    num_clients=st.integers(2, MAX_CLIENTS),
    num_values=st.integers(1, 60),
    quant_bits=st.sampled_from([8, 12, 16]),
    edge=st.booleans(),
)
def test_decrypted_aggregate_equals_weighted_mean(
    threshold_key, data, num_clients, num_values, quant_bits, edge
):
    """Public-key encryption, hosts summing any grouping of clients, any 2 of 3 holders
    opening the sum, both ways: the weighted mean within the stated quantization bound,
    and the statistics (weights, example counts) summed exactly."""
    key, shares = threshold_key
    clip = 1.0
    layout = _layout(
        key.public,
        num_values=num_values,
        max_summands=MAX_CLIENTS,
        quant_bits=quant_bits,
        clip=clip,
    )
    seed = data.draw(st.integers(0, 2**32 - 1))
    hosts = data.draw(st.lists(st.integers(0, 3), min_size=num_clients, max_size=num_clients))
    holders = data.draw(st.sampled_from(list(itertools.combinations([1, 2, 3], 2))))
    rng = np.random.default_rng(seed)
    if edge:  # worst case: every weighted value at the clip edge, of either sign
        updates = [rng.choice([-clip, clip], size=num_values) for _ in range(num_clients)]
        weights = [1.0] * num_clients
    else:
        updates = [rng.uniform(-clip, clip, size=num_values) for _ in range(num_clients)]
        weights = [float(w) for w in rng.uniform(0.05, 1.0, size=num_clients)]
    clipped = [int(e) for e in rng.integers(1, 5000, size=num_clients)]
    groups = [
        [
            (u, w, None, {"values_clipped": e})
            for u, w, e, g in zip(updates, weights, clipped, hosts, strict=True)
            if g == h
        ]
        for h in sorted(set(hosts))
    ]
    acc, blobs = _seal(key, layout, groups)
    plain = _open_both_ways(key, shares, acc, blobs, holders)
    total, stats = layout.decode_sum(plain, acc.count)
    mean = total / stats["weight"]
    expected = np.tensordot(np.array(weights) / sum(weights), np.stack(updates), axes=1)
    bound = layout.codec.error_bound(num_clients, sum(weights))
    assert np.max(np.abs(mean - expected)) <= bound + 1e-6
    assert acc.count == num_clients
    assert stats["values_clipped"] == sum(clipped)
    assert stats["weight"] == pytest.approx(sum(weights), abs=num_clients * 2**-24)


def test_host_sum_is_the_sum_of_the_clients_encodings(small_keypair):
    """A host's sealed sum decrypts to exactly what its clients' updates sum to."""
    _, private = small_keypair
    codec = PackedPaillierCodec.for_key(private.public, num_values=40, max_summands=6)
    rng = np.random.default_rng(3)
    entries = [(rng.uniform(-1, 1, 40), 1.0, rng.integers(-3, 4, 40)) for _ in range(5)]
    singles = [codec.encode(u * w, noise) for u, w, noise in entries]
    summed = codec.encode_sum([(u * w, noise) for u, w, noise in entries])
    assert summed == [sum(col) for col in zip(*singles, strict=True)]
    with pytest.raises(ValueError, match="cannot sum 7"):
        codec.encode_sum([(np.zeros(40), None)] * 7)


def test_any_t_holders_decrypt_and_t_minus_1_do_not(threshold_key):
    """Threshold arithmetic: every pair of the 3 holders opens a sum, both ways; one
    holder alone (its share, or its partial decryption) opens nothing."""
    key, shares = threshold_key
    layout = _layout(key.public, num_values=30, max_summands=4)
    groups = [[(np.full(30, 0.25), 1.0, None, {})], [(np.full(30, -0.5), 1.0, None, {})]]
    acc, blobs = _seal(key, layout, groups)
    results = [
        _open_both_ways(key, shares, acc, blobs, pair)
        for pair in itertools.combinations([1, 2, 3], 2)
    ]
    assert results[0] == results[1] == results[2]
    total, _ = layout.decode_sum(results[0], 2)
    np.testing.assert_allclose(total, np.full(30, -0.25), atol=2 * layout.codec.step)
    unmasker = Unmasker(key, 4)
    one = {1: add_share_blobs(key, [b[0] for b in blobs])}
    with pytest.raises(ValueError, match="2 are needed"):
        unmasker.exponents(one, 2)
    with pytest.raises(ValueError, match="2 are needed"):
        combine_partial_decryptions(key, {1: partial_decrypt(shares[0], acc.ciphertexts())})


def test_wrong_shares_or_a_wrong_sum_do_not_open(threshold_key):
    key, shares = threshold_key
    layout = _layout(key.public, num_values=30, max_summands=4)
    groups = [[(np.full(30, 0.1 * i), 1.0, None, {})] for i in range(3)]
    acc, blobs = _seal(key, layout, groups)
    unmasker = Unmasker(key, 4)
    # The share sums of two of the three updates do not open the sum of all three.
    sums = {j: add_share_blobs(key, [b[j - 1] for b in blobs[:2]]) for j in (1, 2)}
    assert unmasker.unmask(acc.ciphertexts(), unmasker.exponents(sums, 2)) is None
    # A corrupted share sum is caught (it no longer interpolates to an exponent, or the
    # exponent does not open the ciphertexts), never silently mis-decrypted.
    good = {j: add_share_blobs(key, [b[j - 1] for b in blobs]) for j in (1, 2)}
    bad = dict(good)
    bad[2] = bytes([good[2][0] ^ 1]) + good[2][1:]
    with pytest.raises(ValueError, match="interpolate"):
        unmasker.exponents(bad, 3)
    # An opening outside what packing can produce is refused (the server then falls back).
    plain = unmasker.unmask(acc.ciphertexts(), unmasker.exponents(good, 3))
    assert layout.fits(plain)
    assert not layout.fits([1 << (key.public.key_bits - 1)] + plain[1:])


def test_public_key_ciphertexts_are_textbook_paillier_ciphertexts():
    """DJN public-key encryption gives ciphertexts phe's private key decrypts; the same
    plaintext never encrypts twice to the same ciphertext; no obfuscator is reused."""
    key, private = shared_public_key(512, holders=2)
    enc = PublicEncryptor(key)
    enc.precompute(5)
    phe_key = private.to_phe()
    ms = [0, 1, 2**100 + 3, key.n - 1, 5, 5]
    cts, exponents = enc.encrypt_many(ms)
    assert [phe_key.raw_decrypt(int(c)) for c in cts] == ms
    assert cts[-1] != cts[-2]
    assert len(set(exponents)) == len(exponents) and enc.pool_size == 0
    assert Decryptor(private).decrypt(public_encrypt(key.public, 42)) == 42


def test_no_two_ciphertexts_of_a_round_share_an_obfuscator(threshold_key):
    """Precomputed and fresh obfuscators are each used once: every ciphertext of many
    updates divided by its plaintext's (1 + m n) leaves a distinct obfuscator."""
    key, _ = threshold_key
    enc = PublicEncryptor(key)
    enc.precompute(40)
    n2 = key.n**2
    obfuscators = []
    for _ in range(4):
        cts, _ = enc.encrypt_many([7] * 25)  # pool of 40, then fresh ones
        inv = pow(1 + 7 * key.n, -1, n2)
        obfuscators += [int(c) * inv % n2 for c in cts]
    assert len(set(obfuscators)) == len(obfuscators) == 100


def test_shared_custody_obfuscators_decrypt(small_keypair):
    public, private = small_keypair
    dec = Decryptor(private)
    phe_key = private.to_phe()
    for obfuscator in ("fixed_base", "standard"):
        enc = KeyHolderEncryptor(private, obfuscator)
        for m in (0, 1, 2**100 + 3, public.n - 1):
            c = enc.encrypt(m)
            assert dec.decrypt(c) == m
            assert phe_key.raw_decrypt(int(c)) == m  # phe agrees it is a Paillier ciphertext
        assert enc.encrypt(5) != enc.encrypt(5)


def test_no_carry_between_slots_at_max_summands(threshold_key):
    key, shares = threshold_key
    layout = _layout(key.public, num_values=50, max_summands=7, quant_bits=8, clip=2.0)
    assert layout.codec.slots_per_ciphertext > 1
    updates = [np.full(50, 2.0) for _ in range(7)]
    updates[0][::2] = -2.0  # neighbours alternate between the extremes
    acc, blobs = _seal(key, layout, [[(u, 1.0, None, {})] for u in updates])
    total, stats = layout.decode_sum(_open_both_ways(key, shares, acc, blobs, (1, 3)), 7)
    np.testing.assert_allclose(
        total / stats["weight"], np.mean(updates, axis=0), atol=layout.codec.error_bound(7, 7.0)
    )


def test_stats_codec_sums_exactly_without_carries():
    codec = StatsCodec(key_bits=512, max_summands=16)
    rng = np.random.default_rng(0)
    stats = [
        {
            "values_clipped": int(rng.integers(0, 10**6)),
            "weighted_train_loss": float(rng.uniform(0, 1e5)),
        }
        for _ in range(16)
    ]
    summed = codec.decode_sum(
        [sum(col) for col in zip(*(codec.encode_sum([s]) for s in stats), strict=True)]
    )
    assert summed["values_clipped"] == sum(s["values_clipped"] for s in stats)
    assert summed["weighted_train_loss"] == pytest.approx(
        sum(s["weighted_train_loss"] for s in stats), abs=16 * 2**-24
    )
    assert summed["val_weight"] == 0


def test_wire_format_is_compact_bytes(threshold_key):
    key, _ = threshold_key
    public = key.public
    layout = _layout(public, num_values=1000, max_summands=10)
    update, shares = ClientEncryptor(key, layout).encrypt_sum([(np.zeros(1000), 1.0, None, {})])
    assert isinstance(update.ciphertexts, bytes)
    assert update.nbytes == layout.num_ciphertexts * public.ciphertext_bytes
    assert update.nbytes / 1000 < 8 * 2  # 512-bit key: 128 B per ciphertext, ~24 values each
    assert [len(b) for b in shares] == [layout.num_ciphertexts * key.share_width()] * 3
    cts = from_bytes(public, update.ciphertexts)
    assert from_bytes(public, to_bytes(public, cts)) == cts


@pytest.fixture(scope="module")
def key_2048():
    """A real 2048-bit key, 3 holders, any 2 decrypt (a few seconds to make)."""
    return deal_threshold_key(2048, holders=3, threshold=2)


def test_2048_bit_packing_density(key_2048):
    key, _ = key_2048
    layout = _layout(key.public, num_values=10_000, max_summands=10)
    assert layout.codec.slots_per_ciphertext == 102  # 20-bit slots in 2047 bits
    assert layout.stats.num_ciphertexts == 1
    # Ciphertexts, plus one exponent share for another key holder: < 6.5 B per value.
    per_value = (key.public.ciphertext_bytes + key.share_width()) / 102
    assert per_value < 6.5


def test_2048_bit_fast_path_opens_sums_of_1024_bit_exponents(key_2048):
    """At the user-facing key size the secret exponents have DJN's 1024 bits; a sum of
    3 updates opens from 2 holders' share sums (shares at the width the bound gives)
    exactly as by partial decryptions, and every ciphertext has Jacobi symbol +1."""
    import gmpy2

    key, shares = key_2048
    assert key.public.key_bits == 2048 and key.exponent_bits == 1024
    layout = _layout(key.public, num_values=300, max_summands=3)
    rng = np.random.default_rng(3)
    updates = [rng.uniform(-1, 1, 300) for _ in range(3)]
    acc, blobs = _seal(key, layout, [[(u, 1.0, None, {})] for u in updates])
    assert all(len(b) == layout.num_ciphertexts * key.share_width() for b in blobs[0])
    plain = _open_both_ways(key, shares, acc, blobs, (1, 3))
    delta, stats = layout.decode_sum(plain, 3)
    assert np.max(np.abs(delta - sum(updates))) <= layout.codec.error_bound(3, 1.0) + 1e-12
    assert stats["weight"] == pytest.approx(3.0)
    n = gmpy2.mpz(key.n)
    enc = ClientEncryptor(key, layout)
    cts = from_bytes(key.public, enc.encrypt_sum([(updates[0], 1.0, None, {})])[0].ciphertexts)
    assert {gmpy2.jacobi(c % n, n) for c in cts} == {1}


def test_server_rejects_bad_ciphertexts(threshold_key):
    key, shares = threshold_key
    public = key.public
    other, _ = deal_threshold_key(512, holders=3, threshold=2)
    layout = _layout(public, num_values=30, max_summands=3)
    good, good_shares = ClientEncryptor(key, layout).encrypt_sum(
        [(np.ones(30) * 0.1, 1.0, None, {})]
    )
    acc = EncryptedSum(public, layout)
    acc.add(good)

    foreign_layout = _layout(other.public, num_values=30, max_summands=3)
    foreign, _ = ClientEncryptor(other, foreign_layout).encrypt_sum([(np.ones(30), 1.0, None, {})])
    with pytest.raises(RejectedUpdate, match="another key"):
        acc.add(foreign)

    width = public.ciphertext_bytes
    num = layout.num_ciphertexts
    n2 = public.n**2
    outside = type(good)(good.key_id, 30, (n2 + 5).to_bytes(width, "little") * num)
    with pytest.raises(RejectedUpdate, match="outside"):
        acc.add(outside)
    not_unit = type(good)(good.key_id, 30, public.n.to_bytes(width, "little") * num)
    with pytest.raises(RejectedUpdate, match="unit"):
        acc.add(not_unit)
    with pytest.raises(RejectedUpdate, match="bytes"):
        acc.add(type(good)(good.key_id, 30, good.ciphertexts[:-1]))
    with pytest.raises(RejectedUpdate, match="values"):
        acc.add(type(good)(good.key_id, 31, good.ciphertexts))
    # The sum is unchanged by the rejected updates.
    assert acc.count == 1
    assert check_ciphertexts(public, acc.ciphertexts()) is None
    partials = {j: partial_decrypt(shares[j - 1], acc.ciphertexts()) for j in (1, 2)}
    total, _ = layout.decode_sum(combine_partial_decryptions(key, partials), 1)
    np.testing.assert_allclose(total, np.full(30, 0.1), atol=layout.codec.step)


def test_codec_refuses_nan_and_too_many_summands(small_keypair):
    public, _ = small_keypair
    codec = PackedPaillierCodec.for_key(public, num_values=3, max_summands=2)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="count"):
        codec.decode_sum(codec.encode(np.zeros(3)), 3)


def test_process_pool_encrypts_what_one_process_would(threshold_key):
    """A host's ParallelCrypto: the same plaintexts, and the exponents it returns are the
    ones it used (they open the ciphertexts)."""
    from fedray.crypto.parallel import ParallelCrypto

    key, _ = threshold_key
    layout = _layout(key.public, num_values=400, max_summands=3)
    rng = np.random.default_rng(5)
    entries = [(rng.uniform(-1, 1, 400), 0.5, None, {}) for _ in range(3)]
    with ParallelCrypto(key, 2) as pool:
        payload, exponents = pool.encrypt(layout.encode_sum(entries))
    cts = from_bytes(key.public, payload)
    assert len(cts) == layout.num_ciphertexts
    plain = Unmasker(key, 3).unmask(cts, exponents)
    assert plain == layout.encode_sum(entries)


def _updates(key, layout, count):
    enc = ClientEncryptor(key, layout)
    values = layout.codec.num_values
    updates = []
    for i in range(count):
        update, _ = enc.encrypt_sum([(np.full(values, 0.01 * (i + 1)), 1.0, None, {})])
        update.update_id = f"u{i}"
        updates.append(update)
    return updates


def test_sum_is_folded_chunk_by_chunk_and_a_late_bad_chunk_changes_nothing(threshold_key):
    """A sum folded 16 ciphertexts at a time equals one folded whole; an update whose
    only bad ciphertext is in its last chunk is rejected with the sum (or, first, the
    empty sum) exactly as it was: every chunk is checked before any is multiplied in."""
    key, _ = threshold_key
    public = key.public
    layout = _layout(public, num_values=3000, max_summands=4)
    num, width = layout.num_ciphertexts, public.ciphertext_bytes
    assert num > 3 * 16  # several chunks, and a last one
    good = _updates(key, layout, 2)
    whole, chunked = EncryptedSum(public, layout), EncryptedSum(public, layout, chunk=16)
    for update in good:
        whole.add(update)
        chunked.add(update, source=7)
    assert chunked.ciphertexts() == whole.ciphertexts()
    assert (chunked.update_ids, chunked.sources) == (["u0", "u1"], [7, 7])

    before = list(chunked.ciphertexts())
    for bad_value, why in ((public.n, "unit"), (0, "outside")):
        bad = type(good[0])(
            good[0].key_id, 3000, good[0].ciphertexts[:-width] + bad_value.to_bytes(width, "little")
        )
        with pytest.raises(RejectedUpdate, match=f"ciphertext {num - 1} .*{why}"):
            chunked.add(bad, source=1)
        assert chunked.ciphertexts() == before
        assert (chunked.count, chunked.update_ids, chunked.sources) == (2, ["u0", "u1"], [7, 7])
        empty = EncryptedSum(public, layout, chunk=16)
        with pytest.raises(RejectedUpdate):
            empty.add(bad)
        with pytest.raises(ValueError, match="no update"):
            empty.ciphertexts()
    with pytest.raises(RejectedUpdate, match="not bytes"):
        chunked.add(type(good[0])(good[0].key_id, 3000, list(good[0].ciphertexts)))


def test_sum_keeps_no_update_bytes(threshold_key):
    """Folding N updates keeps the sum and each update's id and source, not its bytes:
    what stays allocated after the first fold does not grow by a payload per update."""
    import dataclasses
    import tracemalloc

    key, _ = threshold_key
    layout = _layout(key.public, num_values=3000, max_summands=8)
    updates = _updates(key, layout, 5)
    size = len(updates[0].ciphertexts)
    acc = EncryptedSum(key.public, layout, chunk=16)
    tracemalloc.start()
    try:
        held = []
        for update in updates:
            payload = bytes(bytearray(update.ciphertexts))  # a fresh copy, traced
            acc.add(dataclasses.replace(update, ciphertexts=payload), source=0)
            del payload
            held.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert held[-1] - held[0] < size / 2, (size, held)
    assert acc.count == 5 and acc.update_ids == [u.update_id for u in updates]
