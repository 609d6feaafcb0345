"""Raw Paillier on integers: fast encryption for key holders, sums, decryption, wire format.

Keys and decryption come from ``phe`` (python-paillier); the big-integer work is gmpy2.
This is the integer layer; :mod:`fedray.crypto.codec` packs float vectors on top of it.

Threat model. The server holds only the public key ``n`` and multiplies ciphertexts
(adds plaintexts). This module is the shared-key layer (``crypto.custody=shared``: every
client holds the key pair, as in BatchCrypt and NVIDIA FLARE's HE mode, so a client
colluding with the server could decrypt the others). The default, threshold custody, is
in :mod:`fedray.crypto.threshold`: there no process holds ``p`` and ``q`` after set-up.

Fast encryption. A Paillier ciphertext is ``(1 + m n) * r^n mod n^2`` with ``g = n + 1``;
all the cost is the obfuscator ``r^n``. Key holders know ``p`` and ``q`` and compute it
modulo ``p^2`` and ``q^2`` separately (CRT). Modulo ``p^2``, ``r^n`` ranges over the cyclic
subgroup of order ``p - 1`` (the p-th powers), so instead of ``r^n`` we draw
``h_p^x`` with ``x`` uniform in ``[0, p - 1)`` and ``h_p = g_p^p`` for ``g_p`` a primitive
root mod p, which is uniform over the same subgroup: the obfuscator then has exactly the
distribution of textbook ``r^n``. ``h_p^x`` uses a fixed-base table of precomputed
powers, so one encryption is ~2 x 128 multiplications of 2048-bit numbers instead of a
4096-bit exponentiation (about 25x faster at 2048 bits). ``g_p`` is checked to be a
generator for every prime factor of ``p - 1`` below 2^16; a large prime factor l that is
missed (probability < 1/l each) leaves the obfuscator uniform on a subgroup of index l,
which cannot be told apart without factoring n. ``obfuscator="standard"`` computes
``r^n`` with CRT instead (about 2x faster than phe, no tables).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from functools import lru_cache

import gmpy2
import numpy as np
from phe import paillier

from fedray.errors import ConfigError


@dataclass(frozen=True)
class PublicKey:
    """The Paillier public key: the modulus n (g = n + 1). Safe to give to anyone."""

    n: int

    @property
    def key_bits(self) -> int:
        return self.n.bit_length()

    @property
    def ciphertext_bytes(self) -> int:
        return (2 * self.key_bits + 7) // 8

    @property
    def fingerprint(self) -> str:
        """Short id of the key, carried with every update so a wrong key is caught."""
        return hashlib.sha256(self.n.to_bytes((self.key_bits + 7) // 8, "big")).hexdigest()[:16]


@dataclass(frozen=True)
class PrivateKey:
    """The factors of n. Shared custody only (every key holder and host); never the server."""

    public: PublicKey
    p: int
    q: int

    def __repr__(self) -> str:  # never print the factors into a log
        return f"PrivateKey(fingerprint={self.public.fingerprint})"

    def to_phe(self) -> paillier.PaillierPrivateKey:
        return paillier.PaillierPrivateKey(
            paillier.PaillierPublicKey(self.public.n), self.p, self.q
        )


def generate_keypair(key_bits: int) -> tuple[PublicKey, PrivateKey]:
    """A fresh key pair from phe's generator (OS randomness; never derived from the job seed)."""
    pub, priv = paillier.generate_paillier_keypair(n_length=key_bits)
    public = PublicKey(int(pub.n))
    return public, PrivateKey(public, int(priv.p), int(priv.q))


