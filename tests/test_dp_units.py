"""fedray/privacy/dp.py piece by piece: hand values, refusals, round trips, config wiring.

Complements tests/test_privacy.py and tests/test_accounting.py (noise statistics and the
accountants' values), which these tests do not repeat. Expected values come from hand
arithmetic, exact binomial sums (math.comb on fractions), Opacus's and dp-accounting's
own APIs called here, or numpy's seeded generator replayed here.

Test names avoid the substrings "cli" and "job" (so no "client", "clip"): mutmut's test
selection deselects those with ``-k "not cli and not job"``.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest

from fedray.privacy.dp import (
    ClientLevelDP,
    ClientPlan,
    SampleLevelDP,
    SamplePlan,
    compute_epsilon,
    compute_epsilon_unamplified,
    poisson_cohort_cap,
    privatize_update,
    released_inclusion_probability,
)
from tests.conftest import compose
from tests.test_accounting import rdp_gaussian_epsilon


def _level(**overrides) -> ClientLevelDP:
    kwargs = dict(
        clip_norm=2.0,
        noise_multiplier=1.5,
        delta=1e-5,
        rate=0.5,
        num_clients=8,
        min_clients=4,
        distributed=True,
    )
    return ClientLevelDP(**{**kwargs, **overrides})


# -- cohort size cap and the conditioned inclusion probability ------------------------------


@pytest.mark.parametrize(
    ("num_clients", "rate", "cap"),
    [
        (100, 0.5, 81),  # 50 + 6 sqrt(25) + 1 = 81 exactly
        (1000, 0.1, 158),  # 100 + 6 sqrt(90) + 1 = 157.92, rounded up
        (10_000, 0.01, 161),  # 100 + 6 sqrt(99) + 1 = 160.70
        (8, 0.5, 8),  # 4 + 6 sqrt(2) + 1 = 13.5: no more than every site
        (10, 1.0, 10),  # no spread: 10 + 1, capped at N
        (10, 0.0, 1),  # nobody expected: the floor of one
    ],
)
def test_poisson_cohort_cap_is_mean_plus_six_std_plus_one(num_clients, rate, cap):
    assert poisson_cohort_cap(num_clients, rate) == cap


def _exact_inclusion(num_clients: int, rate: float, min_clients: int) -> float:
    """q P(Bin(N-1, q) >= m-1) / P(Bin(N, q) >= m), m >= 1, as exact binomial sums."""
    q = Fraction(rate)

    def at_least(n: int, k: int) -> Fraction:
        return sum(
            (math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(max(k, 0), n + 1)),
            Fraction(0),
        )

    need = max(1, min_clients)
    return float(q * at_least(num_clients - 1, need - 1) / at_least(num_clients, need))


@pytest.mark.parametrize(
    ("num_clients", "rate", "min_clients"),
    [(10, 0.5, 3), (10, 0.5, 1), (10, 0.3, 2), (20, 0.25, 5), (50, 0.1, 5), (4, 0.5, 4)],
)
def test_released_inclusion_probability_is_the_exact_binomial_ratio(num_clients, rate, min_clients):
    got = released_inclusion_probability(num_clients, rate, min_clients)
    assert got == pytest.approx(_exact_inclusion(num_clients, rate, min_clients), rel=1e-12)
    assert rate <= got <= 1.0


def test_released_inclusion_probability_edge_cases():
    # An empty draw is retried even with m_min <= 1: q / (1 - (1-q)^N) = 512/1023.
    for m in (0, 1):
        assert released_inclusion_probability(10, 0.5, m) == pytest.approx(512 / 1023, rel=1e-12)
    assert released_inclusion_probability(10, 1.0, 3) == 1.0  # everyone, every round
    # No cohort can reach m_min (m > N): nothing is ever released; reported as 1.
    assert released_inclusion_probability(3, 0.5, 5) == 1.0
    # A far tail where scipy's survival functions lose precision (exact: 35/39): the
    # result is still a probability, rounded up to 1 (conservative).
    assert released_inclusion_probability(39, 1.05e-9, 35) == 1.0


def test_zero_rounds_cost_nothing_and_one_round_is_one_gaussian():
    assert compute_epsilon(rate=0.3, noise_multiplier=1.0, steps=0, delta=1e-5) == 0.0
    assert compute_epsilon_unamplified(noise_multiplier=1.0, rounds=0, delta=1e-5) == 0.0
    one = compute_epsilon_unamplified(noise_multiplier=1.0, rounds=1, delta=1e-5)
    assert one == pytest.approx(rdp_gaussian_epsilon(1.0, 1, 1e-5), rel=1e-9)
    assert compute_epsilon_unamplified(noise_multiplier=0.0, rounds=1, delta=1e-5) == math.inf


# -- ClientLevelDP: refusals, config wiring, sizes --------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"clip_norm": 0.0}, "clip_norm must be > 0"),
        ({"clip_norm": -1.0}, "clip_norm must be > 0"),
        ({"rate": 0.0}, "sampling rate must be in (0, 1]"),
        ({"rate": -0.1}, "sampling rate must be in (0, 1]"),
        ({"rate": 1.5}, "sampling rate must be in (0, 1]"),
    ],
)
def test_level_dp_refuses_a_bad_bound_or_rate(overrides, message):
    with pytest.raises(ValueError) as err:
        _level(**overrides)
    assert str(err.value) == message


def test_level_dp_accepts_the_edges_of_the_rate():
    assert _level(rate=1.0).accounted_rate == 1.0
    assert _level(rate=1e-6, num_clients=10).rate == 1e-6


def test_level_dp_from_config_takes_every_field():
    dp = ClientLevelDP.from_config(
        compose(
            [
                "privacy=dp",
                "num_clients=10",
                "clients_per_round=4",
                "min_clients_per_round=3",
                "privacy.noise_multiplier=1.3",
                "privacy.clip_norm=0.7",
                "privacy.delta=1e-6",
                "privacy.target_epsilon=5.0",
                "privacy.reproducible_noise=true",
                "privacy.accountant=pld",
            ]
        )
    )
    assert (dp.clip_norm, dp.noise_multiplier, dp.delta) == (0.7, 1.3, 1e-6)
    assert (dp.rate, dp.num_clients, dp.min_clients) == (0.4, 10, 3)
    assert dp.distributed is True  # crypto=paillier, the default
    assert dp.reproducible_noise is True
    assert (dp.target_epsilon, dp.accountant) == (5.0, "pld")
    assert dp.accounted_rate == pytest.approx(_exact_inclusion(10, 0.4, 3), rel=1e-12)
    # The defaults: central noise without encryption, OS noise, no target, RDP; m_min is
    # half the cohort (at least 1 without encryption, at least 2 with it).
    plain = ClientLevelDP.from_config(
        compose(["privacy=dp", "crypto=none", "num_clients=10", "clients_per_round=1"])
    )
    assert (plain.distributed, plain.reproducible_noise) == (False, False)
    assert (plain.target_epsilon, plain.accountant) == (None, "rdp")
    assert (plain.rate, plain.min_clients) == (0.1, 1)
    assert plain.noise_multiplier == 1.0 and plain.delta == 1e-5
    assert plain.target_epsilon_vs_server is None
    encrypted = ClientLevelDP.from_config(
        compose(
            [
                "privacy=dp",
                "num_clients=10",
                "clients_per_round=3",
                "privacy.target_epsilon_vs_server=9.0",
            ]
        )
    )
    assert (encrypted.min_clients, encrypted.distributed) == (2, True)
    assert encrypted.target_epsilon_vs_server == 9.0


def test_level_dp_sizes_by_hand():
    # sigma 1.5, C 2, m_min 4, q 0.5, N 8: share 1.5 * 2 / 2 = 1.5.
    dp = _level()
    assert dp.share_std == 1.5
    assert dp.encode_clip == 2.0 + 10 * 1.5
    assert dp.denominator == 4.0
    assert dp.cohort_cap == 8
    # Before a codec is known nothing is quantized: the sensitivity is C.
    assert dp.effective_sensitivity == 2.0 and dp.accounting_noise_multiplier == 1.5
    plan = dp.client_plan(SimpleNamespace(step=0.01, num_values=400))
    # C' = C + s sqrt(d) / 2 = 2 + 0.01 * 20 / 2 = 2.1
    assert dp.effective_sensitivity == pytest.approx(2.1, rel=1e-12)
    assert dp.accounting_noise_multiplier == pytest.approx(1.5 * 2.0 / 2.1, rel=1e-12)
    assert plan == ClientPlan(
        clip_norm=2.0, noise_std=1.5, quant_step=0.01, reproducible_noise=False
    )


def test_central_plan_adds_nothing_on_the_device_side():
    dp = _level(distributed=False, reproducible_noise=True)
    dp.client_plan(SimpleNamespace(step=0.01, num_values=400))
    assert dp.effective_sensitivity == 2.0  # nothing quantized counts without encryption
    assert dp.client_plan(None) == ClientPlan(
        clip_norm=2.0, noise_std=0.0, quant_step=0.0, reproducible_noise=True
    )


# -- ClientLevelDP: sampling, server noise, the norm check -------------------------------------


def test_sample_cohort_is_one_uniform_per_site_below_the_rate():
    """Site j joins round r iff U[r, j] < q, read from the server's generator in order
    (so a seeded run replays its cohorts); the result is sorted Python ints."""
    dp = _level(rate=0.5, num_clients=4)  # cap = 4 = N: a full cohort is kept as drawn
    rng = np.random.default_rng(3)
    drawn = [dp.sample_cohort(rng) for _ in range(30)]
    uniforms = np.random.default_rng(3).random((30, 4))
    assert drawn == [[j for j in range(4) if u[j] < 0.5] for u in uniforms]
    assert [0, 1, 2, 3] in drawn  # the case where the cap is reached, not exceeded
    assert all(type(c) is int for cohort in drawn for c in cohort)


class _EverySiteAnswers:
    """A generator whose uniforms are all 0 (every site joins); choice is numpy's own."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)

    def random(self, size):
        return np.zeros(size)

    def choice(self, *args, **kwargs):
        return self._rng.choice(*args, **kwargs)


