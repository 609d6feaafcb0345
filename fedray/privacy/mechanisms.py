"""Clipping and Gaussian noise: small pure functions that tests call directly."""

from __future__ import annotations

import os

import numpy as np


def l2_clip(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """Scale ``update`` down so its L2 norm is at most ``clip_norm`` (float32 out)."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm={clip_norm} must be > 0")
    u = np.asarray(update, dtype=np.float64)
    norm = float(np.linalg.norm(u))
    if norm > clip_norm:
        u = u * (clip_norm / norm)
    return u.astype(np.float32)


def secure_standard_normal(size: int) -> np.ndarray:
    """N(0, 1) draws from the OS CSPRNG (os.urandom) through the Box-Muller transform.

    Use where the noise must be unpredictable even to someone who knows the job's seed.
    Costs about one urandom call of 16 bytes per pair of values.
    """
    pairs = (size + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(pairs, 2)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1)
    r = np.sqrt(-2.0 * np.log(u[:, 0]))
    theta = 2.0 * np.pi * u[:, 1]
    return np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:size]


def gaussian(shape, std: float, rng: np.random.Generator, *, secure: bool = False) -> np.ndarray:
    """N(0, std^2) noise: numpy's seeded PCG64 (replayable) or the OS CSPRNG (secure)."""
    size = int(np.prod(shape))
    z = secure_standard_normal(size) if secure else rng.standard_normal(size)
    return (z * std).reshape(shape)
