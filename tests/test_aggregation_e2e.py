"""Aggregation arithmetic end to end: the server's released model against a hand computation.

Each job runs on a real Ray with real training, clients of unequal sizes (a Dirichlet
split), and for FedAvg real 512-bit Paillier keys. A recording host writes what each client
computed (its plaintext delta and weight, before any encryption) and the global weights it
was sent; the test then recomputes the round by hand, from those records alone, for each
strategy family: weighted mean (FedAvg), server optimizer (FedAdam), robust (median).
"""

from __future__ import annotations

import csv
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle

import tests.test_aggregation_e2e as this
from fedray.crypto.codec import PackedPaillierCodec
from fedray.runtime.client import ClientHost
from fedray.runtime.driver import run_experiment
from fedray.runtime.outputs import load_checkpoint
from tests.conftest import compose

# Ray workers import nothing from tests/: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(this)

SMALL_KEY = ["crypto=paillier", "crypto.key_bits=512", "crypto.allow_insecure_keys=true"]
# Unequal clients: a Dirichlet label split of breast_cancer over 6 sites.
UNEQUAL = [
    "num_clients=6",
    "clients_per_round=6",
    "dataset.partition=dirichlet",
    "dataset.dirichlet_alpha=1.0",
    "checkpoint.every=0",
    "local_epochs=1",
]


class _Recorder:
    """Mixin for a ClientHost: records each call's global weights and each client's update."""

    record_dir = ""

    def train(self, task, global_weights):
        stamp = f"{task.round:03d}-{time.time_ns()}-{self.client_ids[0]}"
        path = Path(self.record_dir)
        (path / f"global-{stamp}.pkl").write_bytes(
            pickle.dumps({"round": task.round, "weights": np.array(global_weights)})
        )
        self._records = []
        results = super().train(task, global_weights)
        # Written only once the call returns: a call that dies mid-round leaves no update.
        for rec in self._records:
            (path / f"update-{stamp}-{rec['client']}.pkl").write_bytes(pickle.dumps(rec))
        return results

    def _finish(self, result, delta, noise):
        self._records.append(
            {
                "client": result.client_id,
                "delta": np.array(delta, dtype=np.float32),
                "weight": float(result.weight),
                "num_examples": len(self.data[result.client_id][0]),  # the site's, not sent
            }
        )
        return super()._finish(result, delta, noise)


class RecordingHost(_Recorder, ClientHost):
    pass


class RecordingFailingHost(_Recorder, ClientHost):
    """Host 0's clients all fail in the first attempt of round ``fail_round`` (an error
    each, no process death); a marker file in ``marker_dir`` makes it happen once."""

    fail_round = 2
    marker_dir = ""

    def train(self, task, global_weights):
        marker = Path(self.marker_dir) / f"failed-{task.round}-{self.client_ids[0]}"
        self._failing = (
            task.round == self.fail_round and 0 in self.client_ids and not marker.exists()
        )
        try:
            return super().train(task, global_weights)
        finally:
            if self._failing:
                marker.touch()

    def _train_one(self, cid, task, global_weights):
        if self._failing:
            raise RuntimeError("planned failure")
        return super()._train_one(cid, task, global_weights)


def _run(tmp_path, overrides, base=RecordingHost, **attrs):
    record = tmp_path / "records"
    record.mkdir()
    host = type("Rec", (base,), {"record_dir": str(record), **attrs})
    cfg = compose([*UNEQUAL, *overrides])
    summary = run_experiment(cfg, tmp_path / "run", host_class=host)
    final = load_checkpoint(tmp_path / "run" / "checkpoints")["weights"]
    return cfg, summary, final, record


def _load(record, kind):
    """Records of one kind, oldest first (file names carry the round and a clock)."""
    return [pickle.loads(p.read_bytes()) for p in sorted(record.glob(f"{kind}-*.pkl"))]


def _round_inputs(record, round_num):
    """The global weights sent in ``round_num`` and the last update of each client in it."""
    sent = [g["weights"] for g in _load(record, "global") if g["round"] == round_num]
    updates: dict[int, dict] = {}
    for path in sorted(record.glob(f"update-{round_num:03d}-*.pkl")):
        rec = pickle.loads(path.read_bytes())
        updates[rec["client"]] = rec  # a retried round: the later attempt wins
    return sent, [updates[c] for c in sorted(updates)]


def _hand_weighted_mean(updates):
    w = np.array([u["weight"] for u in updates], dtype=np.float64)
    d = np.stack([u["delta"].astype(np.float64) for u in updates])
    return (w[:, None] * d).sum(axis=0) / w.sum()


