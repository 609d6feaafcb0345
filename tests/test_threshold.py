"""Threshold Paillier's arithmetic, refusals and bounds, unit by unit (no Ray, 512-bit keys).

mutmut showed these untested (docs/testing.md): the share bounds that set the wire width,
the sharing refusals, Lagrange coefficients beyond 2-of-3, the exponent range the server
accepts, and the refusals of share sums or partial decryptions that do not line up.
"""

from __future__ import annotations

import itertools
import math
import secrets

import gmpy2
import pytest

from fedray.crypto.paillier import PublicKey
from fedray.crypto.threshold import (
    EXPONENT_BITS,
    STATISTICAL_BITS,
    DecryptionShare,
    PublicEncryptor,
    ThresholdPublicKey,
    Unmasker,
    _coefficient_bits,
    add_share_blobs,
    combine_partial_decryptions,
    deal_threshold_key,
    ints_from_bytes,
    ints_to_bytes,
    lagrange_at_zero,
    partial_decrypt,
    shamir_share,
    share_exponents,
    shared_public_key,
)

SHARINGS = [(h, t) for h in range(2, 9) for t in range(2, h + 1)]


@pytest.fixture(scope="module")
def key_3_of_5():
    """A 512-bit key, 5 holders, any 3 decrypt."""
    return deal_threshold_key(512, holders=5, threshold=3)


def _poly_coeffs(roots: list[int]) -> list[int]:
    """Coefficients (constant first) of prod_{r in roots} (r - x)."""
    out = [1]
    for r in roots:
        out = [r * a for a in out] + [0]
        for i in range(len(out) - 1, 0, -1):
            out[i] -= out[i - 1]
    return out


@pytest.mark.parametrize("secret_bits", [EXPONENT_BITS, 1030])
def test_coefficients_hide_the_secret_and_cost_no_more_than_rounding(secret_bits):
    """Rabin's integer Shamir: two secrets d, d' give the same t-1 shares up to a shift
    polynomial g with g(0) = h!(d' - d), vanishing on those holders. Its coefficients are
    below B = h! 2^s (h+1)^(t-1); the random coefficients must be STATISTICAL_BITS wider than
    B (t-1 shares then tell d from d' with advantage 2^-64), and each further bit is paid
    on the wire for every exponent share."""
    for h, t in SHARINGS:
        delta = math.factorial(h)
        bound = delta * (1 << secret_bits) * (h + 1) ** (t - 1)
        for seen in itertools.combinations(range(1, h + 1), t - 1):
            scale = delta // math.prod(seen)  # an integer: distinct factors of h!
            shift = [scale * ((1 << secret_bits) - 1) * c for c in _poly_coeffs(list(seen))]
            assert max(abs(c) for c in shift) < bound
        bits = _coefficient_bits(secret_bits, h, t)
        slack = bits - bound.bit_length() - STATISTICAL_BITS
        assert 0 <= slack <= t - 1, (h, t, slack)


@pytest.mark.parametrize("holders,threshold", [(2, 2), (3, 2), (3, 3), (5, 3), (6, 4), (5, 5)])
def test_share_bound_is_the_largest_share_the_dealer_can_make(
    small_keypair, monkeypatch, holders, threshold
):
    """``exponent_share_bound`` sets the wire width: every share of an exponent below
    2^exponent_bits must fit, and the bound may exceed the largest one by at most h!
    (it is the share of 2^exponent_bits itself). The largest shares come from the
    dealer's own code with every random coefficient at its maximum."""
    public, _ = small_keypair
    key = ThresholdPublicKey(public, hs=4, holders=holders, threshold=threshold)
    bits = key.exponent_bits
    monkeypatch.setattr(secrets, "randbits", lambda bits: (1 << bits) - 1)
    coeff_bits = _coefficient_bits(bits, holders, threshold)
    largest = max(shamir_share((1 << bits) - 1, holders, threshold, coeff_bits))
    assert largest < key.exponent_share_bound() <= largest + key.delta
    for summands in (2, 3, 7):
        bound = key.exponent_share_bound(summands)
        assert summands * largest < bound <= summands * (largest + key.delta)
        (summands * largest).to_bytes(key.share_width(summands), "little")  # fits


