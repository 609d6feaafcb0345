"""fedray/privacy/mechanisms.py bit by bit: a known-answer Box-Muller, and the contract of
l2_clip and gaussian (dtype, shape, refusals), and the torch generators behind Opacus's
DP-SGD noise (whole Mersenne Twister state from the OS, not a 32-bit seed). No Ray.

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


# -- torch generators for DP-SGD: the whole Mersenne Twister state from the OS ---------------


def _mt_words(gen) -> np.ndarray:
    """The 624 Mersenne Twister words of a torch CPU generator's state."""
    raw = gen.get_state().numpy().tobytes()
    return np.frombuffer(raw, dtype="<u8", offset=mech._MT_ARRAY, count=mech._MT_WORDS)


def _follows_seeding(words: np.ndarray) -> int:
    """How many words follow manual_seed's recurrence from the word before them."""
    w = [int(x) for x in words]
    return sum(
        w[j] == (1812433253 * (w[j - 1] ^ (w[j - 1] >> 30)) + j) & 0xFFFFFFFF
        for j in range(1, len(w))
    )


@pytest.mark.parametrize("factory", [mech.torch_generator, mech.full_entropy_torch_generator])
def test_dp_sgd_generator_state_is_not_reachable_from_any_32_bit_seed(factory):
    """manual_seed keeps 32 bits (word 0 is seed mod 2^32, the rest follow from it), so a
    63-bit seed from os.urandom leaves 2^32 states to enumerate. A full-entropy state is
    not manual_seed(s) for the s its first word names, nor any seed's state at all."""
    import torch

    assert torch.equal(  # what makes 63-bit seeds weak, in this torch
        torch.randn(8, generator=torch.Generator().manual_seed(5)),
        torch.randn(8, generator=torch.Generator().manual_seed(5 + 2**32)),
    )
    weak = _mt_words(torch.Generator().manual_seed(5 + 2**40))
    assert _follows_seeding(weak) == 623  # the check below sees a seeded state
    for _ in range(3):
        gen = factory()
        words = _mt_words(gen)
        assert words.max() < 2**32  # one 32-bit word per slot, as torch keeps them
        assert _follows_seeding(words) < 5  # 1 in 2^32 per word by chance
        recovered = torch.Generator().manual_seed(int(words[0]))
        assert np.count_nonzero(_mt_words(recovered) == words) < 5
        draws = torch.randn(64, generator=gen)
        assert not torch.equal(draws, torch.randn(64, generator=recovered))


def test_dp_sgd_generators_differ_in_far_more_than_32_bits():
    """Two generators (two sites, two rounds) share no state: their 19968 state bits
    differ in about half the places (9984, std 71), not in at most 32."""
    a, b = _mt_words(mech.torch_generator()), _mt_words(mech.torch_generator())
    differing = sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b, strict=True))
    assert 9000 < differing < 11000


def test_full_entropy_generator_draws_from_its_filled_state(monkeypatch):
    """The filled words are the state the draws come from: the same OS bytes give the
    same state and the same draws, other bytes other draws."""
    import torch

    fixed = bytes(range(256)) * 10
    monkeypatch.setattr(mech.os, "urandom", lambda n: fixed[:n])
    a, b = mech.full_entropy_torch_generator(), mech.full_entropy_torch_generator()
    words = np.frombuffer(fixed[: 4 * 624], dtype="<u4").astype(np.uint64)
    np.testing.assert_array_equal(_mt_words(a), words)
    assert torch.equal(torch.randn(100, generator=a), torch.randn(100, generator=b))
    monkeypatch.undo()
    c = mech.full_entropy_torch_generator()
    assert not torch.equal(torch.randn(100, generator=c), torch.randn(100, generator=b))


def test_seeded_dp_sgd_generator_is_manual_seed():
    """privacy.reproducible_noise=true: the generator is manual_seed(seed), replayable."""
    import torch

    for seed in (0, 7, 2**40 + 3):
        assert torch.equal(
            torch.randn(16, generator=mech.torch_generator(seed)),
            torch.randn(16, generator=torch.Generator().manual_seed(seed)),
        )


def test_generator_layout_check_fails_closed(monkeypatch):
    """If torch moved the twister's words, filling the wrong bytes could leave a seeded
    state behind without error: the layout check refuses instead."""
    monkeypatch.setattr(mech, "_layout_checked", False)
    monkeypatch.setattr(mech, "_MT_ARRAY", mech._MT_ARRAY + 8)
    with pytest.raises(RuntimeError, match="state layout"):
        mech.full_entropy_torch_generator()
