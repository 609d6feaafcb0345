"""Resumes count every release (issue #22): real Ray jobs, real keys, threshold custody.

A DP run is resumed from ``checkpoint.path=RUN/checkpoints/round_NNNNN`` (or ``latest``):
the privacy ledger of that checkpoints folder is found, so the rounds released after the
checkpoint stay counted and their replay is counted again; the new key's holders open
only the rounds after the checkpoint, and none past ``privacy.target_epsilon_vs_server``
counted from the true number of releases; the saved config is the one that runs; a DP
resume without its ledger, and an override that would change the run, are refused.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import ray.cloudpickle

import tests.test_resume_privacy as this
from fedray.crypto.secure_aggregation import codec_for
from fedray.errors import FedrayError
from fedray.privacy import build_privacy
from fedray.privacy.dp import compute_epsilon, compute_epsilon_unamplified
from fedray.runtime.driver import PRIVACY_LEDGER, run_experiment
from fedray.runtime.server import Server
from tests.conftest import compose, run_cli

ray.cloudpickle.register_pickle_by_value(this)  # the server subclass below, by value

# Client-level DP with distributed noise under threshold Paillier (4 clients on the 2
# CPUs: 2 client actors, 2 key holders, any 2 open). Every client in every round (q = 1),
# so each client's count of released rounds is the number of releases.
ARGS = [
    "num_clients=4",
    "clients_per_round=4",
    "local_epochs=1",
    "crypto=paillier",
    "crypto.key_bits=512",
    "crypto.allow_insecure_keys=true",
    "crypto.custody=threshold",
    "privacy=dp",
    "privacy.noise_multiplier=1.0",
    "checkpoint.every=2",
    "progress=false",
]

# The refusals come before Ray: should one regress, the job fails at once (no cluster
# there) instead of running.
NO_RAY = "ray.address=127.0.0.1:9"


def _epsilons(releases: int, num_values: int) -> tuple[float, float]:
    """(epsilon, epsilon_vs_server) after ``releases`` released rounds, from the DP plan
    of ARGS: the accounted noise multiplier on the codec's grid, q = 1."""
    cfg = compose(ARGS)
    plan = build_privacy(cfg)
    plan.client_plan(codec_for(cfg, types.SimpleNamespace(key_bits=512), num_values))
    sigma = plan.accounting_noise_multiplier
    assert 0 < sigma < 1.0  # the grid's rounding is accounted
    delta = cfg.privacy.delta
    eps = compute_epsilon(rate=1.0, noise_multiplier=sigma, steps=releases, delta=delta)
    vs_server = compute_epsilon_unamplified(noise_multiplier=sigma, rounds=releases, delta=delta)
    return eps, vs_server


