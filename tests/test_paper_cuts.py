"""Issue #27's paper cuts: no server test set, which cluster was joined, a silent
ray.address, the run directory's log, failed starts, Poisson cohorts.

Every socket here is on loopback: the silent and the wrong-protocol "heads" listen on
loopback_node_ip() (which Ray keeps as given, unlike 127.0.0.1), and nothing dials out.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedray.errors import ClusterError
from fedray.launch import _remove_unused_run_dir
from fedray.runtime import driver
from fedray.runtime.cluster import PROBE_TIMEOUT_S, _check_reachable, loopback_node_ip
from tests.conftest import compose, free_port, run_cli

NAN = float("nan")


def _metrics(**changes) -> dict:
    m = {
        "round": 3,
        "train_loss": 0.25,
        "test_loss": NAN,
        "test_accuracy": NAN,
        "fed_val_loss": 0.2,
        "fed_val_accuracy": 0.93,
        "clients_ok": 5,
        "clients_failed": 0,
        "seconds": 0.5,
    }
    return {**m, **changes}


def _progress_line(overrides: list[str], capsys, **changes) -> str:
    driver._progress(compose(["crypto=none", *overrides]), _metrics(**changes))
    return capsys.readouterr().out.strip()


# -- 1. no server test set -------------------------------------------------------------


def test_progress_line_without_a_server_test_set_shows_the_clients_validation(capsys):
    line = _progress_line(["num_clients=5"], capsys)
    assert "nan" not in line
    assert "| val_acc 0.9300 (clients' validation, start of round; no server test set) |" in line
    # With a server test set the line is as before.
    line = _progress_line(["num_clients=5"], capsys, test_loss=0.1, test_accuracy=0.97)
    assert "| test_loss 0.1000 | test_acc 0.9700 | clients 5/5 |" in line
    assert "val_acc" not in line


def test_progress_line_says_why_there_is_no_figure_at_all(capsys):
    line = _progress_line(["num_clients=5"], capsys, fed_val_accuracy=NAN)
    assert "| no server test set; clients' validation none |" in line
    line = _progress_line(
        ["num_clients=5", "privacy=dp", "privacy.mode=sample"], capsys, fed_val_accuracy=NAN
    )
    assert "| no server test set; clients' validation withheld under DP |" in line
    assert "nan" not in line


def _end_line(summary: dict, tmp_path: Path, capsys) -> str:
    job = SimpleNamespace(
        cfg=compose(["crypto=none"]), t_start=time.perf_counter(), output_dir=tmp_path
    )
    base = {"rounds_completed": 2, "client_nodes": {}, "final_accuracy": NAN}
    driver._write_summary(job, {**base, **summary})
    return capsys.readouterr().out.strip()


def test_end_line_without_a_server_test_set(tmp_path, capsys):
    line = _end_line({"final_fed_val_accuracy": 0.93}, tmp_path, capsys)
    assert "nan" not in line
    assert (
        "done: 2 rounds, no server test set; clients' validation accuracy 0.93 "
        "(of the model they received in round 2)" in line
    )
    line = _end_line({"final_fed_val_accuracy": None}, tmp_path, capsys)
    assert "no server test set (dataset.test_path) and no clients' validation" in line
    line = _end_line({"final_accuracy": 0.97123, "final_fed_val_accuracy": 0.9}, tmp_path, capsys)
    assert "done: 2 rounds, final test accuracy 0.9712," in line


# -- 6. Poisson cohorts ----------------------------------------------------------------

POISSON = ["privacy=dp", "num_clients=10", "clients_per_round=5"]  # client level: Poisson


def test_poisson_cohort_is_shown_against_its_expected_size(capsys):
    line = _progress_line(POISSON, capsys, clients_ok=7)
    assert "| clients 7 (5 expected) |" in line and "7/5" not in line
    line = _progress_line(POISSON, capsys, clients_ok=6, clients_failed=1)
    assert "| clients 6 (5 expected; 1 failed) |" in line


def test_fixed_cohorts_keep_ok_over_asked(capsys):
    fixed = ["num_clients=10", "clients_per_round=5"]
    assert "| clients 4/5 (1 failed) |" in _progress_line(
        fixed, capsys, clients_ok=4, clients_failed=1
    )
    # Sample-level DP (DP-SGD inside each site) draws a fixed-size cohort of sites.
    sample = [*POISSON[:1], "privacy.mode=sample", *fixed]
    assert "| clients 5/5 |" in _progress_line(sample, capsys)


# -- 3. a ray.address that accepts and never answers -----------------------------------


@contextlib.contextmanager
def _listener(answer: bytes | None, close: bool = False):
    """A TCP server on loopback that accepts, then sends ``answer`` (None: nothing) and
    closes at once when ``close``, else holds the connection open without a word."""
    server = socket.socket()
    server.bind((loopback_node_ip(), 0))
    server.listen(8)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            if answer:
                conn.sendall(answer)
            if close:
                conn.close()
            else:
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"{loopback_node_ip()}:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        server.close()


def _refusal(address: str, timeout: float = 1.0) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as err:
        _check_reachable(address, timeout)
    return str(err.value), time.monotonic() - t0


def test_silent_address_is_refused_within_the_timeout():
    with _listener(None) as address:
        message, seconds = _refusal(address)
    assert message.startswith(f"cannot reach the Ray cluster at ray.address='{address}': ")
    assert "accepted the connection but did not answer within 1 s" in message
    assert seconds < 2.5


def test_closing_or_foreign_addresses_are_refused_at_once():
    with _listener(None, close=True) as address:
        message, seconds = _refusal(address, timeout=3)
    assert "closed the connection without answering" in message and seconds < 2
    http1 = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
    with _listener(http1, close=True) as address:
        message, seconds = _refusal(address, timeout=3)
    assert "it answered, but not as a Ray head" in message and seconds < 2
    message, _ = _refusal(f"{loopback_node_ip()}:{free_port()}")
    assert "Connection refused" in message


def test_under_tls_a_silent_address_is_refused_and_a_handshake_passes(tmp_path, monkeypatch):
    import ssl

    from tests.test_tls import _self_signed

    monkeypatch.setenv("RAY_USE_TLS", "1")
    with _listener(None) as address:
        message, seconds = _refusal(address)
    assert "did not answer within 1 s" in message and seconds < 2.5
    # A TLS server that completes the handshake (and says nothing more) passes: Ray
    # itself checks its certificate and speaks gRPC over it.
    cert, key = _self_signed(tmp_path, [loopback_node_ip()])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = socket.socket()
    server.bind((loopback_node_ip(), 0))
    server.listen(1)

    def handshake():
        conn, _ = server.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)  # until the client closes

    thread = threading.Thread(target=handshake, daemon=True)
    thread.start()
    try:
        _check_reachable(f"{loopback_node_ip()}:{server.getsockname()[1]}", timeout=5)
    finally:
        thread.join(timeout=5)
        server.close()


def test_a_live_ray_head_passes_the_probe(ray_2cpus):
    _check_reachable(ray_2cpus, timeout=PROBE_TIMEOUT_S)  # the tests' own GCS


def test_silent_ray_address_is_one_line_within_seconds_and_no_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    # Python lists each import on stderr: the probe must come before torch's seconds.
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    with _listener(None) as address:
        t0 = time.monotonic()
        res = run_cli(
            [f"ray.address={address}", "crypto=none", f"hydra.run.dir={run_dir}"],
            env=env,
            timeout=60,
        )
        seconds = time.monotonic() - t0
    assert res.returncode == 2, res.stderr[-2000:]
    imported = [ln.split("|")[-1].strip() for ln in res.stderr.splitlines() if "|" in ln]
    assert "torch" not in imported and "ray" not in imported
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "|" not in ln]
    assert len(lines) == 1, res.stderr[-2000:]  # none of Ray's retry lines
    assert lines[0].startswith(
        f"fedray: error: cannot reach the Ray cluster at ray.address='{address}': it accepted "
        f"the connection but did not answer within {PROBE_TIMEOUT_S:g} s"
    )
    # Start-up plus the probe (it took 23-25 s, or minutes, inside Ray's retries before).
    assert seconds < PROBE_TIMEOUT_S + 8, seconds
    assert not run_dir.exists()  # 5: a failed start leaves no run folder


# -- 5. a failed start leaves no run folder --------------------------------------------

BAD_CSV = ["dataset=csv", "dataset.path='/nonexistent/site_{client_id}.csv'", "dataset.label=y"]


def test_failed_start_removes_its_run_folder_but_keeps_a_users_folder(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli([*BAD_CSV, "crypto=none", f"hydra.run.dir={run_dir}"])
    assert res.returncode == 2 and res.stderr.startswith("fedray: error: data file not found")
    assert not run_dir.exists()
    # A folder with anything else in it stays as it was (Hydra's record and log added).
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    res = run_cli([*BAD_CSV, "crypto=none", f"hydra.run.dir={kept}"])
    assert res.returncode == 2
    assert (kept / "notes.txt").read_text() == "mine"
    assert (kept / ".hydra" / "config.yaml").is_file()
    assert "fedray: error: data file not found" in (kept / "launch.log").read_text()


def _hydra_run_dir(path: Path, *others: str) -> Path:
    (path / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (path / ".hydra" / name).write_text("x: 1\n")
    (path / "launch.log").write_text("fedray: error: ...\n")
    for other in others:
        target = path / other
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("kept")
    return path


def _hc(cwd: Path, output_subdir: str | None = ".hydra"):
    return SimpleNamespace(
        output_subdir=output_subdir,
        job=SimpleNamespace(name="launch"),
        runtime=SimpleNamespace(cwd=str(cwd)),
    )


@pytest.mark.parametrize(
    "others",
    [("metrics.csv",), ("checkpoints/latest",), ("summary.json",), (".hydra/multirun.yaml",)],
    ids=["metrics", "checkpoint", "summary", "foreign-record"],
)
def test_a_run_folder_with_anything_of_its_own_is_never_removed(tmp_path, others):
    run_dir = _hydra_run_dir(tmp_path / "run", *others)
    assert not _remove_unused_run_dir(run_dir, _hc(tmp_path), None)
    assert all((run_dir / o).exists() for o in others)


def test_only_a_fresh_empty_run_folder_is_removed(tmp_path):
    run_dir = _hydra_run_dir(tmp_path / "a" / "run")
    # A resume into the old run (Hydra told not to write its record): never.
    assert not _remove_unused_run_dir(run_dir, _hc(tmp_path, output_subdir=None), None)
    # The directory the command was started in, or one above it: never.
    assert not _remove_unused_run_dir(run_dir, _hc(run_dir), None)
    assert not _remove_unused_run_dir(run_dir, _hc(run_dir / "sub"), None)
    assert run_dir.exists()
    assert _remove_unused_run_dir(run_dir, _hc(tmp_path), None)
    assert not run_dir.exists() and run_dir.parent.exists()


# -- 2 and 4 and 1, end to end: a csv job joins a running cluster ----------------------


def _sites(directory: Path, count: int) -> str:
    rng = np.random.default_rng(0)
    for site in range(count):
        x = rng.normal(size=(40, 2))
        rows = "".join(f"{a:.4f},{b:.4f},{int(a > 0)}\n" for a, b in x)
        (directory / f"site_{site}.csv").write_text("a,b,y\n" + rows)
    return f"dataset.path='{directory}/site_{{client_id}}.csv'"


def test_joined_cluster_is_named_and_the_run_folder_keeps_the_console(ray_2cpus, tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(
        [
            "dataset=csv",
            _sites(tmp_path, 2),
            "dataset.label=y",  # no dataset.test_path: no server test set
            "num_clients=2",
            "crypto=none",
            "rounds=1",
            f"ray.address={ray_2cpus}",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # no warning of Ray's own code from every host (its restart check, Ray 2.60)
    assert "DeprecationWarning" not in res.stdout + res.stderr, res.stderr[-3000:]
    ip = loopback_node_ip()
    # 2: the address joined and the cluster's nodes, once.
    joined = [ln for ln in res.stdout.splitlines() if "joined the Ray cluster" in ln]
    assert len(joined) == 1, res.stdout
    assert joined[0].endswith(f"joined the Ray cluster at {ray_2cpus}: 1 node: {ip} (head, CPU 2)")
    # 1: no nan; the clients' validation figure, said to be theirs.
    assert "nan" not in res.stdout
    (progress,) = [ln for ln in res.stdout.splitlines() if ln.startswith("[fedray] round ")]
    assert re.search(
        r"\| val_acc \d\.\d{4} \(clients' validation, start of round; no server", progress
    )
    (done,) = [ln for ln in res.stdout.splitlines() if ln.startswith("[fedray] done: ")]
    assert "no server test set; clients' validation accuracy " in done
    # 4: what the console showed is in the run folder's log, in order.
    log = (run_dir / "launch.log").read_text()
    shown = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert shown and all(ln in log for ln in shown), log
    positions = [log.index(ln) for ln in shown]
    assert positions == sorted(positions)
    assert not math.isnan(float(progress.split("val_acc ")[1].split()[0]))


def test_output_json_never_holds_nan(tmp_path):
    """summary.json and friends are strict JSON: a NaN anywhere (a job without a test
    set, a nested list) is written as null, never as the non-JSON token NaN."""
    import json

    import numpy as np

    from fedray.runtime.outputs import write_json

    path = tmp_path / "summary.json"
    nan = float("nan")
    write_json(path, {"final_accuracy": nan, "round_seconds": [1.0, nan], "x": {"y": np.nan}})

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data == {"final_accuracy": None, "round_seconds": [1.0, None], "x": {"y": None}}