@lru_cache(maxsize=1)
def _small_primes(limit: int = 1 << 16) -> tuple[int, ...]:
    sieve = np.ones(limit, dtype=bool)
    sieve[:2] = False
    for i in range(2, int(limit**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = False
    return tuple(int(x) for x in np.flatnonzero(sieve))


def _generator_mod_prime(p: int, rng: secrets.SystemRandom) -> int:
    """A random g that generates Z*_p modulo every prime factor of p - 1 below 2^16."""
    m = p - 1
    factors = [ell for ell in _small_primes() if m % ell == 0]
    gp = gmpy2.mpz(p)
    while True:
        g = gmpy2.mpz(rng.randrange(2, p - 1))
        if all(gmpy2.powmod(g, m // ell, gp) != 1 for ell in factors):
            return int(g)


class _FixedBaseTable:
    """Powers h^(d * 2^(w*i)) mod M, so h^x is one multiplication per w-bit digit of x.

    A table of ``ceil(bits / w)`` rows of ``2^w`` entries: 8-bit windows (the default)
    are cheap to build; 12-bit windows cost ~11x the memory and set-up (~200 MiB and
    2-3 CPU-s for a 2048-bit key's n^2 and 1024-bit exponents) and save a third of the
    multiplications, which pays off for updates of thousands of ciphertexts (see
    ``BIG_WINDOW``).
    """

    def __init__(self, base: int, modulus: int, exponent_bits: int, window: int = 8):
        if not 2 <= window <= 16:
            raise ValueError(f"window={window}: fixed-base windows are 2..16 bits")
        self.modulus = gmpy2.mpz(modulus)
        self.window = window
        self.num_digits = (exponent_bits + window - 1) // window
        rows = []
        b = gmpy2.mpz(base) % self.modulus
        for _ in range(self.num_digits):
            row = [gmpy2.mpz(1), b]
            for _ in range((1 << window) - 2):
                row.append(row[-1] * b % self.modulus)
            rows.append(row)
            b = row[-1] * b % self.modulus  # b^(2^w)
        self.rows = rows

    def _digits(self, x: int):
        if self.window == 8:
            return x.to_bytes(self.num_digits, "little")
        w = self.window
        if x >> (w * self.num_digits):
            raise OverflowError(f"exponent of {x.bit_length()} bits is too big for the table")
        mask = (1 << w) - 1
        return [(x >> s) & mask for s in range(0, w * self.num_digits, w)]

    def pow(self, x: int, times: gmpy2.mpz | None = None) -> gmpy2.mpz:
        """h^x mod M, times ``times`` (one multiplication fewer than multiplying after)."""
        m = self.modulus
        acc = gmpy2.mpz(1) if times is None else gmpy2.mpz(times) % m
        for row, digit in zip(self.rows, self._digits(x), strict=True):
            if digit:
                acc = acc * row[digit] % m
        return acc


class _ResidueTable:
    """Powers h^(d * 2^(w*i)) mod n^2 kept as a residue mod n and a correction mod n, so
    h^x costs one multiplication of a 2n-bit number by an n-bit one per w-bit digit.

    Any unit t mod n^2 equals ``a * (1 + e*n) mod n^2`` with ``a = t mod n`` (an integer
    below n) and ``e = (t div n) * a^-1 mod n``; as ``(1 + e n)(1 + f n) = 1 + (e + f) n
    mod n^2``, a product of such units is ``(prod a_j) * (1 + (sum e_j) n) mod n^2``. The
    table keeps ``a`` (n bits, not 2n) for each power and ``e`` beside it (``mod n``):
    ``h^x`` multiplies the accumulator (mod n^2) by ``ceil(bits/w)`` n-bit residues, each
    about half the work of the usual 2n x 2n-bit product and its reduction mod n^2 (both
    are half the size), and adds the ``e`` (numpy, a chunk of exponents at a time). The
    same integers as :class:`_FixedBaseTable`, at about 55% of the cost; the memory is
    the same (n + n bits per power instead of 2n). Needs ``n``, so it serves the
    public-key side (the server's opening); a key holder's tables mod p^2 and q^2 stay
    :class:`_FixedBaseTable`.
    """

    BLOCK = 256  # exponents whose corrections numpy gathers at a time (~6 MB at w = 12)

    def __init__(self, base: int, n: int, exponent_bits: int, window: int = 8):
        if not 2 <= window <= 16:
            raise ValueError(f"window={window}: fixed-base windows are 2..16 bits")
        n = gmpy2.mpz(n)
        n2 = n * n
        self.n, self.modulus, self.window = n, n2, window
        self.exponent_bits = exponent_bits
        self.num_digits = (exponent_bits + window - 1) // window
        self._limb_bytes = 4 * ((int(n).bit_length() + 31) // 32)  # e < n, as 32-bit limbs
        b = gmpy2.mpz(base) % n2
        if gmpy2.gcd(b, n) != 1:
            raise ValueError("the base of a fixed-base table must be a unit mod n^2")
        # b = b0 (1 + beta n); walking a row multiplies by b: (a b0 = r + q n as integers)
        # a (1 + e n) * b0 (1 + beta n) = r (1 + (e + beta + q r^-1) n), and r^-1 is the
        # running power of b0^-1, so no inversion per power.
        b0 = b % n
        b0_inv = gmpy2.invert(b0, n)
        beta = b // n * b0_inv % n
        size = 1 << window
        self.rows: list[list[gmpy2.mpz]] = []
        self._eps = np.zeros((self.num_digits, size, self._limb_bytes // 4), dtype="<u4")
        for i in range(self.num_digits):
            count = min(size, 1 << (exponent_bits - window * i))  # the top row may be short
            a, e, a_inv = gmpy2.mpz(1), gmpy2.mpz(0), gmpy2.mpz(1)
            row, corrections = [a], [e]
            for _ in range(count - 1):
                q, a = gmpy2.f_divmod(a * b0, n)
                a_inv = a_inv * b0_inv % n
                e = (e + beta + q * a_inv) % n
                row.append(a)
                corrections.append(e)
            self.rows.append(row)
            width = self._limb_bytes
            data = b"".join(int(x).to_bytes(width, "little") for x in corrections)
            self._eps[i, :count] = np.frombuffer(data, dtype="<u4").reshape(count, -1)
            if count == size and i + 1 < self.num_digits:  # the next row's base: b^(2^w)
                q, b0 = gmpy2.f_divmod(a * b0, n)
                b0_inv = a_inv * b0_inv % n
                beta = (e + beta + q * b0_inv) % n

    def _digits(self, exponents: list[int]) -> np.ndarray:
        """The w-bit digits of each exponent, least significant first: (len, num_digits)."""
        bits, w = self.exponent_bits, self.window
        nbytes = (bits + 7) // 8
        try:
            data = b"".join(int(x).to_bytes(nbytes, "little") for x in exponents)
        except OverflowError as exc:  # negative, or wider than the table
            raise OverflowError(f"an exponent is too big for the table ({exc})") from None
        flat = np.unpackbits(
            np.frombuffer(data, dtype=np.uint8).reshape(len(exponents), nbytes),
            axis=1,
            bitorder="little",
        )
        if flat[:, bits:].any():
            raise OverflowError(f"an exponent of more than {bits} bits is too big for the table")
        padded = np.zeros((len(exponents), self.num_digits * w), dtype=np.int64)
        padded[:, :bits] = flat[:, :bits]
        return padded.reshape(len(exponents), self.num_digits, w) @ (1 << np.arange(w))

    def _corrections(self, digits: np.ndarray) -> list[int]:
        """sum_j e_j(digit_j) for each row of ``digits`` (exact, not reduced mod n)."""
        limbs = np.zeros((len(digits), self._eps.shape[2]), dtype=np.uint64)
        for eps_row, column in zip(self._eps, digits.T, strict=True):
            limbs += eps_row[column]  # 32-bit limbs summed in 64 bits: no carry is lost
        width = self._limb_bytes
        low = (limbs & 0xFFFFFFFF).astype("<u4").tobytes()
        high = (limbs >> 32).astype("<u4").tobytes()
        return [
            int.from_bytes(low[k : k + width], "little")
            + (int.from_bytes(high[k : k + width], "little") << 32)
            for k in range(0, len(low), width)
        ]

    def pow(self, x: int, times: gmpy2.mpz | None = None) -> gmpy2.mpz:
        """h^x mod n^2, times ``times``."""
        n, m = self.n, self.modulus
        digits = self._digits([x])
        acc = gmpy2.mpz(1) if times is None else gmpy2.mpz(times) % m
        for row, digit in zip(self.rows, digits[0].tolist(), strict=True):
            if digit:
                acc = acc * row[digit] % m
        a1, a0 = gmpy2.f_divmod(acc, n)
        return a0 + (a1 + a0 * self._corrections(digits)[0]) % n * n

    def open_many(self, ciphertexts: list, exponents: list[int]) -> list[int] | None:
        """``L(c * h^X mod n^2)`` for each ciphertext and exponent: the plaintext M when
        ``c * h^X = 1 + M n`` (h being hs^-1), or None for the whole list as soon as one
        product is not 1 mod n (a wrong exponent, or not a ciphertext of this key)."""
        n, m = self.n, self.modulus
        if len(ciphertexts) != len(exponents):
            raise ValueError(f"{len(ciphertexts)} ciphertexts but {len(exponents)} exponents")
        out: list[int] = []
        for lo in range(0, len(ciphertexts), self.BLOCK):
            digits = self._digits(exponents[lo : lo + self.BLOCK])
            corrections = self._corrections(digits)
            block = ciphertexts[lo : lo + self.BLOCK]
            for c, row_digits, e in zip(block, digits.tolist(), corrections, strict=True):
                acc = gmpy2.mpz(c) % m
                for row, digit in zip(self.rows, row_digits, strict=True):
                    acc = acc * row[digit] % m
                # acc (1 + e n) = a0 + (a1 + a0 e) n: it is 1 + M n exactly when a0 = 1
                a1, a0 = gmpy2.f_divmod(acc, n)
                if a0 != 1:
                    return None
                out.append(int((a1 + e) % n))
        return out


BIG_WINDOW = 12  # fixed-base window for big updates' encryption and opening
# Measured at 2048 bits for the server's 1028-bit summed exponents (docs/performance.md):
# the 12-bit table takes ~2.6 CPU-s more to build than the 8-bit one (once per run, in
# each worker, while the first round trains) and saves ~0.19 ms per power (86 instead
# of 129 multiplications), so it is repaid by the second round from ~7,000 powers.
BIG_WINDOW_MIN_POWERS = 7_000


def window_for(powers: int) -> int:
    """Fixed-base window for a table that will serve ``powers`` powers per round."""
    return BIG_WINDOW if powers >= BIG_WINDOW_MIN_POWERS else 8


class ObfuscatorPool:
    """Obfuscators precomputed while a host is idle, each used exactly once.

    ``fresh()`` makes one (whatever an encryptor's obfuscator is); ``next()`` pops a
    precomputed one, or makes one when the pool is empty. Both encryptors keep one.
    """

    def __init__(self, fresh):
        self.fresh = fresh
        self._items: list = []

    def precompute(self, count: int, should_stop=None) -> int:
        """Add up to ``count`` obfuscators (off the critical path).

        ``should_stop()`` is polled between obfuscators so a caller can pause the work
        the moment real encryption needs the CPU. Returns how many were added.
        """
        added = 0
        while added < count and not (should_stop and should_stop()):
            self._items.append(self.fresh())
            added += 1
        return added

    def __len__(self) -> int:
        return len(self._items)

    def next(self):
        try:
            return self._items.pop()  # list.pop is atomic: safe beside the precompute thread
        except IndexError:
            return self.fresh()


class KeyHolderEncryptor:
    """Encrypts integers for a key holder: CRT plus fixed-base obfuscators (see module doc)."""

    def __init__(self, private: PrivateKey, obfuscator: str = "fixed_base"):
        if obfuscator not in ("fixed_base", "standard"):
            raise ConfigError(
                f"crypto.obfuscator={obfuscator!r}; choose one of: fixed_base, standard"
            )
        self.public = private.public
        self.obfuscator = obfuscator
        self._rng = secrets.SystemRandom()
        self._pool = ObfuscatorPool(self._fresh_obfuscators)
        p, q = gmpy2.mpz(private.p), gmpy2.mpz(private.q)
        self._p, self._q = p, q
        self._n = gmpy2.mpz(private.public.n)
        self._p2, self._q2 = p * p, q * q
        self._q2_inv = gmpy2.invert(self._q2, self._p2)
        if obfuscator == "fixed_base":
            self._tables = []
            for prime, sq in ((p, self._p2), (q, self._q2)):
                g = _generator_mod_prime(int(prime), self._rng)
                h = gmpy2.powmod(g, prime, sq)  # into the order-(prime-1) subgroup
                self._tables.append(_FixedBaseTable(int(h), int(sq), int(prime - 1).bit_length()))

    def precompute(self, count: int, should_stop=None) -> int:
        """Add up to ``count`` obfuscators to the pool (see :class:`ObfuscatorPool`)."""
        return self._pool.precompute(count, should_stop)

    @property
    def pool_size(self) -> int:
        return len(self._pool)

    def _fresh_obfuscators(self) -> tuple[gmpy2.mpz, gmpy2.mpz]:
        if self.obfuscator == "fixed_base":
            tp, tq = self._tables
            xp = self._rng.randrange(int(self._p) - 1)
            xq = self._rng.randrange(int(self._q) - 1)
            return tp.pow(xp), tq.pow(xq)
        r = gmpy2.mpz(self._rng.randrange(1, int(self._n)))
        return gmpy2.powmod(r, self._n, self._p2), gmpy2.powmod(r, self._n, self._q2)

    def encrypt(self, m: int) -> gmpy2.mpz:
        """Ciphertext of a plaintext integer 0 <= m < n."""
        return self._encrypt_with(m, self._pool.next())

    def _encrypt_with(self, m: int, obfuscator: tuple[gmpy2.mpz, gmpy2.mpz]) -> gmpy2.mpz:
        gm = 1 + gmpy2.mpz(m) * self._n  # (1 + n)^m mod n^2, exactly, for m < n
        rp, rq = obfuscator
        cp = gm % self._p2 * rp % self._p2
        cq = gm % self._q2 * rq % self._q2
        return cq + self._q2 * ((cp - cq) * self._q2_inv % self._p2)

    def encrypt_many(self, plaintexts: list[int]) -> list[gmpy2.mpz]:
        return [self.encrypt(m) for m in plaintexts]


def public_encrypt(public: PublicKey, m: int) -> gmpy2.mpz:
    """Textbook encryption with the public key only (no CRT); for tests and comparisons."""
    n = gmpy2.mpz(public.n)
    n2 = n * n
    r = gmpy2.mpz(secrets.randbelow(public.n - 1) + 1)
    return (1 + gmpy2.mpz(m) * n) * gmpy2.powmod(r, n, n2) % n2


class Decryptor:
    """Decrypts with phe's CRT decryption (``raw_decrypt``)."""

    def __init__(self, private: PrivateKey):
        self.public = private.public
        self._phe = private.to_phe()

    def decrypt(self, c: int) -> int:
        return int(self._phe.raw_decrypt(int(c)))

    def decrypt_many(self, ciphertexts: list[int]) -> list[int]:
        return [self.decrypt(c) for c in ciphertexts]


def add_ciphertexts(public: PublicKey, a: list, b: list) -> list[gmpy2.mpz]:
    """Homomorphic sum, elementwise: Enc(x) * Enc(y) mod n^2 = Enc(x + y)."""
    n2 = gmpy2.mpz(public.n) ** 2
    return [x * y % n2 for x, y in zip(a, b, strict=True)]


def to_bytes(public: PublicKey, ciphertexts: list) -> bytes:
    """Fixed-width little-endian packing: ``ciphertext_bytes`` per ciphertext, no pickling."""
    width = public.ciphertext_bytes
    return b"".join(int(c).to_bytes(width, "little") for c in ciphertexts)


def from_bytes(public: PublicKey, data: bytes) -> list[gmpy2.mpz]:
    width = public.ciphertext_bytes
    if len(data) % width:
        raise ValueError(f"ciphertext payload of {len(data)} bytes is not a multiple of {width}")
    mv = memoryview(data)
    return [
        gmpy2.mpz(int.from_bytes(mv[i : i + width], "little")) for i in range(0, len(data), width)
    ]


def check_ciphertexts(public: PublicKey, ciphertexts: list, offset: int = 0) -> str | None:
    """Why these are not valid ciphertexts under ``public`` (outside Z*_{n^2}), or None.

    ``offset``: the index of the first one in its payload (checked a chunk at a time), so
    the message names the ciphertext of the payload, not of the chunk."""
    n = gmpy2.mpz(public.n)
    n2 = n * n
    product = gmpy2.mpz(1)
    for i, c in enumerate(ciphertexts, offset):
        if not 0 < c < n2:
            return f"ciphertext {i} is outside [1, n^2)"
        product = product * c % n
    # c is a unit mod n^2 iff gcd(c, n) = 1; one gcd on the product tests them all.
    if gmpy2.gcd(product, n) != 1:
        bad = next(i for i, c in enumerate(ciphertexts, offset) if gmpy2.gcd(c, n) != 1)
        return f"ciphertext {bad} is not a unit mod n^2 (not in Z*_(n^2))"
    return None


def ciphertext_chunks(public: PublicKey, data: bytes, chunk: int):
    """``(index of the first, its ciphertexts)`` for each ``chunk`` ciphertexts of ``data``.

    A payload is read a slice at a time, so whoever folds it holds one chunk of big
    integers beside the bytes, never a second whole copy of the update."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    width = public.ciphertext_bytes
    step = chunk * width
    view = memoryview(data)
    for lo in range(0, len(view), step):
        yield lo // width, from_bytes(public, view[lo : lo + step])


def multiply_into(acc: list, start: int, ciphertexts: list, n2) -> None:
    """``acc[start + i] *= ciphertexts[i] mod n2``, in place (a homomorphic sum)."""
    for i, c in enumerate(ciphertexts, start):
        acc[i] = acc[i] * c % n2
