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


def count_clipped(values: np.ndarray, clip: float) -> int:
    """How many of ``values`` lie outside [-clip, clip] (the codec clips them silently)."""
    return int(np.count_nonzero(np.abs(np.asarray(values, dtype=np.float64)) > clip))


def os_random_bytes(nbytes: int) -> memoryview:
    """``nbytes`` bytes from AES-256 in counter mode under a fresh key from ``os.urandom``.

    Why not ``os.urandom(nbytes)`` itself: the kernel's getrandom delivers a few hundred
    MB/s here, so a million Gaussian values (12 MB) would cost more than twice numpy's
    own generator. AES-CTR under a key drawn from the OS CSPRNG is the standard CSPRNG
    construction (the core of NIST SP 800-90A's CTR_DRBG): its output is
    indistinguishable from random to anyone who does not hold the key, as long as AES
    is a pseudorandom permutation. The key is drawn per call and never stored, so
    nothing the server holds (the job seed, the config, the round, the client id)
    predicts it. A zero counter start is safe because a key is never used twice.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
    out = bytearray(nbytes + 15)  # update_into wants block-size - 1 bytes of room
    written = encryptor.update_into(bytes(nbytes), out)
    return memoryview(out)[:written]  # no copy: a million values take 6 MB


def secure_standard_normal(size: int) -> np.ndarray:
    """N(0, 1) draws from the OS CSPRNG (:func:`os_random_bytes`), vectorised Box-Muller.

    Each pair of values takes 12 random bytes: 53 bits for the radius (a uniform in
    (0, 1) at float64 resolution, so the tail reaches 8.6 standard deviations and is not
    cut short) and 32 bits for the angle (cos and sin in float32, which numpy runs with
    SIMD; their 1e-7 relative error is far below the grid the noise is rounded to).
    Unpredictable to anyone who knows the job's seed; ``benchmarks/noise.py`` compares
    its cost with numpy's seeded generator.
    """
    pairs = (size + 1) // 2
    raw = os_random_bytes(12 * pairs)
    radius_bits = np.frombuffer(raw, dtype=np.uint64, count=pairs)
    angle_bits = np.frombuffer(raw, dtype=np.uint32, offset=8 * pairs, count=pairs)
    u = (radius_bits >> np.uint64(11)).astype(np.float64)
    u += 0.5
    u *= 2.0**-53  # in (0, 1): never 0, so the log is finite
    r = np.sqrt(-2.0 * np.log(u))
    theta = angle_bits.astype(np.float32)
    theta *= np.float32(2.0 * np.pi * 2.0**-32)
    out = np.empty(2 * pairs, dtype=np.float64)
    np.multiply(r, np.cos(theta), out=out[:pairs])
    np.multiply(r, np.sin(theta), out=out[pairs:])
    return out[:size]


def gaussian(
    shape, std: float, rng: np.random.Generator | None = None, *, secure: bool = True
) -> np.ndarray:
    """N(0, std^2) noise: the OS CSPRNG (the default), or ``rng`` (seeded, replayable)."""
    size = int(np.prod(shape))
    if secure:
        z = secure_standard_normal(size)
    else:
        if rng is None:
            raise ValueError("seeded noise (secure=False) needs an rng")
        z = rng.standard_normal(size)
    return (z * std).reshape(shape)
