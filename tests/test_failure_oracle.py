"""No failure oracle: with encryption, a client whose training fails goes into the sum as
a zero update of zero weight, counted inside the encrypted statistics. The server learns
how many of a sum's clients failed (under DP, not even that), never which. The replay of
the curious-server review's NaN oracle, played from inside a real server actor, is in
tests/test_custody.py."""

from __future__ import annotations

import csv

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
def test_a_round_whose_clients_all_failed_opens_their_count_and_moves_no_model(
    ray_2cpus, tmp_path, privacy
):
    """Round 1: every client's training fails. The sum still opens (zero updates of zero
    weight); the server sees the count, not who, and the model does not move. Under DP
    the count is not released, and the zero updates still carry their noise shares, so
    the round's noise does not drop: the model moves by that noise alone."""
    cfg = compose([*SMALL_KEY, "rounds=2", "checkpoint.every=1", f"privacy={privacy}"])
    summary = run_experiment(cfg, tmp_path, host_class=faulty.FailingHost)
    with (tmp_path / "metrics.csv").open() as fh:
        first, second = list(csv.DictReader(fh))
    assert summary["rounds_completed"] == 2
    assert int(second["clients_failed"]) == 0 and int(second["clients_ok"]) >= 2
    after_round_1 = load_checkpoint(tmp_path / "checkpoints" / "round_00001")["weights"]
    initial = _initial_weights(cfg)
    if privacy == "none":
        cohort = cfg.clients_per_round
        assert (int(first["clients_ok"]), int(first["clients_failed"])) == (0, cohort)
        np.testing.assert_array_equal(after_round_1, initial)
    else:  # Poisson cohorts: every client sampled counts as ok, none as failed
        assert int(first["clients_failed"]) == 0 and int(first["clients_ok"]) >= 2
        moved = np.abs(after_round_1 - initial)
        assert np.isfinite(after_round_1).all() and (moved > 0).mean() > 0.9
