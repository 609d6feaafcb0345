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
from tests.conftest import run_cli


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
    return ClientLevelDP(
        clip_norm=clip,
        noise_multiplier=sigma,
        delta=1e-5,
        rate=0.5,
        num_clients=8,
        min_clients=m_min,
        distributed=distributed,
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
    z = secure_standard_normal(50_001)
    assert len(z) == 50_001
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02


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
    dp.target_epsilon = compute_epsilon(rate=0.5, noise_multiplier=1.0, steps=3, delta=1e-5) + 1e-9
    steps = 0
    while not dp.would_exceed_target():
        dp.step()
        steps += 1
    assert steps == 3 and dp.epsilon() <= dp.target_epsilon


def test_cli_dp_reports_finite_epsilon(ray_2cpus, tmp_path):
    out = tmp_path / "dp"
    res = run_cli(
        [
            "privacy=dp",
            "privacy.noise_multiplier=1.0",
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


def test_sample_level_epsilon_matches_opacus_stepwise():
    from opacus.accountants import RDPAccountant

    from fedray.privacy.dp import SampleLevelDP

    def make():
        return SampleLevelDP(
            noise_multiplier=1.1,
            clip_norm=1.0,
            delta=1e-5,
            batch_size=16,
            local_epochs=2,
            client_sizes={0: 100, 1: 400},
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
