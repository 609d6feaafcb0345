"""Compression of plaintext updates (``compression=none|int8|topk``), client to server.

- ``int8``: linear quantization with one float32 scale per update (max |x| / 127); the
  error per value is at most half a step. 1 byte per value.
- ``topk``: only the ``compression.topk_fraction`` largest-magnitude values travel, as
  (uint32 index, float32 value) pairs (Aji and Heafield, "Sparse Communication for
  Distributed Gradient Descent", EMNLP 2017); the rest count as zero. No error feedback.

Encrypted updates are packed quantized integers already (``crypto.quant_bits``), so
compression applies to ``crypto=none`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class CompressedUpdate:
    """What a client sends instead of a float32 delta."""

    kind: str
    size: int
    scale: float = 0.0
    values: np.ndarray | None = None  # int8 (int8) or float32 (topk)
    indices: np.ndarray | None = None  # uint32 (topk)

    @property
    def nbytes(self) -> int:
        extra = 4 if self.kind == "int8" else 0  # the scale
        idx = 0 if self.indices is None else self.indices.nbytes
        return int(self.values.nbytes + idx + extra)


def compress(delta: np.ndarray, kind: str, topk_fraction: float = 0.01) -> CompressedUpdate:
    """Compress a float32 vector."""
    n = delta.size
    if kind == "int8":
        peak = float(np.max(np.abs(delta))) if n else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        q = np.clip(np.rint(delta / scale), -127, 127).astype(np.int8)
        return CompressedUpdate("int8", n, scale=scale, values=q)
    if kind == "topk":
        k = min(n, max(1, math.ceil(topk_fraction * n)))
        idx = np.argpartition(np.abs(delta), n - k)[n - k :]
        idx = np.sort(idx).astype(np.uint32)
        return CompressedUpdate("topk", n, values=delta[idx].astype(np.float32), indices=idx)
    raise ValueError(f"compression={kind!r}; choose one of: none, int8, topk")


def decompress(update: CompressedUpdate, size: int) -> np.ndarray:
    """The dense float32 vector; ValueError if the update does not fit a model of ``size``."""
    if not isinstance(update, CompressedUpdate) or update.size != size:
        raise ValueError(f"compressed update does not describe {size} values")
    if update.kind == "int8":
        if update.values is None or update.values.dtype != np.int8 or update.values.size != size:
            raise ValueError("int8 update must carry one int8 per value")
        if not math.isfinite(update.scale) or update.scale <= 0:
            raise ValueError("int8 update has a bad scale")
        return (update.values.astype(np.float32) * np.float32(update.scale)).astype(np.float32)
    if update.kind == "topk":
        idx, vals = update.indices, update.values
        if idx is None or vals is None or idx.shape != vals.shape or idx.dtype != np.uint32:
            raise ValueError("topk update must carry matching uint32 indices and values")
        if idx.size and int(idx.max()) >= size:
            raise ValueError("topk update has an index out of range")
        out = np.zeros(size, dtype=np.float32)
        out[idx] = vals
        return out
    raise ValueError(f"unknown compression {update.kind!r}")
