"""The strategies' contracts that the step tests leave open: documented defaults, refusals
(one clear message naming the key), the mean's arithmetic, and a server optimizer's state
surviving a save and load (what resume relies on). Pure numpy, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from fedray.strategies.base import Strategy, weighted_mean
from fedray.strategies.fedavg import FedAvg, FedProx
from fedray.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi


def test_weighted_mean_arithmetic_and_refusals():
    d = [np.array([1.0, -2.0], np.float32), np.array([3.0, 4.0], np.float32)]
    out = weighted_mean(d, [1.0, 3.0])
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [(1 + 9) / 4, (-2 + 12) / 4], rtol=1e-12)
    np.testing.assert_allclose(weighted_mean(d[:1], [0.5]), d[0], rtol=1e-12)
    with pytest.raises(ValueError, match="no updates to aggregate"):
        weighted_mean([], [])
    for bad in ([1.0, 0.0], [1.0, -1.0]):
        with pytest.raises(ValueError, match="weights must be > 0"):
            weighted_mean(d, bad)


def test_base_strategy_defaults_step_and_refusals():
    s = Strategy()
    assert s.server_lr == 1.0 and s.client_options() == {"proximal_mu": 0.0}
    assert s.state_dict() == {}
    w = np.array([1.0, 2.0], np.float32)
    out = Strategy(server_lr=0.5).apply(w, np.array([2.0, -2.0]))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [2.0, 1.0])
    np.testing.assert_allclose(s.aggregate([np.ones(2), 3 * np.ones(2)], [1, 1]), [2.0, 2.0])
    for lr in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"server_lr={lr} must be > 0"):
            Strategy(server_lr=lr)
    with pytest.raises(ValueError, match="proximal_mu=-0.1 must be >= 0"):
        Strategy(proximal_mu=-0.1)
    Strategy(proximal_mu=0.0)  # zero is allowed (plain FedAvg)


def test_fedavg_and_fedprox_defaults():
    assert FedAvg().server_lr == 1.0 and FedAvg().client_options() == {"proximal_mu": 0.0}
    p = FedProx()
    assert p.server_lr == 1.0 and p.client_options() == {"proximal_mu": 0.01}
    with pytest.raises(ValueError, match="proximal_mu=0 must be > 0 for FedProx"):
        FedProx(proximal_mu=0)


def test_fedavgm_defaults_refusals_and_first_step():
    s = FedAvgM()
    assert (s.server_lr, s.momentum) == (1.0, 0.9) and s.state_dict() == {}
    w = np.zeros(2, np.float32)
    np.testing.assert_allclose(s.apply(w, np.array([1.0, 2.0])), [1.0, 2.0])  # m = delta
    np.testing.assert_allclose(s.apply(w, np.array([1.0, 0.0])), [1.9, 1.8], rtol=1e-6)
    FedAvgM(server_momentum=0.0)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=f"server_momentum={bad} must be in \\[0, 1\\)"):
            FedAvgM(server_momentum=bad)


def test_fedopt_defaults_and_refusals():
    s = FedAdam()
    assert (s.server_lr, s.beta1, s.beta2, s.tau) == (0.01, 0.9, 0.99, 1e-3)
    assert s.state_dict() == {}
    # First step by hand from the defaults: m = 0.1 d, v = 0.99 tau^2 + 0.01 d^2.
    d = np.array([0.5, -2.0])
    m, v = 0.1 * d, 0.99 * 1e-6 + 0.01 * d * d
    out = s.apply(np.zeros(2, np.float32), d)
    np.testing.assert_allclose(out, 0.01 * m / (np.sqrt(v) + 1e-3), rtol=1e-6)
    for cls in (FedAdagrad, FedAdam, FedYogi):
        for key in ("beta1", "beta2"):
            for bad in (-0.1, 1.0):
                with pytest.raises(ValueError, match=f"{key}={bad} must be in \\[0, 1\\)"):
                    cls(**{key: bad})
            cls(**{key: 0.0})
        for bad in (0.0, -1.0):
            with pytest.raises(ValueError, match=f"tau={bad} must be > 0"):
                cls(tau=bad)
        with pytest.raises(ValueError, match="server_lr"):
            cls(server_lr=0.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvgM(server_lr=0.7, server_momentum=0.5),
        lambda: FedAdagrad(server_lr=0.1),
        lambda: FedAdam(server_lr=0.1),
        lambda: FedYogi(server_lr=0.1),
    ],
    ids=["fedavgm", "fedadagrad", "fedadam", "fedyogi"],
)
def test_server_optimizer_state_survives_save_and_load(make):
    """Two steps, save, load into a fresh strategy: its next steps equal the original's."""
    rng = np.random.default_rng(0)
    deltas = [rng.standard_normal(5) for _ in range(4)]
    a, w = make(), np.zeros(5, np.float32)
    for d in deltas[:2]:
        w = a.apply(w, d)
    state = {k: np.array(v) for k, v in a.state_dict().items()}
    assert state  # a server optimizer has state after a step
    b = make()
    b.load_state_dict(state)
    wa = wb = w
    for d in deltas[2:]:
        wa, wb = a.apply(wa, d), b.apply(wb, d)
        np.testing.assert_array_equal(wa, wb)
    # Without the state the step differs: the state is what carries the optimizer.
    assert not np.array_equal(make().apply(w, deltas[2]), _loaded(make, state).apply(w, deltas[2]))


def _loaded(make, state):
    s = make()
    s.load_state_dict({k: np.array(v) for k, v in state.items()})
    return s


