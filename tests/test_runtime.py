"""Core runtime: full jobs on a real Ray, reproducibility, simulation mode, FedAvg math."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from fedray.crypto.codec import STATS_FIELDS
from fedray.data.datasets import dataset_info, load_client_data
from fedray.models import ParamView, build_model
from fedray.runtime.client import ClientResult
from fedray.runtime.driver import run_experiment
from fedray.runtime.outputs import load_checkpoint
from fedray.runtime.round_stats import client_statistics
from fedray.runtime.server import Server
from fedray.strategies import weighted_mean
from tests.conftest import compose, run_cli

SMALL_KEY = ["crypto=paillier", "crypto.key_bits=512", "crypto.allow_insecure_keys=true"]
SUMMARY_KEYS = {
    "final_accuracy",
    "rounds_completed",
    "round_seconds",
    "bytes_up",
    "bytes_down",
    "epsilon",
    "delta",
    "num_clients",
    "clients_per_round",
    "crypto",
    "key_bits",
    "values_per_ciphertext",
    "client_failures",
    "epsilon_vs_server",
    "reproducible_noise",
    "values_clipped",
}
METRIC_KEYS = {
    "round",
    "seconds",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "epsilon",
    "clients_ok",
    "clients_failed",
    "bytes_up",
    "epsilon_vs_server",
    "values_clipped",
}


def _tensorboard_scalars(directory):
    """Read scalars back from TensorBoard event files (TFRecord framing, tensorboardX protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


class _Done:
    """A finished remote call (its value), for driving the server's round without Ray."""

    def __init__(self, value):
        self.value = value


class _Transport:
    """Stands in for the ``ray`` module the server's ``_attempt`` is handed."""

    @staticmethod
    def put(obj):
        return obj

    @staticmethod
    def wait(refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]


class _Host:
    """One client per host; ``train.remote`` answers with a fixed delta, weight and
    statistics."""

    def __init__(self, cid, delta, weight, stats=None):
        self.cid, self.delta, self.weight, self.stats = cid, delta, weight, stats
        self.train = self

    def remote(self, task, weights):
        assert task.client_ids == [self.cid]
        result = ClientResult(self.cid, weight=self.weight, delta=self.delta, stats=self.stats)
        return _Done([result])


class _InProcessServer(Server):
    def _fetch(self, ref):
        return ref.value


def test_fedavg_matches_hand_computed_weighted_mean():
    """The server's own round (fold, running weighted sum, division, server step) on three
    fixed updates, against the weighted mean worked out by hand."""
    cfg = compose(["crypto=none", "num_clients=3", "clients_per_round=3"])
    info = dataset_info(cfg.dataset)
    size = ParamView(build_model(cfg.model, info, cfg.seed), cfg.model.trainable).size
    base = np.array([[1.0, -2.0, 0.5], [3.0, 4.0, -0.5], [0.0, 1.0, 2.0]], dtype=np.float32)
    deltas = [np.resize(b, size).astype(np.float32) for b in base]
    weights = [0.25, 0.75, 1.0]
    # (0.25*1 + 0.75*3 + 1*0)/2, (0.25*-2 + 0.75*4 + 1*1)/2, (0.125 - 0.375 + 2)/2
    expected = np.resize(np.array([2.5 / 2, 3.5 / 2, 1.75 / 2]), size)
    hosts = [_Host(i, d, w) for i, (d, w) in enumerate(zip(deltas, weights, strict=True))]
    server = _InProcessServer(cfg, info, hosts, {0: 0, 1: 1, 2: 2})
    w0 = server.weights.copy()
    server.round = 1
    outcome = server._attempt(_Transport)
    assert outcome.metrics["clients_ok"] == 3
    np.testing.assert_allclose(server.weights, w0 + expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(weighted_mean(deltas, weights), expected, rtol=0, atol=1e-6)
    # A weight outside (0, 1] is rejected, and that client left out of the mean.
    hosts[1].weight = 0.0
    server.weights = w0.copy()
    outcome = server._attempt(_Transport)
    assert outcome.metrics["clients_rejected"] == 1
    kept = (0.25 * deltas[0].astype(np.float64) + deltas[2]) / 1.25
    np.testing.assert_allclose(server.weights, w0 + kept, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        weighted_mean(deltas, [1.0, 0.0, 1.0])


@pytest.mark.parametrize(
    "privacy",
    [[], ["privacy=dp"], ["privacy=dp", "privacy.mode=sample"]],
    ids=["no-dp", "client-dp", "sample-dp"],
)
def test_round_metrics_are_weight_weighted_means_and_withheld_under_dp(privacy):
    """train_loss = Σ w_k loss_k / Σ w_k; the validation figures weigh only clients with a
    validation split (val_weight), the training loss only clients whose task reports one
    (train_weight: the fourth reports none, and does not pull the mean to 0; the fifth's
    loss overflowed: it counts, as 0, so the weights do not say which site it was). Under DP the
    clients send their weight alone, and the figures are NaN: what the server's own round
    makes of the clients' statistics."""
    cfg = compose(["crypto=none", "num_clients=5", "clients_per_round=5", *privacy])
    info = dataset_info(cfg.dataset)
    size = ParamView(build_model(cfg.model, info, cfg.seed), cfg.model.trainable).size
    # (weight, train loss, (val loss, val accuracy) or no validation split)
    no_loss = None  # what the client records when train() returns no "loss"
    clients = [
        (0.25, 0.8, (1.0, 0.5)),
        (0.75, 0.4, (0.6, 0.9)),
        (1.0, 0.2, None),
        (0.5, no_loss, None),
        (0.5, float("inf"), None),
    ]
    hosts = []
    for cid, (w, loss, val) in enumerate(clients):
        stats = client_statistics(cfg, w, loss, val)
        assert set(stats) == set(STATS_FIELDS)  # weights and weighted figures, no count
        hosts.append(_Host(cid, np.zeros(size, np.float32), w, stats))
    server = _InProcessServer(cfg, info, hosts, {c: c for c in range(5)})
    server.round = 1
    m = server._attempt(_Transport).metrics
    if privacy:
        sent = [h.stats for h in hosts]
        assert all(v == 0 for s in sent for k, v in s.items() if k != "weight")
        assert [s["weight"] for s in sent] == [0.25, 0.75, 1.0, 0.5, 0.5]
        assert all(math.isnan(m[k]) for k in ("train_loss", "fed_val_loss", "fed_val_accuracy"))
        return
    assert [h.stats["train_weight"] for h in hosts] == [0.25, 0.75, 1.0, 0.0, 0.5]
    assert m["train_loss"] == pytest.approx((0.25 * 0.8 + 0.75 * 0.4 + 0.2 + 0.5 * 0) / 2.5)
    assert m["fed_val_loss"] == pytest.approx((0.25 * 1.0 + 0.75 * 0.6) / 1.0)
    assert m["fed_val_accuracy"] == pytest.approx((0.25 * 0.5 + 0.75 * 0.9) / 1.0)
    for h in hosts:  # a task that reports no loss at all: empty, not 0
        h.stats = client_statistics(cfg, h.weight, no_loss)
    assert math.isnan(server._attempt(_Transport).metrics["train_loss"])


def test_sample_level_dp_counts_updates_the_server_saw_in_a_round_it_did_not_release():
    """Without crypto the server receives each DP-SGD update in the clear, released or
    not: an attempt with too few accepted answers (one weight is refused) still counts
    the clients it saw, and only those; the model is unchanged."""
    from fedray.privacy import build_privacy

    cfg = compose(
        [
            "crypto=none",
            "privacy=dp",
            "privacy.mode=sample",
            "num_clients=3",
            "clients_per_round=3",
            "min_clients_per_round=3",
        ]
    )
    info = dataset_info(cfg.dataset)
    size = ParamView(build_model(cfg.model, info, cfg.seed), cfg.model.trainable).size
    hosts = [_Host(c, np.full(size, 0.1, np.float32), w) for c, w in enumerate([0.5, 0.0, 1.0])]
    privacy = build_privacy(cfg, {0: 40, 1: 40, 2: 80})
    server = _InProcessServer(cfg, info, hosts, {0: 0, 1: 1, 2: 2}, privacy=privacy)
    w0, server.round = server.weights.copy(), 1
    outcome = server._attempt(_Transport)
    assert outcome.metrics["clients_ok"] == 2 and outcome.metrics["clients_rejected"] == 1
    assert privacy.participation == {0: 1, 2: 1}
    np.testing.assert_array_equal(server.weights, w0)


@pytest.mark.parametrize("privacy", [[], ["privacy=dp", "privacy.noise_multiplier=1.0"]])
def test_progress_line_says_withheld_for_a_train_loss_dp_keeps_back(privacy, capsys):
    """The round's progress line shows the training loss, or "withheld" where DP keeps it
    back (NaN in metrics.csv), never "nan"."""
    from fedray.runtime.driver import _progress

    cfg = compose(["crypto=none", "progress=true", *privacy])
    loss = float("nan") if privacy else 0.1234
    m = dict(
        round=1,
        train_loss=loss,
        test_loss=0.5,
        test_accuracy=0.75,
        clients_ok=5,
        clients_failed=0,
        seconds=0.1,
        epsilon=None,
    )
    _progress(cfg, m)
    line = capsys.readouterr().out
    assert "nan" not in line
    assert ("train_loss withheld |" if privacy else "train_loss 0.1234 |") in line


def test_cli_full_job_writes_contract_outputs(ray_2cpus, tmp_path):
    out = tmp_path / "run"
    res = run_cli(
        [
            "crypto=none",
            "rounds=4",
            "num_clients=6",
            "clients_per_round=4",
            f"ray.address={ray_2cpus}",
            f"hydra.run.dir={out}",
        ]
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "round   4/4" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["rounds_completed"] == 4
    assert len(summary["round_seconds"]) == 4
    assert summary["num_clients"] == 6 and summary["clients_per_round"] == 4
    assert summary["crypto"] == "none" and summary["epsilon"] is None
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    assert summary["final_accuracy"] > 0.8
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert set(rows[0]) >= METRIC_KEYS
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4]
    assert all(int(r["clients_ok"]) == 4 for r in rows)
    assert (out / "checkpoints" / "latest").exists()
    scalars = _tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["test_accuracy"]] == [1, 2, 3, 4]
    accuracies = [float(r["test_accuracy"]) for r in rows]
    assert [v for _, v in scalars["test_accuracy"]] == pytest.approx(accuracies, abs=1e-5)
    clients = json.loads((out / "clients.json").read_text())
    assert set(clients) == {str(i) for i in range(6)}
    # Placement only: sizes and label histograms stay on the sites (issue 13).
    assert all(set(c) == {"node_id", "device", "gpu_ids"} for c in clients.values())


def test_same_seed_same_final_weights(ray_2cpus, tmp_path):
    over = ["crypto=none", "rounds=3", "num_clients=8", "clients_per_round=5", "seed=3"]
    cfg = compose([*over, "checkpoint.every=1"])
    run_experiment(cfg, tmp_path / "a")
    run_experiment(cfg, tmp_path / "b")
    wa = load_checkpoint(tmp_path / "a" / "checkpoints")["weights"]
    wb = load_checkpoint(tmp_path / "b" / "checkpoints")["weights"]
    np.testing.assert_array_equal(wa, wb)
    # Not vacuous: training moved the model after round 1.
    w1 = load_checkpoint(tmp_path / "a" / "checkpoints" / "round_00001")["weights"]
    assert not np.array_equal(wa, w1)


def test_simulation_mode_hosts_many_clients_per_actor(ray_2cpus, tmp_path):
    cfg = compose(
        [
            "dataset=synthetic",
            "crypto=none",
            "num_clients=60",
            "clients_per_round=12",
            "rounds=3",
            "dataset.samples_per_client=40",
        ]
    )
    summary = run_experiment(cfg, tmp_path)
    assert summary["mode"] == "simulation"
    assert summary["num_actors"] == 2
    assert summary["rounds_completed"] == 3
    assert summary["client_failures"] == 0
    # 60 clients served by 2 actor processes (client_nodes covers every client).
    assert len(summary["client_nodes"]) == 60
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert all(int(r["clients_ok"]) == 12 for r in rows)


def test_target_accuracy_stops_early(ray_2cpus, tmp_path):
    cfg = compose(["crypto=none", "rounds=30", "target_accuracy=0.9"])
    summary = run_experiment(cfg, tmp_path)
    assert summary["stopped_early"] is True
    assert summary["rounds_completed"] < 30
    assert summary["final_accuracy"] >= 0.9


@pytest.mark.parametrize("crypto", [["crypto=none"], SMALL_KEY], ids=["plain", "paillier"])
def test_federated_eval_reported(ray_2cpus, tmp_path, crypto):
    """Round 3's federated validation figures are the round-2 model's loss and accuracy on
    every client's held-out split, averaged with the FedAvg weights (w_k = n_k / weight_ref:
    Σ w_k acc_k / Σ w_k), recomputed here from the checkpoint and the data. No example
    count travels: the clients send weights and weight-weighted figures only (with crypto,
    inside the encrypted aggregate)."""
    cfg = compose([*crypto, "rounds=3", "checkpoint.every=1", "dataset.partition=dirichlet"])
    summary = run_experiment(cfg, tmp_path)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    model_2 = load_checkpoint(tmp_path / "checkpoints" / "round_00002")["weights"]
    model = build_model(cfg.model, dataset_info(cfg.dataset), cfg.seed)
    ParamView(model, cfg.model.trainable).set(model_2)
    data = load_client_data(cfg.dataset, list(range(cfg.num_clients)), cfg.num_clients, cfg.seed)
    ref = max(d.num_examples for d in data.values())
    weights, losses, accuracies = [], [], []
    with torch.no_grad():
        for d in data.values():
            if not len(d.y_val):
                continue  # no validation split: its weight counts for neither figure
            logits = model(torch.as_tensor(d.x_val))
            y = torch.as_tensor(d.y_val)
            weights.append(d.num_examples / ref)
            accuracies.append(float((logits.argmax(1) == y).float().mean()))
            losses.append(float(torch.nn.functional.cross_entropy(logits, y)))
    w = np.array(weights)
    accuracy = float(np.dot(w, accuracies) / w.sum())
    # The old figure, weighted by validation counts, differs here: the test tells them apart.
    val_sizes = [len(d.y_val) for d in data.values() if len(d.y_val)]
    assert abs(accuracy - np.dot(val_sizes, accuracies) / sum(val_sizes)) > 1e-5
    assert float(rows[2]["fed_val_accuracy"]) == pytest.approx(accuracy, abs=1e-6)
    assert float(rows[2]["fed_val_loss"]) == pytest.approx(np.dot(w, losses) / w.sum(), rel=1e-4)
    assert summary["final_fed_val_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert all(0 < float(r["train_loss"]) < 5 for r in rows)  # released without DP


def test_hydra_multirun_gives_one_run_dir_per_combination(ray_2cpus, tmp_path):
    res = run_cli(
        [
            "-m",
            "num_clients=6",
            "crypto=none,paillier",
            "crypto.key_bits=512",
            "crypto.allow_insecure_keys=true",
            "rounds=1",
            f"ray.address={ray_2cpus}",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    combos = {(s["num_clients"], s["crypto"]) for s in summaries}
    assert combos == {(6, "none"), (6, "paillier")}
    assert all(s["rounds_completed"] == 1 for s in summaries)


def test_stratified_cohorts_balance_actors_and_keep_inclusion_probability():
    from fedray.runtime.server import sample_cohort_stratified

    rng = np.random.default_rng(0)
    groups = [list(range(0, 500)), list(range(500, 1000)), list(range(1000, 1300))]
    counts = np.zeros(1300)
    for _ in range(3000):
        cohort = sample_cohort_stratified(rng, groups, 100)
        assert len(cohort) == len(set(cohort)) == 100
        per_group = [sum(c in range(g[0], g[-1] + 1) for c in cohort) for g in groups]
        assert per_group[0] in (38, 39) and per_group[1] in (38, 39) and per_group[2] in (23, 24)
        counts[cohort] += 1
    # every client joins with probability 100 / 1300 (binomial std ~ 0.0049 over 3000 draws)
    assert np.abs(counts / 3000 - 100 / 1300).max() < 0.025
    # Each group as a whole: its clients join in proportion to its size. The odd seat goes
    # to a group by a random draw; always giving it to the largest remainder would put
    # group 2 at 23 seats a round, 16 binomial standard deviations below 3000 * 23.08.
    for g in groups:
        share = 100 * len(g) / 1300
        frac = share - np.floor(share)
        std = np.sqrt(3000 * frac * (1 - frac))
        assert abs(counts[g].sum() - 3000 * share) < 4 * std


@pytest.mark.slow
def test_an_embedded_multirun_starts_ray_once_per_setting_and_results_are_unchanged(tmp_path):
    """Issue #25: a sweep's jobs reuse the embedded Ray the first one started (Ray's start
    is paid once), a job asking for another embedded Ray (here ray.num_cpus) gets a new
    one, and a job on the reused Ray ends exactly as on a fresh one (same seed, same
    final weights)."""
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    res = run_cli(
        [
            "-m",
            "crypto=none",
            "rounds=1",
            "num_clients=6",
            "seed=3",
            "ray.num_cpus=1,1,2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    logs = [(tmp_path / f"sweep/{i}/launch.log").read_text() for i in range(3)]
    reused = ["reusing the embedded Ray of the sweep's earlier jobs" in log for log in logs]
    assert reused == [False, True, False], logs
    weights = [np.load(tmp_path / f"sweep/{i}/checkpoints/round_00001/arrays.npz") for i in (0, 1)]
    assert set(weights[0].files) == set(weights[1].files)
    for name in weights[0].files:
        assert np.array_equal(weights[0][name], weights[1][name]), name
