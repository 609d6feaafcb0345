"""Shared fixtures. Ray is started only here, sized small, and always shut down."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedray.runtime.cluster import loopback_node_ip

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tests send traffic to loopback only: every Ray started here gets loopback_node_ip() as
# its node IP (Ray turns 127.0.0.1 into this machine's reachable address), and none of
# them, nor any in a process a test starts, reports usage stats (ray.init() turns them off
# itself, but a `Cluster` head's dashboard would send them).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# One embedded Ray serves every test file that asks for ``ray_2cpus`` (starting one costs
# seconds of the 2-core CI machine per file). A fixture that needs another Ray in this
# process (``two_node_cluster``) shuts it down first; the next file then starts a new one.
_LOCAL_RAY: dict[str, str] = {}
LOCAL_RAY_CPUS = 2


def _release_local_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _LOCAL_RAY.clear()


def _local_ray_is_clean() -> bool:
    """The shared Ray is up and nothing a previous file left behind holds its CPUs."""
    import ray

    if not (ray.is_initialized() and _LOCAL_RAY):
        return False
    if ray.cluster_resources().get("CPU", 0.0) != LOCAL_RAY_CPUS:
        return False
    deadline = time.monotonic() + 10  # actors of the last job release their CPUs lazily
    while ray.available_resources().get("CPU", 0.0) != LOCAL_RAY_CPUS:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="module")
def ray_2cpus():
    """An embedded 2-CPU Ray on loopback, shared by the test files (see above)."""
    import ray

    if not _local_ray_is_clean():
        _release_local_ray()
        ctx = ray.init(
            address="local",  # a new instance, whatever `ray start` left in /tmp/ray
            num_cpus=LOCAL_RAY_CPUS,
            include_dashboard=False,
            _node_ip_address=loopback_node_ip(),
            logging_level="ERROR",
            log_to_driver=False,
        )
        _LOCAL_RAY["address"] = ctx.address_info["gcs_address"]
    yield _LOCAL_RAY["address"]


@pytest.fixture(scope="session", autouse=True)
def _stop_the_shared_ray():
    yield
    if "ray" in sys.modules:
        _release_local_ray()


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head (site_a, 1 GPU declared) and a worker (site_b, 1 GPU declared), this machine."""
    import ray
    from ray.cluster_utils import Cluster

    _release_local_ray()
    ip = loopback_node_ip()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "node_ip_address": ip,
            "num_cpus": 1,
            "num_gpus": 1,
            "resources": {"site_a": 1},
        },
    )
    cluster.add_node(node_ip_address=ip, num_cpus=1, num_gpus=1, resources={"site_b": 1})
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


@pytest.fixture(scope="session")
def threshold_key():
    """A 512-bit threshold key, 3 holders, any 2 decrypt: (public key, the 3 shares)."""
    from fedray.crypto.threshold import deal_threshold_key

    return deal_threshold_key(512, holders=3, threshold=2)


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


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_home(directory: Path) -> dict[str, str]:
    """An environment whose HOME is ``directory``, with a fresh Ray token generated there.

    Ray 2.60's `ray start --head` turns on token authentication and reads the token from
    ~/.ray/auth_token; a test must not depend on (or write to) the user's own HOME.
    """
    env = {**os.environ, "HOME": str(directory), "RAY_AUTH_MODE": "token"}
    subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "get-auth-token", "--generate"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert (directory / ".ray" / "auth_token").exists()
    return env


def start_ray_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start --block ARGS` on loopback, in its own session (for fixtures only).

    Its output goes to ``log`` (see :func:`node_failed`). Its GCS, raylet and workers
    share the session's process group, so :func:`stop_ray_nodes` stops exactly them;
    `ray stop` would stop every Ray here.

    Its node IP is :func:`loopback_node_ip`: a worker's ``--address=HOST:PORT`` and every
    client of the node name that host, not 127.0.0.1 (which Ray turns into this machine's
    reachable address).
    """
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                str(Path(sys.executable).with_name("ray")),
                "start",
                "--block",
                f"--node-ip-address={loopback_node_ip()}",
                "--disable-usage-stats",
                *args,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def node_failed(what: str, node: subprocess.Popen, log: Path) -> None:
    """Fail the test with the node's own last words, not just 'did not come up'."""
    state = f"exited with {node.returncode}" if node.poll() is not None else "still running"
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    pytest.fail(f"{what} ({state}); the last lines of {log}:\n{tail}", pytrace=False)


def stop_ray_nodes(nodes: list[subprocess.Popen], port: int) -> None:
    """Stop nodes from :func:`start_ray_node` (workers first), and forget the cluster.

    Each is asked to stop (SIGINT: `ray start --block` stops its processes) and given a few
    seconds together; what is left of their process groups (only processes they started)
    is then killed. Waiting 15 s a node cost 30 s a cluster: they rarely finish in time."""
    for node in reversed(nodes):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGINT)
    deadline = time.monotonic() + 5
    for node in reversed(nodes):
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)  # whatever is left of the group
        node.wait(timeout=10)
    # `ray stop` would drop Ray's pointer to this (now dead) cluster; killing it does not,
    # and a bare ray.init() elsewhere would then try to join it.
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.exists() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


# The files that start the most Ray jobs, longest first (measured with --durations). Under
# `make test` (pytest-xdist, whole files per worker) starting them first keeps one long
# file from running alone at the end; without xdist the order changes nothing else.
SLOW_FILES_FIRST = (
    "test_secure_rounds.py",
    "test_readme.py",
    "test_runtime.py",
    "test_resume.py",
    "test_privacy_runs.py",
    "test_faults.py",
    "test_custody.py",
    "test_hf.py",
    "test_dp_noise_in_jobs.py",
    "test_aggregation_e2e.py",
    "test_server_view.py",
    "test_data_models.py",
    "test_multinode.py",
    "test_job_submit.py",
    "test_tls.py",
)


RAY_FIXTURES = {"ray_2cpus", "two_node_cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:  # `-m "not needs_ray"` selects the unit tests (make mutants does)
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.needs_ray)
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
