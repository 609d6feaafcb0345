"""Threshold Paillier: t of h key holders decrypt; encryption needs the public key only.

Who holds what (threshold custody, the default):

* A dealer makes ``n = p q`` (phe's generator, OS randomness), shares the decryption
  exponent among ``h`` key holders and hands each its share, then drops ``p``, ``q`` and
  exits (its process ends, so nothing of the factors outlives the set-up).
* Each key holder keeps one :class:`DecryptionShare`. Any ``t`` of them decrypt; ``t - 1``
  of them learn nothing about a plaintext (statistically, see below).
* Everyone else (server, driver, client hosts) holds only :class:`ThresholdPublicKey`.

Decryption exponent (Damgård–Jurik / Shoup, over the integers). ``d`` satisfies
``d = 0 mod lambda(n)`` and ``d = 1 mod n``, so ``c^d = (1 + n)^m`` for any ciphertext of
``m``. It is shared with Shamir's scheme *over the integers* (no safe primes needed):
``f(0) = Delta d`` with ``Delta = h!`` and ``t - 1`` random coefficients drawn
``STATISTICAL_BITS`` bits wider than any integer polynomial that could shift ``t - 1``
shares from one secret to another, so ``t - 1`` shares are within statistical distance
``(t - 1) 2^-STATISTICAL_BITS`` of independent of ``d`` (Rabin 1998; the integer variant
used by TNO's distributed_keygen). Holder ``j`` returns ``c^(s_j)``; the combiner raises
each to ``Delta lambda_j`` (an integer) and gets ``c^(Delta^2 d) = 1 + Delta^2 m n``.

Fast path: obfuscator exponents shared with the key holders. One partial decryption is
a 4096-bit exponentiation per ciphertext per holder (tens of ms at 2048 bits); a
million-parameter update would take minutes. Instead a client encrypts with a DJN
obfuscator ``hs^x`` (below), keeps ``x`` secret and gives each key holder one Shamir
share of ``x`` (same integer scheme). The obfuscator of a *sum* of updates is ``hs^X``
with ``X`` the sum of their exponents; ``t`` holders each add their shares over the
updates of the sum, the server combines ``t`` such sums into ``X`` (integer Lagrange
interpolation, exact) and strips ``hs^X`` from the summed ciphertext with one fixed-base
exponentiation (one multiplication per 8 or 12 bits of ``X``: ~130 or ~86 at 2048 bits,
2.3 times what the 448-bit exponents before issue #22 cost; each multiplies the 4096-bit
accumulator by a 2048-bit residue, see :class:`~fedray.crypto.paillier._ResidueTable`,
about half the cost of a product mod ``n^2``). Releasing ``X``
for a sum reveals nothing beyond that sum's plaintext; each key holder adds each
contribution into at most one released sum (see :mod:`fedray.runtime.keys`), so the
server cannot difference two sums.

Assumptions (named, as they are not textbook Paillier):

* **DJN obfuscators** (Damgård, Jurik, Nielsen, "A generalization of Paillier's
  public-key system with applications to electronic voting", IJIS 2010, section 4):
  ``h = -y^2 mod n`` for a random unit ``y``, ``hs = h^n mod n^2``, and ciphertexts
  ``(1 + n)^m hs^x``. Semantically secure under Decisional Composite Residuosity.
  DJN's moduli have ``p = q = 3 mod 4``, where ``-1`` has Jacobi symbol +1; phe's
  generator does not promise that, and with ``p != q mod 4`` the base would have Jacobi
  symbol -1, so every ciphertext's Jacobi symbol mod n (anyone can compute it) would be
  ``(-1)^x``: the parity of its secret exponent. So ``h = -y^2`` only when ``(-1 | n) =
  +1`` and ``h = y^2`` otherwise: ``(h | n) = (hs | n) = +1`` and every ciphertext has
  Jacobi symbol +1 whatever its exponent (:class:`ThresholdPublicKey` refuses any other
  base).
* **Short exponents**: ``x`` is drawn below ``2^ceil(k/2)`` for a ``k``-bit ``n`` (1024
  bits at 2048), not from the full (secret) order of ``hs``: DJN's choice (section 4),
  followed by ABY, Intel IPCL and SecretFlow HEU. That
  ``hs^x`` with such an ``x`` cannot be told from ``hs^x`` with ``x`` uniform over the
  group order is DJN's assumption on top of DCR (the small-exponent, or short-exponent
  subgroup, assumption). The best known attack on the short exponent is generic
  (Pollard lambda, ``2^(k/4)`` = ``2^512`` work at 2048 bits), far beyond the ~112-bit
  strength of the modulus itself.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import gmpy2

from fedray.crypto.paillier import (
    ObfuscatorPool,
    PrivateKey,
    PublicKey,
    _FixedBaseTable,
    _ResidueTable,
    generate_keypair,
)


def exponent_bits(n: int) -> int:
    """DJN's secret exponent length for modulus ``n``: ceil(k/2) bits, k = n's bit length."""
    return (int(n).bit_length() + 1) // 2


EXPONENT_BITS = exponent_bits(1 << 2047)  # 1024: the default 2048-bit key's (per key: below)
STATISTICAL_BITS = 64  # integer Shamir: statistical distance 2^-64 per shared secret


@dataclass(frozen=True)
class ThresholdPublicKey:
    """What everyone may hold: ``n``, the DJN base ``hs``, and the (t, h) of the sharing."""

    public: PublicKey
    hs: int
    holders: int
    threshold: int

    def __post_init__(self):
        n = gmpy2.mpz(self.public.n)
        if gmpy2.jacobi(gmpy2.mpz(self.hs) % n, n) != 1:
            raise ValueError(
                "DJN base hs has Jacobi symbol -1 mod n: every ciphertext's Jacobi symbol "
                "would give away the parity of its secret exponent"
            )

    @property
    def n(self) -> int:
        return self.public.n

    @property
    def exponent_bits(self) -> int:
        """Length of the secret obfuscator exponents: ceil(k/2) for a k-bit n (DJN)."""
        return exponent_bits(self.public.n)

    @property
    def delta(self) -> int:
        return math.factorial(self.holders)

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def exponent_share_bound(self, summands: int = 1) -> int:
        """Largest share of a sum of ``summands`` exponents (sets the wire width)."""
        bits = self.exponent_bits
        coeff = _coefficient_bits(bits, self.holders, self.threshold)
        one = self.delta * (1 << bits) + ((1 << coeff) - 1) * sum(
            self.holders**i for i in range(1, self.threshold)
        )
        return one * summands

    def share_width(self, summands: int = 1) -> int:
        return (self.exponent_share_bound(summands).bit_length() + 7) // 8


@dataclass(frozen=True)
class DecryptionShare:
    """Key holder ``index``'s share ``s_j`` of the decryption exponent. Never printed."""

    key: ThresholdPublicKey
    index: int  # 1..holders
    value: int

    def __repr__(self) -> str:
        return f"DecryptionShare(index={self.index}, key={self.key.fingerprint})"


