"""Spread one update's encryption over processes (gmpy2 holds the GIL).

Each worker builds its own encryptor (fixed-base tables, ~0.1 s) once, then takes chunks
of plaintexts; ciphertexts come back as packed bytes, with their secret obfuscator
exponents (public-key encryption, for the key holders' shares). Pays off for large
updates (a 1M-parameter model is ~10,000 ciphertexts) on hosts with several CPUs: a
client host uses one when ``crypto.processes`` says so (by default, with
``client.num_cpus`` >= 2 and >= 1000 ciphertexts per update); small updates are faster
in-process, with obfuscators precomputed while the host is idle.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from fedray.crypto.paillier import KeyHolderEncryptor, PrivateKey, to_bytes
from fedray.crypto.threshold import PublicEncryptor, ThresholdPublicKey

_STATE: dict = {}


def _init(key: ThresholdPublicKey, private: PrivateKey | None, obfuscator: str) -> None:
    _STATE["public"] = key.public
    if private is not None:
        _STATE["private"] = KeyHolderEncryptor(private, obfuscator)
    else:
        _STATE["enc"] = PublicEncryptor(key)


def _encrypt(plaintexts: list[int]) -> tuple[bytes, list[int] | None]:
    if "private" in _STATE:
        return to_bytes(_STATE["public"], _STATE["private"].encrypt_many(plaintexts)), None
    cts, exponents = _STATE["enc"].encrypt_many(plaintexts)
    return to_bytes(_STATE["public"], cts), exponents


class ParallelCrypto:
    """A pool of ``processes`` encryption workers. Use as a context manager."""

    def __init__(
        self,
        key: ThresholdPublicKey,
        processes: int,
        *,
        private: PrivateKey | None = None,
        obfuscator: str = "fixed_base",
    ):
        self.key = key
        self.processes = processes
        self._pool = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=mp.get_context("spawn"),
            initializer=_init,
            initargs=(key, private, obfuscator),
        )
        # Warm every worker (builds its tables) before anything is timed.
        list(self._pool.map(_encrypt, [[0]] * processes))

    def _chunks(self, items: list, parts: int) -> list[list]:
        bounds = np.linspace(0, len(items), parts + 1).astype(int)
        return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]

    def encrypt(self, plaintexts: list[int]) -> tuple[bytes, list[int] | None]:
        """Ciphertexts as bytes, and their obfuscator exponents (None with a private key)."""
        parts = list(self._pool.map(_encrypt, self._chunks(plaintexts, self.processes * 4)))
        exponents = None if parts[0][1] is None else [x for _, xs in parts for x in xs]
        return b"".join(c for c, _ in parts), exponents

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> ParallelCrypto:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
