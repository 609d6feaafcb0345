"""Shared fixtures. Ray is started only here, sized small, and always shut down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(scope="module")
def ray_2cpus():
    """An embedded 2-CPU Ray shared by a module's tests (on loopback)."""
    import ray

    ctx = ray.init(
        address="local",  # a new instance, whatever `ray start` left in /tmp/ray
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="ERROR",
        log_to_driver=False,
    )
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head (site_a, 1 GPU declared) and a worker (site_b, 1 GPU declared), this machine."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 1, "resources": {"site_a": 1}},
    )
    cluster.add_node(num_cpus=1, num_gpus=1, resources={"site_b": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def small_keypair():
    """A 512-bit key: fast, insecure, for unit tests only."""
    from fedray.crypto.paillier import generate_keypair

    return generate_keypair(512)


def compose(overrides: list[str]):
    """Compose and check a config exactly as the launcher does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fedray.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        raw = hydra_compose(config_name="config", overrides=overrides)
    return to_config(raw)


def run_cli(
    args: list[str], timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m fedray.launch`` as a user would (``env`` replaces the environment)."""
    env = dict(os.environ if env is None else env)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "fedray.launch", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
