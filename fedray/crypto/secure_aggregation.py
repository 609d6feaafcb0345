"""Secure aggregation on top of the packed codecs: what clients send and what the server sums.

A client turns its weighted update, plus its round statistics (weights, weighted losses:
:class:`~fedray.crypto.codec.StatsCodec`), into one :class:`EncryptedUpdate`
(compact bytes, never pickled phe objects); a host running several simulated clients may
seal the sum of their updates into one (``count`` > 1). With threshold custody it
encrypts with the public key only and returns, beside the update, one blob of exponent
shares per key holder (:mod:`fedray.crypto.threshold`): those go to the key holders,
never to the server. The server folds updates into an :class:`EncryptedSum` and asks the
key holders for what it needs to open the *sum* only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gmpy2
import numpy as np

from fedray.crypto.codec import FeatureSumsCodec, PackedPaillierCodec, StatsCodec
from fedray.crypto.paillier import (
    KeyHolderEncryptor,
    PrivateKey,
    PublicKey,
    check_ciphertexts,
    ciphertext_chunks,
    multiply_into,
    to_bytes,
)
from fedray.crypto.threshold import PublicEncryptor, ThresholdPublicKey, share_exponents


class RejectedUpdate(ValueError):
    """An update that must not enter the sum; the message says why."""


@dataclass
class EncryptedUpdate:
    """An encrypted, packed update (model delta, then statistics) as it travels.

    One client's, or the sum of ``count`` clients' (``client_ids``) sealed by the host
    that trained them. ``update_id`` names the signed contribution deposited with the key
    holders. Weights and the other statistics are inside the ciphertexts, not beside them.
    """

    key_id: str
    num_values: int
    ciphertexts: bytes
    count: int = 1
    client_ids: tuple[int, ...] = ()
    update_id: str = ""

    @property
    def nbytes(self) -> int:
        return len(self.ciphertexts)


@dataclass(frozen=True)
class UpdateLayout:
    """The ciphertexts of one update: the model delta's, then the statistics'."""

    codec: PackedPaillierCodec
    stats: StatsCodec

    @classmethod
    def for_key(cls, public: PublicKey, codec: PackedPaillierCodec) -> UpdateLayout:
        return cls(codec, StatsCodec(public.key_bits, codec.max_summands))

    @property
    def num_ciphertexts(self) -> int:
        return self.codec.num_ciphertexts + self.stats.num_ciphertexts

    @property
    def num_values(self) -> int:
        return self.codec.num_values

    @property
    def max_summands(self) -> int:
        return self.codec.max_summands

    def encode_sum(self, entries: list[tuple[np.ndarray, float, np.ndarray | None, dict]]):
        """Plaintexts for ``(update, weight, noise_steps, stats)`` entries, summed."""
        for _, weight, _, _ in entries:
            if not 0.0 < weight <= 1.0:
                raise ValueError(f"weight={weight} must be in (0, 1]")
        delta = self.codec.encode_sum(
            [(np.asarray(u, dtype=np.float64) * w, noise) for u, w, noise, _ in entries]
        )
        stats = self.stats.encode_sum([{**s, "weight": w} for _, w, _, s in entries])
        return delta + stats

    def fits(self, plaintexts: list[int]) -> bool:
        """Whether decrypted plaintexts are within what packing can produce (a wrong
        opening almost surely is not): delta slots, then statistics slots."""
        k = self.codec.num_ciphertexts
        if len(plaintexts) != self.num_ciphertexts:
            return False
        delta_bits = self.codec.slots_per_ciphertext * self.codec.slot_bits
        stats_bits = self.stats.slots_per_ciphertext * self.stats.slot_bits
        return all(0 <= m < 1 << delta_bits for m in plaintexts[:k]) and all(
            0 <= m < 1 << stats_bits for m in plaintexts[k:]
        )

    def decode_sum(self, plaintexts: list[int], count: int) -> tuple[np.ndarray, dict]:
        """The summed float delta (weighted) and the summed statistics."""
        k = self.codec.num_ciphertexts
        return self.codec.decode_sum(plaintexts[:k], count), self.stats.decode_sum(plaintexts[k:])


class ClientEncryptor:
    """Client side: weight, quantize, pack and encrypt an update with its statistics.

    Threshold custody: public-key (DJN) encryption, and ``share_exponents`` gives one blob
    of exponent shares per key holder (the fast path). Shared custody: the host holds the
    private key (``private``) and encrypts with CRT; no shares.
    """

    def __init__(
        self,
        key: ThresholdPublicKey,
        layout: UpdateLayout,
        *,
        private: PrivateKey | None = None,
        obfuscator: str = "fixed_base",
        share: bool = True,
        pool=None,
    ):
        self.key = key
        self.public = key.public
        self.layout = layout
        self.share = share and private is None
        self._private_enc = KeyHolderEncryptor(private, obfuscator) if private else None
        self._public_enc = None if private else PublicEncryptor(key)
        # A ParallelCrypto spreads one big update over processes (gmpy2 holds the GIL);
        # the in-process pool of precomputed obfuscators is used first, whole updates only.
        self._pool = pool

    @property
    def _enc(self):
        return self._private_enc or self._public_enc

    def precompute(self, count: int, should_stop=None) -> int:
        """Precompute obfuscators for ``count`` future ciphertexts (idle time)."""
        return self._enc.precompute(count, should_stop)

    @property
    def pool_size(self) -> int:
        return self._enc.pool_size

    def encrypt_sum(
        self, entries: list[tuple[np.ndarray, float, np.ndarray | None, dict]]
    ) -> tuple[EncryptedUpdate, list[bytes] | None]:
        """One update holding the sum over ``entries`` of (update, weight, noise, stats).

        Returns it with one blob of exponent shares per key holder (None without shares).
        """
        update, shares = self.encrypt_plaintexts(self.layout.encode_sum(entries))
        update.count = len(entries)
        return update, shares

    def encrypt_plaintexts(
        self, plaintexts: list[int]
    ) -> tuple[EncryptedUpdate, list[bytes] | None]:
        """Encrypt packed plaintexts (a layout's encoding) as one update of ``count`` 1,
        with one blob of exponent shares per key holder (None without shares)."""
        if self._pool is not None and self.pool_size < len(plaintexts):
            if self.share:  # the workers share the exponents too, in parallel
                ciphertexts, shares = self._pool.encrypt_and_share(plaintexts)
                return self._update(ciphertexts, 1), shares
            ciphertexts, exponents = self._pool.encrypt(plaintexts)
        elif self._private_enc is not None:
            cts = self._private_enc.encrypt_many(plaintexts)
            ciphertexts, exponents = to_bytes(self.public, cts), None
        else:
            cts, exponents = self._public_enc.encrypt_many(plaintexts)
            ciphertexts = to_bytes(self.public, cts)
        shares = share_exponents(self.key, exponents) if self.share and exponents else None
        return self._update(ciphertexts, 1), shares

    def _update(self, ciphertexts: bytes, count: int) -> EncryptedUpdate:
        return EncryptedUpdate(
            key_id=self.public.fingerprint,
            num_values=self.layout.codec.num_values,
            ciphertexts=ciphertexts,
            count=count,
        )


FOLD_CHUNK = 2048  # ciphertexts an EncryptedSum checks and multiplies in at a time


class EncryptedSum:
    """Server side: the running homomorphic sum of the updates accepted this round.

    It holds the sum (one update's worth of big integers) and, per update, only its
    ``update_id`` and ``source`` (where the sealed bytes can be had again for the slow
    paths): never the updates' bytes, so ten clients' updates do not mean ten copies.
    ``chunk``: ciphertexts read from a payload at a time (the transient of a fold).
    """

    def __init__(self, public: PublicKey, layout: UpdateLayout, chunk: int = FOLD_CHUNK):
        self.public = public
        self.layout = layout
        self.chunk = chunk
        self._n2 = gmpy2.mpz(public.n) ** 2
        self._acc: list | None = None
        self.count = 0
        self.update_ids: list[str] = []
        self.sources: list[Any] = []  # per update, where its ciphertexts can be fetched

    def add(self, update: EncryptedUpdate, source: Any = None) -> None:
        """Fold one update in, or raise RejectedUpdate (the sum is then unchanged).

        Two streaming passes over the bytes: every chunk is checked before any is
        multiplied in, so a bad ciphertext in the last chunk leaves the sum as it was."""
        self._check_header(update)
        for start, cts in ciphertext_chunks(self.public, update.ciphertexts, self.chunk):
            problem = check_ciphertexts(self.public, cts, offset=start)
            if problem:
                raise RejectedUpdate(problem)
        first = self._acc is None
        acc: list = [] if first else self._acc
        for start, cts in ciphertext_chunks(self.public, update.ciphertexts, self.chunk):
            if first:
                acc.extend(cts)
            else:
                multiply_into(acc, start, cts, self._n2)
        self._acc = acc
        self.count += update.count
        self.update_ids.append(update.update_id)
        self.sources.append(source)

    def _check_header(self, update: EncryptedUpdate) -> None:
        """RejectedUpdate unless key, length, count and payload size are this sum's."""
        if update.key_id != self.public.fingerprint:
            raise RejectedUpdate("encrypted under another key")
        if update.num_values != self.layout.num_values:
            raise RejectedUpdate(
                f"has {update.num_values} values, the sum has {self.layout.num_values}"
            )
        if not isinstance(update.count, int) or update.count < 1:
            raise RejectedUpdate(f"count {update.count!r} is not a positive integer")
        if self.count + update.count > self.layout.max_summands:
            raise RejectedUpdate(
                f"the sum holds {self.count} updates; {update.count} more would exceed "
                f"the maximum {self.layout.max_summands}"
            )
        expected = self.layout.num_ciphertexts * self.public.ciphertext_bytes
        data = update.ciphertexts
        if not isinstance(data, bytes | bytearray):
            raise RejectedUpdate(f"payload is a {type(data).__name__}, not bytes")
        if len(data) != expected:
            raise RejectedUpdate(f"payload of {len(data)} bytes, expected {expected}")

    def ciphertexts(self) -> list:
        if self._acc is None:
            raise ValueError("no update was added")
        return self._acc

    def payload(self) -> bytes:
        return to_bytes(self.public, self.ciphertexts())


def codec_settings(cfg) -> tuple[float, int]:
    """(clip, max_summands) of the packed codec this config makes: every party that
    encodes or decodes one sum must derive the same (across organisations each derives it
    from its own config, so both are in the job every party declares)."""
    clip, max_summands = cfg.crypto.clip, cfg.clients_per_round
    if cfg.privacy.name == "dp" and cfg.privacy.mode == "client":
        from fedray.privacy import build_privacy

        plan = build_privacy(cfg)
        clip, max_summands = plan.encode_clip, max(plan.cohort_cap, cfg.clients_per_round)
    return float(clip), int(max_summands)


def codec_for(cfg, public: PublicKey, num_values: int) -> PackedPaillierCodec:
    """The packed codec clients and server derive from the config (identical by construction)."""
    clip, max_summands = codec_settings(cfg)
    return PackedPaillierCodec.for_key(
        public,
        num_values=num_values,
        max_summands=max_summands,
        quant_bits=cfg.crypto.quant_bits,
        clip=clip,
    )


def feature_sums_codec(cfg, public: PublicKey, num_features: int) -> FeatureSumsCodec:
    """The codec of the federation's feature sums (opened once, before round 1): hosts
    and server derive the same one. Headroom for ``num_clients`` updates, more than the
    hosts there are."""
    return FeatureSumsCodec(public.key_bits, int(num_features), max(1, int(cfg.num_clients)))
