"""Raw Paillier, unit by unit (no Ray, 512-bit keys): the generator, fixed-base tables,
the key holder's encryption, sums, the wire format and the server's ciphertext checks.

mutmut showed these untested (docs/testing.md): the generator's range and check,
table windows and sizes, the obfuscators' exponent ranges, and ``add_ciphertexts``,
``encrypt_many`` / ``decrypt_many`` and ``precompute``, which only the Ray jobs ran.
"""

from __future__ import annotations

import hashlib
import itertools
import random

import pytest
import sympy

from fedray.crypto import paillier
from fedray.crypto.paillier import (
    Decryptor,
    KeyHolderEncryptor,
    ObfuscatorPool,
    PublicKey,
    _FixedBaseTable,
    _generator_mod_prime,
    _ResidueTable,
    add_ciphertexts,
    check_ciphertexts,
    ciphertext_chunks,
    from_bytes,
    multiply_into,
    public_encrypt,
    to_bytes,
)
from fedray.errors import ConfigError

SMOOTH_PRIME = 120121  # p - 1 = 2^3 * 3 * 5 * 7 * 11 * 13: 19% of Z*_p are generators


class _Draw:
    """A stand-in for ``secrets.SystemRandom`` that draws ``pick(lo, hi)`` from [lo, hi)."""

    def __init__(self, pick):
        self.pick = pick

    def randrange(self, start, stop=None):
        lo, hi = (0, start) if stop is None else (start, stop)
        return self.pick(lo, hi)


LOWEST = _Draw(lambda lo, hi: lo)
HIGHEST = _Draw(lambda lo, hi: hi - 1)
ONE = _Draw(lambda lo, hi: 1)


def _generators(p: int) -> set[int]:
    return {g for g in range(1, p) if sympy.n_order(g, p) == p - 1}


def test_generator_generates_z_p_when_p_minus_1_is_smooth():
    """Every factor of p - 1 is below 2^16, so each g returned is a primitive root."""
    assert sympy.factorint(SMOOTH_PRIME - 1) == {2: 3, 3: 1, 5: 1, 7: 1, 11: 1, 13: 1}
    rng = random.Random(1)
    for _ in range(40):
        g = _generator_mod_prime(SMOOTH_PRIME, rng)
        assert 1 < g < SMOOTH_PRIME - 1
        assert sympy.n_order(g, SMOOTH_PRIME) == SMOOTH_PRIME - 1


@pytest.mark.parametrize("p", [5, 7, 11, 13, 23])
def test_generator_draws_every_generator_and_nothing_else(p):
    """g is random over all of Z*_p's generators (1 and p - 1 never are, for p >= 5)."""
    rng = random.Random(p)
    drawn = {_generator_mod_prime(p, rng) for _ in range(300)}
    assert drawn == _generators(p)


@pytest.mark.parametrize(
    ("window", "bits"), [(2, 21), (3, 30), (4, 13), (7, 50), (8, 9), (8, 64), (9, 40), (16, 17)]
)
def test_fixed_base_table_gives_exact_powers(window, bits):
    modulus = 1000003**2  # an odd prime squared, like p^2
    h = 123457
    table = _FixedBaseTable(h, modulus, bits, window)
    rng = random.Random(window * 100 + bits)
    for x in [
        0,
        1,
        2,
        (1 << bits) - 1,
        1 << (bits - 1),
        *(rng.getrandbits(bits) for _ in range(5)),
    ]:
        assert table.pow(x) == pow(h, x, modulus), x
        assert table.pow(x, times=modulus + 10) == 10 * pow(h, x, modulus) % modulus


def test_fixed_base_table_default_window_is_8_bits():
    """The documented default: ceil(bits / 8) rows of 256 powers (small tables)."""
    table = _FixedBaseTable(3, 101**2, 20)
    assert table.window == 8
    assert [len(row) for row in table.rows] == [256, 256, 256]
    assert table.pow(2**20 - 1) == pow(3, 2**20 - 1, 101**2)


