"""The accountant against independently computed values (no Ray, no dp-accounting on the
expected side).

Without sampling (q = 1), T rounds of the Gaussian mechanism with noise multiplier σ are
one Gaussian mechanism with multiplier σ/√T, so:

* its exact (ε, δ) curve is Balle and Wang's analytic Gaussian (ICML 2018, Theorem 8):
  δ(ε) = Φ(1/(2s) - ε s) - e^ε Φ(-1/(2s) - ε s), s = σ/√T. ``accountant=pld`` must give
  that ε, up to its discretization (and never below it);
* its Rényi DP is T α / (2σ²) at order α (Mironov 2017, Proposition 7), converted to ε by
  Canonne, Kamath and Steinke (2020, Proposition 12):
  ε = min_α  rdp(α) + log(1 - 1/α) - log(δ α)/(α - 1), over the orders listed below.
  ``accountant=rdp`` must give that ε.

The quantization term: with distributed noise the accountant uses the sensitivity of the
quantized update, C' = C + s √d / 2 (DESIGN and fedray/privacy/dp.py), so ε is that of
noise multiplier σ C / C'.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedray.crypto.codec import PackedPaillierCodec
from fedray.privacy.dp import ClientLevelDP, compute_epsilon

# The RDP orders (dp-accounting's default list, written out here).
ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def exact_gaussian_epsilon(sigma: float, rounds: int, delta: float) -> float:
    s = sigma / math.sqrt(rounds)

    def excess(eps: float) -> float:
        return norm.cdf(0.5 / s - eps * s) - math.exp(eps) * norm.cdf(-0.5 / s - eps * s) - delta

    return brentq(excess, 0.0, 500.0, xtol=1e-12)


def rdp_gaussian_epsilon(sigma: float, rounds: int, delta: float) -> float:
    return min(
        rounds * a / (2 * sigma**2) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        for a in ORDERS
    )


CASES = [(1.0, 10, 1e-5), (2.0, 50, 1e-5), (0.8, 3, 1e-6), (5.0, 200, 1e-5)]


@pytest.mark.parametrize(("sigma", "rounds", "delta"), CASES)
def test_pld_epsilon_is_the_exact_gaussian_epsilon(sigma, rounds, delta):
    exact = exact_gaussian_epsilon(sigma, rounds, delta)
    pld = compute_epsilon(
        rate=1.0, noise_multiplier=sigma, steps=rounds, delta=delta, accountant="pld"
    )
    assert exact <= pld * (1 + 1e-9)  # a pessimistic discretization, never optimistic
    assert pld == pytest.approx(exact, rel=0.01)


@pytest.mark.parametrize(("sigma", "rounds", "delta"), CASES)
def test_rdp_epsilon_is_the_hand_rdp_conversion(sigma, rounds, delta):
    ours = compute_epsilon(rate=1.0, noise_multiplier=sigma, steps=rounds, delta=delta)
    assert ours == pytest.approx(rdp_gaussian_epsilon(sigma, rounds, delta), rel=1e-9)
    # RDP is an upper bound, looser than the exact curve.
    assert ours > exact_gaussian_epsilon(sigma, rounds, delta)


def test_sampling_amplifies_and_pld_is_tighter_than_rdp():
    rdp = compute_epsilon(rate=0.05, noise_multiplier=1.0, steps=200, delta=1e-5)
    pld = compute_epsilon(rate=0.05, noise_multiplier=1.0, steps=200, delta=1e-5, accountant="pld")
    assert pld < rdp < rdp_gaussian_epsilon(1.0, 200, 1e-5)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_distributed_epsilon_counts_the_quantization_term(accountant):
    sigma, clip, num_values, rounds, delta = 2.0, 1.0, 10_000, 20, 1e-5
    dp = ClientLevelDP(
        clip_norm=clip,
        noise_multiplier=sigma,
        delta=delta,
        rate=1.0,  # q = 1: the hand values above apply
        num_clients=4,
        min_clients=4,
        distributed=True,
        accountant=accountant,
    )
    codec = PackedPaillierCodec(
        key_bits=512, num_values=num_values, max_summands=4, quant_bits=12, clip=dp.encode_clip
    )
    plan = dp.client_plan(codec)
    assert plan.quant_step == codec.step > 0
    # C' = C + s √d / 2: the quantized update's largest L2 norm.
    sensitivity = clip + codec.step * math.sqrt(num_values) / 2
    assert sensitivity > 1.2 * clip  # the term matters at this grid
    effective = sigma * clip / sensitivity
    if accountant == "rdp":
        expected = rdp_gaussian_epsilon(effective, rounds, delta)
        assert dp.epsilon(rounds) == pytest.approx(expected, rel=1e-9)
    else:
        expected = exact_gaussian_epsilon(effective, rounds, delta)
        assert dp.epsilon(rounds) == pytest.approx(expected, rel=0.01)
    # Without the term (central noise, nothing quantized) ε is that of σ itself.
    central = ClientLevelDP(
        clip_norm=clip,
        noise_multiplier=sigma,
        delta=delta,
        rate=1.0,
        num_clients=4,
        min_clients=4,
        distributed=False,
        accountant=accountant,
    )
    central.client_plan(None)
    assert central.epsilon(rounds) < 0.85 * dp.epsilon(rounds)
    assert central.epsilon(rounds) == pytest.approx(
        compute_epsilon(
            rate=1.0, noise_multiplier=sigma, steps=rounds, delta=delta, accountant=accountant
        ),
        rel=1e-12,
    )
    # Against the server (no amplification; q = 1 anyway) the same term is used.
    assert dp.client_epsilon_vs_server(rounds) == pytest.approx(dp.epsilon(rounds), rel=1e-6)
    assert np.isfinite(dp.epsilon(rounds))
