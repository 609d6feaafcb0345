"""Ctrl-C and resume from the command line, as a user does it (embedded Ray, real runs)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedray.runtime.driver import run_experiment
from fedray.runtime.outputs import load_checkpoint
from tests.conftest import ROOT, compose, run_cli

# Server optimizer state (fedadam), accountant and client-level noise shares under
# threshold Paillier (dp + crypto: a new key is dealt on resume), sampled cohorts
# (clients_per_round < num_clients): everything a resume must restore.
ARGS = [
    "dataset=synthetic",
    "num_clients=60",
    "clients_per_round=20",
    "rounds=8",
    "crypto=paillier",
    "crypto.key_bits=512",
    "crypto.allow_insecure_keys=true",
    "strategy=fedadam",
    "privacy=dp",
    "privacy.noise_multiplier=2.0",
    # Bit-identical needs replayable noise: by default DP noise comes from the OS CSPRNG,
    # so a resumed run's rounds (and its accountant's count) differ by design.
    "privacy.reproducible_noise=true",
    "checkpoint.every=2",
    "ray.num_cpus=2",
]


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as fh:
        return [
            {k: v for k, v in r.items() if k != "seconds" and not k.endswith("_seconds")}
            for r in csv.DictReader(fh)
        ]


@pytest.mark.slow
def test_ctrl_c_then_resume_with_only_the_run_dir_ends_bit_identical(ray_2cpus, tmp_path):
    # The uninterrupted reference runs in process on the tests' Ray (one Ray start fewer);
    # the interrupted run and its resume go through the launcher, as a user does.
    run_experiment(compose(ARGS), tmp_path / "full")

    run_dir = tmp_path / "interrupted"
    # Its own session, like a terminal's foreground job: Ctrl-C reaches the driver and
    # every process of the embedded Ray.
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedray.launch", *ARGS, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    stopped_at = int(latest.read_text().strip().split("_")[1])
    assert 2 <= stopped_at < 8, "the run was not interrupted mid-run"
    # One line, no traceback: the last checkpoint and the command that resumes.
    fedray_lines = [line for line in err.splitlines() if line.startswith("fedray:")]
    assert len(fedray_lines) == 1, err[-2000:]
    line = fedray_lines[0]
    assert line.startswith(f"fedray: interrupted; last checkpoint: round {stopped_at} in "), line
    command = line.split("; resume with: ")[1]
    assert command.endswith(f" -m fedray.launch hydra.run.dir={run_dir} resume=true"), line
    assert "Traceback" not in err
    # Nothing computed is lost: every round that printed is in metrics.csv and checkpointed.
    assert [int(r["round"]) for r in _rows(run_dir)] == list(range(1, stopped_at + 1))
    record = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    metrics_before = (run_dir / "metrics.csv").read_bytes()

    refused = run_cli([f"hydra.run.dir={run_dir}", "resume=true", "num_clients=3"])
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert "num_clients (saved: 60)" in refused.stderr

    # The command the line printed, pasted into bash.
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    resumed = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from round {stopped_at}" in resumed.stdout

    # The old run's record is untouched, and metrics.csv was appended to.
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == record
    assert (run_dir / "metrics.csv").read_bytes().startswith(metrics_before)
    a = load_checkpoint(tmp_path / "full" / "checkpoints")
    b = load_checkpoint(run_dir / "checkpoints")
    assert a["round"] == b["round"] == 8
    np.testing.assert_array_equal(a["weights"], b["weights"])
    assert a["strategy"].keys() == b["strategy"].keys() == {"m", "v"}
    for key in a["strategy"]:
        np.testing.assert_array_equal(a["strategy"][key], b["strategy"][key])
    assert (a["rng"], a["noise_rng"], a["privacy"]) == (b["rng"], b["noise_rng"], b["privacy"])
    assert _rows(tmp_path / "full") == _rows(run_dir)


def test_the_resume_command_after_a_resumed_run_keeps_what_that_resume_changed(tmp_path, capsys):
    """A resume does not rewrite the run's saved config: a Ctrl-C during a resume that
    extended the run (rounds=40) must print a command that passes rounds=40 again, or the
    next resume would stop at the saved rounds. Overrides a resume refuses are not carried."""
    from fedray.launch import _interrupted, _resume_safe
    from fedray.runtime.outputs import latest_checkpoint_round

    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "round_0025").mkdir(parents=True)
    (checkpoints / "round_0025" / "state.json").write_text('{"round": 25}')
    (checkpoints / "latest").write_text("round_0025")
    assert latest_checkpoint_round(checkpoints) == 25
    given = ["hydra.run.dir=x", "resume=true", "rounds=40", "ray.address=auto", "seed=3"]
    again = _resume_safe(given)
    assert again == ["rounds=40", "ray.address=auto"]
    with pytest.raises(SystemExit):
        _interrupted(tmp_path, None, again)
    line = capsys.readouterr().err.strip()
    assert line.startswith("fedray: interrupted; last checkpoint: round 25 in "), line
    assert line.endswith(f"hydra.run.dir={tmp_path} resume=true rounds=40 ray.address=auto"), line