def test_sample_cohort_keeps_at_most_the_cap_distinct_sites():
    dp = _level(rate=0.5, num_clients=100)
    assert dp.cohort_cap == 81
    cohort = dp.sample_cohort(_EverySiteAnswers(seed=5))
    assert len(cohort) == 81 and len(set(cohort)) == 81
    assert cohort == sorted(cohort) and set(cohort) <= set(range(100))
    assert all(type(c) is int for c in cohort)


def test_central_server_noise_is_sigma_c_from_the_seeded_generator():
    dp = _level(distributed=False, reproducible_noise=True)
    total = np.arange(6.0).reshape(2, 3)
    noisy = dp.server_noise(total, np.random.default_rng(7))
    replay = 1.5 * 2.0 * np.random.default_rng(7).standard_normal(6).reshape(2, 3)
    np.testing.assert_allclose(noisy - total, replay, rtol=1e-12, atol=1e-12)
    # Distributed: the shares are already in the sum; the server adds nothing.
    assert _level().server_noise(total, np.random.default_rng(7)) is total


class _Rejected(Exception):
    pass


def test_check_bound_tolerates_1e4_relative_and_no_more():
    dp = _level(clip_norm=2.0)
    limit = 2.0 * (1 + 1e-4)
    dp.check_clipped(np.array([1.2, 1.6]), _Rejected)  # norm 2
    dp.check_clipped(np.array([limit]), _Rejected)  # exactly at the tolerance
    with pytest.raises(_Rejected):
        dp.check_clipped(np.array([np.nextafter(limit, 3.0)]), _Rejected)
    with pytest.raises(_Rejected) as err:
        dp.check_clipped(np.array([0.0, 3.0]), _Rejected)
    assert str(err.value) == "update norm 3 is above privacy.clip_norm=2.0"