@pytest.mark.parametrize(("window", "bits"), [(4, 12), (8, 16), (5, 10)])
def test_fixed_base_table_refuses_exponents_beyond_its_size(window, bits):
    table = _FixedBaseTable(7, 10007**2, bits, window)
    assert table.pow((1 << bits) - 1) == pow(7, (1 << bits) - 1, 10007**2)
    with pytest.raises(OverflowError, match="too big"):
        table.pow(1 << bits)


def test_fixed_base_table_refuses_windows_outside_2_to_16():
    for window in (1, 17):
        with pytest.raises(ValueError, match=f"window={window}: fixed-base windows are 2..16 bits"):
            _FixedBaseTable(3, 101**2, 20, window)


SMALL_N = (1000003 * 999983, 1000003)  # a composite n (as Paillier's) and a prime


@pytest.mark.parametrize(
    ("window", "bits"), [(2, 21), (3, 30), (5, 64), (8, 9), (8, 64), (9, 40), (12, 25)]
)
def test_residue_table_gives_exact_powers_mod_n_squared(window, bits):
    """The server's table keeps each power mod n^2 as a residue mod n and a correction
    mod n: its powers are exactly pow()'s and _FixedBaseTable's, exponents wider than
    the table or negative are refused."""
    rng = random.Random(window * 1000 + bits)
    for n in SMALL_N:
        modulus, h = n * n, 123457
        table, plain = _ResidueTable(h, n, bits, window), _FixedBaseTable(h, modulus, bits, window)
        assert table.num_digits == -(-bits // window) and table.modulus == modulus
        for x in [
            0,
            1,
            2,
            (1 << bits) - 1,
            1 << (bits - 1),
            *(rng.getrandbits(bits) for _ in range(6)),
        ]:
            assert table.pow(x) == pow(h, x, modulus) == plain.pow(x), (n, x)
            assert table.pow(x, times=modulus + 10) == 10 * pow(h, x, modulus) % modulus
        for bad in (1 << bits, -1):
            with pytest.raises(OverflowError, match="too big"):
                table.pow(bad)


def test_residue_table_opens_sums_and_refuses_wrong_ones(monkeypatch):
    """``open_many`` gives M for each ``c = (1 + M n) hs^X`` from X (the table is over
    hs^-1), across its blocks of exponents; one wrong exponent or one ciphertext that is
    not a unit, anywhere, and the whole list does not open."""
    n = SMALL_N[0]
    modulus = n * n
    hs = pow(987654321, n, modulus)
    bits = 30
    table = _ResidueTable(pow(hs, -1, modulus), n, bits, 4)
    monkeypatch.setattr(_ResidueTable, "BLOCK", 3)  # 10 ciphertexts: 4 blocks
    rng = random.Random(5)
    ms = [rng.randrange(n) for _ in range(10)]
    xs = [rng.getrandbits(bits) for _ in range(10)]
    cts = [(1 + m * n) * pow(hs, x, modulus) % modulus for m, x in zip(ms, xs, strict=True)]
    assert table.open_many(cts, xs) == ms
    assert table.open_many([c + 5 * modulus for c in cts], xs) == ms  # taken mod n^2
    for i in (0, 4, 9):
        wrong = list(xs)
        wrong[i] ^= 1
        assert table.open_many(cts, wrong) is None
    assert table.open_many([*cts[:7], 1000003 * cts[7] % modulus, *cts[8:]], xs) is None
    with pytest.raises(ValueError, match="10 ciphertexts but 9 exponents"):
        table.open_many(cts, xs[:9])
    with pytest.raises(ValueError, match="must be a unit mod n"):
        _ResidueTable(1000003, n, bits, 4)
    with pytest.raises(ValueError, match="window=17: fixed-base windows are 2..16 bits"):
        _ResidueTable(hs, n, bits, 17)


def test_key_holder_default_is_fixed_base_and_decrypts_with_phe(small_keypair):
    public, private = small_keypair
    enc = KeyHolderEncryptor(private)
    assert enc.obfuscator == "fixed_base" and enc.public == public
    dec = Decryptor(private)
    assert dec.public == public
    ms = [0, 1, 2**200 + 5, public.n - 1]
    cts = enc.encrypt_many(ms)
    n2 = public.n**2
    assert all(0 < c < n2 for c in cts) and check_ciphertexts(public, cts) is None
    assert dec.decrypt_many(cts) == ms
    assert [private.to_phe().raw_decrypt(int(c)) for c in cts] == ms


def test_key_holder_refuses_unknown_obfuscators(small_keypair):
    _, private = small_keypair
    with pytest.raises(ConfigError, match="crypto.obfuscator='fast'; choose one of: fixed_base"):
        KeyHolderEncryptor(private, "fast")


def test_fixed_base_exponents_cover_exactly_the_group_order(small_keypair):
    """x is drawn from [0, p - 1), the order of h_p: x = 0 gives the obfuscator 1, and the
    top draw x = p - 2 is the inverse of x = 1 (modulo p^2 and q^2, so modulo n^2)."""
    public, private = small_keypair
    n, n2 = public.n, public.n**2
    enc = KeyHolderEncryptor(private, "fixed_base")
    enc._rng = LOWEST
    assert enc.encrypt(9) == 1 + 9 * n
    enc._rng = ONE
    c_one = enc.encrypt(0)
    enc._rng = HIGHEST
    c_top = enc.encrypt(0)
    assert c_one != 1 and c_one * c_top % n2 == 1


def test_standard_obfuscator_draws_r_from_1_to_n_minus_1(small_keypair):
    """r = 1 is the trivial obfuscator; r = n - 1 gives (-1)^n = -1 mod n^2 (n odd)."""
    public, private = small_keypair
    n, n2 = public.n, public.n**2
    enc = KeyHolderEncryptor(private, "standard")
    assert Decryptor(private).decrypt(enc.encrypt(77)) == 77
    enc._rng = LOWEST
    assert enc.encrypt(9) == 1 + 9 * n
    enc._rng = HIGHEST
    assert enc.encrypt(9) == n2 - (1 + 9 * n)


def test_public_encrypt_draws_r_from_1_to_n_minus_1(small_keypair, monkeypatch):
    public, private = small_keypair
    n, n2 = public.n, public.n**2
    assert Decryptor(private).decrypt(public_encrypt(public, 31)) == 31
    monkeypatch.setattr(paillier.secrets, "randbelow", lambda k: 0)
    assert public_encrypt(public, 9) == 1 + 9 * n
    monkeypatch.setattr(paillier.secrets, "randbelow", lambda k: k - 1)
    assert public_encrypt(public, 9) == n2 - (1 + 9 * n)


def test_precomputed_obfuscators_are_used_once_and_can_be_paused(small_keypair):
    public, private = small_keypair
    enc = KeyHolderEncryptor(private)
    polls = itertools.count()
    assert enc.precompute(10, should_stop=lambda: next(polls) >= 3) == 3
    assert enc.pool_size == 3
    assert enc.precompute(4) == 4 and enc.pool_size == 7
    n2 = public.n**2
    inv = pow(1 + 5 * public.n, -1, n2)
    cts = enc.encrypt_many([5] * 9)  # 7 from the pool, then 2 fresh
    assert enc.pool_size == 0
    assert len({int(c) * inv % n2 for c in cts}) == 9  # nine distinct obfuscators
    assert Decryptor(private).decrypt_many(cts) == [5] * 9


def test_obfuscator_pool_pops_each_once_then_makes_fresh_ones():
    made = itertools.count()
    pool = ObfuscatorPool(made.__next__)
    assert pool.precompute(3) == 3 and len(pool) == 3
    assert pool.precompute(0) == 0
    assert [pool.next() for _ in range(5)] == [2, 1, 0, 3, 4]
    assert len(pool) == 0


def test_add_ciphertexts_is_the_homomorphic_sum(small_keypair):
    public, private = small_keypair
    n, n2 = public.n, public.n**2
    enc, dec = KeyHolderEncryptor(private), Decryptor(private)
    a = enc.encrypt_many([1, 2**300, n - 1])
    b = enc.encrypt_many([5, 7, 2])
    total = add_ciphertexts(public, a, b)
    assert all(0 < c < n2 for c in total)
    assert dec.decrypt_many(total) == [6, 2**300 + 7, 1]  # (n - 1) + 2 wraps mod n
    with pytest.raises(ValueError, match="shorter"):
        add_ciphertexts(public, a, b[:2])


def test_wire_format_round_trips_and_refuses_bad_lengths(small_keypair):
    public, private = small_keypair
    assert public.ciphertext_bytes == 128  # 512-bit n, 1024-bit n^2
    assert PublicKey(255).ciphertext_bytes == 2 and PublicKey(256).ciphertext_bytes == 3
    assert to_bytes(public, [1, 258]) == b"\x01" + bytes(127) + b"\x02\x01" + bytes(126)
    cts = KeyHolderEncryptor(private).encrypt_many([3, 4, 5])
    data = to_bytes(public, cts)
    assert len(data) == 3 * 128 and from_bytes(public, data) == cts
    assert from_bytes(public, b"") == []
    with pytest.raises(ValueError, match="payload of 383 bytes is not a multiple of 128"):
        from_bytes(public, data[:-1])


def test_check_ciphertexts_names_the_bad_index(small_keypair):
    public, private = small_keypair
    n2 = public.n**2
    assert check_ciphertexts(public, [1, n2 - 1, 2]) is None  # units at the range's edges
    assert check_ciphertexts(public, [0]) == "ciphertext 0 is outside [1, n^2)"
    assert check_ciphertexts(public, [1, n2], offset=10) == "ciphertext 11 is outside [1, n^2)"
    not_unit = check_ciphertexts(public, [1, 2, 7 * private.p, 1], offset=5)
    assert not_unit == "ciphertext 7 is not a unit mod n^2 (not in Z*_(n^2))"
    assert check_ciphertexts(public, [private.q**2]).startswith("ciphertext 0 is not a unit")


def test_ciphertext_chunks_cover_the_payload_in_order(small_keypair):
    public, _ = small_keypair
    cts = list(range(1, 8))
    data = to_bytes(public, cts)
    for chunk in (1, 3, 7, 100):
        pieces = list(ciphertext_chunks(public, data, chunk))
        assert [i for i, _ in pieces] == list(range(0, 7, chunk))
        assert [len(p) for _, p in pieces] == [min(chunk, 7 - i) for i in range(0, 7, chunk)]
        assert [c for _, p in pieces for c in p] == cts
    assert list(ciphertext_chunks(public, b"", 3)) == []
    with pytest.raises(ValueError, match="chunk=0 must be >= 1"):
        list(ciphertext_chunks(public, data, 0))


def test_multiply_into_adds_at_an_offset(small_keypair):
    public, private = small_keypair
    enc, dec = KeyHolderEncryptor(private), Decryptor(private)
    acc = enc.encrypt_many([10, 20, 30, 40])
    multiply_into(acc, 1, enc.encrypt_many([1, 2]), public.n**2)
    assert dec.decrypt_many(acc) == [10, 21, 32, 40]
    assert all(0 < c < public.n**2 for c in acc)


def test_private_key_repr_never_shows_the_factors(small_keypair):
    public, private = small_keypair
    for text in (repr(private), str(private), f"{private}"):
        assert str(private.p) not in text and str(private.q) not in text
        assert text == f"PrivateKey(fingerprint={public.fingerprint})"
    # sha256 of n, big-endian, first 16 hex digits
    assert PublicKey(255).fingerprint == hashlib.sha256(b"\xff").hexdigest()[:16]