@pytest.mark.parametrize("cls", [FedAvgM, FedAdagrad, FedAdam, FedYogi])
def test_server_steps_return_float32_and_keep_float64_state(cls):
    s = cls()
    out = s.apply(np.zeros(3, np.float32), np.array([0.1, -0.2, 0.3], np.float32))
    assert out.dtype == np.float32  # the global model stays float32
    if cls is not FedAvgM:  # the adaptive moments accumulate in float64
        assert s.m.dtype == np.float64 and s.v.dtype == np.float64


def test_yogi_leaves_v_unchanged_where_it_equals_delta_squared():
    """sign(v - delta^2) = 0 there: v stays, and the step is finite."""
    d = np.array([0.5, -1.0])
    s = FedYogi(server_lr=0.1)
    s.load_state_dict({"m": np.zeros(2), "v": d * d})
    out = s.apply(np.zeros(2, np.float32), d)
    np.testing.assert_array_equal(s.v, d * d)
    expected = 0.1 * (0.1 * d) / (np.abs(d) + 1e-3)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_build_strategy_passes_every_config_key():
    from fedray.config import StrategyConfig
    from fedray.strategies import build_strategy

    def build(name, **kw):
        return build_strategy(StrategyConfig(name=name, **kw))

    assert build("fedavg", server_lr=0.3).server_lr == 0.3
    p = build("fedprox", server_lr=0.4, proximal_mu=0.2)
    assert (p.server_lr, p.proximal_mu) == (0.4, 0.2)
    assert build("fedprox").proximal_mu == 0.01  # mu = 0 in the config: FedProx's default
    m = build("fedavgm", server_lr=0.5, server_momentum=0.3)
    assert (m.server_lr, m.momentum) == (0.5, 0.3)
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        s = build(name, server_lr=0.2, beta1=0.5, beta2=0.6, tau=0.01)
        assert (s.server_lr, s.beta1, s.beta2, s.tau) == (0.2, 0.5, 0.6, 0.01)
    assert build("median", server_lr=0.7).server_lr == 0.7
    t = build("trimmed_mean", server_lr=0.8, trim_fraction=0.25)
    assert (t.server_lr, t.trim_fraction) == (0.8, 0.25)
    k = build("krum", server_lr=0.9, krum_byzantine=2, krum_select=3)
    assert (k.server_lr, k.byzantine, k.select) == (0.9, 2, 3)


def test_trimmed_mean_trims_per_coordinate():
    from fedray.strategies.robust import trimmed_mean

    # Each coordinate has its own outliers: coordinate 0's extremes are updates 0 and 1,
    # coordinate 1's are updates 2 and 3.
    deltas = [np.array(v, dtype=np.float64) for v in ([9, 1], [-9, 2], [1, 9], [2, -9], [3, 4])]
    np.testing.assert_allclose(trimmed_mean(deltas, 0.2), [2.0, 7 / 3])
    # k = floor(0.4 * 5) = 2 of each side: the median is left (2k < K).
    np.testing.assert_allclose(trimmed_mean(deltas, 0.4), [2.0, 2.0])
    with pytest.raises(ValueError, match="trim_fraction=0.5 trims all 2 updates"):
        trimmed_mean(deltas[:2], 0.5)


def test_robust_strategy_defaults_and_refusals():
    from fedray.strategies.robust import Krum, TrimmedMean

    t = TrimmedMean()
    assert (t.trim_fraction, t.server_lr) == (0.1, 1.0)
    TrimmedMean(trim_fraction=0.0)  # no trimming: the plain mean
    for bad in (-0.1, 0.5):
        with pytest.raises(ValueError, match=f"trim_fraction={bad} must be in \\[0, 0.5\\)"):
            TrimmedMean(trim_fraction=bad)
    k = Krum()
    assert (k.byzantine, k.select, k.server_lr) == (1, 1, 1.0)
    Krum(byzantine=0)
    for kw in ({"byzantine": -1}, {"select": 0}):
        with pytest.raises(ValueError, match="krum needs byzantine >= 0 and select >= 1"):
            Krum(**kw)


def test_krum_scores_by_hand_and_multi_krum_mean():
    from fedray.strategies.robust import Krum, krum_select

    # K = 4, f = 1: one neighbour each (K - f - 2 = 1), the nearest other update.
    deltas = [np.array(v, dtype=np.float64) for v in ([0, 0], [1, 0], [0, 3], [10, 10])]
    # Squared distance to the nearest other: 1, 1, 9, 113 -> order 0, 1, 2, 3 (stable).
    assert krum_select(deltas, 1, 4) == [0, 1, 2, 3]
    assert krum_select(deltas, 1) == [0]  # select defaults to 1 (Krum)
    far = [np.array(v, dtype=np.float64) for v in ([2, 2], [3, 3], [-1, 0], [-1, 1], [9, 9])]
    # K = 5, f = 1: two neighbours each; hand scores below.
    x = np.stack(far)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    hand = np.sort(d, axis=1)[:, :2].sum(1)
    assert krum_select(far, 1, 5) == np.argsort(hand, kind="stable").tolist()
    with pytest.raises(ValueError, match="Krum needs more than f \\+ 2 = 3 updates, got 3"):
        krum_select(deltas[:3], 1)
    out = Krum(byzantine=1, select=2).aggregate(deltas, [1.0] * 4)
    np.testing.assert_allclose(out, [0.5, 0.0])  # the mean of the two best, per coordinate