@pytest.mark.slow
@pytest.mark.parametrize("crypto", [["crypto=none"], SMALL_KEY], ids=["plain", "paillier"])
def test_fedavg_releases_the_example_weighted_mean(ray_2cpus, tmp_path, crypto):
    cfg, summary, final, record = _run(tmp_path, [*crypto, "rounds=1"])
    (w0, *_), updates = _round_inputs(record, 1)
    assert [u["client"] for u in updates] == list(range(6))
    sizes = [u["num_examples"] for u in updates]
    assert len(set(sizes)) > 1, "the split should give clients unequal sizes"
    biggest = max(sizes)
    assert [u["weight"] for u in updates] == pytest.approx([n / biggest for n in sizes])
    expected = (w0 + _hand_weighted_mean(updates)).astype(np.float32)
    if cfg.crypto.name == "none":
        np.testing.assert_allclose(final, expected, rtol=0, atol=1e-6)
    else:
        codec = PackedPaillierCodec(
            key_bits=512,
            num_values=final.size,
            max_summands=6,
            quant_bits=cfg.crypto.quant_bits,
            clip=cfg.crypto.clip,
        )
        total_weight = sum(u["weight"] for u in updates)
        bound = codec.error_bound(len(updates), total_weight)
        assert np.abs(final - expected).max() <= bound + 1e-6
    # The unweighted mean is a different model: the weights matter.
    plain_mean = (w0 + np.mean([u["delta"] for u in updates], axis=0)).astype(np.float32)
    assert np.abs(final - plain_mean).max() > 10 * (np.abs(final - expected).max() + 1e-6)


@pytest.mark.slow
def test_fedadam_releases_one_adam_step_on_the_mean_delta(ray_2cpus, tmp_path):
    cfg, _, final, record = _run(tmp_path, ["crypto=none", "strategy=fedadam", "rounds=2"])
    w = None
    m = v = None
    lr, tau = cfg.strategy.server_lr, cfg.strategy.tau
    b1, b2 = 0.9, 0.99
    for r in (1, 2):
        sent, updates = _round_inputs(record, r)
        if w is not None:  # what the server sent in round 2 is its round-1 result
            np.testing.assert_allclose(sent[0], w, rtol=0, atol=1e-6)
        w = sent[0].astype(np.float64)
        d = _hand_weighted_mean(updates)
        if m is None:
            m, v = np.zeros_like(d), np.full_like(d, tau**2)
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        w = (w + lr * m / (np.sqrt(v) + tau)).astype(np.float32)
    np.testing.assert_allclose(final, w, rtol=0, atol=1e-6)
    # Not plain FedAvg: the Adam step differs from w + lr * mean.
    assert np.abs(final - (sent[0] + lr * d)).max() > 1e-4


@pytest.mark.slow
def test_median_releases_the_coordinate_median(ray_2cpus, tmp_path):
    _, _, final, record = _run(tmp_path, ["crypto=none", "strategy=median", "rounds=1"])
    (w0, *_), updates = _round_inputs(record, 1)
    expected = (w0 + np.median(np.stack([u["delta"] for u in updates]), axis=0)).astype(np.float32)
    np.testing.assert_allclose(final, expected, rtol=0, atol=1e-6)
    assert np.abs(final - (w0 + _hand_weighted_mean(updates))).max() > 1e-4


@pytest.mark.slow
def test_a_round_with_too_few_clients_leaves_the_model_unchanged(ray_2cpus, tmp_path):
    """Host 0's clients fail in round 2: 3 of 6 answer (min 6), the round is retried."""
    _, summary, final, record = _run(
        tmp_path,
        ["crypto=none", "rounds=2", "min_clients_per_round=6"],
        base=RecordingFailingHost,
        marker_dir=str(tmp_path),
    )
    assert summary["rounds_completed"] == 2
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert int(rows[1]["retries"]) == 1 and int(rows[1]["clients_ok"]) == 6
    (w0, *_), round1 = _round_inputs(record, 1)
    after_1 = (w0 + _hand_weighted_mean(round1)).astype(np.float32)
    sent, round2 = _round_inputs(record, 2)
    assert len(sent) == 4, "round 2: two hosts, two attempts"
    for weights in sent:  # the failed attempt changed nothing the retry was sent
        np.testing.assert_array_equal(weights, after_1)
    expected = (after_1 + _hand_weighted_mean(round2)).astype(np.float32)
    np.testing.assert_allclose(final, expected, rtol=0, atol=1e-6)
