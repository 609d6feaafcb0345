"""Secure aggregation on top of the packed codec: what clients send and what the server sums.

A client turns its weighted update into an :class:`EncryptedUpdate` (compact bytes, never
pickled phe objects); a host running several simulated clients may seal the sum of their
updates into one (``count`` > 1). The server folds updates into an
:class:`EncryptedSum` as they arrive, holding one running ciphertext vector, and hands
the final product to a key holder, which returns only the decoded *sum*. The server
never holds a private key, nor the obfuscators that clients give the key holder.
"""

from __future__ import annotations

from dataclasses import dataclass

import gmpy2
import numpy as np

from fedray.crypto.codec import PackedPaillierCodec
from fedray.crypto.paillier import (
    Decryptor,
    KeyHolderEncryptor,
    PrivateKey,
    PublicKey,
    check_ciphertexts,
    from_bytes,
    obfuscators_to_bytes,
    to_bytes,
)


class RejectedUpdate(ValueError):
    """An update that must not enter the sum; the message says why."""


@dataclass
class EncryptedUpdate:
    """An encrypted, packed, weighted update as it travels to the server.

    One client's, or the sum of ``count`` clients' (``client_ids``) sealed by the host
    that trained them; ``weight`` is then their total weight. ``update_id`` names the
    obfuscators deposited with the key holder ("" if none were).
    """

    key_id: str
    num_values: int
    ciphertexts: bytes
    weight: float
    count: int = 1
    client_ids: tuple[int, ...] = ()
    update_id: str = ""

    @property
    def nbytes(self) -> int:
        return len(self.ciphertexts)


class ClientEncryptor:
    """Client side: weight, quantize, pack and encrypt an update."""

    def __init__(self, private: PrivateKey, codec: PackedPaillierCodec, obfuscator: str, pool=None):
        self.public = private.public
        self.codec = codec
        self._enc = KeyHolderEncryptor(private, obfuscator)
        # A ParallelCrypto spreads one update over processes (gmpy2 holds the GIL); the
        # in-process pool of precomputed obfuscators is used first, whole updates only.
        self._pool = pool

    def precompute(self, count: int, should_stop=None) -> int:
        """Precompute obfuscators for ``count`` future ciphertexts (see KeyHolderEncryptor)."""
        return self._enc.precompute(count, should_stop)

    @property
    def pool_size(self) -> int:
        return self._enc.pool_size

    def encrypt(
        self, update: np.ndarray, weight: float, noise_steps: np.ndarray | None = None
    ) -> EncryptedUpdate:
        """Encrypt ``weight * update``; ``noise_steps`` (DP) is added after quantizing."""
        return self.encrypt_sum([(update, weight, noise_steps)])[0]

    def encrypt_sum(
        self, entries: list[tuple[np.ndarray, float, np.ndarray | None]]
    ) -> tuple[EncryptedUpdate, bytes]:
        """One update holding the sum of ``weight * update`` over ``entries``.

        Returns it with its obfuscators as bytes: give those to a key holder for fast
        decryption (:class:`~fedray.crypto.paillier.KnownObfuscatorDecryptor`), never to
        the server.
        """
        for _, weight, _ in entries:
            if not 0.0 < weight <= 1.0:
                raise ValueError(f"weight={weight} must be in (0, 1]")
        plaintexts = self.codec.encode_sum(
            [(np.asarray(u, dtype=np.float64) * w, noise) for u, w, noise in entries]
        )
        if self._pool is not None and self._enc.pool_size < len(plaintexts):
            ciphertexts, obfuscators = self._pool.encrypt_keeping_obfuscators(plaintexts)
        else:
            cts, obfs = self._enc.encrypt_keeping_obfuscators(plaintexts)
            ciphertexts = to_bytes(self.public, cts)
            obfuscators = obfuscators_to_bytes(self.public, obfs)
        update = EncryptedUpdate(
            key_id=self.public.fingerprint,
            num_values=self.codec.num_values,
            ciphertexts=ciphertexts,
            weight=float(sum(w for _, w, _ in entries)),
            count=len(entries),
        )
        return update, obfuscators


class EncryptedSum:
    """Server side: the running homomorphic sum of the updates accepted this round."""

    def __init__(self, public: PublicKey, codec: PackedPaillierCodec):
        self.public = public
        self.codec = codec
        self._n2 = gmpy2.mpz(public.n) ** 2
        self._acc: list | None = None
        self.count = 0
        self.total_weight = 0.0
        self.update_ids: list[str] = []  # for the key holder's fast path ("" = none)

    def add(self, update: EncryptedUpdate) -> None:
        """Fold one update in, or raise RejectedUpdate (the sum is then unchanged)."""
        if update.key_id != self.public.fingerprint:
            raise RejectedUpdate("encrypted under another key")
        if update.num_values != self.codec.num_values:
            raise RejectedUpdate(
                f"has {update.num_values} values, the model has {self.codec.num_values}"
            )
        if not isinstance(update.count, int) or update.count < 1:
            raise RejectedUpdate(f"count {update.count!r} is not a positive integer")
        if not 0.0 < update.weight <= update.count:
            raise RejectedUpdate(f"weight {update.weight} outside (0, {update.count}]")
        if self.count + update.count > self.codec.max_summands:
            raise RejectedUpdate(
                f"the sum holds {self.count} updates; {update.count} more would exceed "
                f"the maximum {self.codec.max_summands}"
            )
        expected = self.codec.num_ciphertexts * self.public.ciphertext_bytes
        if len(update.ciphertexts) != expected:
            raise RejectedUpdate(f"payload of {len(update.ciphertexts)} bytes, expected {expected}")
        cts = from_bytes(self.public, update.ciphertexts)
        problem = check_ciphertexts(self.public, cts)
        if problem:
            raise RejectedUpdate(problem)
        if self._acc is None:
            self._acc = cts
        else:
            n2 = self._n2
            self._acc = [a * c % n2 for a, c in zip(self._acc, cts, strict=True)]
        self.count += update.count
        self.total_weight += update.weight
        self.update_ids.append(update.update_id)

    def payload(self) -> bytes:
        if self._acc is None:
            raise ValueError("no update was added")
        return to_bytes(self.public, self._acc)


def decrypt_sum(
    private: PrivateKey, codec: PackedPaillierCodec, payload: bytes, count: int
) -> np.ndarray:
    """Key holder side: decrypt and decode a sum of ``count`` updates (not a single one)."""
    if count < 1:
        raise ValueError("refusing to decrypt an empty sum")
    cts = from_bytes(private.public, payload)
    return codec.decode_sum(Decryptor(private).decrypt_many(cts), count)
