"""Encrypted rounds on a real Ray: key custody, accuracy parity with plaintext."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import ray

from fedray.crypto.paillier import PrivateKey
from fedray.data.datasets import dataset_info
from fedray.runtime.client import client_actor_class
from fedray.runtime.driver import run_experiment
from fedray.runtime.keys import key_dealer_class
from fedray.runtime.outputs import load_checkpoint
from fedray.runtime.server import server_actor_class
from tests import faulty_hosts as faulty
from tests.conftest import compose

SMALL_KEY = ["crypto.key_bits=512", "crypto.allow_insecure_keys=true"]


def test_server_never_holds_the_private_key(ray_2cpus):
    cfg = compose([*SMALL_KEY, "num_clients=4", "clients_per_round=4", "rounds=1"])
    info = dataset_info(cfg.dataset)
    dealer = key_dealer_class().options(name="test-dealer").remote(cfg.crypto.key_bits)
    public = ray.get(dealer.public_key.remote())
    hosts = [
        client_actor_class().remote(cfg, [i, i + 2], info, 40.0, "test-dealer") for i in range(2)
    ]
    assert ray.get([h.ready.remote() for h in hosts]) == [True, True]
    server = server_actor_class().remote(cfg, info, hosts, {0: 0, 2: 0, 1: 1, 3: 1}, public)
    outcome = ray.get(server.run_round.remote())
    assert outcome.metrics["clients_ok"] == 4
    # Nothing reachable from the server object is a private key, nor is its checkpoint.
    assert ray.get(server.holds_private_key.remote()) is False
    state = ray.get(server.state_dict.remote())
    assert not any(isinstance(v, PrivateKey) for v in state.values())
    assert set(state) == {"round", "weights", "strategy", "rng", "noise_rng", "privacy"}
    private = ray.get(dealer.keypair.remote())
    dumped = json.dumps({k: str(v) for k, v in state.items()})
    assert str(private.p) not in dumped and str(private.q) not in dumped
    # Decrypting needs a key holder, and a key holder decrypts sums only.
    with pytest.raises(ray.exceptions.RayTaskError, match="refusing to decrypt"):
        ray.get(hosts[0].decrypt_sum.remote(b"\x01" * public.ciphertext_bytes, 1))
    # The private key's repr never prints its factors.
    assert str(private.p) not in repr(private)
    for actor in [*hosts, server, dealer]:
        ray.kill(actor)


@pytest.mark.slow
def test_encrypted_default_job_matches_plaintext_accuracy(ray_2cpus, tmp_path):
    """Acceptance: 2048-bit paillier ends within 0.01 of crypto=none, same seed."""
    enc = run_experiment(compose([]), tmp_path / "paillier")
    plain = run_experiment(compose(["crypto=none"]), tmp_path / "none")
    assert enc["key_bits"] == 2048 and enc["crypto"] == "paillier"
    assert enc["values_per_ciphertext"] == 102
    assert abs(enc["final_accuracy"] - plain["final_accuracy"]) <= 0.01
    assert plain["final_accuracy"] >= 0.93
    # Encrypted updates are bigger on the wire than float32 deltas, but < 8 B per value.
    per_value = enc["bytes_up"] / (enc["updates_up"] * enc["num_parameters"])
    assert 4 < per_value <= 8
    # Each of the 2 hosts sealed one sum of its clients per round, and the key holder
    # decrypted every round from the obfuscators the hosts deposited.
    assert enc["updates_up"] == 2 * enc["rounds_completed"]
    assert plain["updates_up"] == 10 * plain["rounds_completed"]
    rows = list(csv.DictReader((tmp_path / "paillier" / "metrics.csv").open()))
    assert {r["decrypted_by"] for r in rows} == {"key_holder"}


def test_key_holder_fast_path_and_fallback_give_identical_models(ray_2cpus, tmp_path):
    """Decrypting with deposited obfuscators, or falling back to the private key when they
    are off or wrong, yields the very same global model; per-client sealing agrees too."""
    base = [*SMALL_KEY, "rounds=3", "checkpoint.every=1"]

    def run(name, extra=(), host_class=None):
        summary = run_experiment(compose([*base, *extra]), tmp_path / name, host_class=host_class)
        rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
        weights = load_checkpoint(tmp_path / name / "checkpoints")["weights"]
        return summary, {r["decrypted_by"] for r in rows}, weights

    fast, fast_by, fast_w = run("fast")
    assert fast_by == {"key_holder"}
    for name, extra, host_class in [
        ("off", ["crypto.fast_decrypt=false"], None),
        ("wrong-deposits", [], faulty.WrongDepositHost),
        ("per-client", ["crypto.host_sum=false"], None),
        ("dealer-killed", [], faulty.DealerKillingHost),
        ("2-processes", ["crypto.processes=2"], None),  # each host encrypts with a pool
    ]:
        summary, by, weights = run(name, extra, host_class)
        expected = {
            "per-client": {"key_holder"},
            "2-processes": {"key_holder"},
            "dealer-killed": {"key_holder", "hosts"},  # round 1 fast, then the hosts
        }.get(name, {"hosts"})
        assert by == expected, name
        np.testing.assert_array_equal(weights, fast_w)
        assert summary["final_accuracy"] == fast["final_accuracy"]
        if name == "per-client":  # one update per client per round
            assert summary["updates_up"] == 10 * 3


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
