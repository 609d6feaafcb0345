"""Each strategy against results computed by hand (plain arithmetic, not the implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedray.config import STRATEGIES
from fedray.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedProx,
    FedYogi,
    Krum,
    Median,
    TrimmedMean,
    build_strategy,
)
from fedray.strategies.robust import krum_select, trimmed_mean
from tests.conftest import compose

TAU = 1e-3


def test_fedavgm_accumulates_momentum():
    s = FedAvgM(server_lr=0.5, server_momentum=0.9)
    x = np.array([1.0, 1.0], dtype=np.float32)
    x = s.apply(x, np.array([0.2, -0.4]))  # m = [0.2, -0.4]; x = 1 + 0.5 m
    np.testing.assert_allclose(x, [1.1, 0.8], rtol=1e-6)
    x = s.apply(x, np.array([0.2, 0.0]))  # m = 0.9*[0.2,-0.4] + [0.2,0] = [0.38, -0.36]
    np.testing.assert_allclose(x, [1.1 + 0.19, 0.8 - 0.18], rtol=1e-6)


@pytest.mark.parametrize(
    ("cls", "v1"),
    [
        # v0 = tau^2; Adagrad: v = v0 + d^2; Adam: v = b2 v0 + (1-b2) d^2;
        # Yogi: v = v0 - (1-b2) d^2 sign(v0 - d^2) = v0 + (1-b2) d^2 when d^2 > v0.
        (FedAdagrad, lambda d: TAU**2 + d * d),
        (FedAdam, lambda d: 0.99 * TAU**2 + 0.01 * d * d),
        (FedYogi, lambda d: TAU**2 + 0.01 * d * d),
    ],
)
def test_adaptive_server_optimizers_first_step(cls, v1):
    s = cls(server_lr=0.1, beta1=0.9, beta2=0.99, tau=TAU)
    deltas = [0.5, -2.0]
    x = s.apply(np.zeros(2, dtype=np.float32), np.array(deltas))
    for got, d in zip(x, deltas, strict=True):
        m = 0.1 * d  # (1 - b1) d
        assert got == pytest.approx(0.1 * m / (math.sqrt(v1(d)) + TAU), rel=1e-5)
    state = s.state_dict()
    fresh = cls(server_lr=0.1, beta1=0.9, beta2=0.99, tau=TAU)
    fresh.load_state_dict(state)
    np.testing.assert_allclose(fresh.apply(x, np.ones(2)), s.apply(x, np.ones(2)))


def test_yogi_second_moment_can_shrink_unlike_adam():
    yogi, adam = FedYogi(tau=1.0), FedAdam(tau=1.0)
    for s in (yogi, adam):
        s.apply(np.zeros(1, np.float32), np.array([0.0]))  # v = tau^2 = 1 (Yogi: +0.01*0*...)
    # Now d^2 = 0 < v: Yogi adds (1-b2) d^2 = 0, Adam decays v by b2.
    yogi.apply(np.zeros(1, np.float32), np.array([0.0]))
    adam.apply(np.zeros(1, np.float32), np.array([0.0]))
    assert yogi.v[0] == pytest.approx(1.0)
    assert adam.v[0] == pytest.approx(0.99**2)


def test_median_and_trimmed_mean():
    ups = [np.array([1.0, 5.0]), np.array([2.0, -1.0]), np.array([10.0, 0.0])]
    np.testing.assert_allclose(Median().aggregate(ups, [1, 1, 1]), [2.0, 0.0])
    five = [np.array([v]) for v in (-100.0, 1.0, 2.0, 3.0, 100.0)]
    # beta = 0.2 of 5 -> drop 1 each side -> mean(1, 2, 3) = 2
    np.testing.assert_allclose(TrimmedMean(trim_fraction=0.2).aggregate(five, [1] * 5), [2.0])
    np.testing.assert_allclose(trimmed_mean(five, 0.0), [1.2])
    with pytest.raises(ValueError, match="trims all"):
        trimmed_mean(five, 0.6)  # floor(3) per side of 5 leaves nothing
    with pytest.raises(ValueError, match="trim_fraction"):
        TrimmedMean(trim_fraction=0.5)


def test_krum_and_multi_krum_pick_by_hand_scores():
    pts = [np.array([v]) for v in (0.0, 0.1, 0.3, 0.35, 10.0)]
    # f = 1 -> n - f - 2 = 2 nearest; scores: 0.10, 0.05, 0.0425, 0.065, 187.2125
    assert krum_select(pts, byzantine=1, select=5) == [2, 1, 3, 0, 4]
    np.testing.assert_allclose(Krum(byzantine=1).aggregate(pts, [1] * 5), [0.3])
    np.testing.assert_allclose(Krum(byzantine=1, select=2).aggregate(pts, [1] * 5), [0.2])
    with pytest.raises(ValueError, match="Krum needs"):
        krum_select(pts[:3], byzantine=1)


def test_fedprox_options_and_validation():
    assert FedProx(proximal_mu=0.5).client_options() == {"proximal_mu": 0.5}
    with pytest.raises(ValueError, match="proximal_mu"):
        FedProx(proximal_mu=0.0)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_builds_from_config(name):
    strategy = build_strategy(compose(["crypto=none", f"strategy={name}"]).strategy)
    assert strategy.name == name
    assert strategy.needs_individual_updates == (name in ("median", "trimmed_mean", "krum"))
