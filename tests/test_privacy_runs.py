"""Privacy that holds against the server, end to end: real Ray, real keys, real training.

Noise the server cannot replay, accounting that survives a resume, clipping that is
counted, per-site metadata that stays on the site (issue 13), and round statistics that
give away neither the weight reference nor anything under DP.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle

import tests.test_privacy_runs as this
from fedray.crypto.codec import STATS_FIELDS
from fedray.errors import ConfigError
from fedray.privacy.dp import compute_epsilon, released_inclusion_probability
from fedray.runtime.driver import PRIVACY_LEDGER, run_experiment
from fedray.runtime.outputs import load_checkpoint
from fedray.runtime.server import Server
from tests.conftest import compose

ray.cloudpickle.register_pickle_by_value(this)  # the server subclass below, by value

SMALL_KEY = ["crypto.key_bits=512", "crypto.allow_insecure_keys=true"]


class DecodingServer(Server):
    """Writes the round statistics the server decodes from each opened sum (the same
    ``layout.decode_sum`` of the same plaintexts as its round) into ``record_dir``."""

    record_dir = ""

    def _decrypt(self, acc, layout=None, unmasker=None):
        plaintexts, how = super()._decrypt(acc, layout, unmasker)
        if layout is not None:  # round 0, the feature sums (dataset.standardize=global)
            return plaintexts, how
        _, stats = self.layout.decode_sum(plaintexts, acc.count)
        path = Path(self.record_dir) / f"{self.round:03d}-{uuid.uuid4().hex}.json"
        path.write_text(json.dumps(stats))
        return plaintexts, how


def _decoding_server(directory: Path):
    directory.mkdir(parents=True)
    return type("Decoding", (DecodingServer,), {"record_dir": str(directory)})


def _decoded(directory: Path) -> list[dict[str, float]]:
    """The decoded statistics, one dict per opened sum, in round order."""
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


def _final_weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints")["weights"]


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_same_seed_dp_runs_differ_unless_noise_is_reproducible(ray_2cpus, tmp_path, caplog):
    # Distributed noise under encryption; central noise takes the same path
    # (tests/test_privacy.py::test_central_noise_comes_from_the_os_unless_reproducible).
    over = ["privacy=dp", *SMALL_KEY, "rounds=1", "num_clients=4", "clients_per_round=4", "seed=5"]
    server = _decoding_server(tmp_path / "decoded")
    with caplog.at_level(logging.WARNING, logger="fedray"):
        run_experiment(compose(over), tmp_path / "a", server_class=server)
    # Client-level DP: the hosts send their (uniform) weight and nothing computed from
    # their data; the server already knows who answered. ε covers the noised model only.
    (stats,) = _decoded(tmp_path / "decoded")
    assert stats == {**dict.fromkeys(STATS_FIELDS, 0.0), "weight": 4.0}
    (row,) = _rows(tmp_path / "a")
    assert row["train_loss"] == row["fed_val_loss"] == row["fed_val_accuracy"] == ""
    assert 0 < float(row["test_accuracy"]) <= 1 and float(row["test_loss"]) > 0
    said = [r.getMessage() for r in caplog.records if "not released" in r.getMessage()]
    assert len(said) == 1 and "epsilon would not cover them" in said[0]
    for name, extra in (("b", []), ("c", ["privacy.reproducible_noise=true"])):
        summary = run_experiment(compose([*over, *extra]), tmp_path / name)
    c = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert c["reproducible_noise"] is True
    assert c["epsilon_vs_server"] is None  # no DP against a server that can replay the noise
    assert summary["epsilon_vs_server"] == math.inf
    run_experiment(compose([*over, "privacy.reproducible_noise=true"]), tmp_path / "d")
    # Same seed, same config, all the server holds: the noise still differs.
    assert not np.array_equal(_final_weights(tmp_path / "a"), _final_weights(tmp_path / "b"))
    # Research flag: exact replay.
    np.testing.assert_array_equal(_final_weights(tmp_path / "c"), _final_weights(tmp_path / "d"))
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert a["reproducible_noise"] is False
    assert a["final_fed_val_accuracy"] is None  # not released under DP
    # q = 1 here, so sampling amplifies nothing: both budgets agree.
    assert a["epsilon_vs_server"] == pytest.approx(a["epsilon"], rel=1e-6) and a["epsilon"] > 0
    assert {"epsilon_vs_server", "values_clipped"} <= set(_rows(tmp_path / "a")[0])


def test_resume_counts_rounds_released_after_the_checkpoint(ray_2cpus, tmp_path):
    over = [
        "privacy=dp",
        "crypto=none",
        "num_clients=6",
        "clients_per_round=3",
        "checkpoint.every=2",
    ]
    run_experiment(compose([*over, "rounds=3"]), tmp_path)
    ckpt = tmp_path / "checkpoints"
    # A crash after round 3 released, before its checkpoint: the newest is round 2.
    (ckpt / "latest").write_text("round_00002")
    ledger = json.loads((ckpt / PRIVACY_LEDGER).read_text())
    assert ledger["round"] == 3 and ledger["privacy"]["steps"] == 3
    summary = run_experiment(compose([*over, "rounds=4", "resume=true"]), tmp_path)
    assert summary["rounds_completed"] == 4
    # Round 3 was released twice (fresh noise each time), then round 4: 5 releases.
    rate = released_inclusion_probability(6, 0.5, 2)
    expected = compute_epsilon(rate=rate, noise_multiplier=1.0, steps=5, delta=1e-5)
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert json.loads((ckpt / PRIVACY_LEDGER).read_text())["privacy"]["steps"] == 5
    # Plaintext client-level DP: no training or validation statistics either.
    assert all(r["train_loss"] == r["fed_val_accuracy"] == "" for r in _rows(tmp_path))


def test_clipped_values_are_counted_and_warned_once(ray_2cpus, tmp_path, caplog):
    over = ["crypto=paillier", *SMALL_KEY, "rounds=2", "num_clients=4", "clients_per_round=4"]
    with caplog.at_level(logging.WARNING, logger="fedray"):
        summary = run_experiment(compose([*over, "crypto.clip=0.0001"]), tmp_path / "tight")
    rows = _rows(tmp_path / "tight")
    assert all(int(r["values_clipped"]) > 0 for r in rows)
    assert summary["values_clipped"] == sum(int(r["values_clipped"]) for r in rows)
    assert sum("were clipped" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedray"):
        summary = run_experiment(
            compose([*over, "crypto.clip=100", "rounds=1"]), tmp_path / "loose"
        )
    assert summary["values_clipped"] == 0
    assert not any("were clipped" in r.getMessage() for r in caplog.records)


def _assert_no_weight_reference(decoded: list[dict[str, float]], sizes: list[int]) -> None:
    """What the server decoded in each round of an encrypted job in which every site took
    part: weights and weight-weighted figures. A summed example count beside the summed
    weight gave weight_ref (the largest site's size) exactly, a summed validation count
    nearly: no decoded quantity over the weight sum comes within a factor 10 of it."""
    ref = max(sizes)
    assert len(decoded) == 2  # one opened sum per round
    for stats in decoded:
        assert set(stats) == set(STATS_FIELDS)
        weight = stats["weight"]
        assert weight == pytest.approx(sum(sizes) / ref, abs=1e-6)  # Σ n_k / weight_ref
        assert 0 < stats["val_weight"] <= weight
        for name, value in stats.items():
            assert not ref / 10 < value / weight < 10 * ref, f"{name} reveals weight_ref"


def test_per_site_sizes_and_labels_stay_on_the_site(ray_2cpus, tmp_path, caplog):
    from fedray.data.datasets import load_client_data

    # Encrypted: the codec quantizes n_k / weight_ref * update, so the final weights
    # depend on weight_ref itself, not only on the ratios.
    over = [
        *SMALL_KEY,
        "rounds=2",
        "num_clients=5",
        "clients_per_round=5",
        "dataset.partition=dirichlet",
    ]
    server = _decoding_server(tmp_path / "decoded")
    with caplog.at_level(logging.INFO, logger="fedray"):
        run_experiment(compose(over), tmp_path / "default", server_class=server)
    clients = json.loads((tmp_path / "default" / "clients.json").read_text())
    assert all(set(c) == {"node_id", "device", "gpu_ids"} for c in clients.values())
    assert not any("labels" in r.getMessage() for r in caplog.records)
    cfg = compose(over)
    sizes = [d.num_examples for d in load_client_data(cfg.dataset, list(range(5)), 5, 0).values()]
    assert len(set(sizes)) > 1  # uneven sites: a wrong reference would change the weights
    _assert_no_weight_reference(_decoded(tmp_path / "decoded"), sizes)
    with pytest.raises(ConfigError, match="dataset.weight_ref"):
        run_experiment(compose([*over, f"dataset.weight_ref={max(sizes) - 1}"]), tmp_path / "low")
    # Opt in: sizes and histograms are shared. The public weight_ref given here, the
    # largest count, is what the hosts' chain found: the same final weights.
    shared_over = [*over, "dataset.share_label_counts=true", f"dataset.weight_ref={max(sizes)}"]
    run_experiment(compose(shared_over), tmp_path / "shared")
    np.testing.assert_array_equal(
        _final_weights(tmp_path / "default"), _final_weights(tmp_path / "shared")
    )
    shared = json.loads((tmp_path / "shared" / "clients.json").read_text())
    assert sorted(c["num_examples"] for c in shared.values()) == sorted(sizes)
    assert all(sum(c["labels"]) == c["num_examples"] for c in shared.values())