@pytest.fixture(scope="module")
def first_run(ray_2cpus, tmp_path_factory):
    """Three released rounds through the launcher (its .hydra/ record), on the tests' Ray;
    checkpoints after rounds 2 and 3, the ledger after each round."""
    run_dir = tmp_path_factory.mktemp("resume_privacy") / "run"
    done = run_cli([*ARGS, "rounds=3", f"ray.address={ray_2cpus}", f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr[-2000:]
    ledger = json.loads((run_dir / "checkpoints" / PRIVACY_LEDGER).read_text())
    assert ledger["round"] == 3 and ledger["privacy"]["steps"] == 3
    assert (run_dir / "checkpoints" / "round_00002" / "state.json").is_file()
    return run_dir


def _crashed_copy(first_run: Path, to: Path) -> Path:
    """The run as a crash after round 3 was released, before its checkpoint, leaves it:
    the ledger counts 3 releases, the newest checkpoint is round 2."""
    shutil.copytree(first_run, to)
    shutil.rmtree(to / "checkpoints" / "round_00003")
    (to / "checkpoints" / "latest").write_text("round_00002")
    return to


def test_resume_from_a_round_folder_counts_the_replayed_releases(ray_2cpus, first_run, tmp_path):
    old = _crashed_copy(first_run, tmp_path / "old")
    round_2 = old / "checkpoints" / "round_00002"
    # Only what a resume may change: the rest comes from old/.hydra/config.yaml, found
    # from the round folder (not the command line's defaults: 10 clients, no DP).
    resumed = run_cli(
        [
            f"hydra.run.dir={tmp_path / 'new'}",
            "resume=true",
            f"checkpoint.path={round_2}",
            "rounds=4",
            f"ray.address={ray_2cpus}",
        ]
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert (summary["num_clients"], summary["privacy"], summary["custody"]) == (
        4,
        "dp",
        "threshold",
    )
    assert summary["resumed_from_round"] == 2 and summary["rounds_completed"] == 4
    # Released: rounds 1, 2, 3, then round 3 again (fresh noise on the same clipped
    # updates: a second release), then round 4.
    eps, vs_server = _epsilons(5, summary["num_parameters"])
    assert summary["epsilon"] == pytest.approx(eps, rel=1e-9)
    assert summary["epsilon_vs_server"] == pytest.approx(vs_server, rel=1e-9)
    assert summary["epsilon_vs_server"] > _epsilons(4, summary["num_parameters"])[1]
    # The resumed run writes into the checkpoints folder, not into the round folder.
    ledger = json.loads((old / "checkpoints" / PRIVACY_LEDGER).read_text())
    assert ledger["round"] == 4 and ledger["privacy"]["steps"] == 5
    assert (old / "checkpoints" / "latest").read_text() == "round_00004"
    assert sorted(p.name for p in round_2.iterdir()) == ["arrays.npz", "state.json"]


class ProbingServer(Server):
    """On its first round, asks every real key holder to open a sum of each round
    1..6 and writes what each answered into ``record_dir``, then runs the round."""

    record_dir = ""

    def run_round(self):
        record = Path(self.record_dir) / "probes.json"
        if not record.exists():
            answers = {}
            for round_num in range(1, 7):
                answers[round_num] = []
                for holder in self.key_holders:
                    try:
                        ray.get(holder.share_sum.remote(round_num, ["probe"], {}))
                        answers[round_num].append("opened")
                    except ray.exceptions.RayTaskError as exc:
                        cause = exc.cause
                        answers[round_num].append(f"{type(cause).__name__}: {cause}")
            record.write_text(json.dumps(answers))
        return super().run_round()


def test_key_holders_open_only_the_rounds_after_the_checkpoint_within_the_target(
    ray_2cpus, first_run, tmp_path
):
    old = _crashed_copy(first_run, tmp_path / "old")
    num_values = json.loads((first_run / "summary.json").read_text())["num_parameters"]
    # A target that 5 releases keep and a 6th would pass. Counted from the ledger (3
    # releases), the window after the checkpoint (round 2) is rounds 3..4; from the
    # checkpoint's stale count (2) it would be 3..5.
    target = (_epsilons(5, num_values)[1] + _epsilons(6, num_values)[1]) / 2
    (tmp_path / "probes").mkdir()
    server = type("Probing", (ProbingServer,), {"record_dir": str(tmp_path / "probes")})
    cfg = compose(
        [
            *ARGS,
            "rounds=8",
            "resume=true",
            f"checkpoint.path={old / 'checkpoints' / 'latest'}",
            f"privacy.target_epsilon_vs_server={target}",
        ]
    )
    summary = run_experiment(cfg, old, server_class=server)
    probes = json.loads((tmp_path / "probes" / "probes.json").read_text())
    for round_num, answers in probes.items():
        assert len(answers) == 2, answers  # both key holders answered
        outside = [f"PermissionError: round {round_num} is outside this job's rounds 3..4"]
        if round_num in ("3", "4"):  # in the window: refused only for the missing update
            assert all(a.startswith("PermissionError: ") and "outside" not in a for a in answers), (
                answers
            )
        else:  # released by the old key (1, 2), or past the target (5, 6)
            assert answers == outside * 2, answers
    assert summary["rounds_completed"] == 4
    assert summary["stop_reason"] == "privacy.target_epsilon_vs_server"
    assert summary["epsilon_vs_server"] == pytest.approx(_epsilons(5, num_values)[1], rel=1e-9)
    assert summary["epsilon_vs_server"] <= target


def test_a_dp_resume_without_its_ledger_is_refused(first_run, tmp_path):
    old = shutil.copytree(first_run, tmp_path / "old")
    (old / "checkpoints" / PRIVACY_LEDGER).unlink()
    refused = run_cli([f"hydra.run.dir={old}", "resume=true", NO_RAY], timeout=120)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    ledger = old / "checkpoints" / PRIVACY_LEDGER
    assert line.startswith(
        f"fedray: error: resume=true with privacy=dp needs the privacy ledger {ledger} "
    ), line
    assert "pass checkpoint.path=<the old run's checkpoints folder" in line
    # A round folder copied away from its checkpoints folder: the ledger is looked for
    # next to it, and nothing starts.
    moved = shutil.copytree(first_run / "checkpoints" / "round_00002", tmp_path / "moved" / "r")
    cfg = compose([*ARGS, "rounds=4", "resume=true", f"checkpoint.path={moved}"])
    with pytest.raises(FedrayError, match=f"privacy ledger {tmp_path / 'moved' / PRIVACY_LEDGER} "):
        run_experiment(cfg, tmp_path / "out")


def test_a_resume_refuses_overrides_that_change_the_saved_run(first_run, tmp_path):
    round_2 = first_run / "checkpoints" / "round_00002"
    refused = run_cli(
        [
            f"hydra.run.dir={tmp_path / 'new'}",
            "resume=true",
            f"checkpoint.path={round_2}",
            "privacy.noise_multiplier=0.5",
            "rounds=5",
            NO_RAY,
        ],
        timeout=120,
    )
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert f"continues the run in {first_run} with its saved config" in line, line
    changed = line.split("would change what its checkpoint means: ")[1].split(". Allowed")[0]
    assert changed == "privacy.noise_multiplier (saved: 1.0)", line  # rounds= is allowed
    # A checkpoint without its run's record: the command line would replace the config.
    bare = shutil.copytree(round_2, tmp_path / "bare" / "checkpoints" / "round_00002")
    refused = run_cli(
        [f"hydra.run.dir={tmp_path / 'new2'}", "resume=true", f"checkpoint.path={bare}", NO_RAY],
        timeout=120,
    )
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert f"there is none at {tmp_path / 'bare' / '.hydra' / 'config.yaml'}" in line, line


def test_the_resume_command_after_a_resume_from_a_round_folder_names_the_folder():
    from fedray.launch import _resume_safe

    given = ["resume=true", "checkpoint.path=/r/checkpoints/round_00002", "rounds=9"]
    again = _resume_safe(given, Path("/r/checkpoints"))
    assert again == ["rounds=9", "checkpoint.path=/r/checkpoints"]
    assert _resume_safe(["resume=true", "rounds=9"], Path("/r/checkpoints")) == ["rounds=9"]
