"""Differential privacy: clipping, calibrated noise in both placements, accounting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedray.crypto.codec import PackedPaillierCodec
from fedray.crypto.secure_aggregation import ClientEncryptor, EncryptedSum, UpdateLayout
from fedray.crypto.threshold import combine_partial_decryptions, partial_decrypt
from fedray.privacy.dp import ClientLevelDP, compute_epsilon, privatize_update
from fedray.privacy.mechanisms import l2_clip, secure_standard_normal
from tests.conftest import compose, run_cli
from tests.test_dp_units import _level, _sample_dp


@settings(max_examples=200, deadline=None)
@given(
    update=arrays(np.float64, st.integers(1, 300), elements=st.floats(-1e6, 1e6)),
    clip=st.floats(1e-3, 1e3),
)
def test_clipping_bound_holds(update, clip):
    out = l2_clip(update, clip)
    assert np.linalg.norm(out.astype(np.float64)) <= clip * (1 + 1e-5)
    if np.linalg.norm(update) <= clip:  # small updates pass unchanged
        np.testing.assert_allclose(out, update.astype(np.float32), rtol=1e-6, atol=1e-30)


def _plan(distributed, sigma=1.0, clip=0.5, m_min=4):
    """Client-level DP over 8 clients sampled at q = 0.5."""
    return _level(
        clip_norm=clip, noise_multiplier=sigma, min_clients=m_min, distributed=distributed
    )


def test_distributed_noise_sums_to_sigma_c_under_encryption(threshold_key):
    """m_min clients each add their share; the decrypted sum's noise has std sigma*C."""
    key, shares = threshold_key
    dp = _plan(distributed=True)
    d = 4000
    codec = PackedPaillierCodec.for_key(
        key.public, num_values=d, max_summands=dp.cohort_cap, quant_bits=16, clip=dp.encode_clip
    )
    layout = UpdateLayout.for_key(key.public, codec)
    plan = dp.client_plan(codec)
    enc = ClientEncryptor(key, layout, share=False)
    acc = EncryptedSum(key.public, layout)
    for k in range(dp.min_clients):
        clipped, noise = privatize_update(np.zeros(d, dtype=np.float32), plan, seed=100 + k)
        acc.add(enc.encrypt_sum([(clipped, 1.0, noise, {})])[0])
    partials = {j: partial_decrypt(shares[j - 1], acc.ciphertexts()) for j in (1, 2)}
    total, _ = layout.decode_sum(combine_partial_decryptions(key, partials), acc.count)
    target = dp.noise_multiplier * dp.clip_norm
    # std estimate over d samples: relative standard error ~ 1/sqrt(2d) ~ 1.1%; allow 5%.
    assert abs(total.std() / target - 1) < 0.05
    assert abs(total.mean()) < 5 * target / math.sqrt(d)


def test_central_noise_has_std_sigma_c():
    dp = _plan(distributed=False, sigma=1.3, clip=2.0)
    noisy = dp.server_noise(np.zeros(20_000), np.random.default_rng(0))
    assert abs(noisy.std() / (1.3 * 2.0) - 1) < 0.03
    # The client-side plan adds nothing in the central placement.
    clipped, noise = privatize_update(np.ones(10, np.float32) * 5, dp.client_plan(None), 1)
    assert noise is None and np.linalg.norm(clipped) == pytest.approx(2.0, rel=1e-6)


def test_secure_rng_is_standard_normal():
    from scipy import stats

    z = secure_standard_normal(200_001)
    assert len(z) == 200_001
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    # The whole shape, tails included (a bad radius or angle fails this at once).
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # Beyond 3 sigma: about 540 of 200,001 draws; a binomial test, not a fixed 10% band
    # (that one failed about 2% of correct runs).
    beyond = int((np.abs(z) > 3).sum())
    assert stats.binomtest(beyond, len(z), 2 * stats.norm.sf(3)).pvalue > 1e-6


@pytest.mark.parametrize(
    ("rate", "sigma", "steps", "delta"),
    [(0.01, 1.0, 100, 1e-5), (0.1, 1.1, 20, 1e-5), (0.5, 2.0, 10, 1e-6), (1.0, 5.0, 50, 1e-5)],
)
def test_epsilon_matches_dp_accounting(rate, sigma, steps, delta):
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma)), steps)
    ours = compute_epsilon(rate=rate, noise_multiplier=sigma, steps=steps, delta=delta)
    assert ours == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert math.isfinite(ours) and ours > 0


