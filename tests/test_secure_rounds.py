"""Encrypted rounds on a real Ray: key custody, accuracy parity with plaintext."""

from __future__ import annotations

import json

import pytest
import ray

from fedray.crypto.paillier import PrivateKey
from fedray.data.datasets import dataset_info
from fedray.runtime.client import client_actor_class
from fedray.runtime.driver import run_experiment
from fedray.runtime.keys import key_dealer_class
from fedray.runtime.server import server_actor_class
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
    per_value = enc["bytes_up"] / (enc["rounds_completed"] * 10 * enc["num_parameters"])
    assert 4 < per_value <= 8


def test_plaintext_only_strategy_refused_with_crypto():
    from fedray.errors import ConfigError

    for name in ("median", "trimmed_mean", "krum"):
        with pytest.raises(ConfigError, match="cannot run with crypto=paillier"):
            compose([f"strategy={name}"])