def _coefficient_bits(secret_bits: int, holders: int, threshold: int) -> int:
    """Width of the random coefficients that hide a ``secret_bits``-bit secret times h!.

    Any two secrets are linked by a shift polynomial vanishing on ``t - 1`` holders'
    points whose coefficients are below ``h! 2^secret_bits (h+1)^(t-1)``; coefficients
    ``STATISTICAL_BITS`` wider make the shift invisible up to ``2^-STATISTICAL_BITS``.
    """
    delta_bits = math.factorial(holders).bit_length()
    return (
        secret_bits + delta_bits + (threshold - 1) * (holders + 1).bit_length() + (STATISTICAL_BITS)
    )


def _check_sharing(holders: int, threshold: int) -> None:
    if holders < 2 or not 2 <= threshold <= holders:
        raise ValueError(
            f"threshold={threshold} of holders={holders}: need 2 <= threshold <= holders"
        )


def shamir_share(secret: int, holders: int, threshold: int, coefficient_bits: int) -> list[int]:
    """Integer Shamir shares f(1..h) of ``f(0) = h! * secret`` (see the module docstring)."""
    delta = math.factorial(holders)
    coeffs = [delta * secret] + [secrets.randbits(coefficient_bits) for _ in range(threshold - 1)]
    shares = []
    for j in range(1, holders + 1):
        acc = 0
        for c in reversed(coeffs):
            acc = acc * j + c
        shares.append(acc)
    return shares