# -- ClientLevelDP: budgets, target, state -------------------------------------------------


def test_budgets_before_any_round_and_without_dp_against_the_server():
    assert _level().epsilon_vs_server() == 0.0  # nobody has taken part yet
    central = _level(distributed=False)
    assert central.client_epsilon_vs_server(0) == 0.0
    assert central.client_epsilon_vs_server(3) == math.inf
    seeded = _level(reproducible_noise=True)  # distributed, but the server can replay it
    assert seeded.client_plan(None).reproducible_noise is True
    assert seeded.client_epsilon_vs_server(0) == 0.0
    assert seeded.client_epsilon_vs_server(1) == math.inf


def test_level_target_is_exceeded_only_strictly():
    first = compute_epsilon(
        rate=released_inclusion_probability(8, 0.5, 4), noise_multiplier=1.5, steps=1, delta=1e-5
    )
    assert _level(target_epsilon=first).would_exceed_target() is None  # equal is allowed
    below = np.nextafter(first, 0.0)
    assert _level(target_epsilon=below).would_exceed_target() == f"privacy.target_epsilon={below}"
    assert _level().would_exceed_target() is None  # no target
    # Against the server: the next round is one plain Gaussian release for a new site.
    one = rdp_gaussian_epsilon(1.5, 1, 1e-5)
    assert _level(target_epsilon_vs_server=one * (1 + 1e-9)).would_exceed_target() is None
    below = one * (1 - 1e-9)
    assert (
        _level(target_epsilon_vs_server=below).would_exceed_target()
        == f"privacy.target_epsilon_vs_server={below}"
    )


