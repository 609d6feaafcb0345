"""Encrypted rounds on a real Ray: key custody, accuracy parity with plaintext."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from fedray.runtime.driver import run_experiment
from fedray.runtime.outputs import load_checkpoint
from tests import faulty_hosts as faulty
from tests.conftest import compose

SMALL_KEY = ["crypto.key_bits=512", "crypto.allow_insecure_keys=true"]


@pytest.mark.slow
def test_encrypted_default_job_matches_plaintext_accuracy(ray_2cpus, tmp_path):
    """Acceptance: 2048-bit paillier ends within 0.01 of crypto=none, same seed."""
    enc = run_experiment(compose([]), tmp_path / "paillier")
    plain = run_experiment(compose(["crypto=none"]), tmp_path / "none")
    assert enc["key_bits"] == 2048 and enc["crypto"] == "paillier"
    assert (enc["custody"], enc["threshold"], enc["key_holders"]) == ("threshold", 2, 2)
    assert enc["values_per_ciphertext"] == 102
    assert abs(enc["final_accuracy"] - plain["final_accuracy"]) <= 0.01
    assert plain["final_accuracy"] >= 0.93
    # Encrypted updates are bigger on the wire than float32 deltas: <= 6 B per value of
    # ciphertexts, <= 12 B per value with the exponent shares for the other key holder.
    updates = enc["updates_up"] * enc["num_parameters"]
    assert 4 < enc["bytes_up"] / updates <= 6
    assert (enc["bytes_up"] + enc["bytes_to_key_holders"]) / updates <= 12
    # Each of the 2 hosts sealed one sum of its clients per round, and 2 key holders'
    # share sums opened every round's sum.
    assert enc["updates_up"] == 2 * enc["rounds_completed"]
    assert plain["updates_up"] == 10 * plain["rounds_completed"]
    rows = list(csv.DictReader((tmp_path / "paillier" / "metrics.csv").open()))
    assert {r["decrypted_by"] for r in rows} == {"share_sums"}


def test_every_decryption_path_gives_the_same_model(ray_2cpus, tmp_path):
    """Share sums (the default), partial decryptions (fast path off, or wrong shares),
    per-client sealing, process pools and shared custody (one of its two key holders
    killed mid-run): the very same global model."""
    base = [*SMALL_KEY, "rounds=2", "checkpoint.every=1"]

    def run(name, extra=(), host_class=None):
        summary = run_experiment(compose([*base, *extra]), tmp_path / name, host_class=host_class)
        rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
        weights = load_checkpoint(tmp_path / name / "checkpoints")["weights"]
        return summary, {r["decrypted_by"] for r in rows}, weights

    fast, fast_by, fast_w = run("fast")
    assert fast_by == {"share_sums"}
    assert fast["models_checked"]  # hosts recomputed each model from attested sums
    for name, extra, host_class, expected in [
        ("off", ["crypto.fast_decrypt=false"], None, {"partial_decryption"}),
        # (models checked against attested sums need the share sums: off here)
        (
            "wrong-shares",
            ["cluster.verify_models=false"],
            faulty.WrongSharesHost,
            {"partial_decryption"},
        ),
        # per-client sealing, each host encrypting over a 2-process pool
        ("per-client", ["crypto.host_sum=false", "crypto.processes=2"], None, {"share_sums"}),
        # shared custody, and its last key holder killed as round 2 starts: the other
        # holder decrypts that holder's range of the sum too
        ("shared", ["crypto.custody=shared"], faulty.HolderKillingHost, {"private_key"}),
    ]:
        summary, by, weights = run(name, extra, host_class)
        assert by == expected, name
        # checked or not (no share sums to check with), the very same model
        assert summary["models_checked"] == (name in ("per-client", "shared")), name
        np.testing.assert_array_equal(weights, fast_w)
        assert summary["final_accuracy"] == fast["final_accuracy"]
        if name == "per-client":  # one update per client per round
            assert summary["updates_up"] == 10 * 2
    assert summary["custody"] == "shared" and summary["threshold"] == 1


def test_slow_path_fails_clearly_when_hosts_lost_their_sealed_updates(ray_2cpus, tmp_path):
    """The server keeps no update's bytes: the slow path fetches them from the hosts. If
    those are gone (a host restarted after the fold), the run stops with one error naming
    the round, and the rounds before it stay in metrics.csv."""
    from fedray.errors import ClusterError

    cfg = compose([*SMALL_KEY, "rounds=3", "checkpoint.every=1", "crypto.fast_decrypt=false"])
    with pytest.raises(ClusterError, match=r"round 2: .*no sealed update"):
        run_experiment(cfg, tmp_path / "run", host_class=faulty.ForgetfulHost)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [(r["round"], r["decrypted_by"]) for r in rows] == [("1", "partial_decryption")]
    assert load_checkpoint(tmp_path / "run" / "checkpoints")["round"] == 1


def test_rounds_survive_holders_minus_t_key_holders_dying(ray_2cpus, tmp_path):
    """3 key holders, any 2 decrypt: the last holder is killed as round 2 starts, and the
    run ends with the same weights as without the kill. (Shared custody with a dead
    holder: test_every_decryption_path_gives_the_same_model.)"""
    base = [*SMALL_KEY, "rounds=4", "cluster.num_actors=3", "client.num_cpus=0.5"]
    base += ["checkpoint.every=0"]
    killed = run_experiment(compose(base), tmp_path / "killed", host_class=faulty.HolderKillingHost)
    clean = run_experiment(compose(base), tmp_path / "clean")
    assert (killed["key_holders"], killed["threshold"]) == (3, 2)
    assert killed["rounds_completed"] == clean["rounds_completed"] == 4
    assert killed["client_failures"] == 0
    np.testing.assert_array_equal(
        load_checkpoint(tmp_path / "killed" / "checkpoints")["weights"],
        load_checkpoint(tmp_path / "clean" / "checkpoints")["weights"],
    )


def test_crypto_refuses_sums_of_one_client():
    from fedray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"min_clients_per_round=1 must be >= 2"):
        compose(["min_clients_per_round=1"])
    with pytest.raises(ConfigError, match=r"clients_per_round=1 must be >= 2"):
        compose(["clients_per_round=1", "num_clients=4"])
    with pytest.raises(ConfigError, match=r"crypto.threshold=1 must be >= 2"):
        compose(["crypto.threshold=1"])
    with pytest.raises(ConfigError, match=r"crypto.custody='x'"):
        compose(["crypto.custody=x"])
    assert compose(["crypto=none", "clients_per_round=1", "num_clients=4"]).clients_per_round == 1


def test_hosts_use_a_process_pool_only_where_it_pays():
    from fedray.errors import ConfigError
    from fedray.runtime.client import PARALLEL_MIN_CIPHERTEXTS, crypto_processes

    big = PARALLEL_MIN_CIPHERTEXTS
    assert crypto_processes(compose([]), big - 1) == 1  # small update: in-process
    assert crypto_processes(compose(["client.num_cpus=4"]), big) == 4
    assert crypto_processes(compose(["client.num_cpus=0.5"]), big) == 1
    assert crypto_processes(compose(["crypto.processes=3"]), 10) == 3  # asked for
    with pytest.raises(ConfigError, match=r"crypto.processes=0 must be >= 1, or null"):
        compose(["crypto.processes=0"])


def test_plaintext_only_strategy_refused_with_crypto():
    from fedray.errors import ConfigError

    for name in ("median", "trimmed_mean", "krum"):
        with pytest.raises(ConfigError, match="cannot run with crypto=paillier"):
            compose([f"strategy={name}"])
