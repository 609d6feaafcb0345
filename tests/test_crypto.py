"""Packed Paillier: exact sums under real keys, rejection of bad ciphertexts, key custody."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedray.crypto.codec import PackedPaillierCodec
from fedray.crypto.paillier import (
    Decryptor,
    KeyHolderEncryptor,
    KnownObfuscatorDecryptor,
    check_ciphertexts,
    from_bytes,
    generate_keypair,
    obfuscators_from_bytes,
    public_encrypt,
    to_bytes,
)
from fedray.crypto.secure_aggregation import (
    ClientEncryptor,
    EncryptedSum,
    RejectedUpdate,
    decrypt_sum,
)

MAX_CLIENTS = 12


def _aggregate(private, codec, updates, weights, obfuscator="fixed_base", hosts=None):
    """Encrypt (summed per host when ``hosts`` gives each client's host), sum, decrypt.

    Decrypts twice, with the private key and with the deposited obfuscators, and checks
    that both give the same plaintexts.
    """
    enc = ClientEncryptor(private, codec, obfuscator)
    acc = EncryptedSum(private.public, codec)
    hosts = list(range(len(updates))) if hosts is None else hosts
    obfuscator_sets = []
    for h in sorted(set(hosts)):
        entries = [(u, w, None) for u, w, g in zip(updates, weights, hosts, strict=True) if g == h]
        update, obfuscators = enc.encrypt_sum(entries)
        acc.add(update)
        obfuscator_sets.append(obfuscators_from_bytes(private.public, obfuscators))
    cts = from_bytes(private.public, acc.payload())
    plaintexts = Decryptor(private).decrypt_many(cts)
    assert KnownObfuscatorDecryptor(private).decrypt_sum(cts, obfuscator_sets) == plaintexts
    total = codec.decode_sum(plaintexts, acc.count)
    return total / acc.total_weight, acc


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    num_clients=st.integers(1, MAX_CLIENTS),
    num_values=st.integers(1, 60),
    quant_bits=st.sampled_from([8, 12, 16]),
    edge=st.booleans(),
)
def test_decrypted_aggregate_equals_weighted_mean(
    small_keypair, data, num_clients, num_values, quant_bits, edge
):
    _, private = small_keypair
    clip = 1.0
    codec = PackedPaillierCodec.for_key(
        private.public,
        num_values=num_values,
        max_summands=MAX_CLIENTS,
        quant_bits=quant_bits,
        clip=clip,
    )
    seed = data.draw(st.integers(0, 2**32 - 1))
    # Clients sealed one by one, or summed by the hosts that trained them, any grouping.
    hosts = data.draw(st.lists(st.integers(0, 3), min_size=num_clients, max_size=num_clients))
    rng = np.random.default_rng(seed)
    if edge:  # worst case: every weighted value at the clip edge, of either sign
        updates = [rng.choice([-clip, clip], size=num_values) for _ in range(num_clients)]
        weights = [1.0] * num_clients
    else:
        updates = [rng.uniform(-clip, clip, size=num_values) for _ in range(num_clients)]
        weights = [float(w) for w in rng.uniform(0.05, 1.0, size=num_clients)]
    mean, acc = _aggregate(private, codec, updates, weights, hosts=hosts)
    expected = np.tensordot(np.array(weights) / sum(weights), np.stack(updates), axes=1)
    bound = codec.error_bound(num_clients, sum(weights))
    assert np.max(np.abs(mean - expected)) <= bound + 1e-12
    assert acc.count == num_clients


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


def test_known_obfuscator_decryption_checks_the_sum(small_keypair):
    public, private = small_keypair
    codec = PackedPaillierCodec.for_key(public, num_values=30, max_summands=4)
    enc = ClientEncryptor(private, codec, "fixed_base")
    (a, oa), (b, ob) = (enc.encrypt_sum([(np.full(30, x), 1.0, None)]) for x in (0.25, -0.5))
    acc = EncryptedSum(public, codec)
    acc.add(a)
    acc.add(b)
    cts = from_bytes(public, acc.payload())
    sets = [obfuscators_from_bytes(public, o) for o in (oa, ob)]
    fast = KnownObfuscatorDecryptor(private)
    plain = fast.decrypt_sum(cts, sets)
    np.testing.assert_allclose(codec.decode_sum(plain, 2), np.full(30, -0.25), atol=codec.step)
    # A sum that is not the product of the named updates is caught, not mis-decrypted:
    assert fast.decrypt_sum(cts, sets[:1]) is None  # an update missing from the claim
    assert fast.decrypt_sum(from_bytes(public, a.ciphertexts), sets) is None  # one too few
    tampered = list(cts)
    tampered[0] = tampered[0] * (1 + 7 * public.n) % public.n**2  # still a valid ciphertext
    assert Decryptor(private).decrypt(tampered[0]) != plain[0]
    assert fast.decrypt_sum(tampered, sets)[0] == plain[0] + 7  # a plaintext shift passes
    assert fast.decrypt_sum(cts, []) is None


def test_key_dealer_decrypts_deposited_sums_once_and_counts_clients(small_keypair):
    from fedray.runtime.keys import KeyDealer

    dealer = KeyDealer(512, min_count=3)
    public, private = dealer.public_key(), dealer.keypair()
    codec = PackedPaillierCodec.for_key(public, num_values=20, max_summands=5)
    enc = ClientEncryptor(private, codec, "fixed_base")
    host_a, obf_a = enc.encrypt_sum([(np.full(20, 0.5), 1.0, None)] * 2)
    host_b, obf_b = enc.encrypt_sum([(np.full(20, -0.1), 1.0, None)])
    assert dealer.deposit(4, "a", host_a.count, obf_a) and dealer.deposit(4, "b", 1, obf_b)
    assert not dealer.deposit(4, "a", 2, obf_a)  # an id is deposited once
    acc = EncryptedSum(public, codec)
    acc.add(host_a)
    acc.add(host_b)
    assert dealer.decrypt_sum(3, ["a", "b"], acc.payload()) is None  # another round's
    # The count comes from the deposits: 2 + 1 clients >= min_count 3.
    plain = dealer.decrypt_sum(4, ["a", "b"], acc.payload())
    np.testing.assert_allclose(codec.decode_sum(plain, 3), np.full(20, 0.9), atol=3 * codec.step)
    assert dealer.decrypt_sum(4, ["a", "b"], acc.payload()) is None  # deposits are used once
    # A sum of fewer clients than a round must have is refused, whatever the server says.
    only_a = EncryptedSum(public, codec)
    only_a.add(host_a)
    dealer.deposit(5, "a2", 2, obf_a)
    with pytest.raises(PermissionError, match="refusing to decrypt a sum of 2"):
        dealer.decrypt_sum(5, ["a2"], only_a.payload())
    # Stragglers' deposits do not pile up: two rounds later they are dropped.
    dealer.deposit(5, "late", 1, obf_b)
    dealer.decrypt_sum(7, ["nothing"], acc.payload())
    assert dealer.pending_deposits() == 0


def test_no_carry_between_slots_at_max_summands(small_keypair):
    _, private = small_keypair
    codec = PackedPaillierCodec.for_key(
        private.public, num_values=50, max_summands=7, quant_bits=8, clip=2.0
    )
    assert codec.slots_per_ciphertext > 1
    updates = [np.full(50, 2.0) for _ in range(7)]
    updates[0][::2] = -2.0  # neighbours alternate between the extremes
    mean, _ = _aggregate(private, codec, updates, [1.0] * 7)
    expected = np.mean(updates, axis=0)
    np.testing.assert_allclose(mean, expected, atol=codec.error_bound(7, 7.0))


def test_both_obfuscators_and_textbook_encryption_decrypt(small_keypair):
    public, private = small_keypair
    dec = Decryptor(private)
    phe_key = private.to_phe()
    for obfuscator in ("fixed_base", "standard"):
        enc = KeyHolderEncryptor(private, obfuscator)
        for m in (0, 1, 2**100 + 3, public.n - 1):
            c = enc.encrypt(m)
            assert dec.decrypt(c) == m
            assert phe_key.raw_decrypt(int(c)) == m  # phe agrees it is a Paillier ciphertext
        # randomised: the same plaintext never encrypts to the same ciphertext
        assert enc.encrypt(5) != enc.encrypt(5)
    assert dec.decrypt(public_encrypt(public, 42)) == 42


def test_wire_format_is_compact_bytes(small_keypair):
    public, private = small_keypair
    codec = PackedPaillierCodec.for_key(public, num_values=1000, max_summands=10)
    update = ClientEncryptor(private, codec, "fixed_base").encrypt(np.zeros(1000), 1.0)
    assert isinstance(update.ciphertexts, bytes)
    assert update.nbytes == codec.num_ciphertexts * public.ciphertext_bytes
    assert update.nbytes / 1000 < 8 * 2  # 512-bit key: 128 B per ciphertext, ~24 values each
    assert from_bytes(public, to_bytes(public, from_bytes(public, update.ciphertexts))) == (
        from_bytes(public, update.ciphertexts)
    )


def test_2048_bit_packing_density():
    public, _ = generate_keypair(2048)
    codec = PackedPaillierCodec.for_key(public, num_values=10_000, max_summands=10)
    assert codec.slots_per_ciphertext == 102  # 20-bit slots in 2047 bits
    assert public.ciphertext_bytes / codec.slots_per_ciphertext <= 8


def test_server_rejects_bad_ciphertexts(small_keypair):
    public, private = small_keypair
    other_public, other_private = generate_keypair(512)
    codec = PackedPaillierCodec.for_key(public, num_values=30, max_summands=3)
    good = ClientEncryptor(private, codec, "fixed_base").encrypt(np.ones(30) * 0.1, 1.0)
    acc = EncryptedSum(public, codec)
    acc.add(good)

    foreign_codec = PackedPaillierCodec.for_key(other_public, num_values=30, max_summands=3)
    foreign = ClientEncryptor(other_private, foreign_codec, "fixed_base").encrypt(np.ones(30), 1.0)
    with pytest.raises(RejectedUpdate, match="another key"):
        acc.add(foreign)

    width = public.ciphertext_bytes
    n2 = public.n**2
    outside = type(good)(
        good.key_id, 30, (n2 + 5).to_bytes(width, "little") * codec.num_ciphertexts, 1.0
    )
    with pytest.raises(RejectedUpdate, match="outside"):
        acc.add(outside)
    not_unit = type(good)(
        good.key_id, 30, public.n.to_bytes(width, "little") * codec.num_ciphertexts, 1.0
    )
    with pytest.raises(RejectedUpdate, match="unit"):
        acc.add(not_unit)
    short = type(good)(good.key_id, 30, good.ciphertexts[:-1], 1.0)
    with pytest.raises(RejectedUpdate, match="bytes"):
        acc.add(short)
    wrong_shape = type(good)(good.key_id, 31, good.ciphertexts, 1.0)
    with pytest.raises(RejectedUpdate, match="values"):
        acc.add(wrong_shape)
    # The sum is unchanged by the rejected updates.
    assert acc.count == 1
    assert check_ciphertexts(public, from_bytes(public, acc.payload())) is None
    np.testing.assert_allclose(
        decrypt_sum(private, codec, acc.payload(), 1), np.full(30, 0.1), atol=codec.step
    )


def test_codec_refuses_nan_and_too_many_summands(small_keypair):
    public, _ = small_keypair
    codec = PackedPaillierCodec.for_key(public, num_values=3, max_summands=2)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="count"):
        codec.decode_sum(codec.encode(np.zeros(3)), 3)


def test_process_pool_encrypts_what_one_process_would(small_keypair):
    """A host's ParallelCrypto: same plaintexts after decryption, both ways, and the
    obfuscators it returns are the ones it used."""
    from fedray.crypto.parallel import ParallelCrypto

    public, private = small_keypair
    codec = PackedPaillierCodec.for_key(public, num_values=400, max_summands=3)
    rng = np.random.default_rng(5)
    entries = [(rng.uniform(-1, 1, 400), 0.5, None) for _ in range(3)]
    with ParallelCrypto(private, 2) as pool:
        enc = ClientEncryptor(private, codec, "fixed_base", pool=pool)
        update, obfuscators = enc.encrypt_sum(entries)
    assert update.count == 3 and update.nbytes == codec.num_ciphertexts * public.ciphertext_bytes
    cts = from_bytes(public, update.ciphertexts)
    plaintexts = Decryptor(private).decrypt_many(cts)
    assert plaintexts == codec.encode_sum([(u * w, None) for u, w, _ in entries])
    sets = [obfuscators_from_bytes(public, obfuscators)]
    assert KnownObfuscatorDecryptor(private).decrypt_sum(cts, sets) == plaintexts
