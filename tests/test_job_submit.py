"""`ray job submit` of a fedray job, the first job on a fresh two-node `ray start` cluster."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedray.runtime.cluster import loopback_node_ip
from tests.conftest import free_port, isolated_home, node_failed, start_ray_node, stop_ray_nodes

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def fresh_cluster(tmp_path_factory):
    """A head (site_a, with the job server) and a worker (site_b), 1 CPU each, on loopback.

    Each node runs as `ray start --block` in its own session (conftest.start_ray_node),
    in a HOME of its own with a fresh token (Ray 2.60's `ray start --head` turns on
    token auth).
    """
    directory = tmp_path_factory.mktemp("job_submit")
    env = isolated_home(directory)
    # A job's entrypoint runs with the head node's environment: its `python` is ours.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    head_log, worker_log = directory / "head.log", directory / "worker.log"
    # A temp dir per node, short (Ray's socket paths must fit 107 bytes): two nodes on one
    # machine would otherwise share the head's session folder, and the worker's runtime-env
    # agent then unpacked the job's working_dir under the running driver, which failed to
    # import a module it imported late (ModuleNotFoundError, one run in two or three).
    temp = Path(tempfile.mkdtemp(prefix="frjs", dir="/tmp"))
    port, dash = free_port(), free_port()
    ip = loopback_node_ip()  # the nodes' IP: GCS, job server and every client use it
    head = start_ray_node(
        [
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            '--resources={"site_a": 1}',
            "--include-dashboard=true",
            f"--dashboard-host={ip}",
            f"--dashboard-port={dash}",
            # Not the default 52365: another Ray here may hold it, and the head's job
            # server then has no agent ("No available agent to submit job").
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={temp / 'a'}",
        ],
        env,
        head_log,
    )
    nodes = [head]
    try:
        deadline = time.monotonic() + 90
        while True:  # the job server answers once the head is up
            try:
                socket.create_connection((ip, dash), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    node_failed("the Ray head did not come up within 90 s", head, head_log)
                time.sleep(0.5)
        worker = start_ray_node(
            [
                f"--address={ip}:{port}",
                "--num-cpus=1",
                '--resources={"site_b": 1}',
                f"--dashboard-agent-listen-port={free_port()}",
                f"--temp-dir={temp / 'b'}",
            ],
            env,
            worker_log,
        )
        nodes.append(worker)
        while (
            "site_b"
            not in subprocess.run(
                [RAY, "status", f"--address={ip}:{port}"],
                env=env,
                capture_output=True,
                text=True,
            ).stdout
        ):
            if time.monotonic() > deadline:
                node_failed("the worker node did not join within 90 s", worker, worker_log)
            time.sleep(1)
        yield f"http://{ip}:{dash}", env
    finally:
        stop_ray_nodes(nodes, port)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_first_job_submitted_to_a_fresh_cluster_runs_on_both_nodes(fresh_cluster, tmp_path):
    """The path of jobs/local_cluster.sh: the first job of a new cluster used to lose its
    driver to oneMKL ('Cannot load libtorch_cpu.so') when torch was imported late."""
    address, env = fresh_cluster
    run_dir = tmp_path / "run"
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "-m",
        "fedray.launch",
        "cluster=remote",
        "rounds=2",
        "crypto.key_bits=512",
        "crypto.allow_insecure_keys=true",
        f"hydra.run.dir={run_dir}",
    ]
    deadline = time.monotonic() + 90
    while True:
        proc = subprocess.run(
            submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        # The head's job agent registers a little after its job server answers; until
        # then a submission is refused ("No available agent", or a connection error on a
        # loaded machine) and nothing started, so retrying is safe until Ray says the job
        # was submitted.
        accepted = "submitted successfully" in proc.stdout + proc.stderr
        if accepted or proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert len(summary["nodes_used"]) == 2