def test_level_state_round_trips_through_json_with_int_keys():
    dp = _level()
    dp.step([10, 9, 2])
    dp.step([np.int64(10)])
    state = dp.state_dict()
    assert state == {"steps": 2, "participation": {"2": 1, "9": 1, "10": 2}}
    assert list(state["participation"]) == ["2", "9", "10"]  # by site, not as strings
    restored = _level()
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.steps == 2 and restored.participation == {2: 1, 9: 1, 10: 2}
    assert restored.epsilon_vs_server() == pytest.approx(_unamplified_two_rounds(), rel=1e-9)
    # A ledger from before participation was recorded: steps only, nobody counted.
    restored.load_state_dict({"steps": "5"})
    assert restored.steps == 5 and restored.participation == {}


def _unamplified_two_rounds() -> float:
    return rdp_gaussian_epsilon(1.5, 2, 1e-5)


# -- privatize_update ------------------------------------------------------------------------


@pytest.mark.parametrize(("noise_std", "quant_step"), [(0.5, 0.0), (0.0, 0.01), (0.0, 0.0)])
def test_privatize_adds_no_share_without_both_a_share_and_a_grid(noise_std, quant_step):
    plan = ClientPlan(clip_norm=1.0, noise_std=noise_std, quant_step=quant_step)
    bounded, noise = privatize_update(np.full(4, 2.0), plan, seed=1)
    assert noise is None
    np.testing.assert_allclose(bounded, np.full(4, 0.5), rtol=1e-6)


def test_privatize_share_is_integer_grid_units():
    plan = ClientPlan(clip_norm=1.0, noise_std=0.5, quant_step=0.01, reproducible_noise=True)
    _, noise = privatize_update(np.zeros(1000), plan, seed=4)
    assert noise.dtype == np.int64
    expected = np.rint(np.random.default_rng(4).standard_normal(1000) * 50.0)
    np.testing.assert_array_equal(noise, expected)
    _, secure = privatize_update(np.zeros(1000), ClientPlan(1.0, 0.5, 0.01), seed=4)
    assert secure.dtype == np.int64 and 40 < secure.std() < 60


# -- SampleLevelDP ---------------------------------------------------------------------------


def _opacus(sigma: float, rate: float, steps: int, mechanism: str = "rdp") -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=mechanism)
    acc.history = [(sigma, rate, steps)]
    return float(acc.get_epsilon(delta=1e-5))


def test_sample_dp_from_config_takes_every_field():
    cfg = compose(
        [
            "privacy=dp",
            "privacy.mode=sample",
            "crypto=none",
            "batch_size=16",
            "local_epochs=3",
            "privacy.noise_multiplier=1.3",
            "privacy.clip_norm=0.7",
            "privacy.delta=1e-6",
            "privacy.target_epsilon=5.0",
            "privacy.reproducible_noise=true",
            "privacy.accountant=pld",
        ]
    )
    dp = SampleLevelDP.from_config(cfg, {"0": "100", 1: 50})
    assert (dp.noise_multiplier, dp.clip_norm, dp.delta) == (1.3, 0.7, 1e-6)
    assert (dp.batch_size, dp.local_epochs) == (16, 3)
    assert dp.client_sizes == {0: 100, 1: 50}
    assert (dp.target_epsilon, dp.accountant, dp.reproducible_noise) == (5.0, "pld", True)
    assert dp.client_plan(None) == SamplePlan(1.3, 0.7, "sample", reproducible_noise=True)
    assert dp.target_epsilon_vs_server is None
    defaults = SampleLevelDP.from_config(
        compose(
            [
                "privacy=dp",
                "privacy.mode=sample",
                "privacy.target_epsilon_vs_server=9.0",
            ]
        ),
        {},
    )
    assert defaults.target_epsilon_vs_server == 9.0
    assert (defaults.target_epsilon, defaults.accountant) == (None, "rdp")
    assert defaults.reproducible_noise is False