def test_epsilon_grows_with_rounds_and_falls_with_sigma():
    eps_rounds = [
        compute_epsilon(rate=0.1, noise_multiplier=1.0, steps=s, delta=1e-5) for s in (1, 10, 100)
    ]
    assert eps_rounds[0] < eps_rounds[1] < eps_rounds[2]
    eps_sigma = [
        compute_epsilon(rate=0.1, noise_multiplier=s, steps=50, delta=1e-5) for s in (0.8, 1.5, 3.0)
    ]
    assert eps_sigma[0] > eps_sigma[1] > eps_sigma[2]


def test_target_epsilon_stops_before_exceeding():
    dp = _plan(distributed=False)
    dp.target_epsilon = (
        compute_epsilon(rate=dp.accounted_rate, noise_multiplier=1.0, steps=3, delta=1e-5) + 1e-9
    )
    steps = 0
    while not dp.would_exceed_target():
        dp.step()
        steps += 1
    assert steps == 3 and dp.epsilon() <= dp.target_epsilon


def test_target_against_the_server_stops_before_any_client_could_pass_it():
    """epsilon_vs_server has no sampling amplification and counts a client's own released
    rounds: the run stops before the client with the most rounds, if sampled, passes it.
    Each target is named in the stop reason."""
    from fedray.privacy.dp import compute_epsilon_unamplified

    dp = _plan(distributed=True)
    after = [
        compute_epsilon_unamplified(noise_multiplier=1.0, rounds=r, delta=1e-5) for r in (2, 3)
    ]
    dp.target_epsilon_vs_server = (after[0] + after[1]) / 2  # 2 rounds pass, 3 do not
    dp.step([0, 1])
    assert dp.would_exceed_target() is None
    dp.step([0])  # client 0: 2 rounds; a third would pass the target
    assert dp.epsilon_vs_server() == pytest.approx(after[0])
    assert (
        dp.would_exceed_target()
        == f"privacy.target_epsilon_vs_server={dp.target_epsilon_vs_server}"
    )
    assert dp.epsilon(dp.steps + 1) < 1e9 and dp.target_epsilon is None  # not the other target
    dp.target_epsilon = dp.epsilon(dp.steps + 1) / 2  # both pass: the first is named
    assert dp.would_exceed_target() == f"privacy.target_epsilon={dp.target_epsilon}"


def _two_sites(**target):
    """Sample-level DP over a small site (32 examples: sampling rate 1) and a large one."""
    return _sample_dp(client_sizes={0: 32, 1: 3200}, **target)


def test_sample_level_targets_bound_the_same_site_epsilon():
    dp = _two_sites(target_epsilon_vs_server=7.0)
    dp.step([0])  # site 0: 4.729 after one round, 7.077 after two
    assert dp.would_exceed_target() == "privacy.target_epsilon_vs_server=7.0"
    dp.target_epsilon_vs_server = 7.1
    assert dp.would_exceed_target() is None


def test_sample_level_window_counts_every_site_in_every_round():
    """The key holders' window at sample level: rounds in which the worst site, in all of
    them, stays within the target (site 0: 4.729 after one round, 7.077 after two)."""
    assert _two_sites(target_epsilon_vs_server=7.0).rounds_within_target_vs_server(10) == 1
    assert _two_sites(target_epsilon_vs_server=7.1).rounds_within_target_vs_server(10) == 2
    assert _two_sites(target_epsilon_vs_server=7.1).rounds_within_target_vs_server(1) == 1
    dp = _two_sites(target_epsilon_vs_server=7.0)
    dp.step([0])  # a resumed job: site 0 already took part once
    assert dp.rounds_within_target_vs_server(10) == 0
    assert _two_sites().rounds_within_target_vs_server(10) == 10  # no target