def lagrange_at_zero(indices: list[int], holders: int) -> list[int]:
    """Integers ``h! * lambda_j(0)`` for the holders ``indices`` (1-based, distinct)."""
    if len(set(indices)) != len(indices) or not all(1 <= j <= holders for j in indices):
        raise ValueError(f"holder indices {indices} must be distinct, in 1..{holders}")
    delta = math.factorial(holders)
    out = []
    for j in indices:
        num, den = delta, 1
        for m in indices:
            if m != j:
                num *= m
                den *= m - j
        if num % den:
            raise ArithmeticError("h! lambda_j(0) is not an integer")  # never for 1..h
        out.append(num // den)
    return out


def deal_threshold_key(
    key_bits: int, holders: int, threshold: int
) -> tuple[ThresholdPublicKey, list[DecryptionShare]]:
    """A fresh key, its DJN base and ``holders`` decryption shares (the dealer's job).

    The factors live only inside this call; the caller keeps the shares for the holders.
    """
    _check_sharing(holders, threshold)
    shared, private = shared_public_key(key_bits, holders)
    n = gmpy2.mpz(shared.n)
    p, q = gmpy2.mpz(private.p), gmpy2.mpz(private.q)
    lam = gmpy2.lcm(p - 1, q - 1)
    d = lam * gmpy2.invert(lam, n)  # 0 mod lambda, 1 mod n
    coeff_bits = _coefficient_bits(int(d).bit_length(), holders, threshold)
    values = shamir_share(int(d), holders, threshold, coeff_bits)
    key = ThresholdPublicKey(shared.public, shared.hs, holders, threshold)
    del p, q, lam, d, private
    return key, [DecryptionShare(key, j, v) for j, v in enumerate(values, start=1)]


class PublicEncryptor:
    """Encrypts with the public key only: ``(1 + m n) hs^x mod n^2`` with a secret ``x``.

    ``x`` has ``key.exponent_bits`` bits (ceil(k/2), DJN); ``hs^x`` comes from a
    fixed-base table (one multiplication per byte of ``x``); pairs ``(x, hs^x)`` can be
    precomputed while the host is idle. Each pair is used once.
    """

    def __init__(self, key: ThresholdPublicKey, window: int = 8):
        self.key = key
        self.exponent_bits = key.exponent_bits
        self._n = gmpy2.mpz(key.n)
        self._n2 = self._n * self._n
        self._table = _FixedBaseTable(key.hs, int(self._n2), self.exponent_bits, window)
        self._pool = ObfuscatorPool(self.fresh)

    def fresh(self) -> tuple[int, gmpy2.mpz]:
        x = secrets.randbits(self.exponent_bits)
        return x, self._table.pow(x)

    def precompute(self, count: int, should_stop=None) -> int:
        """Add up to ``count`` pairs ``(x, hs^x)`` to the pool (see :class:`ObfuscatorPool`)."""
        return self._pool.precompute(count, should_stop)

    @property
    def pool_size(self) -> int:
        return len(self._pool)

    def encrypt_many(self, plaintexts: list[int]) -> tuple[list[gmpy2.mpz], list[int]]:
        """Ciphertexts of ``plaintexts`` (each < n) and their secret exponents."""
        n, n2 = self._n, self._n2
        cts, xs = [], []
        for m in plaintexts:
            x, r = self._pool.next()
            cts.append((1 + gmpy2.mpz(m) * n) * r % n2)
            xs.append(x)
        return cts, xs


def share_exponents(key: ThresholdPublicKey, exponents: list[int]) -> list[bytes]:
    """One blob per key holder: its Shamir share of each exponent, fixed-width bytes."""
    coeff_bits = _coefficient_bits(key.exponent_bits, key.holders, key.threshold)
    width = key.share_width()
    columns: list[list[bytes]] = [[] for _ in range(key.holders)]
    for x in exponents:
        for j, s in enumerate(shamir_share(x, key.holders, key.threshold, coeff_bits)):
            columns[j].append(s.to_bytes(width, "little"))
    return [b"".join(col) for col in columns]


def ints_from_bytes(data: bytes, width: int) -> list[int]:
    if len(data) % width:
        raise ValueError(f"payload of {len(data)} bytes is not a multiple of {width}")
    mv = memoryview(data)
    return [int.from_bytes(mv[i : i + width], "little") for i in range(0, len(data), width)]


def ints_to_bytes(values: list[int], width: int) -> bytes:
    return b"".join(int(v).to_bytes(width, "little") for v in values)


def add_share_blobs(key: ThresholdPublicKey, blobs: list[bytes]) -> bytes:
    """A key holder's share of the summed exponents, from its shares of each update."""
    width = key.share_width()
    columns = [ints_from_bytes(b, width) for b in blobs]
    if len({len(c) for c in columns}) != 1:
        raise ValueError("share blobs of different lengths cannot be added")
    out_width = key.share_width(len(blobs))
    return ints_to_bytes([sum(col) for col in zip(*columns, strict=True)], out_width)


def opens_product(
    key: ThresholdPublicKey,
    products: list,
    plaintexts: list[int],
    exponents: list[int],
    bits: int = STATISTICAL_BITS,
) -> bool:
    """Whether every claimed plaintext ``M_i`` is the decryption of ``products[i]``, given
    the claimed summed exponents ``X_i`` of the fast path, checked in one batch: a key
    holder's attestation (``KeyHolder.attest``) without one fixed-base power per ciphertext.

    The construction (not textbook): the small-exponent batch test of Bellare, Garay and
    Rabin (EUROCRYPT 1998) applied to ``(1 + M_i n) hs^(X_i) = P_i (mod n^2)``. With fresh
    random ``r_i`` of ``bits`` bits drawn here, after the claim, it checks
    ``prod P_i^(r_i) = (1 + (sum r_i M_i mod n) n) hs^(sum r_i X_i)``: one multi-
    exponentiation of ``bits``-bit exponents (Pippenger's buckets) and one power of ``hs``,
    instead of a ~1028-bit power of ``hs`` per ciphertext (~10x fewer products).

    Soundness, and the assumption it rests on: ``Z*_(n^2)`` is the direct product of the
    subgroup ``{1 + a n}`` (order n) and the n-th residues (``gcd(n, phi(n)) = 1``, true for
    n = pq with p, q of equal length), and every unit ``P_i`` is ``(1 + M_i n) y_i`` with
    ``M_i`` its decryption and ``y_i`` an n-th residue. If a claim is off by ``d_i = M_i -
    M'_i`` the two sides differ by ``(1 + (sum r_i d_i) n)`` times an n-th residue, which is
    1 only if ``sum r_i d_i = 0 mod n``: for a ``d_i`` not 0 mod n at most one ``r_i`` below
    ``2^bits < n`` does that (unless the claimant knows a factor of n, i.e. the key is
    broken), so a wrong claim passes with probability at most ``2^-bits`` whatever the
    ``X'_i``. It vouches for the plaintexts only, not that ``X_i`` is the true
    randomness (the attestation is about the plaintexts). Claims outside ``[0, n)`` and
    exponents outside ``[0, len << exponent_bits)`` are refused here (the check is sound
    mod n only). ``hs`` must be an n-th residue, as the dealer made it (the key's
    fingerprint and the dealer's signature bind it)."""
    if not len(products) == len(plaintexts) == len(exponents) or not products:
        return False
    n = gmpy2.mpz(key.n)
    n2 = n * n
    # sound mod n only: a claim must name the plaintext itself; X is bounded (loosely: the
    # holder checks the bound of its own sum) so the power of hs stays small
    bound = len(products) << key.exponent_bits
    if not all(0 <= int(m) < n for m in plaintexts) or not all(
        0 <= int(x) < bound for x in exponents
    ):
        return False
    coeffs = [secrets.randbits(bits) for _ in products]
    m = sum(r * int(p) for r, p in zip(coeffs, plaintexts, strict=True)) % n
    x = sum(r * int(e) for r, e in zip(coeffs, exponents, strict=True))
    right = (1 + m * n) * gmpy2.powmod(gmpy2.mpz(key.hs), x, n2) % n2
    return _multi_power(products, coeffs, n2, bits) == right


def _multi_power(bases: list, exponents: list[int], modulus, bits: int, window: int = 8):
    """``prod bases[i]^exponents[i] mod modulus`` for exponents below ``2^bits``
    (Pippenger's bucket method: per window of exponent bits one product per base)."""
    mask = (1 << window) - 1
    acc = gmpy2.mpz(1)
    for w in reversed(range(-(-bits // window))):
        for _ in range(window if acc != 1 else 0):
            acc = acc * acc % modulus
        shift = w * window
        buckets: list = [None] * (mask + 1)
        for base, e in zip(bases, exponents, strict=True):
            d = (e >> shift) & mask
            if d:
                b = buckets[d]
                buckets[d] = base if b is None else b * base % modulus
        running, total = gmpy2.mpz(1), gmpy2.mpz(1)
        for d in range(mask, 0, -1):  # total = prod over d of buckets[d]^d
            if buckets[d] is not None:
                running = running * buckets[d] % modulus
            if running != 1:
                total = total * running % modulus
        acc = acc * total % modulus
    return acc


class Unmasker:
    """Server side of the fast path: ``t`` holders' share sums -> the summed plaintexts.

    Stripping ``hs^X`` is one fixed-base power per ciphertext (the table of ``hs^-1``
    powers, :class:`~fedray.crypto.paillier._ResidueTable`, is built once per key, on
    first use). ``pool``, a
    :class:`~fedray.crypto.parallel.ParallelCrypto`, spreads big sums over its processes
    (each builds its own table once); results are identical either way.
    """

    def __init__(self, key: ThresholdPublicKey, max_summands: int, *, window: int = 8, pool=None):
        self.key = key
        self.max_summands = max(1, max_summands)
        self.window = window
        self.pool = pool
        self._n = gmpy2.mpz(key.n)
        self._n2 = self._n * self._n
        self._table_cache: _ResidueTable | None = None
        self._max_exponent = self.max_summands << key.exponent_bits

    @property
    def _table(self) -> _ResidueTable:
        if self._table_cache is None:
            hs_inv = gmpy2.invert(gmpy2.mpz(self.key.hs), self._n2)
            bits = self.key.exponent_bits + self.max_summands.bit_length()
            self._table_cache = _ResidueTable(int(hs_inv), int(self._n), bits, self.window)
        return self._table_cache

    def exponents(self, share_sums: dict[int, bytes], summands: int) -> list[int]:
        """The summed exponents X, interpolated exactly from ``t`` holders' sums."""
        key = self.key
        if len(share_sums) < key.threshold:
            raise ValueError(f"{len(share_sums)} share sums; {key.threshold} are needed")
        indices = sorted(share_sums)[: key.threshold]
        coeffs = lagrange_at_zero(indices, key.holders)
        width = key.share_width(summands)
        columns = [ints_from_bytes(share_sums[j], width) for j in indices]
        delta2 = key.delta * key.delta
        out = []
        for values in zip(*columns, strict=True):
            total = sum(c * v for c, v in zip(coeffs, values, strict=True))
            x, rem = divmod(total, delta2)
            if rem or not 0 <= x < self._max_exponent:
                raise ValueError("key holders' share sums do not interpolate to an exponent")
            out.append(x)
        return out

    def unmask(self, ciphertexts: list, exponents: list[int]) -> list[int] | None:
        """Plaintexts of ``ciphertexts`` given their summed exponents; None if one is not
        of the form ``(1 + M n) hs^X`` (a wrong sum or wrong shares)."""
        if len(ciphertexts) != len(exponents):
            raise ValueError(f"{len(ciphertexts)} ciphertexts but {len(exponents)} exponents")
        if self.pool is not None and len(ciphertexts) > 1:
            return self.pool.unmask(ciphertexts, exponents, self.max_summands, self.window)
        return self._table.open_many(ciphertexts, exponents)  # L(c * hs^-X mod n^2)


def partial_decrypt(share: DecryptionShare, ciphertexts: list) -> list[int]:
    """Key holder side: ``c^(s_j) mod n^2`` for each ciphertext (slow: full exponent)."""
    n2 = gmpy2.mpz(share.key.n) ** 2
    s = gmpy2.mpz(share.value)
    return [int(gmpy2.powmod(gmpy2.mpz(c), s, n2)) for c in ciphertexts]


def combine_partial_decryptions(
    key: ThresholdPublicKey, partials: dict[int, list[int]]
) -> list[int]:
    """Plaintexts from ``t`` holders' partial decryptions (``{index: [c^s_j, ...]}``)."""
    if len(partials) < key.threshold:
        raise ValueError(f"{len(partials)} partial decryptions; {key.threshold} are needed")
    indices = sorted(partials)[: key.threshold]
    coeffs = lagrange_at_zero(indices, key.holders)
    n = gmpy2.mpz(key.n)
    n2 = n * n
    scale = gmpy2.invert(gmpy2.mpz(key.delta) ** 2, n)
    out = []
    for values in zip(*(partials[j] for j in indices), strict=True):
        acc = gmpy2.mpz(1)
        for c, v in zip(coeffs, values, strict=True):
            acc = acc * gmpy2.powmod(gmpy2.mpz(v), c, n2) % n2
        m, rem = divmod(acc - 1, n)
        if rem:
            raise ValueError("partial decryptions do not combine to a plaintext")
        out.append(int(m * scale % n))
    return out


def shared_public_key(key_bits: int, holders: int) -> tuple[ThresholdPublicKey, PrivateKey]:
    """Shared custody (BatchCrypt): one key pair every key holder and host is given."""
    public, private = generate_keypair(key_bits)
    n = gmpy2.mpz(public.n)
    rng = secrets.SystemRandom()
    while True:
        y = gmpy2.mpz(rng.randrange(2, public.n - 1))
        if gmpy2.gcd(y, n) == 1:
            break
    # DJN's h = -y^2 has Jacobi symbol (-1 | n): +1 on DJN's moduli (p = q = 3 mod 4),
    # -1 on about half of phe's. Take y^2 there, so (hs | n) = +1 and a ciphertext's
    # Jacobi symbol says nothing about its exponent's parity (module docstring).
    h = (-y * y) % n if gmpy2.jacobi(n - 1, n) == 1 else y * y % n
    hs = gmpy2.powmod(h, n, n * n)
    return ThresholdPublicKey(public, int(hs), holders, 1), private