@pytest.mark.parametrize("holders,threshold", [(3, 4), (3, 1), (3, 0), (1, 1), (1, 2)])
def test_dealer_refuses_sharings_one_holder_could_open_or_nobody_could(holders, threshold):
    """t = 1 would give every holder the whole key; t > h would give nobody a way to
    decrypt. Both are refused before any key is made, in one line."""
    with pytest.raises(ValueError, match=f"threshold={threshold} of holders={holders}: need 2"):
        deal_threshold_key(512, holders, threshold)


@pytest.mark.parametrize("holders,threshold", SHARINGS)
def test_lagrange_coefficients_interpolate_any_t_holders(holders, threshold):
    """For every set of t holders, sum(h! lambda_j(0) f(j)) = h! f(0) for a random
    polynomial of degree t - 1, in any order of the indices."""
    delta = math.factorial(holders)
    f = [secrets.randbits(64) for _ in range(threshold)]
    value = {j: sum(c * j**i for i, c in enumerate(f)) for j in range(1, holders + 1)}
    for chosen in itertools.combinations(range(1, holders + 1), threshold):
        for order in (list(chosen), list(reversed(chosen))):
            coeffs = lagrange_at_zero(order, holders)
            assert sum(c * value[j] for c, j in zip(coeffs, order, strict=True)) == delta * f[0]


@pytest.mark.parametrize("indices", [[1, 1], [2, 3, 2], [0, 1], [1, 4], [-1, 2]])
def test_lagrange_refuses_repeated_or_unknown_holders(indices):
    """A repeated holder would count one share twice; index 0 is the secret itself."""
    with pytest.raises(ValueError, match=r"must be distinct, in 1\.\.3"):
        lagrange_at_zero(indices, 3)


def test_any_three_of_five_open_and_two_do_not(key_3_of_5):
    """Partial decryptions of every 3 of 5 holders (and of 4, which uses 3) give the same
    plaintexts; 2 are refused; a holder with a wrong share makes the combination fail
    rather than give a wrong plaintext."""
    key, shares = key_3_of_5
    plaintexts = [0, 1, 12345, key.n - 1]
    enc = PublicEncryptor(key)
    cts, _ = enc.encrypt_many(plaintexts)
    partials = {s.index: partial_decrypt(s, cts) for s in shares}
    n2 = key.n**2
    assert all(0 < v < n2 for vs in partials.values() for v in vs)  # reduced mod n^2
    for chosen in itertools.combinations(range(1, 6), 3):
        assert combine_partial_decryptions(key, {j: partials[j] for j in chosen}) == plaintexts
    assert combine_partial_decryptions(key, {j: partials[j] for j in (5, 2, 4, 1)}) == plaintexts
    with pytest.raises(ValueError, match="2 partial decryptions; 3 are needed"):
        combine_partial_decryptions(key, {j: partials[j] for j in (1, 5)})
    forged = DecryptionShare(key, 2, shares[1].value + 1)
    wrong = {1: partials[1], 2: partial_decrypt(forged, cts), 3: partials[3]}
    with pytest.raises(ValueError, match="partial decryptions do not combine to a plaintext"):
        combine_partial_decryptions(key, wrong)


def test_partials_of_different_lengths_are_refused(key_3_of_5):
    """Holders that decrypted different numbers of ciphertexts are not silently cut to
    the shortest (the first plaintexts alone would open fine)."""
    key, shares = key_3_of_5
    cts, _ = PublicEncryptor(key).encrypt_many([3, 4])
    parts = {s.index: partial_decrypt(s, cts) for s in shares[:3]}
    assert combine_partial_decryptions(key, {j: p[:1] for j, p in parts.items()}) == [3]
    parts[2] = parts[2][:1]
    with pytest.raises(ValueError):
        combine_partial_decryptions(key, parts)