def test_server_stops_before_a_round_that_would_pass_a_target():
    """The server's own check, before it samples or contacts anyone: the outcome names
    the target and the round counter does not move."""
    from fedray.data.datasets import dataset_info
    from fedray.privacy import build_privacy
    from fedray.runtime.server import Server

    cfg = compose(["crypto=none", "privacy=dp", "privacy.target_epsilon=0.01"])
    server = Server(cfg, dataset_info(cfg.dataset))
    server.set_up([], {}, privacy=build_privacy(cfg))  # no hosts: nothing to contact
    outcome = server.run_round()
    assert outcome.stop and outcome.stop_reason == "privacy.target_epsilon=0.01"
    assert server.round == 0


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_key_holders_open_only_the_rounds_within_the_target_against_the_server(
    threshold_key, resumed
):
    """The driver's window for the key holders: from the checkpoint's round + 1 to the
    last round in which a client in every round would stay within the target (on resume,
    counting from the saved accountant: the ledger's, newer than the checkpoint)."""
    from types import SimpleNamespace

    from fedray.crypto.secure_aggregation import codec_for
    from fedray.privacy import build_privacy
    from fedray.privacy.dp import compute_epsilon_unamplified
    from fedray.runtime.driver import _key_holders_window

    key, _ = threshold_key
    cfg = compose(["privacy=dp", "rounds=30", "privacy.target_epsilon_vs_server=25"])
    windows = []
    job = SimpleNamespace(
        cfg=cfg,
        privacy=build_privacy(cfg),
        public_key=key,
        custody=SimpleNamespace(restrict=lambda first, last: windows.append((first, last))),
        first_round=1,
    )
    saved, done = None, 0
    if resumed:  # checkpoint at round 5; rounds 6 and 7 released after it (the ledger)
        job.first_round, done = 6, 7
        saved = {"steps": 7, "participation": {"0": 7, "1": 6}}
    _key_holders_window(job, saved, 40)
    grid = build_privacy(cfg)
    grid.client_plan(codec_for(cfg, key.public, 40))  # sigma C / C', the quantization term
    sigma = grid.accounting_noise_multiplier
    assert sigma < 1.0

    def eps(rounds):
        return compute_epsilon_unamplified(noise_multiplier=sigma, rounds=rounds, delta=1e-5)

    most = max(r for r in range(31) if eps(done + r) <= 25.0)  # a linear scan
    assert 0 < most < 30 - done and eps(done + most + 1) > 25.0
    assert windows == [(job.first_round, job.first_round - 1 + most)]
    assert job.last_round == job.first_round - 1 + most < 30


