"""fedray/privacy/mechanisms.py bit by bit: a known-answer Box-Muller, and the contract of
l2_clip and gaussian (dtype, shape, refusals). Pure numpy, no Ray.

Written for the mutants a statistical test cannot see: the noise keeps a standard-normal
histogram when the angle reuses the radius's random bits, or is scaled wrongly into a
pseudo-random phase, yet it is no longer the Box-Muller transform of independent bits.
"""

from __future__ import annotations

import numpy as np
import pytest

import fedray.privacy.mechanisms as mech


def _hand_box_muller(raw: bytes, size: int) -> np.ndarray:
    """The documented transform, in float64: per pair, 53 radius bits from a uint64 word
    (u = (bits + 1/2) 2^-53) and 32 angle bits from a uint32 after all radius words."""
    pairs = (size + 1) // 2
    words = np.frombuffer(raw[: 8 * pairs], dtype="<u8")
    angles = np.frombuffer(raw[8 * pairs : 12 * pairs], dtype="<u4")
    out = []
    for half in (np.cos, np.sin):
        for w, a in zip(words, angles, strict=True):
            u = (float(int(w) >> 11) + 0.5) * 2.0**-53
            out.append(np.sqrt(-2.0 * np.log(u)) * half(2.0 * np.pi * float(a) / 2.0**32))
    return np.array(out)[:size]


@pytest.mark.parametrize("size", [1, 2, 7, 1000])
def test_secure_standard_normal_is_box_muller_of_the_csprng_bytes(monkeypatch, size):
    stream = np.random.default_rng(size).bytes(12 * ((size + 1) // 2))
    asked = []

    def fake(nbytes):
        asked.append(nbytes)
        return memoryview(stream[:nbytes])

    monkeypatch.setattr(mech, "os_random_bytes", fake)
    z = mech.secure_standard_normal(size)
    assert asked == [12 * ((size + 1) // 2)]  # 12 bytes a pair, one call
    assert z.dtype == np.float64 and z.shape == (size,)
    # float32 angles: cos and sin within 1e-6 of the float64 transform (the radius <= 8.6)
    np.testing.assert_allclose(z, _hand_box_muller(stream, size), rtol=0, atol=2e-5)


def test_secure_standard_normal_radius_and_angle_are_independent():
    """The angle bits must not overlap the radius bits: with them shared, the angle of
    pair 2j+1 follows the radius of pair j."""
    n = 200_000
    z = mech.secure_standard_normal(n)
    x, y = z[: n // 2], z[n // 2 :]
    u = np.exp(-(x**2 + y**2) / 2)  # the radius's uniform
    v = (np.arctan2(y, x) / (2 * np.pi)) % 1.0  # the angle's uniform
    for a, b in ((u, v), (u[: len(u) // 2], v[1::2]), (u[: len(u) // 2], v[0::2])):
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.02


def test_l2_clip_contract():
    x = np.array([3.0, 4.0], dtype=np.float32)
    out = mech.l2_clip(x, 1.0)
    assert out.dtype == np.float32  # float32 out, whatever comes in
    np.testing.assert_allclose(out, [0.6, 0.8], rtol=1e-6)
    assert mech.l2_clip(np.array([1, 0]), 5.0).dtype == np.float32
    np.testing.assert_array_equal(mech.l2_clip(x, 5.0), x)  # inside: unchanged
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"clip_norm={bad} must be > 0"):
            mech.l2_clip(x, bad)


def test_gaussian_contract():
    g = mech.gaussian((2, 3), 2.0)  # secure by default: no rng needed
    assert g.shape == (2, 3)
    a = mech.gaussian((4, 5), 3.0, np.random.default_rng(1), secure=False)
    np.testing.assert_array_equal(
        a, 3.0 * np.random.default_rng(1).standard_normal(20).reshape(4, 5)
    )
    with pytest.raises(ValueError, match=r"seeded noise \(secure=False\) needs an rng"):
        mech.gaussian((3,), 1.0, None, secure=False)


def test_count_clipped_counts_values_strictly_outside_the_range():
    values = np.array([-2.0, -1.0, -0.5, 0.0, 1.0, 1.0000001, 3.0], dtype=np.float32)
    assert mech.count_clipped(values, 1.0) == 3  # ±1 itself is kept, not clipped
    assert mech.count_clipped(values, 5.0) == 0
    assert mech.count_clipped([1, -7], 2) == 1  # any array-like, ints too
    assert isinstance(mech.count_clipped(values, 1.0), int)
