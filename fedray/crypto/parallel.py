"""Spread one update's encryption or decryption over processes (gmpy2 holds the GIL).

Each worker builds its own encryptor (fixed-base tables, ~0.1 s) once, then takes chunks
of plaintexts or ciphertexts; ciphertexts come back as packed bytes. Pays off for large
updates (a 1M-parameter model is ~10,000 ciphertexts) on hosts with several CPUs: a
client host uses one when ``crypto.processes`` says so (by default, with
``client.num_cpus`` >= 2 and >= 1000 ciphertexts per update); small updates are faster
in-process, with obfuscators precomputed while the host is idle.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from fedray.crypto.paillier import (
    Decryptor,
    KeyHolderEncryptor,
    PrivateKey,
    from_bytes,
    obfuscators_to_bytes,
    to_bytes,
)

_STATE: dict = {}


def _init(private: PrivateKey, obfuscator: str) -> None:
    _STATE["enc"] = KeyHolderEncryptor(private, obfuscator)
    _STATE["dec"] = Decryptor(private)
    _STATE["public"] = private.public


def _encrypt_keeping(plaintexts: list[int]) -> tuple[bytes, bytes]:
    cts, obfuscators = _STATE["enc"].encrypt_keeping_obfuscators(plaintexts)
    return to_bytes(_STATE["public"], cts), obfuscators_to_bytes(_STATE["public"], obfuscators)


def _decrypt(payload: bytes) -> list[int]:
    return _STATE["dec"].decrypt_many(from_bytes(_STATE["public"], payload))


class ParallelCrypto:
    """A pool of ``processes`` key-holder workers. Use as a context manager."""

    def __init__(self, private: PrivateKey, processes: int, obfuscator: str = "fixed_base"):
        self.public = private.public
        self.processes = processes
        self._pool = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=mp.get_context("spawn"),
            initializer=_init,
            initargs=(private, obfuscator),
        )
        # Warm every worker (builds its tables) before anything is timed.
        list(self._pool.map(_encrypt_keeping, [[0]] * processes))

    def _chunks(self, items: list, parts: int) -> list[list]:
        bounds = np.linspace(0, len(items), parts + 1).astype(int)
        return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]

    def encrypt_keeping_obfuscators(self, plaintexts: list[int]) -> tuple[bytes, bytes]:
        """Ciphertexts and their obfuscators (for the key holder), both as bytes."""
        parts = list(self._pool.map(_encrypt_keeping, self._chunks(plaintexts, self.processes * 4)))
        return b"".join(c for c, _ in parts), b"".join(o for _, o in parts)

    def decrypt(self, payload: bytes) -> list[int]:
        width = self.public.ciphertext_bytes
        count = len(payload) // width
        bounds = np.linspace(0, count, self.processes * 4 + 1).astype(int)
        parts = [
            payload[a * width : b * width]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            if b > a
        ]
        return [m for chunk in self._pool.map(_decrypt, parts) for m in chunk]

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> ParallelCrypto:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