def _sample_dp(**overrides) -> SampleLevelDP:
    kwargs = dict(
        noise_multiplier=1.0,
        clip_norm=1.0,
        delta=1e-5,
        batch_size=32,
        local_epochs=1,
        client_sizes={0: 320, 1: 320, 2: 320},
    )
    return SampleLevelDP(**{**kwargs, **overrides})


def test_sample_dp_budgets_before_and_after_a_round():
    dp = _sample_dp(clip_norm=0.7)
    assert dp.client_plan(None) == SamplePlan(1.0, 0.7, "sample", reproducible_noise=False)
    assert dp.epsilon() == 0.0 and dp.epsilon_vs_server() == 0.0
    assert dp.client_epsilon(0, 0) == 0.0
    dp.step([1])
    assert 0 < dp.epsilon_vs_server() == dp.epsilon() < math.inf
    seeded = _sample_dp(reproducible_noise=True)
    assert seeded.epsilon_vs_server() == 0.0
    seeded.step([1])
    assert seeded.epsilon_vs_server() == math.inf


def test_sample_dp_small_sites_take_one_full_batch_per_epoch():
    """n <= batch: every example in every step (rate 1), one step per local epoch."""
    dp = _sample_dp(local_epochs=2, client_sizes={0: 10})
    assert dp.client_epsilon(0, 1) == pytest.approx(_opacus(1.0, 1.0, 2), rel=1e-9)
    # Batch 1: a one-example site, an empty one and an unknown one are all rate 1,
    # one step per epoch (the unknown one as the worst case, a single example).
    tiny = _sample_dp(batch_size=1, local_epochs=2, client_sizes={0: 1, 3: 0})
    expected = _opacus(1.0, 1.0, 6)
    for site in (0, 3, 7):
        assert tiny.client_epsilon(site, 3) == pytest.approx(expected, rel=1e-9)


def test_sample_dp_pld_is_opacus_prv():
    dp = _sample_dp(accountant="pld", client_sizes={0: 64})
    assert dp.client_epsilon(0, 2) == pytest.approx(_opacus(1.0, 0.5, 4, "prv"), rel=1e-9)


def test_sample_dp_target_looks_one_round_ahead_for_every_site():
    eps = {r: _opacus(1.0, 0.1, 10 * r) for r in (1, 3)}
    assert _sample_dp().would_exceed_target() is None  # no target
    # Nobody has taken part: each site's next round is its first; equal is allowed.
    assert _sample_dp(target_epsilon=eps[1]).would_exceed_target() is None
    below = np.nextafter(eps[1], 0.0)
    assert _sample_dp(target_epsilon=below).would_exceed_target() == (
        f"privacy.target_epsilon={below}"
    )
    # Against the server a site's epsilon is the same figure.
    assert _sample_dp(target_epsilon_vs_server=eps[1]).would_exceed_target() is None
    assert _sample_dp(target_epsilon_vs_server=below).would_exceed_target() == (
        f"privacy.target_epsilon_vs_server={below}"
    )
    assert _sample_dp(target_epsilon=1e-9, client_sizes={}).would_exceed_target() is None
    # Site 1 has two rounds: its third passes a target just below eps(3).
    dp = _sample_dp(target_epsilon=np.nextafter(eps[3], 0.0))
    dp.step([1])
    dp.step([1])
    assert dp.would_exceed_target() == f"privacy.target_epsilon={dp.target_epsilon}"
    dp.target_epsilon = eps[3]
    assert dp.would_exceed_target() is None


def test_rounds_within_is_the_largest_count_at_or_below_the_target():
    """The key holders' window: the largest r in 0..limit with epsilon_after(r) <= target,
    equal to the target included, against a linear scan."""
    from fedray.privacy.dp import _rounds_within

    assert _rounds_within(10, None, lambda r: 1 / 0) == 10  # no target: no accounting
    for target in (0, 0.5, 1, 3, 3.5, 9, 10, 11):
        for limit in (0, 1, 4, 10):
            expected = max(r for r in range(limit + 1) if r <= target)
            assert _rounds_within(limit, target, float) == expected, (target, limit)


