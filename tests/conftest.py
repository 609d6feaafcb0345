"""Shared fixtures. Ray is started only here, sized small, and always shut down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(scope="session")
def ray_2cpus():
    """One embedded 2-CPU Ray shared by the session (on loopback)."""
    import ray

    ctx = ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="ERROR",
        log_to_driver=False,
    )
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


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


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m fedray.launch`` as a user would."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "fedray.launch", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
