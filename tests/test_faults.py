"""Faults: dead actors, stragglers, bad updates, interrupted drivers, bad input."""

from __future__ import annotations

import csv
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray.cloudpickle

import tests.faulty_hosts as faulty
from fedray.errors import DataError
from fedray.runtime.driver import run_experiment
from fedray.runtime.outputs import load_checkpoint
from tests.conftest import ROOT, compose, run_cli

# Ray workers import nothing from tests/: ship these classes by value.
ray.cloudpickle.register_pickle_by_value(faulty)

SMALL_KEY = ["crypto=paillier", "crypto.key_bits=512", "crypto.allow_insecure_keys=true"]


def _rows(path):
    with (path / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_killing_a_client_actor_each_round_does_not_stop_the_run(ray_2cpus, tmp_path):
    """Acceptance: a random client actor dies mid-round in each of 5 rounds of a 10-client run.

    Encrypted: a restarted host must be given the key and holders again. (A restarted
    plaintext host serves its clients again in test_round_with_too_few_clients_is_retried.)
    """
    crypto = SMALL_KEY
    rng = np.random.default_rng(11)
    plan = frozenset((r, int(rng.choice([0, 5]))) for r in range(1, 6))  # 2 hosts: ids 0-4, 5-9
    crashing = type(
        "CrashEachRound", (faulty.CrashingHost,), {"plan": plan, "marker_dir": str(tmp_path)}
    )
    cfg = compose([*crypto, "checkpoint.every=0"])
    faulty_run = run_experiment(cfg, tmp_path / "faulty", host_class=crashing)
    clean_run = run_experiment(cfg, tmp_path / "clean")
    rows = _rows(tmp_path / "faulty")
    assert faulty_run["rounds_completed"] == clean_run["rounds_completed"] == 20
    assert [int(r["clients_failed"]) >= 5 for r in rows[:5]] == [True] * 5
    assert all(int(r["clients_ok"]) >= 5 for r in rows)
    # The dead host was restarted and its clients are served again afterwards.
    assert all(int(r["clients_ok"]) == 10 for r in rows[6:])
    assert abs(faulty_run["final_accuracy"] - clean_run["final_accuracy"]) <= 0.02


def test_stragglers_are_dropped_at_the_deadline(ray_2cpus, tmp_path):
    # The deadline leaves a loaded 2-core CI machine room for round 1's first training
    # (1.5 s dropped a healthy host there once); the straggler sleeps twice as long.
    cfg = compose(["crypto=none", "rounds=3", "round_timeout_s=4", "checkpoint.every=0"])
    summary = run_experiment(cfg, tmp_path, host_class=faulty.SlowHost)
    rows = _rows(tmp_path)
    assert summary["rounds_completed"] == 3
    assert int(rows[1]["clients_late"]) >= 1
    assert int(rows[1]["clients_ok"]) >= 5
    assert int(rows[0]["clients_late"]) == 0


@pytest.mark.parametrize(
    ("overrides", "rejected"),
    [
        (["crypto=none", "privacy=dp"], 2),
        ([*SMALL_KEY, "crypto.host_sum=false"], 2),
        (SMALL_KEY, 5),
    ],
    ids=["plaintext-dp", "paillier-per-client", "paillier-host-sum"],
)
def test_bad_updates_are_rejected_and_the_round_goes_on(ray_2cpus, tmp_path, overrides, rejected):
    cfg = compose([*overrides, "rounds=5", "checkpoint.every=0"])
    summary = run_experiment(cfg, tmp_path, host_class=faulty.CorruptingHost)
    rows = _rows(tmp_path)
    assert summary["rounds_completed"] == 5
    # Each of the 2 hosts corrupts its first client's update, a different way each round;
    # with host sums, host 0's sum of its 5 clients is corrupted.
    assert [int(r["clients_rejected"]) for r in rows] == [rejected] * 5
    assert all(int(r["clients_ok"]) == 10 - rejected for r in rows)
    assert np.isfinite(load_checkpoint(tmp_path / "checkpoints")["weights"]).all()
    assert summary["final_accuracy"] > 0.5


def test_killed_driver_resumes_to_the_same_final_weights(ray_2cpus, tmp_path):
    """Acceptance: interrupted at round k and resumed == uninterrupted, same seed."""
    args = [
        "dataset=synthetic",
        "num_clients=20",
        "clients_per_round=10",
        "rounds=8",
        "crypto=none",
        "checkpoint.every=1",
        f"ray.address={ray_2cpus}",
    ]
    full = run_cli([*args, f"hydra.run.dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-2000:]

    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedray.launch", *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "round_00003":
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run
    proc.wait()
    stopped_at = int(latest.read_text().strip().split("_")[1])
    assert 3 <= stopped_at < 8, "the driver was not interrupted mid-run"

    resumed = run_cli([*args, f"hydra.run.dir={run_dir}", "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(tmp_path / "full" / "checkpoints")
    b = load_checkpoint(run_dir / "checkpoints")
    assert a["round"] == b["round"] == 8
    np.testing.assert_array_equal(a["weights"], b["weights"])
    assert [int(r["round"]) for r in _rows(run_dir)] == list(range(1, 9))


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    res = run_cli(["resume=true", f"hydra.run.dir={tmp_path}"], timeout=120)
    assert res.returncode == 2
    assert "resume=true but there is no checkpoint" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def _write_site(path, rows, header="f1,f2,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "data file not found"),
        (("f1,f2,diagnosis", ["1,2,0", "3,4,1"]), "no label column 'label'"),
        (("f1,f2,label", ["1,2,0", "3,x,1"]), "row 3, column 'f2': 'x' is not a number"),
        (("f1,f2,label", ["1,2,0", "3,4"]), "row 3 has 2 cells"),
    ],
    ids=["missing", "no-label", "non-numeric", "ragged"],
)
def test_bad_csv_is_one_clear_error(ray_2cpus, tmp_path, content, message):
    for cid in range(3):
        path = tmp_path / f"site_{cid}.csv"
        if content is not None and cid == 1:
            header, rows = content
            _write_site(path, rows, header)
        elif content is not None or cid != 1:
            _write_site(path, [f"{i},{i % 3},{i % 2}" for i in range(12)])
    cfg = compose(
        [
            "dataset=csv",
            f"dataset.path='{tmp_path}/site_{{client_id}}.csv'",
            "dataset.label=label",
            "num_clients=3",
            "clients_per_round=3",
            "crypto=none",
            "rounds=1",
        ]
    )
    with pytest.raises(DataError, match=message) as err:
        run_experiment(cfg, tmp_path / "out")
    assert "site_1.csv" in str(err.value) and "\n" not in str(err.value)


def test_unreachable_ray_address_is_one_clear_error():
    # Port 1 on loopback: nothing listens there.
    res = run_cli(["ray.address=127.0.0.1:1", "crypto=none"], timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1
    assert lines[0].startswith(
        "fedray: error: cannot reach the Ray cluster at ray.address='127.0.0.1:1'"
    )


def _crash_in(round_num: int, marker_dir):
    return type(
        "CrashOnce",
        (faulty.CrashingHost,),
        {"plan": frozenset({(round_num, 0)}), "marker_dir": str(marker_dir)},
    )


def _attempt_recorder(tmp_path):
    """A server class that records each attempt (see faulty.AttemptRecordingServer), and
    the folder it records into."""
    record = tmp_path / "attempts"
    record.mkdir()
    server = type("Rec", (faulty.AttemptRecordingServer,), {"record_dir": str(record)})
    return record, server


def _records(record, kind):
    return [pickle.loads(p.read_bytes()) for p in sorted(record.glob(f"*-{kind}.pkl"))]


def _fedavg_step(weights, received):
    """FedAvg by hand (server_lr 1): weights + the weight-weighted mean of the deltas."""
    w = np.array([weight for _, _, weight in received], dtype=np.float64)
    d = np.stack([delta.astype(np.float64) for _, delta, _ in received])
    return (weights + (w[:, None] * d).sum(axis=0) / w.sum()).astype(np.float32)


def _clients(attempt):
    return sorted(cid for cid, _, _ in attempt["received"])


def test_round_with_too_few_clients_is_retried(ray_2cpus, tmp_path):
    """Host 0 (clients 0-4) dies mid-call in round 2: 5 of 10 answer (min 10), so that
    attempt releases nothing and changes no weight; the retry's released model is FedAvg
    by hand over the 10 updates of the retry alone."""
    cfg = compose(["crypto=none", "rounds=3", "min_clients_per_round=10", "checkpoint.every=0"])
    record, server = _attempt_recorder(tmp_path)
    summary = run_experiment(cfg, tmp_path, host_class=_crash_in(2, tmp_path), server_class=server)
    rows = _rows(tmp_path)
    assert summary["rounds_completed"] == 3
    assert int(rows[1]["retries"]) >= 1 and int(rows[1]["clients_ok"]) == 10
    attempts = _records(record, "attempt")
    rounds = [a["round"] for a in attempts]
    assert rounds[0] == 1 and rounds == sorted(rounds) and rounds.count(2) >= 2
    assert _clients(attempts[rounds.index(2)]) == list(range(5, 10))  # host 1's only
    weights = attempts[0]["before"]
    for a in attempts:
        np.testing.assert_array_equal(a["before"], weights)  # where the last one left it
        if len(a["received"]) < 10:  # too few: released nothing
            np.testing.assert_array_equal(a["after"], weights)
            continue
        assert _clients(a) == list(range(10))
        expected = _fedavg_step(weights, a["received"])
        np.testing.assert_allclose(a["after"], expected, rtol=0, atol=1e-6)
        weights = a["after"]
    final = load_checkpoint(tmp_path / "checkpoints")  # written after the last round
    assert final["round"] == 3
    np.testing.assert_array_equal(final["weights"], weights)


def test_out_of_retries_is_one_clear_error_and_keeps_finished_rounds(ray_2cpus, tmp_path):
    """No retry left: the run stops with round 1's model, FedAvg by hand over round 1's
    updates; round 2's attempt (5 of 10 clients) left the server's weights unchanged."""
    from fedray.errors import ClusterError

    cfg = compose(
        [
            "crypto=none",
            "rounds=3",
            "min_clients_per_round=10",
            "max_round_retries=0",
            "checkpoint.every=1",
        ]
    )
    record, server = _attempt_recorder(tmp_path)
    with pytest.raises(ClusterError, match="round 2: only 5 clients answered") as err:
        run_experiment(cfg, tmp_path, host_class=_crash_in(2, tmp_path), server_class=server)
    assert "\n" not in str(err.value)
    assert [int(r["round"]) for r in _rows(tmp_path)] == [1]
    checkpoint = load_checkpoint(tmp_path / "checkpoints")
    assert checkpoint["round"] == 1
    first, failed = _records(record, "attempt")
    assert (first["round"], failed["round"]) == (1, 2)
    assert _clients(first) == list(range(10)) and _clients(failed) == list(range(5, 10))
    after_1 = _fedavg_step(first["before"], first["received"])
    np.testing.assert_allclose(checkpoint["weights"], after_1, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(first["after"], checkpoint["weights"])
    np.testing.assert_array_equal(failed["before"], checkpoint["weights"])
    np.testing.assert_array_equal(failed["after"], checkpoint["weights"])
    # What the server holds once it gave up: still round 1's model.
    held = _records(record, "run_round")[-1]
    assert held["round"] == 1
    np.testing.assert_array_equal(held["weights"], checkpoint["weights"])


def test_a_sum_of_weight_zero_stops_the_run_without_model_checks(ray_2cpus, tmp_path):
    """Clients that seal weight 0 (no range proofs) make the opened summed weight 0: the
    server refuses the step as the hosts' model checks would, even with the checks off,
    and the run stops with round 1's finite model instead of stepping into inf/NaN."""
    from fedray.errors import ClusterError

    cfg = compose([*SMALL_KEY, "rounds=3", "checkpoint.every=1", "cluster.verify_models=false"])
    with pytest.raises(ClusterError, match="round 2: sum check failed: the summed weight 0 is"):
        run_experiment(cfg, tmp_path, host_class=faulty.WeightlessHost)
    assert [int(r["round"]) for r in _rows(tmp_path)] == [1]
    checkpoint = load_checkpoint(tmp_path / "checkpoints")
    assert checkpoint["round"] == 1 and np.all(np.isfinite(checkpoint["weights"]))


def test_a_host_lost_between_its_upload_and_the_approvals_is_left_out_of_a_retry(
    ray_2cpus, tmp_path
):
    """Host 0 dies in round 2 after its sealed update reached the server, before the sum
    is approved. Before asking any host to approve, the server asks each host of the sum
    whether it still holds its update: none has signed the round's list yet, so the round
    is tried again (without the dead host's clients; Ray restarts it for round 3) instead
    of stopping the run, as an approval missing after the others signed would."""
    lost = type("Lost", (faulty.LostBeforeApprovalHost,), {"marker_dir": str(tmp_path)})
    cfg = compose([*SMALL_KEY, "rounds=3", "checkpoint.every=0", "min_clients_per_round=2"])
    summary = run_experiment(cfg, tmp_path / "run", host_class=lost)
    assert (tmp_path / "lost-before-approval").exists()
    rows = _rows(tmp_path / "run")
    assert summary["rounds_completed"] == 3
    assert [int(r["retries"]) for r in rows] == [0, 1, 0]
    assert int(rows[1]["clients_ok"]) == 5 and int(rows[1]["clients_failed"]) >= 5
    assert int(rows[2]["clients_ok"]) == 10  # the restarted host serves its clients again