def test_sample_level_window_uses_each_sites_own_size():
    """Every site in every round: the window is the largest r for which the worst site
    stays within the target, from that site's own sampling rate (linear scan)."""
    dp = _sample_dp(client_sizes={0: 3200}, target_epsilon_vs_server=2.5)
    r = dp.rounds_within_target_vs_server(50)  # 1.21 after one round, 4.59 after 50
    assert 1 < r < 50  # a 1-example site (rate 1) would get 1 round at most
    assert dp.client_epsilon(0, r) <= 2.5 < dp.client_epsilon(0, r + 1)
    nobody = _sample_dp(client_sizes={}, target_epsilon_vs_server=0.5)
    assert nobody.rounds_within_target_vs_server(5) == 5  # no site: nothing to spend


def test_updates_seen_in_the_clear_count_at_sample_level_only():
    """saw_in_clear: a retried attempt's plaintext updates (crypto=none). Sample level
    counts them like a round per site; client level (central noise) has no DP against
    the server to spend and counts released rounds only."""
    sample = _sample_dp(client_sizes={0: 40, 1: 40, 2: 80})
    sample.saw_in_clear([0, 2])
    assert sample.participation == {0: 1, 2: 1}
    level = _level()
    level.saw_in_clear([0, 2])
    assert (level.steps, level.participation) == (0, {})


# -- privacy.max_colluding_clients: shares sized for the m_min - k honest ones (issue 22) ----


def test_shares_are_sized_for_the_honest_sites_left_after_k_colluders():
    # sigma 1.5, C 2, m_min 4: share sigma C / sqrt(m_min - k) = 3 / sqrt(4 - k).
    for k, share in [(0, 1.5), (1, 3.0 / math.sqrt(3)), (3, 3.0)]:
        dp = _level(colluding_clients=k)
        assert dp.colluding_clients == k and dp.honest_clients == 4 - k
        assert dp.share_std == pytest.approx(share, rel=1e-12)
        assert dp.encode_clip == pytest.approx(2.0 + 10 * share, rel=1e-12)
        plan = dp.client_plan(SimpleNamespace(step=0.01, num_values=400))
        assert plan.noise_std == pytest.approx(share, rel=1e-12)
        # The honest shares alone carry sigma C: what the server cannot remove.
        assert (4 - k) * dp.share_std**2 == pytest.approx((1.5 * 2.0) ** 2, rel=1e-12)
    assert _level(distributed=False, colluding_clients=2).client_plan(None).noise_std == 0.0


def test_colluders_subtracting_their_shares_leave_sigma_c_of_noise():
    """m_min sites each draw a share (privatize_update, as the hosts do); k of them collude
    with the server and subtract theirs. What is left is the honest shares' sum: its
    variance is sigma^2 C^2 (chi-square bound over 200,000 values, false alarm ~1e-9),
    not the (m_min - k) / m_min of it the old sizing left."""
    from scipy.stats import chi2

    sigma, clip, m, k, d = 1.5, 2.0, 3, 1, 200_000
    dp = _level(clip_norm=clip, noise_multiplier=sigma, min_clients=m, colluding_clients=k)
    step = 1e-3  # grid step: rounding adds step^2 / 12 per share, negligible
    plan = dp.client_plan(SimpleNamespace(step=step, num_values=d))
    zero = np.zeros(d, np.float32)
    shares = [privatize_update(zero, plan, seed=0)[1] for _ in range(m)]
    left = (sum(shares) - sum(shares[:k])) * step  # the honest shares, in model units
    variance = (sigma * clip) ** 2 + (m - k) * step**2 / 12
    lo, hi = chi2.ppf(1e-9, d) / d, chi2.ppf(1 - 1e-9, d) / d
    assert hi < (m / (m - k)) * lo  # the bound sees the old sizing's 2/3 of the variance
    ratio = float(np.mean(left**2)) / variance
    assert lo < ratio < hi, f"honest noise has {ratio:.4f} of sigma^2 C^2"
    total = sum(shares) * step  # all m shares: what observers of the model see
    assert float(np.mean(total**2)) / (m * dp.share_std**2) == pytest.approx(1.0, abs=0.05)


