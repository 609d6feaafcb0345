"""BatchCrypt-style packing of float vectors into Paillier plaintexts.

Zhang et al., "BatchCrypt: Efficient Homomorphic Encryption for Cross-Silo Federated
Learning" (USENIX ATC 2020). Each value is clipped to [-clip, clip] and quantized to a
signed ``quant_bits``-bit integer ``q`` with ``|q| <= Q = 2^(quant_bits-1) - 1``. A slot
stores ``q + Q`` (never negative), in ``slot_bits = quant_bits + ceil(log2(max_summands))``
bits, so the sum of up to ``max_summands`` slots always fits its slot: no carry can reach
the neighbouring slot, whatever the values. As many slots as fit below ``n`` share one
plaintext; decoding subtracts ``count * Q`` per slot.

Weights: client k encodes ``s_k * x_k`` with ``s_k = w_k / weight_ref`` in (0, 1] (its
example count over a reference the hosts share, the largest client's), so the server sums
ciphertexts and divides by the plaintext total ``sum s_k``. Quantization error of the
weighted mean is at most ``count * clip / (2 Q) / sum s_k`` per value (``error_bound``),
for values inside the clip range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedray.crypto.paillier import PublicKey

PACK_CHUNK = 2048  # ciphertexts packed or unpacked per step (bounds temporaries)


class _Slots:
    """Slot geometry shared by the codecs: a value of ``_width`` bits plus
    ``ceil(log2(max_summands))`` bits of headroom per slot (a sum of ``max_summands``
    slots never carries into the next), as many slots as fit below ``2^(key_bits-1) <= n``
    per plaintext, and ``_count`` values in all."""

    @property
    def slot_bits(self) -> int:
        return self._width + max(0, math.ceil(math.log2(self.max_summands)))

    @property
    def slots_per_ciphertext(self) -> int:
        # The packed plaintext stays below 2^(key_bits-1) <= n.
        return (self.key_bits - 1) // self.slot_bits

    @property
    def num_ciphertexts(self) -> int:
        return -(-self._count // self.slots_per_ciphertext)

    def _pack_ints(self, slots: list[int]) -> list[int]:
        """Non-negative slot integers -> plaintexts, the first slot in the lowest bits."""
        s, b = self.slots_per_ciphertext, self.slot_bits
        out = []
        for i in range(0, len(slots), s):
            m = 0
            for k, v in enumerate(slots[i : i + s]):
                m |= v << (k * b)
            out.append(m)
        return out

    def _unpack_ints(self, plaintexts: list[int]) -> list[int]:
        """The inverse of :meth:`_pack_ints` (every slot of every plaintext)."""
        s, b = self.slots_per_ciphertext, self.slot_bits
        mask = (1 << b) - 1
        return [(m >> (k * b)) & mask for m in plaintexts for k in range(s)]


@dataclass(frozen=True)
class PackedPaillierCodec(_Slots):
    """Quantize, pack and unpack float vectors for a key of ``key_bits`` bits."""

    key_bits: int
    num_values: int
    max_summands: int
    quant_bits: int = 16
    clip: float = 1.0

    def __post_init__(self) -> None:
        if not 2 <= self.quant_bits <= 32:
            raise ValueError(f"quant_bits={self.quant_bits} must be in [2, 32]")
        if self.max_summands < 1:
            raise ValueError(f"max_summands={self.max_summands} must be >= 1")
        if self.clip <= 0 or not math.isfinite(self.clip):
            raise ValueError(f"clip={self.clip} must be a finite number > 0")
        if self.slots_per_ciphertext < 1:
            raise ValueError(
                f"a {self.key_bits}-bit key cannot hold one {self.slot_bits}-bit slot; "
                "lower quant_bits or max_summands, or use a larger key"
            )

    @classmethod
    def for_key(cls, public: PublicKey, **kwargs) -> PackedPaillierCodec:
        return cls(key_bits=public.key_bits, **kwargs)

    @property
    def qmax(self) -> int:
        return (1 << (self.quant_bits - 1)) - 1

    @property
    def _width(self) -> int:
        return self.quant_bits

    @property
    def _count(self) -> int:
        return self.num_values

    @property
    def step(self) -> float:
        """Width of one quantization step."""
        return self.clip / self.qmax

    def error_bound(self, count: int, total_weight: float) -> float:
        """Largest |decoded mean - true weighted mean| per value, for values inside the clip."""
        return count * self.step / 2 / total_weight

    # -- encoding ---------------------------------------------------------------------
    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Clip and round to signed integers in [-Q, Q] (int64)."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (self.num_values,):
            raise ValueError(f"expected {self.num_values} values, got shape {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("cannot encode NaN or infinite values")
        q = np.rint(np.clip(v, -self.clip, self.clip) / self.step)
        return np.clip(q, -self.qmax, self.qmax).astype(np.int64)

    def encode(self, values: np.ndarray, noise_steps: np.ndarray | None = None) -> list[int]:
        """Float vector -> packed plaintext integers, each < 2^(key_bits-1).

        ``noise_steps`` (integer DP noise in grid units) is added after quantizing, and
        the result is clipped to [-Q, Q] again, so slots never overflow.
        """
        return self.encode_sum([(values, noise_steps)])

    def encode_sum(self, entries: list[tuple[np.ndarray, np.ndarray | None]]) -> list[int]:
        """The packed sum of several encodings (``(values, noise_steps)`` each).

        Equal, plaintext for plaintext, to the sum of their ``encode`` results: slots add
        without carries, so a host can sum its clients before encrypting and the
        decrypted aggregate is unchanged. ``decode_sum`` takes ``len(entries)`` as one
        count per encoding.
        """
        if not 1 <= len(entries) <= self.max_summands:
            raise ValueError(
                f"cannot sum {len(entries)} encodings; between 1 and {self.max_summands}"
            )
        total = np.zeros(self.num_values, dtype=np.int64)
        for values, noise_steps in entries:
            q = self.quantize(values)
            if noise_steps is not None:
                q = np.clip(q + np.asarray(noise_steps, dtype=np.int64), -self.qmax, self.qmax)
            total += q
        slots = (total + len(entries) * self.qmax).astype(np.uint64)
        return self._pack(slots)

    def _pack(self, slots: np.ndarray) -> list[int]:
        s, b = self.slots_per_ciphertext, self.slot_bits
        shifts = np.arange(b, dtype=np.uint64)
        out: list[int] = []
        # Chunk by chunk: the bit-level temporaries are 8 bytes per bit of a slot (160 B
        # per value), so a 4M-value update in one go would hold ~0.7 GB of them.
        for start in range(0, self.num_ciphertexts, PACK_CHUNK):
            count = min(PACK_CHUNK, self.num_ciphertexts - start)
            padded = np.zeros(count * s, dtype=np.uint64)
            part = slots[start * s : (start + count) * s]
            padded[: len(part)] = part
            bits = ((padded.reshape(-1, s, 1) >> shifts) & np.uint64(1)).astype(np.uint8)
            rows = np.packbits(bits.reshape(count, s * b), axis=1, bitorder="little")
            out.extend(int.from_bytes(row.tobytes(), "little") for row in rows)
        return out

    # -- decoding ---------------------------------------------------------------------
    def unpack(self, plaintexts: list[int]) -> np.ndarray:
        """Packed integers -> slot values (uint64), the inverse of ``_pack``."""
        if len(plaintexts) != self.num_ciphertexts:
            raise ValueError(f"expected {self.num_ciphertexts} plaintexts, got {len(plaintexts)}")
        s, b = self.slots_per_ciphertext, self.slot_bits
        width = (s * b + 7) // 8
        shifts = np.arange(b, dtype=np.uint64)
        slots = np.empty(len(plaintexts) * s, dtype=np.uint64)
        for start in range(0, len(plaintexts), PACK_CHUNK):  # chunked, as in _pack
            part = plaintexts[start : start + PACK_CHUNK]
            raw = np.frombuffer(b"".join(int(m).to_bytes(width, "little") for m in part), np.uint8)
            bits = np.unpackbits(raw.reshape(len(part), width), axis=1, bitorder="little")
            bits = bits[:, : s * b].reshape(-1, b).astype(np.uint64)
            slots[start * s : (start + len(part)) * s] = (bits << shifts).sum(
                axis=1, dtype=np.uint64
            )
        return slots[: self.num_values]

    def decode_sum(self, plaintexts: list[int], count: int) -> np.ndarray:
        """Decrypted sum of ``count`` encodings -> the sum of their (clipped) float vectors."""
        if not 1 <= count <= self.max_summands:
            raise ValueError(f"count={count} must be between 1 and {self.max_summands}")
        q = self.unpack(plaintexts).astype(np.int64) - count * self.qmax
        return q.astype(np.float64) * self.step


# What a client's statistics hold (fedray/runtime/round_stats.py fills them in): weights
# and weight-weighted sums, never an example count (with the summed weight, a summed count
# would give the server the weight reference, n_k / w_k). ``clients_failed``: clients whose
# training failed, sealed as zero updates with their usual weight, so the server learns how
# many of a sum's clients failed (not under DP), never which (fedray/runtime/client.py).
STATS_FIELDS = (
    "weight",
    "train_weight",
    "val_weight",
    "weighted_train_loss",
    "weighted_val_loss",
    "weighted_val_accuracy",
    "values_clipped",
    "clients_failed",
)


@dataclass(frozen=True)
class StatsCodec(_Slots):
    """Per-client round statistics packed as exact fixed-point integers (extra ciphertexts).

    With encryption on, a client's weights and weighted losses and accuracies travel
    *inside* the encrypted update: the server learns only their sums over the clients of
    the aggregate, like the model update itself. Each field is a non-negative
    number stored as ``round(value * 2^frac_bits)`` in a slot of ``value_bits`` bits plus
    ``ceil(log2(max_summands))`` bits of headroom, so sums never carry.
    """

    key_bits: int
    max_summands: int
    value_bits: int = 64
    frac_bits: int = 24
    fields: tuple[str, ...] = STATS_FIELDS

    @property
    def _width(self) -> int:
        return self.value_bits

    @property
    def _count(self) -> int:
        return len(self.fields)

    def encode_sum(self, stats: list[dict[str, float]]) -> list[int]:
        """The packed sum of several clients' statistics (missing fields count 0)."""
        limit = (1 << self.value_bits) - 1
        scale = 1 << self.frac_bits
        slots = []
        for name in self.fields:
            total = 0
            for s in stats:
                v = float(s.get(name, 0.0))
                if not math.isfinite(v) or v < 0:
                    v = 0.0
                total += min(limit, round(v * scale))
            slots.append(total)
        return self._pack_ints(slots)

    def decode_sum(self, plaintexts: list[int]) -> dict[str, float]:
        if len(plaintexts) != self.num_ciphertexts:
            raise ValueError(f"expected {self.num_ciphertexts} plaintexts, got {len(plaintexts)}")
        slots = self._unpack_ints(plaintexts)
        scale = float(1 << self.frac_bits)
        return {name: slots[i] / scale for i, name in enumerate(self.fields)}