def test_cli_dp_reports_epsilon_and_stops_before_the_target_against_the_server(ray_2cpus, tmp_path):
    """Every client is in every round (q = 1): epsilon_vs_server after r rounds is r plain
    Gaussian releases. A target between 3 and 4 rounds' worth ends the job after round 3,
    says why, and records it in summary.json."""
    from fedray.privacy.dp import compute_epsilon_unamplified

    after = [
        compute_epsilon_unamplified(noise_multiplier=1.0, rounds=r, delta=1e-5) for r in (3, 4)
    ]
    target = round((after[0] + after[1]) / 2, 3)
    out = tmp_path / "dp"
    res = run_cli(
        [
            "privacy=dp",
            "privacy.noise_multiplier=1.0",
            f"privacy.target_epsilon_vs_server={target}",
            "crypto.key_bits=512",
            "crypto.allow_insecure_keys=true",
            "rounds=5",
            f"ray.address={ray_2cpus}",
            f"hydra.run.dir={out}",
        ]
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["delta"] == 1e-5
    assert summary["epsilon"] is not None and 0 < summary["epsilon"] < math.inf
    assert summary["rounds_completed"] == 3 and summary["stopped_early"]
    assert summary["stop_reason"] == "privacy.target_epsilon_vs_server"
    assert after[0] <= summary["epsilon_vs_server"] <= target
    assert f"it would exceed privacy.target_epsilon_vs_server={target}" in res.stdout


def test_sample_level_epsilon_matches_opacus_stepwise():
    from opacus.accountants import RDPAccountant

    def make():
        return _sample_dp(
            noise_multiplier=1.1, batch_size=16, local_epochs=2, client_sizes={0: 100, 1: 400}
        )

    dp = make()
    for _ in range(3):
        dp.step([0, 1])
    dp.step([1])
    for cid, n, rounds in ((0, 100, 3), (1, 400, 4)):
        acc = RDPAccountant()
        for _ in range(rounds * 2 * math.ceil(n / 16)):  # Opacus's own per-step API
            acc.step(noise_multiplier=1.1, sample_rate=16 / n)
        assert dp.client_epsilon(cid, rounds) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert dp.epsilon() == max(dp.client_epsilon(0, 3), dp.client_epsilon(1, 4))
    restored = make()
    restored.load_state_dict(dp.state_dict())
    assert restored.epsilon() == dp.epsilon()


def test_sample_level_dp_job_with_opacus(ray_2cpus, tmp_path):
    from fedray.runtime.driver import run_experiment
    from tests.conftest import compose

    cfg = compose(["privacy=dp", "privacy.mode=sample", "crypto=none", "rounds=3"])
    summary = run_experiment(cfg, tmp_path)
    assert summary["rounds_completed"] == 3
    assert 0 < summary["epsilon"] < math.inf
    assert summary["final_accuracy"] > 0.6


# -- issue 13: noise nobody else can predict ------------------------------------------------


def _distributed_plan(codec_step=1e-4, reproducible=False):
    from fedray.privacy.dp import ClientPlan

    return ClientPlan(
        clip_norm=1.0, noise_std=0.5, quant_step=codec_step, reproducible_noise=reproducible
    )


def _server_replay(plan, seed, d):
    """What the server can compute from what it holds: the job seed, round, client, plan."""
    rng = np.random.default_rng(seed)
    return np.rint(rng.standard_normal(d) * plan.noise_std / plan.quant_step).astype(np.int64)


def test_server_cannot_reproduce_a_noise_share_from_the_seed():
    d, seed = 1000, 12345
    plan = _distributed_plan()
    _, a = privatize_update(np.zeros(d, np.float32), plan, seed)
    _, b = privatize_update(np.zeros(d, np.float32), plan, seed)
    assert not np.array_equal(a, b)  # same seed, same round, same client: other noise
    replay = _server_replay(plan, seed, d)
    # The server's best guess explains none of the share: residual as large as the share.
    assert np.std(a - replay) > 1.3 * np.std(a)
    # Research flag: the share is the seeded one, and the server replays it exactly.
    seeded = _distributed_plan(reproducible=True)
    _, c = privatize_update(np.zeros(d, np.float32), seeded, seed)
    np.testing.assert_array_equal(c, _server_replay(seeded, seed, d))


def test_central_noise_comes_from_the_os_unless_reproducible():
    dp = _plan(distributed=False)
    a = dp.server_noise(np.zeros(1000), np.random.default_rng(7))
    b = dp.server_noise(np.zeros(1000), np.random.default_rng(7))
    assert not np.array_equal(a, b)
    dp.reproducible_noise = True
    a = dp.server_noise(np.zeros(1000), np.random.default_rng(7))
    b = dp.server_noise(np.zeros(1000), np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_secure_rng_alias_still_works():
    from tests.conftest import compose

    with pytest.warns(FutureWarning, match="secure_rng is deprecated"):
        old_seeded = compose(["privacy=dp", "privacy.secure_rng=false"])
    assert old_seeded.privacy.seeded_noise
    with pytest.warns(FutureWarning):
        old_secure = compose(["privacy=dp", "privacy.secure_rng=true"])
    assert not old_secure.privacy.seeded_noise
    assert not compose(["privacy=dp"]).privacy.seeded_noise  # the default: OS noise
    assert compose(["privacy=dp", "privacy.reproducible_noise=true"]).privacy.seeded_noise


# -- issue 13: two budgets ------------------------------------------------------------------


def _unamplified(sigma, rounds, delta=1e-5):
    """dp-accounting's plain Gaussian composition, computed here independently."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(sigma), rounds)
    return acc.get_epsilon(delta)


def _amplified(rate, sigma, steps, delta=1e-5):
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    ("num_clients", "rate", "sigma", "rounds", "joined", "eps", "eps_server"),
    [
        # The table (RDP accountant, delta = 1e-5).
        (10_000, 0.01, 1.0, 100, 2, 1.21, 7.08),
        (1_000, 0.5, 1.2, 30, 15, 15.80, 19.56),
    ],
)
def test_epsilon_vs_server_is_unamplified_composition(
    num_clients, rate, sigma, rounds, joined, eps, eps_server
):
    dp = ClientLevelDP(
        clip_norm=1.0,
        noise_multiplier=sigma,
        delta=1e-5,
        rate=rate,
        num_clients=num_clients,
        min_clients=1,
        distributed=True,
    )
    for r in range(rounds):
        # client 0 is in the first ``joined`` rounds; client 1 in every other round
        dp.step(([0] if r < joined else []) + ([1] if r % 2 else []))
    assert dp.participation[0] == joined
    worst = max(dp.participation.values())
    assert dp.epsilon_vs_server() == pytest.approx(_unamplified(sigma, worst), rel=1e-9)
    assert dp.client_epsilon_vs_server(joined) == pytest.approx(
        _unamplified(sigma, joined), rel=1e-9
    )
    assert dp.client_epsilon_vs_server(joined) == pytest.approx(eps_server, abs=0.005)
    assert dp.epsilon() == pytest.approx(eps, abs=0.005)
    assert dp.epsilon() == pytest.approx(_amplified(rate, sigma, rounds), rel=1e-6)


def test_no_dp_against_a_server_that_sees_updates_or_knows_the_noise():
    central = _plan(distributed=False)
    central.step([0, 1])
    assert central.epsilon_vs_server() == math.inf
    seeded = _plan(distributed=True)
    seeded.reproducible_noise = True
    seeded.step([0])
    assert seeded.epsilon_vs_server() == math.inf
    assert math.isfinite(seeded.epsilon())


def test_accountants_use_the_zero_out_relation():
    from dp_accounting.privacy_accountant import NeighboringRelation

    from fedray.privacy.dp import make_accountant

    for name in ("rdp", "pld"):
        assert make_accountant(name).neighboring_relation is NeighboringRelation.REPLACE_SPECIAL


# -- issue 13: retries, resume, sample mode ------------------------------------------------


def test_retried_rounds_are_accounted_at_the_conditioned_inclusion_probability():
    from fedray.privacy.dp import released_inclusion_probability

    assert released_inclusion_probability(10, 0.5, 3) == pytest.approx(0.5186, abs=5e-5)
    dp = _level(clip_norm=1.0, noise_multiplier=1.0, num_clients=10, min_clients=3)
    dp.step([0, 1, 2])
    expected = compute_epsilon(
        rate=released_inclusion_probability(10, 0.5, 3), noise_multiplier=1.0, steps=1, delta=1e-5
    )
    assert dp.epsilon() == pytest.approx(expected, rel=1e-9)
    assert dp.epsilon() > compute_epsilon(rate=0.5, noise_multiplier=1.0, steps=1, delta=1e-5)
    # The sampling done matches: draw cohorts as the server does, retrying short ones.
    rng = np.random.default_rng(0)
    hits, released = 0, 0
    while released < 20_000:
        cohort = dp.sample_cohort(rng)
        if len(cohort) < dp.min_clients:
            continue  # the server retries the round
        released += 1
        hits += 0 in cohort
    assert hits / released == pytest.approx(dp.accounted_rate, abs=0.01)


def test_sample_mode_stops_on_the_client_with_the_highest_epsilon():
    dp = _two_sites(target_epsilon=4.739)
    dp.step([0, 1])
    dp.step([1])
    # The small site has fewer rounds but the highest epsilon, and its next round
    # takes it from 4.729 to 7.077, past the target.
    assert dp.client_epsilon(0, 1) == pytest.approx(4.729, abs=5e-4)
    assert dp.client_epsilon(0, 2) == pytest.approx(7.077, abs=5e-4)
    assert dp.client_epsilon(1, 3) < dp.target_epsilon
    assert dp.would_exceed_target()


def test_values_outside_the_codec_clip_are_counted():
    from fedray.privacy.mechanisms import count_clipped

    assert count_clipped(np.array([3.0, -0.5, 1e9]), 1.0) == 2
    assert count_clipped(np.array([1.0, -1.0, 0.0]), 1.0) == 0  # the edge is kept
    assert count_clipped(np.array([1.5, -1.0001, 0.9]), 1.0) == 2


def test_set_up_calls_that_reveal_site_sizes_close_before_the_server_exists():
    """The server holds every host's handle: the calls that answer with a site's example
    count (the weight_ref chain, sample-DP sizes) refuse once set-up is over."""
    from fedray.data.datasets import dataset_info
    from fedray.runtime.client import ClientHost
    from tests.conftest import compose

    cfg = compose(
        ["crypto=none", "num_clients=4", "clients_per_round=4", "privacy=dp", "privacy.mode=sample"]
    )
    host = ClientHost(cfg, [0, 1], dataset_info(cfg.dataset))
    assert host.ready() is True
    largest = host.running_max_examples(0.0)
    assert largest == max(host.dp_client_sizes().values())
    assert host.set_weight_ref(largest - 1) != True  # noqa: E712 - an error line
    assert host.set_weight_ref(largest) is True
    for call in (lambda: host.running_max_examples(0.0), host.dp_client_sizes):
        with pytest.raises(PermissionError, match="set-up"):
            call()
    assert "labels" not in host.describe()[0] and "num_examples" not in host.describe()[0]


# -- issue 22: DP-SGD noise from full-entropy generator states -----------------------------


def _dp_sgd_update(task, start, data, plan) -> np.ndarray:
    """One site's DP-SGD update from ``start`` (the built-in task, no Ray)."""
    import copy

    import torch

    model = copy.deepcopy(start)
    task.train(model, data, epochs=2, lr=0.5, seed=1, round_num=1, client_id=0, privacy=plan)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    before = torch.cat([p.detach().reshape(-1) for p in start.parameters()])
    return (after - before).numpy()


def test_dp_sgd_noise_and_masks_come_from_the_full_entropy_generators(monkeypatch):
    """Same data, same clipping, same start: two DP-SGD trainings differ (fresh OS state
    per training), and are equal once the generators fedray makes are seeded alike, even
    with torch's global generator in different states: Opacus's noise and its Poisson
    masks (batch 8 of 40: they matter) draw only from those generators."""
    import torch

    import fedray.privacy.mechanisms as mech
    from fedray.privacy.dp import SamplePlan
    from fedray.tasks.tabular import Examples, TabularClassificationTask
    from tests.conftest import compose

    cfg = compose(["privacy=dp", "privacy.mode=sample", "crypto=none", "batch_size=8"])
    task = TabularClassificationTask(cfg, None)
    gen = torch.Generator().manual_seed(0)
    data = Examples(torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen))
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    plan = SamplePlan(noise_multiplier=1.0, clip_norm=0.5)
    a, b = _dp_sgd_update(task, start, data, plan), _dp_sgd_update(task, start, data, plan)
    assert np.linalg.norm(a - b) > 0.1 * np.linalg.norm(a)

    made = []

    def alike(seed=None):  # the generators of every training seeded alike, in order
        assert seed is None  # OS-noise mode asks for full-entropy generators
        made.append(1)
        return torch.Generator().manual_seed(1000 + len(made) % 3)

    monkeypatch.setattr(mech, "torch_generator", alike)
    torch.manual_seed(1)
    c = _dp_sgd_update(task, start, data, plan)
    made.clear()
    torch.manual_seed(2)
    d = _dp_sgd_update(task, start, data, plan)
    assert made and np.array_equal(c, d)
    # Seeded research mode replays from its seed alone.
    monkeypatch.undo()
    seeded = SamplePlan(noise_multiplier=1.0, clip_norm=0.5, reproducible_noise=True)
    np.testing.assert_array_equal(
        _dp_sgd_update(task, start, data, seeded), _dp_sgd_update(task, start, data, seeded)
    )


def test_summary_records_the_colluders_the_shares_were_sized_for():
    """summary.json: max_colluding_clients as configured under DP, null without DP."""
    from types import SimpleNamespace

    from fedray.runtime.driver import _new_summary
    from tests.conftest import compose

    def summary(overrides, privacy):
        job = SimpleNamespace(
            cfg=compose(overrides),
            custody=None,
            privacy=privacy,
            first_round=1,
            public_key=None,
            placement=SimpleNamespace(mode="simulation"),
            hosts=[],
            described={},
        )
        return _new_summary(job, (10, 10, 0), 0.0)

    dp = ["privacy=dp", "num_clients=8", "clients_per_round=4", "min_clients_per_round=3"]
    assert summary([*dp, "privacy.max_colluding_clients=2"], object())["max_colluding_clients"] == 2
    assert summary(dp, object())["max_colluding_clients"] == 0
    assert summary(["privacy=none"], None)["max_colluding_clients"] is None