def test_colluders_keep_the_server_budget_at_sigma_and_lower_the_model_budget():
    """epsilon_vs_server counts the honest shares only (sigma C, whatever k); epsilon counts
    every share of a released sum, at least m_min of them: sigma sqrt(m_min / (m_min - k))."""
    m, rounds = 4, 6
    for k in (0, 1, 3):
        dp = _level(rate=1.0, num_clients=m, min_clients=m, colluding_clients=k)
        assert dp.noise_multiplier_vs_server == 1.5
        assert dp.accounting_noise_multiplier == pytest.approx(
            1.5 * math.sqrt(m / (m - k)), rel=1e-12
        )
        assert dp.client_epsilon_vs_server(rounds) == pytest.approx(
            rdp_gaussian_epsilon(1.5, rounds, 1e-5), rel=1e-9
        )
        assert dp.epsilon(rounds) == pytest.approx(
            rdp_gaussian_epsilon(1.5 * math.sqrt(m / (m - k)), rounds, 1e-5), rel=1e-9
        )
    # With the codec's grid, both divide by the same C' = C + s sqrt(d) / 2 = 2.1.
    dp = _level(colluding_clients=1)
    dp.client_plan(SimpleNamespace(step=0.01, num_values=400))
    assert dp.noise_multiplier_vs_server == pytest.approx(1.5 * 2.0 / 2.1, rel=1e-12)
    assert dp.accounting_noise_multiplier == pytest.approx(
        1.5 * 2.0 / 2.1 * math.sqrt(4 / 3), rel=1e-12
    )
    # Central noise: the server adds all of it; k changes neither budget.
    central = _level(distributed=False, colluding_clients=2)
    assert central.accounting_noise_multiplier == 1.5
    assert central.client_epsilon_vs_server(1) == math.inf


def test_issue_22_one_colluder_at_two_sites_fifteen_rounds():
    """The issue's figures: sigma 1, m_min 2, one colluder, 15 rounds. Old sizing left the
    server sigma / sqrt(2) (epsilon_vs_server 39.8, reported as 24.8); now 24.8 holds."""
    old = compute_epsilon_unamplified(noise_multiplier=1 / math.sqrt(2), rounds=15, delta=1e-5)
    assert old == pytest.approx(39.8, abs=0.05)
    dp = _level(noise_multiplier=1.0, clip_norm=1.0, min_clients=2, colluding_clients=1)
    assert dp.client_epsilon_vs_server(15) == pytest.approx(24.8, abs=0.05)
    assert dp.share_std == 1.0  # the one honest share carries sigma C alone


@pytest.mark.parametrize("k", [-1, 4, 5])
def test_level_dp_refuses_colluders_outside_zero_to_m_min(k):
    with pytest.raises(ValueError, match=r"colluding clients must be in \[0, min_clients\)"):
        _level(colluding_clients=k)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["min_clients_per_round=2", "privacy.max_colluding_clients=2"],
            "privacy.max_colluding_clients=2 must be an integer from 0 to "
            "min_clients_per_round - 1 = 1 (min_clients_per_round=2)",
        ),
        (
            ["min_clients_per_round=3", "privacy.max_colluding_clients=-1"],
            "privacy.max_colluding_clients=-1 must be an integer from 0 to "
            "min_clients_per_round - 1 = 2 (min_clients_per_round=3)",
        ),
        (  # m_min by default: half the cohort of 4, at least 2 with encryption
            ["privacy.max_colluding_clients=2"],
            "privacy.max_colluding_clients=2 must be an integer from 0 to "
            "min_clients_per_round - 1 = 1 (min_clients_per_round=2)",
        ),
    ],
)
def test_config_refuses_colluders_outside_zero_to_m_min(overrides, message):
    from fedray.errors import ConfigError

    base = ["privacy=dp", "num_clients=8", "clients_per_round=4"]
    with pytest.raises(ConfigError) as err:
        compose([*base, *overrides])
    assert str(err.value) == message and "\n" not in str(err.value)


def test_config_takes_colluders_into_the_plan():
    base = ["privacy=dp", "num_clients=8", "clients_per_round=4", "min_clients_per_round=3"]
    assert compose(base).privacy.max_colluding_clients == 0  # the default
    dp = ClientLevelDP.from_config(compose([*base, "privacy.max_colluding_clients=2"]))
    assert (dp.colluding_clients, dp.min_clients, dp.honest_clients) == (2, 3, 1)
    assert dp.share_std == pytest.approx(1.0)  # sigma C / sqrt(1)
    assert compose(["privacy=none", "privacy.max_colluding_clients=0"]).privacy.name == "none"
