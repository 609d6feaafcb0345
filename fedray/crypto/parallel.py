"""Spread one update's encryption, or one sum's opening, over processes (gmpy2 holds the GIL).

Each worker builds what it needs once, when the pool starts (an encryptor's or an
unmasker's fixed-base table; ``window=12`` for big updates: 2-3 CPU-s and ~250 MiB per
worker at 2048 bits, see docs/performance.md), then takes chunks: plaintexts come
back as packed ciphertext bytes with their secret obfuscator exponents (public-key
encryption, for the key holders' shares); summed ciphertexts and their summed exponents
come back as plaintexts (the server's fast-path opening, :class:`Unmasker`). Pays off
for large updates (a 1M-parameter model is ~10,000 ciphertexts) on hosts with several
CPUs: a client host uses one when ``crypto.processes`` says so (by default, with
``client.num_cpus`` >= 2 and >= 1000 ciphertexts per update), and so does the server
to open such sums; small updates are faster in-process, with obfuscators precomputed
while the host is idle.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from fedray.crypto.paillier import KeyHolderEncryptor, PrivateKey, from_bytes, to_bytes
from fedray.crypto.threshold import (
    PublicEncryptor,
    ThresholdPublicKey,
    Unmasker,
    share_exponents,
)

_STATE: dict = {}
# Ciphertexts per opening job: with a few jobs per process in flight, the server holds a
# few chunks of the sum as bytes at a time, not a second copy of it.
OPEN_CHUNK = 512


def _init(
    key: ThresholdPublicKey, private: PrivateKey | None, obfuscator: str, window: int
) -> None:
    _STATE.update(key=key, private=private, obfuscator=obfuscator, window=window)
    # A Ray actor is killed without running exit hooks: workers leave with their parent.
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _encryptor():
    if "enc" not in _STATE:
        private = _STATE["private"]
        _STATE["enc"] = (
            KeyHolderEncryptor(private, _STATE["obfuscator"])
            if private is not None
            else PublicEncryptor(_STATE["key"], window=_STATE["window"])
        )
    return _STATE["enc"]


def _unmasker(max_summands: int, window: int) -> Unmasker:
    cached = _STATE.get("unmasker")
    if cached is None or (cached.max_summands, cached.window) != (max_summands, window):
        cached = _STATE["unmasker"] = Unmasker(_STATE["key"], max_summands, window=window)
        cached._table  # noqa: B018 (build the table now, once)
    return cached


def _encrypt(plaintexts: list[int], share: bool = False) -> tuple[bytes, list | None]:
    """Ciphertext bytes and the exponents, or (``share``) the holders' share blobs."""
    enc, key = _encryptor(), _STATE["key"]
    if isinstance(enc, KeyHolderEncryptor):
        return to_bytes(key.public, enc.encrypt_many(plaintexts)), None
    cts, exponents = enc.encrypt_many(plaintexts)
    return to_bytes(key.public, cts), share_exponents(key, exponents) if share else exponents


def _unmask(job: tuple[bytes, list[int], int, int]) -> list[int] | None:
    payload, exponents, max_summands, window = job
    unmasker = _unmasker(max_summands, window)
    return unmasker.unmask(from_bytes(_STATE["key"].public, payload), exponents)


class ParallelCrypto:
    """A pool of ``processes`` crypto workers. Use as a context manager.

    ``unmask_summands``: warm the workers for opening sums of up to that many updates
    (the server's use) rather than for encrypting (a client host's). ``window``: the
    fixed-base window of the workers' tables (:func:`~fedray.crypto.paillier.window_for`).
    """

    def __init__(
        self,
        key: ThresholdPublicKey,
        processes: int,
        *,
        private: PrivateKey | None = None,
        obfuscator: str = "fixed_base",
        unmask_summands: int | None = None,
        window: int = 8,
    ):
        self.key = key
        self.processes = processes
        self.window = window
        self._pool = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=mp.get_context("spawn"),
            initializer=_init,
            initargs=(key, private, obfuscator, window),
        )
        # Warm every worker (builds its tables) before anything is timed.
        if unmask_summands is None:
            list(self._pool.map(_encrypt, [[0]] * processes))
        else:
            warm = (b"", [], max(1, unmask_summands), window)
            list(self._pool.map(_unmask, [warm] * processes))

    def _bounds(self, count: int, most: int | None = None) -> list[tuple[int, int]]:
        """Chunks of ``count`` items: four per process, or more of at most ``most``."""
        parts = self.processes * 4 if most is None else max(self.processes * 4, -(-count // most))
        bounds = np.linspace(0, count, parts + 1).astype(int)
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]

    def encrypt(self, plaintexts: list[int]) -> tuple[bytes, list[int] | None]:
        """Ciphertexts as bytes, and their obfuscator exponents (None with a private key)."""
        chunks = [plaintexts[a:b] for a, b in self._bounds(len(plaintexts))]
        parts = list(self._pool.map(_encrypt, chunks))
        exponents = None if parts[0][1] is None else [x for _, xs in parts for x in xs]
        return b"".join(c for c, _ in parts), exponents

    def encrypt_and_share(self, plaintexts: list[int]) -> tuple[bytes, list[bytes] | None]:
        """Ciphertexts as bytes and one blob of exponent shares per key holder, both made
        by the workers chunk by chunk (the exponents never come back; None with a private
        key). A holder's blob is its chunks' blobs in order: fixed-width shares, one per
        ciphertext, as :func:`share_exponents` makes them for the whole update."""
        chunks = [plaintexts[a:b] for a, b in self._bounds(len(plaintexts))]
        parts = list(self._pool.map(_encrypt, chunks, [True] * len(chunks)))
        payload = b"".join(c for c, _ in parts)
        if parts[0][1] is None:
            return payload, None
        holders = len(parts[0][1])
        return payload, [b"".join(blobs[j] for _, blobs in parts) for j in range(holders)]

    def unmask(
        self, ciphertexts: list, exponents: list[int], max_summands: int, window: int
    ) -> list[int] | None:
        """:meth:`Unmasker.unmask` over the workers, chunk by chunk: the same plaintexts
        (None if any chunk does not open)."""
        public = self.key.public
        jobs = (
            (to_bytes(public, ciphertexts[a:b]), exponents[a:b], max_summands, window)
            for a, b in self._bounds(len(ciphertexts), most=OPEN_CHUNK)
        )
        out: list[int] = []
        for part in self._map_few_at_a_time(_unmask, jobs):
            if part is None:
                return None
            out.extend(part)
        return out

    def _map_few_at_a_time(self, fn, jobs):
        """``fn`` over ``jobs`` in order, as ``Executor.map`` does, but with at most two
        jobs per process submitted at a time: ``map`` would make every job's input at
        once (for an opening, a second whole copy of the sum as bytes)."""
        pending: deque = deque()
        for job in jobs:
            pending.append(self._pool.submit(fn, job))
            if len(pending) >= 2 * self.processes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> ParallelCrypto:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
