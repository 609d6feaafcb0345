"""Placement: fail fast when the cluster lacks resources; silo vs simulation decisions."""

from __future__ import annotations

import pytest

from fedray.errors import ClusterError
from fedray.runtime.cluster import dealer_options, plan_placement
from fedray.runtime.driver import run_experiment
from tests.conftest import compose

TWO_CPUS = {"CPU": 2.0, "memory": 1e10, "node:127.0.0.1": 1.0}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["client.num_gpus=1"], "client.num_gpus=1 but the Ray cluster has 0 GPU"),
        (["client.num_cpus=4"], "client.num_cpus=4 but the Ray cluster has 2 CPU"),
        (["+client.resources.site_a=1"], "client.resources.site_a=1 but the Ray cluster has 0"),
        (["+cluster.sites.0.site_b=1"], "cluster.sites.0 asks for site_b=1"),
        (["cluster.mode=silo"], "cluster.mode=silo needs one actor per client"),
    ],
)
def test_missing_resources_fail_fast(overrides, message):
    with pytest.raises(ClusterError, match=message):
        plan_placement(compose(["crypto=none", *overrides]), TWO_CPUS)


def test_auto_mode_picks_silo_when_clients_fit():
    silo = plan_placement(compose(["client.num_cpus=0.2"]), TWO_CPUS)
    assert silo.mode == "silo" and len(silo.host_clients) == 10
    sim = plan_placement(compose([]), TWO_CPUS)
    assert sim.mode == "simulation" and len(sim.host_clients) == 2
    assert sorted(c for h in sim.host_clients for c in h) == list(range(10))


def test_key_dealer_is_pinned_to_the_node_offering_its_site():
    head, b, c = ("a1" * 28, "b2" * 28, "c3" * 28)  # Ray node ids are 28 bytes of hex
    nodes = [
        {"NodeID": head, "Alive": True, "Resources": {"CPU": 2.0, "node:10.0.0.1": 1.0}},
        {"NodeID": b, "Alive": True, "Resources": {"CPU": 1.0, "site_b": 1.0}},
        {"NodeID": c, "Alive": False, "Resources": {"CPU": 1.0, "site_c": 1.0}},
    ]
    assert dealer_options(compose([]), nodes) == {}
    pinned = dealer_options(compose(["crypto.dealer_site=site_b"]), nodes)
    assert pinned["scheduling_strategy"].node_id == b
    assert pinned["scheduling_strategy"].soft is False
    with pytest.raises(ClusterError, match=r"dealer_site='site_c'.*offered: site_b"):
        dealer_options(compose(["crypto.dealer_site=site_c"]), nodes)  # its node is down


def test_run_fails_before_any_round_when_resources_are_missing(ray_2cpus, tmp_path):
    with pytest.raises(ClusterError, match="GPU"):
        run_experiment(compose(["crypto=none", "client.num_gpus=0.5"]), tmp_path)
    assert not (tmp_path / "metrics.csv").exists()
    with pytest.raises(ClusterError, match="crypto.dealer_site='site_z'"):
        run_experiment(compose(["crypto.dealer_site=site_z"]), tmp_path)
    assert not (tmp_path / "metrics.csv").exists()
