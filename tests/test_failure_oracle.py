"""No failure oracle: with encryption, a client whose training fails goes into the sum as
a zero update of zero weight, counted inside the encrypted statistics. The server learns
how many of a sum's clients failed (under DP, not even that), never which. The replay of
the curious-server review's NaN oracle, played from inside a real server actor, is in
tests/test_custody.py."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import ray.cloudpickle

import tests.faulty_hosts as faulty
from fedray.data.datasets import dataset_info
from fedray.models import build_model
from fedray.models.factory import ParamView
from fedray.runtime.driver import run_experiment
from fedray.runtime.outputs import load_checkpoint
from tests.conftest import compose

ray.cloudpickle.register_pickle_by_value(faulty)

SMALL_KEY = ["crypto=paillier", "crypto.key_bits=512", "crypto.allow_insecure_keys=true"]


def _initial_weights(cfg) -> np.ndarray:
    return ParamView(build_model(cfg.model, dataset_info(cfg.dataset), cfg.seed)).get()


@pytest.mark.parametrize("privacy", ["none", "dp"])
def test_a_round_whose_clients_all_failed_opens_only_their_count(ray_2cpus, tmp_path, privacy):
    """Round 1: every client's training fails. The sum still opens: zero updates, each
    with the weight its client would have had, so the model does not move (FedAvg) and the
    summed weight is that of round 2, where every client trains. The server sees how many
    failed, not who. Under DP it sees nothing of it: the count is not released, the
    summed weight is the cohort's, and the zero updates carry their noise shares, so the
    model moves by that noise alone."""
    record = tmp_path / "opened.jsonl"
    server = type("Opened", (faulty.OpenedStatsServer,), {"record": str(record)})
    # Under DP the hosts also pad their answers: a call whose clients all failed comes
    # no sooner than one whose clients trained, and says nothing of how long it took.
    pad = ["federation.answer_after_s=2"] if privacy == "dp" else []
    cfg = compose([*SMALL_KEY, "rounds=2", "checkpoint.every=1", f"privacy={privacy}", *pad])
    summary = run_experiment(
        cfg, tmp_path / "run", host_class=faulty.FailingHost, server_class=server
    )
    with (tmp_path / "run" / "metrics.csv").open() as fh:
        first, second = list(csv.DictReader(fh))
    opened = [json.loads(line) for line in record.read_text().splitlines()]
    assert summary["rounds_completed"] == 2 and [o["round"] for o in opened] == [1, 2]
    assert int(second["clients_failed"]) == 0 and int(second["clients_ok"]) >= 2
    after_round_1 = load_checkpoint(tmp_path / "run" / "checkpoints" / "round_00001")["weights"]
    initial = _initial_weights(cfg)
    if privacy == "none":
        cohort = cfg.clients_per_round
        assert (int(first["clients_ok"]), int(first["clients_failed"])) == (0, cohort)
        assert opened[0]["clients_failed"] == cohort and opened[1]["clients_failed"] == 0
        # the same clients both rounds (all 10): the same summed weights, so none of
        # them says which clients failed; their losses count as 0 (as a non-finite one)
        for k in ("weight", "train_weight", "val_weight"):
            assert opened[0][k] == pytest.approx(opened[1][k], abs=1e-6), k
        assert opened[0]["train_weight"] > 0 and opened[0]["val_weight"] > 0
        assert opened[0]["weighted_train_loss"] == 0 < opened[1]["weighted_train_loss"]
        np.testing.assert_array_equal(after_round_1, initial)
    else:  # Poisson cohorts: every client sampled counts as ok, none as failed
        assert int(first["clients_failed"]) == 0 and int(first["clients_ok"]) >= 2
        for o in opened:  # uniform weights: the summed weight is the cohort's size
            assert o["clients_failed"] == 0
            assert o["weight"] == pytest.approx(o["clients"], abs=1e-6)
        moved = np.abs(after_round_1 - initial)
        assert np.isfinite(after_round_1).all() and (moved > 0).mean() > 0.9
        for row in (first, second):  # padded: no answer before 2 s, no timing sent
            assert float(row["wait_seconds"]) >= 2.0
            assert float(row["train_seconds"]) == float(row["encrypt_seconds"]) == 0.0


def test_answer_padding_must_fit_the_round_deadline():
    from fedray.errors import ConfigError

    with pytest.raises(ConfigError, match="federation.answer_after_s=5 must be below"):
        compose(["federation.answer_after_s=5", "round_timeout_s=5"])


def test_a_crafted_failure_count_is_clamped_and_ignored_under_dp():
    """A colluding client can put any number in its ``clients_failed`` slot: the server
    reports at most the sum's clients, and under DP (where honest hosts send 0) nothing."""
    from fedray.runtime.server import Server

    server = Server.__new__(Server)
    server.codec, server.privacy, server.round = object(), None, 3
    assert server._failed_in_sum({"clients_failed": 2.0}, 5) == 2
    assert server._failed_in_sum({"clients_failed": 9.0}, 5) == 5
    server.privacy = object()
    assert server._failed_in_sum({"clients_failed": 2.0}, 5) == 0
