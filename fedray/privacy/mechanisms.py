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


# torch's CPU generator state (``torch.Generator.get_state()``, 5056 bytes in torch 2.4 to
# 2.13): ATen's CPUGeneratorImplState, whose first member is the legacy THGeneratorState
# {u64 the_initial_seed; i32 left; i32 seeded; u64 next; u64 state[624]; double
# normal_x, normal_y, normal_rho; i32 normal_is_valid} (each state word holds one 32-bit
# Mersenne Twister word), then {float next_float_normal_sample; bool valid}. set_state
# copies the 624 words into the engine and checks only seeded, left and next.
_MT_WORDS = 624
_MT_STATE_BYTES = 5056
_MT_LEFT, _MT_SEEDED, _MT_NEXT, _MT_ARRAY = 8, 12, 16, 24
_MT_NORMAL_VALID = _MT_ARRAY + 8 * _MT_WORDS + 24  # THGeneratorState.normal_is_valid
_MT_FLOAT_NORMAL_VALID = _MT_NORMAL_VALID + 12  # CPUGeneratorImplState's bool
_layout_checked = False


def _mt_init_words(seed: int, count: int) -> list[int]:
    """The first ``count`` words ``manual_seed(seed)`` puts in the Mersenne Twister."""
    words = [seed & 0xFFFFFFFF]
    for j in range(1, count):
        prev = words[-1]
        words.append((1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF)
    return words


def _check_torch_generator_layout() -> None:
    """Fail closed if torch's generator state is not laid out as this module assumes:
    writing random bytes at the wrong offsets could leave the twister seeded from 32 bits
    (or from nothing) without any error."""
    global _layout_checked
    if _layout_checked:
        return
    import torch

    seed = 0x9E3779B97F4A7C15
    raw = torch.Generator().manual_seed(seed).get_state().numpy().tobytes()
    words = np.frombuffer(raw, dtype="<u8", offset=_MT_ARRAY, count=8).tolist()
    header = np.frombuffer(raw, dtype="<i4", offset=_MT_LEFT, count=2).tolist()
    if (
        len(raw) != _MT_STATE_BYTES
        or words != _mt_init_words(seed, 8)
        or header != [1, 1]
        or int.from_bytes(raw[:8], "little") != seed
    ):
        raise RuntimeError(
            f"torch {torch.__version__}: the CPU generator's state layout is not the one "
            "fedray fills from os.urandom (fedray/privacy/mechanisms.py); refusing to train "
            "with DP-SGD noise from a generator it cannot seed with full entropy"
        )
    _layout_checked = True


def full_entropy_torch_generator():
    """A torch CPU generator whose whole Mersenne Twister state (624 words, 19937 bits of
    it used) comes from ``os.urandom``.

    Why not ``manual_seed(int.from_bytes(os.urandom(8)))``: manual_seed keeps 32 bits of
    the seed (``manual_seed(5)`` and ``manual_seed(5 + 2**32)`` draw the same numbers), so a
    server that sees one site's DP-SGD update could try all 2^32 seeds, regenerate the
    noise and subtract it. Here the state is not reachable from any seed, and two
    generators share a state with probability about 2^-19937. Still a Mersenne Twister,
    not a CSPRNG: its state follows from 624 consecutive raw outputs, and those never
    leave the site (only clipped, noised gradient sums do).
    """
    import torch

    _check_torch_generator_layout()
    gen = torch.Generator()
    raw = bytearray(gen.get_state().numpy().tobytes())
    words = np.frombuffer(os.urandom(4 * _MT_WORDS), dtype="<u4").astype("<u8")
    raw[_MT_ARRAY : _MT_ARRAY + 8 * _MT_WORDS] = words.tobytes()
    raw[_MT_LEFT : _MT_LEFT + 4] = (1).to_bytes(4, "little")  # twist before the first output
    raw[_MT_SEEDED : _MT_SEEDED + 4] = (1).to_bytes(4, "little")
    raw[_MT_NEXT : _MT_NEXT + 8] = bytes(8)
    raw[_MT_NORMAL_VALID : _MT_NORMAL_VALID + 4] = bytes(4)  # no cached normal sample
    raw[_MT_FLOAT_NORMAL_VALID] = 0
    gen.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
    return gen


def torch_generator(seed: int | None = None):
    """A torch CPU generator for DP-SGD: ``manual_seed(seed)`` (replayable, research only)
    or, with ``seed=None``, :func:`full_entropy_torch_generator`."""
    import torch

    if seed is None:
        return full_entropy_torch_generator()
    return torch.Generator().manual_seed(seed)
