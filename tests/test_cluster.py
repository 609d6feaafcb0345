"""Placement: fail fast when the cluster lacks resources; silo vs simulation decisions."""

from __future__ import annotations

import pytest

from fedray.errors import ClusterError
from fedray.runtime.cluster import plan_placement
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


def test_run_fails_before_any_round_when_resources_are_missing(ray_2cpus, tmp_path):
    with pytest.raises(ClusterError, match="GPU"):
        run_experiment(compose(["crypto=none", "client.num_gpus=0.5"]), tmp_path)
    assert not (tmp_path / "metrics.csv").exists()