@dataclass(frozen=True)
class FeatureSumsCodec(_Slots):
    """The federation's per-feature sums (``dataset.standardize=global``,
    ``dataset.missing=impute_mean``) packed as exact signed fixed-point integers.

    A sealed update is one host's sum over its clients of ``3 * num_features`` values (non-empty
    cells, sums, sums of squares: :func:`fedray.data.datasets.feature_sums`). Each value is
    ``round(v * 2^frac_bits)`` plus an offset of ``2^(value_bits - 1)``, so a slot is never
    negative; ``slot_bits`` adds ``ceil(log2(max_summands))`` bits of headroom for the
    ``max_summands`` host updates of a sum, so sums never carry, and decoding subtracts one
    offset per update. A value outside ``+-2^(value_bits - 1 - frac_bits)`` is refused by
    the host that encodes it (its sums could not be carried exactly).
    """

    key_bits: int
    num_features: int
    max_summands: int
    value_bits: int = 128
    # Fine enough for a deviation small beside a column's mean. The grid hides nothing: a
    # column of integers or fixed decimals sums to a fraction with weight_ref in its
    # denominator, whatever the grid (docs/data.md, what global standardisation reveals).
    frac_bits: int = 40

    @property
    def num_values(self) -> int:
        return 3 * self.num_features

    @property
    def offset(self) -> int:
        return 1 << (self.value_bits - 1)

    @property
    def _width(self) -> int:
        return self.value_bits

    @property
    def _count(self) -> int:
        return self.num_values

    def encode(self, values: np.ndarray) -> list[int]:
        """One host's summed values -> packed plaintexts; ValueError if one is too large."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (self.num_values,) or not np.all(np.isfinite(v)):
            raise ValueError(f"expected {self.num_values} finite values, got shape {v.shape}")
        scale = 1 << self.frac_bits
        slots = [round(float(x) * scale) + self.offset for x in v]
        if any(not 0 <= q < 2 * self.offset for q in slots):
            raise ValueError(
                f"a feature sum is beyond +-2^{self.value_bits - 1 - self.frac_bits}: too "
                "large to add up exactly (rescale the column)"
            )
        return self._pack_ints(slots)

    def fits(self, plaintexts: list[int]) -> bool:
        """Whether opened plaintexts are within what packing can produce."""
        width = self.slots_per_ciphertext * self.slot_bits
        return len(plaintexts) == self.num_ciphertexts and all(
            0 <= m < 1 << width for m in plaintexts
        )

    def decode_sum(self, plaintexts: list[int], updates: int) -> np.ndarray:
        """The opened sum of ``updates`` encodings -> the summed float values."""
        if not 1 <= updates <= self.max_summands:
            raise ValueError(f"updates={updates} must be between 1 and {self.max_summands}")
        if not self.fits(plaintexts):
            raise ValueError("the opened plaintexts do not fit the feature sums' packing")
        slots = self._unpack_ints(plaintexts)
        scale = float(1 << self.frac_bits)
        return np.array(
            [(q - updates * self.offset) / scale for q in slots[: self.num_values]],
            dtype=np.float64,
        )