def _share_sums(key, exponent: int, summands: int) -> dict[int, bytes]:
    """Every holder's share of ``exponent``, at the wire width of a sum of ``summands``."""
    bits = _coefficient_bits(key.exponent_bits, key.holders, key.threshold)
    values = shamir_share(exponent, key.holders, key.threshold, bits)
    width = key.share_width(summands)
    return {j: ints_to_bytes([v], width) for j, v in enumerate(values, start=1)}


@pytest.mark.parametrize("max_summands", [1, 3])
def test_exponents_cover_exactly_the_range_of_a_sum(key_3_of_5, max_summands):
    """A sum of ``max_summands`` exponents lies in [0, max_summands 2^exponent_bits): both
    ends interpolate exactly, one past the end is refused (the server then falls back);
    the top one opens a ciphertext whose obfuscator is hs^top."""
    key, _ = key_3_of_5
    unmasker = Unmasker(key, max_summands)
    top = (max_summands << key.exponent_bits) - 1
    for x in (0, 1, top):
        assert unmasker.exponents(_share_sums(key, x, max_summands), max_summands) == [x]
    with pytest.raises(ValueError, match="do not interpolate to an exponent"):
        unmasker.exponents(_share_sums(key, top + 1, max_summands), max_summands)
    n2 = key.n**2
    c = (1 + 5 * key.n) * pow(key.hs, top, n2) % n2
    assert unmasker.unmask([c], [top]) == [5]  # the server's table reaches the top exponent


def test_exponents_refuse_share_sums_of_different_lengths(threshold_key):
    key, _ = threshold_key
    _, xs = PublicEncryptor(key).encrypt_many([1, 2, 3])
    blobs = share_exponents(key, xs)
    sums = {1: add_share_blobs(key, [blobs[0]]), 2: add_share_blobs(key, [blobs[1]])}
    unmasker = Unmasker(key, 1)
    assert unmasker.exponents(sums, 1) == xs
    sums[2] = sums[2][: 2 * key.share_width()]
    with pytest.raises(ValueError):
        unmasker.exponents(sums, 1)


def test_zero_opens_to_zero_and_the_counts_must_match(threshold_key):
    """A sum of plaintext 0 (all clients sent zeros) opens to 0, not to 'wrong sum'."""
    key, _ = threshold_key
    cts, xs = PublicEncryptor(key).encrypt_many([0, 7, 0])
    blobs = share_exponents(key, xs)
    unmasker = Unmasker(key, 1)
    exponents = unmasker.exponents({j: blobs[j - 1] for j in (2, 3)}, 1)
    assert unmasker.unmask(cts, exponents) == [0, 7, 0]
    with pytest.raises(ValueError, match="3 ciphertexts but 2 exponents"):
        unmasker.unmask(cts, exponents[:2])


class _RecordingPool:
    """Stands in for a ParallelCrypto: records what it is given."""

    def __init__(self):
        self.calls = []

    def unmask(self, ciphertexts, exponents, max_summands, window):
        self.calls.append((len(ciphertexts), max_summands, window))
        return ["from the pool"] * len(ciphertexts)


def test_unmasker_sends_sums_of_several_ciphertexts_to_its_pool(threshold_key):
    """A pool gets every sum of more than one ciphertext, with the Unmasker's settings;
    a single ciphertext is opened in process (shipping it would cost more)."""
    key, _ = threshold_key
    cts, xs = PublicEncryptor(key).encrypt_many([5, 6])
    pool = _RecordingPool()
    unmasker = Unmasker(key, 4, window=6, pool=pool)
    assert unmasker.unmask(cts, xs) == ["from the pool"] * 2
    assert unmasker.unmask(cts[:1], xs[:1]) == [5]
    assert pool.calls == [(2, 4, 6)]


