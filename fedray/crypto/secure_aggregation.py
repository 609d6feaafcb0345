"""Secure aggregation on top of the packed codec: what clients send and what the server sums.

A client turns its weighted update into an :class:`EncryptedUpdate` (compact bytes, never
pickled phe objects). The server folds updates into an :class:`EncryptedSum` as they
arrive, holding one running ciphertext vector, and hands the final product to a key
holder, which returns only the decoded *sum*. The server never holds a private key.
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
    to_bytes,
)


class RejectedUpdate(ValueError):
    """An update that must not enter the sum; the message says why."""


@dataclass
class EncryptedUpdate:
    """One client's encrypted, packed, weighted update as it travels to the server."""

    key_id: str
    num_values: int
    ciphertexts: bytes
    weight: float

    @property
    def nbytes(self) -> int:
        return len(self.ciphertexts)


class ClientEncryptor:
    """Client side: weight, quantize, pack and encrypt an update."""

    def __init__(self, private: PrivateKey, codec: PackedPaillierCodec, obfuscator: str):
        self.public = private.public
        self.codec = codec
        self._enc = KeyHolderEncryptor(private, obfuscator)

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
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight={weight} must be in (0, 1]")
        plaintexts = self.codec.encode(np.asarray(update, dtype=np.float64) * weight, noise_steps)
        return EncryptedUpdate(
            key_id=self.public.fingerprint,
            num_values=self.codec.num_values,
            ciphertexts=to_bytes(self.public, self._enc.encrypt_many(plaintexts)),
            weight=float(weight),
        )


class EncryptedSum:
    """Server side: the running homomorphic sum of the updates accepted this round."""

    def __init__(self, public: PublicKey, codec: PackedPaillierCodec):
        self.public = public
        self.codec = codec
        self._n2 = gmpy2.mpz(public.n) ** 2
        self._acc: list | None = None
        self.count = 0
        self.total_weight = 0.0

    def add(self, update: EncryptedUpdate) -> None:
        """Fold one update in, or raise RejectedUpdate (the sum is then unchanged)."""
        if update.key_id != self.public.fingerprint:
            raise RejectedUpdate("encrypted under another key")
        if update.num_values != self.codec.num_values:
            raise RejectedUpdate(
                f"has {update.num_values} values, the model has {self.codec.num_values}"
            )
        if not 0.0 < update.weight <= 1.0:
            raise RejectedUpdate(f"weight {update.weight} outside (0, 1]")
        if self.count >= self.codec.max_summands:
            raise RejectedUpdate(f"the sum already holds {self.count} updates (the maximum)")
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
        self.count += 1
        self.total_weight += update.weight

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
