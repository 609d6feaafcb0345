"""Multi-node placement on a real two-node Ray cluster (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from fedray.runtime.driver import run_experiment
from tests.conftest import compose

SMALL_KEY = ["crypto.key_bits=512", "crypto.allow_insecure_keys=true"]


def _node_with(resource: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


def test_clients_pinned_to_sites_run_on_those_nodes(two_node_cluster, tmp_path):
    cfg = compose(
        [
            *SMALL_KEY,
            "num_clients=2",
            "clients_per_round=2",
            "rounds=3",
            "client.num_cpus=0.5",
            "+cluster.sites.0.site_a=1",
            "+cluster.sites.1.site_b=1",
            "crypto.dealer_site=site_b",
        ]
    )
    summary = run_experiment(cfg, tmp_path)
    assert summary["mode"] == "silo"
    assert summary["client_nodes"]["0"] == _node_with("site_a")
    assert summary["client_nodes"]["1"] == _node_with("site_b")
    # The key dealer (private key, obfuscators) ran on site_b's node, not the head's.
    assert summary["key_dealer_node"] == _node_with("site_b") != _node_with("site_a")
    assert len(summary["nodes_used"]) == 2
    # The sites were reserved together in a placement group, released after the run.
    states = [pg["state"] for pg in ray.util.placement_group_table().values()]
    assert states and "CREATED" not in states


def test_fractional_gpus_are_assigned_and_torch_stays_on_cpu(two_node_cluster, tmp_path):
    # 4 clients x 0.5 GPU on 2 declared GPUs: two actors share each GPU.
    cfg = compose(
        [
            "crypto=none",
            "num_clients=4",
            "clients_per_round=4",
            "rounds=2",
            "client.num_cpus=0.25",
            "client.num_gpus=0.5",
            "cluster.mode=silo",
        ]
    )
    summary = run_experiment(cfg, tmp_path)
    clients = json.loads((tmp_path / "clients.json").read_text())
    assert summary["rounds_completed"] == 2
    assert all(len(c["gpu_ids"]) == 1 for c in clients.values())
    per_gpu = {}
    for c in clients.values():
        key = (c["node_id"], c["gpu_ids"][0])
        per_gpu[key] = per_gpu.get(key, 0) + 1
    assert sorted(per_gpu.values()) == [2, 2]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert all(c["device"] == expected for c in clients.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_client_given_a_gpu_trains_on_it(tmp_path):
    cfg = compose(["crypto=none", "rounds=2", "client.num_gpus=0.5", "ray.num_gpus=1"])
    summary = run_experiment(cfg, tmp_path)
    clients = json.loads((tmp_path / "clients.json").read_text())
    assert all(c["device"] == "cuda" for c in clients.values())
    assert summary["final_accuracy"] > 0.8