def test_add_share_blobs_of_several_updates_and_refusals(threshold_key):
    """Share sums of 3 updates open the sum of the 3 ciphertexts; blobs that do not hold
    the same number of shares, or a whole number of them, are refused."""
    key, _ = threshold_key
    enc = PublicEncryptor(key)
    updates = [enc.encrypt_many([i, 10 * i]) for i in (1, 2, 3)]
    n2 = key.n**2
    summed = [math.prod(c[k] for c, _ in updates) % n2 for k in range(2)]
    blobs = [share_exponents(key, xs) for _, xs in updates]
    sums = {j: add_share_blobs(key, [b[j - 1] for b in blobs]) for j in (1, 3)}
    assert all(len(s) == 2 * key.share_width(3) for s in sums.values())
    unmasker = Unmasker(key, 3)
    assert unmasker.unmask(summed, unmasker.exponents(sums, 3)) == [6, 60]
    width = key.share_width()
    with pytest.raises(ValueError, match="share blobs of different lengths cannot be added"):
        add_share_blobs(key, [blobs[0][0], blobs[1][0][:width]])
    with pytest.raises(ValueError, match=f"payload of 5 bytes is not a multiple of {width}"):
        add_share_blobs(key, [bytes(5)])


@pytest.mark.parametrize("width", [1, 3, 65])
def test_ints_round_trip_at_any_width(width):
    values = [0, 1, (1 << (8 * width)) - 1, secrets.randbits(8 * width)]
    data = ints_to_bytes(values, width)
    assert len(data) == 4 * width and ints_from_bytes(data, width) == values
    if width > 1:
        with pytest.raises(ValueError, match=f"payload of {len(data) + 1} bytes is not a"):
            ints_from_bytes(data + b"\0", width)


def test_precompute_stops_when_asked(threshold_key):
    """Idle-time precomputation yields the CPU the moment ``should_stop`` says so."""
    key, _ = threshold_key
    enc = PublicEncryptor(key)
    assert enc.precompute(10, should_stop=lambda: True) == 0 and enc.pool_size == 0
    polls = iter([False, False, False, True])
    assert enc.precompute(10, should_stop=lambda: next(polls)) == 3 and enc.pool_size == 3
    assert enc.precompute(2) == 2 and enc.pool_size == 5


def test_public_encryptor_keeps_its_key_and_window(threshold_key):
    """Callers choose the fixed-base window (big updates ask for 12 bits: fewer
    multiplications per obfuscator); the table is built with the window asked for, and
    the ciphertexts decrypt the same."""
    key, shares = threshold_key
    enc = PublicEncryptor(key, window=4)
    assert enc.key is key and enc._table.window == 4
    cts, _ = enc.encrypt_many([9])
    partials = {s.index: partial_decrypt(s, cts) for s in shares[:2]}
    assert combine_partial_decryptions(key, partials) == [9]


def test_shared_custody_key_names_its_holders_and_one_decrypts():
    """Shared custody: every holder has the whole key, so the key says t = 1 (the server
    asks one holder for plaintexts) and names all h holders."""
    key, private = shared_public_key(512, holders=4)
    assert (key.holders, key.threshold, key.delta) == (4, 1, 24)
    assert key.n == private.public.n


def _keys_of_both_kinds(leaking: int = 3, others: int = 1):
    """512-bit shared keys (with their factors): ``leaking`` where -1 has Jacobi symbol
    -1 mod n (p != q mod 4: DJN's h = -y^2 there gave every ciphertext away), and
    ``others`` where it has +1 (p = q mod 4)."""
    bad, good = [], []
    for _ in range(200):
        key, private = shared_public_key(512, holders=2)
        kind = bad if gmpy2.jacobi(key.n - 1, key.n) == -1 else good
        kind.append((key, private))
        if len(bad) >= leaking and len(good) >= others:
            return bad[:leaking] + good[:others]
    pytest.fail(f"200 keys gave {len(bad)} with (-1|n) = -1 and {len(good)} with +1")


def test_obfuscator_base_is_djn_where_it_can_be_and_always_has_jacobi_plus_one():
    """DJN (section 4): hs = h^n with h = -y^2, so -hs is a square mod p and mod q, on
    moduli where (-1 | n) = +1 (DJN's p = q = 3 mod 4, or p = q = 1 mod 4). Where
    (-1 | n) = -1, h = y^2: hs is a square mod p and mod q. Either way (hs | n) = +1."""
    for key, private in _keys_of_both_kinds():
        p, q, n = private.p, private.q, key.n
        base = -key.hs if gmpy2.jacobi(n - 1, n) == 1 else key.hs
        assert gmpy2.legendre(base % p, p) == 1 and gmpy2.legendre(base % q, q) == 1
        assert gmpy2.jacobi(key.hs % n, n) == 1
        assert gmpy2.gcd(key.hs, n) == 1


def test_ciphertexts_jacobi_symbol_gives_away_nothing_about_the_exponent():
    """The attacker holds the public key and ciphertexts: it computes each ciphertext's
    Jacobi symbol mod n, (c | n) = (hs | n)^x, and guesses x odd when it is -1. With a
    base of Jacobi symbol -1 (DJN's -y^2 on about half of phe's moduli) it reads the
    parity of every exponent; here every ciphertext has symbol +1, on keys of both kinds,
    so the guess is a constant and right only for the half of exponents that are even."""
    for key, _ in _keys_of_both_kinds():
        enc = PublicEncryptor(key)
        n = gmpy2.mpz(key.n)
        cts, xs = enc.encrypt_many([secrets.randbelow(key.n) for _ in range(200)])
        symbols = [gmpy2.jacobi(gmpy2.mpz(c) % n, n) for c in cts]
        guessed = sum((s == -1) == (x % 2 == 1) for s, x in zip(symbols, xs, strict=True))
        assert set(symbols) == {1}
        assert 60 <= guessed <= 140  # chance: 100 +- 10 (the old base got all 200 right)


def test_a_key_whose_base_has_jacobi_minus_one_is_refused():
    """Anyone who builds a key object (a dealer from before the fix, a key read back from
    elsewhere) gets an error rather than ciphertexts that leak their exponents' parity."""
    key, _ = _keys_of_both_kinds(leaking=1, others=0)[0]
    n = key.n
    leaking = (n - 1) * key.hs % (n * n)  # (-1 | n) = -1: the symbol flips
    assert gmpy2.jacobi(leaking % n, n) == -1
    with pytest.raises(ValueError, match="Jacobi symbol -1 mod n"):
        ThresholdPublicKey(key.public, leaking, key.holders, key.threshold)
    assert ThresholdPublicKey(key.public, key.hs, 3, 2).hs == key.hs


@pytest.mark.parametrize("key_bits", [512, 513, 2048])
def test_secret_exponents_have_ceil_k_over_2_bits(key_bits):
    """DJN draws the obfuscator exponent as a ceil(k/2)-bit number for a k-bit n (1024
    bits at 2048, not 448): every exponent fits, the longest of 64 uses every bit (a miss
    has probability 2^-64), and each obfuscator is hs^x for its x. The shares and the
    server's bound follow the same length."""
    n = (1 << (key_bits - 1)) | secrets.randbits(key_bits - 1) | 1  # an odd k-bit modulus
    while gmpy2.gcd(n, 2 * 3 * 5 * 7) != 1:
        n += 2
    key = ThresholdPublicKey(PublicKey(n), hs=4, holders=3, threshold=2)
    bits = -(-key_bits // 2)
    assert key.exponent_bits == bits
    enc = PublicEncryptor(key)
    pairs = [enc.fresh() for _ in range(64)]
    assert max(x for x, _ in pairs).bit_length() == bits
    n2 = n * n
    assert all(r == pow(4, x, n2) for x, r in pairs[:4])
    coeff = _coefficient_bits(bits, 3, 2)
    assert key.exponent_share_bound() == 6 * (1 << bits) + ((1 << coeff) - 1) * 3
    assert Unmasker(key, 5)._max_exponent == 5 << bits
