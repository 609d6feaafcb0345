"""A site's own policy (fedray/federation/policy.py) against a hostile coordinator.

Every request below is what a coordinator may send; the site must refuse each one that
its policy does not allow with one clear line, and let a good one through. Each hostile
request differs from the good one in one field only, so the good one is the control.
No Ray here: these are the site's checks alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
import yaml

from fedray.federation.policy import (
    PolicyError,
    PolicyRefusal,
    SitePolicy,
    TrainRequest,
    load_policy,
    model_fingerprint,
    policy_from_dict,
)

FP_A = "a" * 64  # the model this site accepts
FP_B = "b" * 64  # another model


def policy_dict(**changes) -> dict:
    """The site's policy as its YAML file would hold it; ``changes`` replace top keys."""
    base = {
        "site": "hospital-a",
        "tasks": [
            {
                "id": "tabular",
                "version": "1",
                "class": "fedray.tasks.tabular.TabularClassificationTask",
                "model_fingerprint": FP_A,
            }
        ],
        "max_rounds": 10,
        "hyperparameters": {
            "lr": {"min": 0.001, "max": 0.5},
            "local_epochs": {"min": 1, "max": 5},
            "batch_size": {"min": 8, "max": 256},
            "proximal_mu": {"min": 0.0, "max": 1.0, "default": 0.0},
        },
        "min_sum": {"clients": 3, "sites": 2},
        "privacy": {
            "mode": "client",
            "noise_multiplier": 1.0,
            "clip_norm": 1.0,
            "delta": 1e-5,
            "max_epsilon_vs_server": None,
        },
        "max_upload_bytes": 1_000_000,
    }
    base.update(changes)
    return base


def make_policy(**changes) -> SitePolicy:
    return policy_from_dict(policy_dict(**changes))


GOOD = TrainRequest(
    round=3,
    task_id="tabular",
    task_version="1",
    model_fingerprint=FP_A,
    hyperparameters={"lr": 0.1, "local_epochs": 2, "batch_size": 32},
    upload_bytes=500_000,
)


def refused(policy: SitePolicy, request: TrainRequest) -> str:
    with pytest.raises(PolicyRefusal) as info:
        policy.check_request(request)
    line = str(info.value)
    assert line and "\n" not in line, f"not one line: {line!r}"
    return line


# -- good requests pass ------------------------------------------------------------------------


def test_good_requests_pass():
    policy = make_policy()
    policy.check_request(GOOD)  # the control of every hostile request below
    policy.check_request(dataclasses.replace(GOOD, round=1))
    policy.check_request(dataclasses.replace(GOOD, round=10, upload_bytes=1_000_000))
    edges = {"lr": 0.5, "local_epochs": 1, "batch_size": 256, "proximal_mu": 1.0}
    policy.check_request(dataclasses.replace(GOOD, hyperparameters=edges))
    assert policy.resolve_hyperparameters(GOOD) == {
        "lr": 0.1,
        "local_epochs": 2,
        "batch_size": 32,
        "proximal_mu": 0.0,  # the site's default for a key the request left out
    }
    policy.check_sum(3, 3, 2, 3)
    policy.check_sum(10, 7, 3, 0)  # none of this site's clients: nothing of its released
    # As the wire carries them: the fingerprint's 32 raw bytes, an integer as a double.
    wire = {"lr": 0.1, "local_epochs": 2.0, "batch_size": 32}
    policy.check_request(
        dataclasses.replace(GOOD, model_fingerprint=bytes.fromhex(FP_A), hyperparameters=wire)
    )
    resolved = policy.resolve_hyperparameters(dataclasses.replace(GOOD, hyperparameters=wire))
    assert resolved["local_epochs"] == 2 and isinstance(resolved["local_epochs"], int)


# -- a hostile coordinator's requests, each refused ------------------------------------------


HOSTILE = {
    "task_not_installed": (dict(task_id="exfiltrate"), "task exfiltrate@1 is not installed"),
    "task_other_version": (dict(task_version="2"), "task tabular@2 is not installed"),
    "model_other_fingerprint": (dict(model_fingerprint=FP_B), "model fingerprint 'bbbbbbbb"),
    "model_other_fingerprint_bytes": (
        dict(model_fingerprint=bytes.fromhex(FP_B)),
        "model fingerprint 'bbbbbbbb",
    ),
    "round_huge": (dict(round=2**64), "over 2**63-1"),
    "round_zero": (dict(round=0), "round numbers start at 1"),
    "round_not_int": (dict(round="3"), "must be an integer"),
    "lr_above_range": (
        dict(hyperparameters={"lr": 5.0, "local_epochs": 2, "batch_size": 32}),
        "lr=5.0 is outside this site's range [0.001, 0.5]",
    ),
    "lr_below_range": (
        dict(hyperparameters={"lr": 0.0, "local_epochs": 2, "batch_size": 32}),
        "lr=0.0 is outside",
    ),
    "lr_nan": (
        dict(hyperparameters={"lr": math.nan, "local_epochs": 2, "batch_size": 32}),
        "lr=nan is outside",
    ),
    "epochs_above_range": (
        dict(hyperparameters={"lr": 0.1, "local_epochs": 500, "batch_size": 32}),
        "local_epochs=500 is outside this site's range [1, 5]",
    ),
    "epochs_not_integer": (
        dict(hyperparameters={"lr": 0.1, "local_epochs": 2.5, "batch_size": 32}),
        "local_epochs=2.5 must be an integer",
    ),
    "batch_size_one": (
        dict(hyperparameters={"lr": 0.1, "local_epochs": 2, "batch_size": 1}),
        "batch_size=1 is outside",
    ),
    "hyperparameter_unknown": (
        dict(hyperparameters={"lr": 0.1, "local_epochs": 2, "batch_size": 32, "noise": 0.0}),
        "hyper-parameter 'noise' is not allowed by this site",
    ),
    "hyperparameter_missing": (
        dict(hyperparameters={"lr": 0.1, "local_epochs": 2}),
        "hyper-parameter 'batch_size' is missing",
    ),
    "hyperparameter_string": (
        dict(hyperparameters={"lr": "0.1", "local_epochs": 2, "batch_size": 32}),
        "lr='0.1' is not a number",
    ),
    "upload_over_cap": (dict(upload_bytes=1_000_001), "over this site's cap max_upload_bytes"),
    "upload_negative": (dict(upload_bytes=-1), "must be a whole number of bytes"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_request_refused(name):
    change, expected = HOSTILE[name]
    line = refused(make_policy(), dataclasses.replace(GOOD, **change))
    assert expected in line, line


def test_task_refusal_names_what_the_site_runs():
    line = refused(make_policy(), dataclasses.replace(GOOD, task_id="evil"))
    assert line.startswith("round 3:") and "it runs: tabular@1" in line


def test_task_class_is_the_sites_own():
    """The class comes from the site's file; the coordinator names only an id."""
    from fedray.tasks.tabular import TabularClassificationTask

    policy = make_policy()
    assert policy.task_class("tabular", "1") is TabularClassificationTask
    with pytest.raises(PolicyRefusal, match="not installed/allowed"):
        policy.task_class("fedray.tasks.tabular.TabularClassificationTask", "1")


# -- the key holder's smallest sum ------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        ((3, 1, 2, 1), "a sum of 1 clients is below this site's min_sum.clients=3"),
        ((3, 2, 2, 2), "a sum of 2 clients is below"),
        ((3, 3, 1, 3), "a sum of 1 sites is below this site's min_sum.sites=2"),
        ((3, 3.0, 2, 3), "number of clients must be an integer"),
        # one own client and two "clients" of a colluding site that add no noise
        ((3, 3, 2, 1), "holding 1 of this site's own clients is below min_sum.clients"),
        ((3, 100, 2, 2), "holding 2 of this site's own clients"),
        ((3, 3, 2, 4), "4 own clients in a sum of 3 clients"),
        ((3, 3, 2, None), "own clients must be an integer"),
    ],
)
def test_key_holder_refuses_small_sums(args, expected):
    policy = make_policy()
    with pytest.raises(PolicyRefusal) as info:
        policy.check_sum(*args)
    assert expected in str(info.value) and "\n" not in str(info.value)


# -- the site's own privacy budget ------------------------------------------------------------


def independent_epsilon(sigma: float, releases: int, delta: float) -> float:
    """epsilon vs the server after ``releases`` Gaussian releases, straight from
    dp-accounting (zero-out relation, no amplification), not through the policy."""
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import rdp_privacy_accountant

    if releases == 0:
        return 0.0
    acc = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=NeighboringRelation.REPLACE_SPECIAL
    )
    acc.compose(dp_event.GaussianDpEvent(sigma), releases)
    return float(acc.get_epsilon(delta))


def test_budget_stops_the_site_whatever_the_coordinator_asks(tmp_path):
    from fedray.privacy.dp import compute_epsilon_unamplified

    sigma, delta = 1.0, 1e-5
    eps = [independent_epsilon(sigma, n, delta) for n in range(6)]
    for n in range(6):  # fedray's own accountant agrees with dp-accounting
        assert compute_epsilon_unamplified(
            noise_multiplier=sigma, rounds=n, delta=delta
        ) == pytest.approx(eps[n], rel=1e-9)
    budget = (eps[3] + eps[4]) / 2  # room for exactly three releases
    priv = dict(
        policy_dict()["privacy"],
        max_epsilon_vs_server=budget,
        ledger=str(tmp_path / "ledger.json"),
        new_ledger=True,
    )
    policy = make_policy(privacy=priv)
    assert policy.epsilon_vs_server() == 0.0
    for rnd in (1, 2, 3):
        policy.check_request(dataclasses.replace(GOOD, round=rnd))
        assert policy.record_release(rnd, *_approval(rnd)) == pytest.approx(eps[rnd], rel=1e-9)
    assert policy.releases == 3
    assert policy.epsilon_vs_server() == pytest.approx(eps[3], rel=1e-9)
    # Round 4, the coordinator's word notwithstanding: refused before training ...
    line = refused(policy, dataclasses.replace(GOOD, round=4))
    assert "over its budget privacy.max_epsilon_vs_server" in line
    assert f"{eps[4]:.4g}" in line and "3 releases signed" in line
    # ... and an approval is not signed (nor counted) either.
    with pytest.raises(PolicyRefusal, match="over its budget"):
        policy.record_release(4, *_approval(4))
    assert policy.releases == 3
    assert policy.epsilon_vs_server() == pytest.approx(eps[3], rel=1e-9)


def _approval(rnd, *ids, key="k" * 64):
    """An approval statement's parts: the sorted update ids and the key fingerprint."""
    return (list(ids) or [f"r{rnd}-u{i}" for i in range(3)]), key


def test_every_release_counts_only_a_retry_does_not():
    policy = make_policy()
    policy.record_release(1, *_approval(1))
    policy.record_release(1, ["r1-u2", "r1-u0", "r1-u1"], "k" * 64)  # the same statement
    assert policy.releases == 1
    policy.record_release(2, *_approval(2))
    policy.record_release(3, *_approval(3))
    assert policy.releases == 3
    assert policy.epsilon_vs_server() == pytest.approx(independent_epsilon(1.0, 3, 1e-5))


def test_the_release_id_is_the_approval_statement_not_a_label():
    """Two different sums of one round are two statements: the second is refused (the
    round is completed), never silently deduplicated as one (M2)."""
    policy = make_policy()
    policy.record_release(3, *_approval(3, "a", "b", "c"))
    for other in (_approval(3, "a", "b", "d"), _approval(3, "a", "b", "c", key="j" * 64)):
        with pytest.raises(PolicyRefusal, match="already completed round 3"):
            policy.record_release(3, *other)
    assert policy.releases == 1
    with pytest.raises(PolicyRefusal, match="distinct"):
        policy.record_release(4, ["a", "a"], "k" * 64)
    with pytest.raises(PolicyRefusal, match="list of ids"):
        policy.record_release(4, "sum-4", "k" * 64)


def test_max_rounds_counts_rounds_taken_part_in():
    """max_rounds caps how many rounds the site takes part in, whatever their numbers,
    and a round at or before the last completed one is refused (M4)."""
    policy = make_policy(max_rounds=2)
    for _ in range(3):  # the same round again (a retried request) is one round
        policy.check_request(dataclasses.replace(GOOD, round=5))
    policy.record_release(5, *_approval(5))
    assert "at or before it" in refused(policy, dataclasses.replace(GOOD, round=5))
    assert "at or before it" in refused(policy, dataclasses.replace(GOOD, round=4))
    policy.check_request(dataclasses.replace(GOOD, round=100))
    assert policy.rounds_taken_part == 2
    line = refused(policy, dataclasses.replace(GOOD, round=101))
    assert "took part in 2 rounds, its max_rounds=2" in line
    with pytest.raises(PolicyRefusal, match="max_rounds=2"):
        policy.check_sum(102, 3, 2, 3)
    with pytest.raises(PolicyRefusal, match="max_rounds=2"):
        policy.record_release(102, *_approval(102))
    with pytest.raises(PolicyRefusal, match="already completed round 5"):
        policy.check_sum(4, 3, 2, 3)
    policy.check_sum(100, 3, 2, 3)  # the round it takes part in


def test_participations_survive_a_restart(tmp_path):
    priv = dict(policy_dict()["privacy"], ledger=str(tmp_path / "l.json"), new_ledger=True)
    first = make_policy(max_rounds=2, privacy=priv)
    first.check_request(dataclasses.replace(GOOD, round=1))
    first.check_request(dataclasses.replace(GOOD, round=2))
    again = make_policy(max_rounds=2, privacy=priv)
    assert again.rounds_taken_part == 2
    assert "max_rounds=2" in refused(again, dataclasses.replace(GOOD, round=3))


def test_colluding_clients_do_not_change_the_budget_vs_server():
    """The site's shares are sized so the honest ones alone carry sigma C (fedray's rule):
    epsilon_vs_server is the same for any k; only the share a client adds grows."""
    priv = dict(policy_dict()["privacy"], max_colluding_clients=2)
    policy = make_policy(privacy=priv)
    policy.record_release(1, *_approval(1))
    assert policy.epsilon_vs_server() == pytest.approx(independent_epsilon(1.0, 1, 1e-5))
    plan = policy.client_plan()
    assert plan.noise_std == pytest.approx(1.0 / math.sqrt(3 - 2))
    assert plan.reproducible_noise is False  # the site's noise is from the OS, always
    assert make_policy().client_plan().noise_std == pytest.approx(1.0 / math.sqrt(3))


def test_ledger_survives_a_restart(tmp_path):
    ledger = tmp_path / "ledger.json"
    priv = dict(policy_dict()["privacy"], ledger=str(ledger))
    with pytest.raises(PolicyError, match="does not exist; if this site starts a new ledger"):
        make_policy(privacy=priv)  # not said to be new: a missing ledger is an error
    first = policy_from_dict(policy_dict(privacy=priv), new_ledger=True)
    first.record_release(1, *_approval(1))
    first.record_release(2, *_approval(2))
    again = make_policy(privacy=priv)  # the site restarted
    assert again.releases == 2
    assert again.epsilon_vs_server() == pytest.approx(first.epsilon_vs_server())
    again.record_release(2, *_approval(2))  # a retry of a counted approval: still once
    assert again.releases == 2
    # Releases counted under other DP settings cannot be re-counted under these.
    other = dict(priv, noise_multiplier=5.0)
    with pytest.raises(PolicyError, match="privacy.ledger"):
        make_policy(privacy=other)
    ledger.write_text("{not json")
    with pytest.raises(PolicyError, match="cannot be read"):
        make_policy(privacy=priv)


def test_a_lost_ledger_is_an_error_even_when_new_ledger_is_set(tmp_path):
    ledger = tmp_path / "ledger.json"
    priv = dict(policy_dict()["privacy"], ledger=str(ledger), new_ledger=True)
    first = make_policy(privacy=priv)
    first.record_release(1, *_approval(1))
    assert (tmp_path / "ledger.json.created").exists()
    ledger.unlink()  # a lost volume, a wrong working directory, a new run directory
    with pytest.raises(PolicyError, match="is missing but .* says this site created it"):
        make_policy(privacy=priv)
    with pytest.raises(PolicyError, match="has disappeared"):
        first.record_release(2, *_approval(2))


def test_a_budget_needs_a_ledger_at_an_absolute_or_policy_relative_path(tmp_path):
    priv = dict(policy_dict()["privacy"], max_epsilon_vs_server=8.0)
    with pytest.raises(PolicyError, match="privacy.ledger is missing: with a budget"):
        make_policy(privacy=priv)
    with pytest.raises(PolicyError, match="must be an absolute path"):
        make_policy(privacy=dict(priv, ledger="ledger.json"))
    path = tmp_path / "conf" / "policy.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(policy_dict(privacy=dict(priv, ledger="ledger.json"))))
    policy = load_policy(path, new_ledger=True)  # relative: the policy file's directory
    assert policy.privacy.ledger == str(path.parent / "ledger.json")
    assert (path.parent / "ledger.json").exists()


def test_two_instances_on_one_ledger_lose_no_release(tmp_path):
    """The key holder and the agent (two processes) on one ledger: each write is under a
    lock and re-reads first, so both releases are counted by both (L1)."""
    priv = dict(policy_dict()["privacy"], ledger=str(tmp_path / "l.json"), new_ledger=True)
    a = make_policy(privacy=priv)
    b = make_policy(privacy=priv)
    a.record_release(1, *_approval(1))
    b.record_release(2, *_approval(2))
    assert b.releases == 2
    assert make_policy(privacy=priv).releases == 2
    with pytest.raises(PolicyRefusal, match="already completed round 2"):
        a.record_release(2, *_approval(2, "x", "y", "z"))  # a re-read b's release first
    assert not list(tmp_path.glob("*.tmp"))


def test_sample_mode_budget_is_fedrays_dp_sgd_accountant():
    from fedray.privacy.dp import SampleLevelDP

    hp = dict(policy_dict()["hyperparameters"])
    hp["batch_size"] = {"min": 32, "max": 32}
    hp["local_epochs"] = {"min": 1, "max": 1}
    priv = {
        "mode": "sample",
        "noise_multiplier": 1.1,
        "clip_norm": 1.0,
        "delta": 1e-5,
        "max_epsilon_vs_server": None,
        "examples": 320,
    }
    policy = make_policy(privacy=priv, hyperparameters=hp)
    policy.record_release(1, *_approval(1))
    policy.record_release(2, *_approval(2))
    ref = SampleLevelDP(
        noise_multiplier=1.1,
        clip_norm=1.0,
        delta=1e-5,
        batch_size=32,
        local_epochs=1,
        client_sizes={7: 320},
    )
    assert policy.epsilon_vs_server() == pytest.approx(ref.client_epsilon(7, 2), rel=1e-9)


def test_no_dp_means_no_budget_against_the_server():
    policy = make_policy(privacy={"mode": "none"})
    assert policy.epsilon_vs_server() == 0.0
    policy.record_release(1, *_approval(1))
    assert policy.epsilon_vs_server() == math.inf
    assert policy.client_plan() is None


# -- the model fingerprint --------------------------------------------------------------------


def test_model_fingerprint():
    import torch
    from torch import nn

    from fedray.models import ParamView

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    names = [("0.bias", "float32", [3]), ("0.weight", "float32", [3, 4])]
    names += [("2.bias", "float32", [2]), ("2.weight", "float32", [2, 3])]
    expected = hashlib.sha256(json.dumps(names, separators=(",", ":")).encode()).hexdigest()
    assert model_fingerprint(model) == expected
    assert model_fingerprint(ParamView(model)) == expected
    assert model_fingerprint([(n, d, s) for n, d, s in reversed(names)]) == expected  # sorted
    with torch.no_grad():  # other values, the same model
        model[0].weight.add_(1.0)
    assert model_fingerprint(model) == expected
    wider = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    assert model_fingerprint(wider) != expected
    assert model_fingerprint(model.double()) != expected  # dtype counts
    # Only exchanged parameters enter: a head on a frozen body.
    head = model_fingerprint(ParamView(model.float(), ["2."]))
    assert head == model_fingerprint(model, ["2."]) != expected


# -- policy-file errors: one line naming the key ----------------------------------------------


def _bad(**changes):
    return changes


BAD_FILES = {
    "unknown_top_key": (_bad(coordinator_may_override=True), "coordinator_may_override is not a known key; allowed: site, tasks"),
    "unknown_range_key": (
        _bad(hyperparameters={"lr": {"min": 0.1, "maxx": 1.0}}),
        "hyperparameters.lr.maxx is not a known key; allowed: min, max, default",
    ),
    "range_inverted": (
        _bad(hyperparameters={"lr": {"min": 1.0, "max": 0.1}}),
        "hyperparameters.lr.min=1.0 must be <= hyperparameters.lr.max=0.1",
    ),
    "unknown_privacy_key": (
        _bad(privacy={"mode": "client", "epsilon": 1}),
        "privacy.epsilon is not a known key; allowed: mode, noise_multiplier",
    ),
    "bad_privacy_mode": (
        _bad(privacy={"mode": "central"}),
        "privacy.mode='central' is not allowed; choose one of: client, sample, none",
    ),
    "privacy_key_missing": (
        _bad(privacy={"mode": "client", "noise_multiplier": 1.0}),
        "privacy.clip_norm is missing",
    ),
    "sum_of_one": (_bad(min_sum={"clients": 1, "sites": 1}), "min_sum.clients=1 must be an integer >= 2"),
    "min_sum_key_missing": (_bad(min_sum={"clients": 3}), "min_sum.sites is missing"),
    "max_rounds_zero": (_bad(max_rounds=0), "max_rounds=0 must be an integer >= 1"),
    "upload_cap_float": (_bad(max_upload_bytes=1.5), "max_upload_bytes=1.5 must be an integer"),
    "fingerprint_not_hex": (
        _bad(tasks=[{"id": "t", "version": "1", "class": "fedray.tasks.tabular.X", "model_fingerprint": "abc"}]),
        "tasks[0].model_fingerprint='abc' must be 64 lowercase hex digits",
    ),
    "task_class_not_installed": (
        _bad(tasks=[{"id": "t", "version": "1", "class": "evil_pkg.mod.Task", "model_fingerprint": FP_A}]),
        "tasks[0].class='evil_pkg.mod.Task': module 'evil_pkg.mod' is not installed at this site",
    ),
    "task_key_unknown": (
        _bad(tasks=[{"id": "t", "version": "1", "class": "a.B", "model_fingerprint": FP_A, "url": "x"}]),
        "tasks[0].url is not a known key; allowed: id, version, class, model_fingerprint",
    ),
    "colluding_too_many": (
        _bad(privacy={"mode": "client", "noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-5, "max_epsilon_vs_server": 5, "max_colluding_clients": 3}),
        "privacy.max_colluding_clients=3 must be < min_sum.clients=3",
    ),
    "sample_mode_unpinned": (
        _bad(privacy={"mode": "sample", "noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-5, "max_epsilon_vs_server": 5, "examples": 100}),
        "hyperparameters.batch_size must be pinned",
    ),
    "version_yaml_float": (
        _bad(tasks=[{"id": "t", "version": yaml.safe_load("1.10"), "class": "fedray.tasks.tabular.X", "model_fingerprint": FP_A}]),
        "tasks[0].version=1.1 must be a string",
    ),
    "version_not_wire": (
        _bad(tasks=[{"id": "t", "version": "v1-beta", "class": "fedray.tasks.tabular.X", "model_fingerprint": FP_A}]),
        "tasks[0].version='v1-beta' must be a version (digits and dots",
    ),
    "task_id_with_dot": (
        _bad(tasks=[{"id": "tab.ular", "version": "1", "class": "fedray.tasks.tabular.X", "model_fingerprint": FP_A}]),
        "tasks[0].id='tab.ular' must be a task id",
    ),
    "task_id_trailing_newline": (
        _bad(tasks=[{"id": "tabular\n", "version": "1", "class": "fedray.tasks.tabular.X", "model_fingerprint": FP_A}]),
        "tasks[0].id='tabular\\n' must be a task id",
    ),
    "fingerprint_trailing_newline": (
        _bad(tasks=[{"id": "t", "version": "1", "class": "fedray.tasks.tabular.X", "model_fingerprint": FP_A + "\n"}]),
        "must be 64 lowercase hex digits",
    ),
    "hyper_name_not_wire": (
        _bad(hyperparameters={"LR": {"min": 0.1, "max": 1.0}}),
        "hyperparameters.LR must be named [a-z][a-z0-9_]*",
    ),
    "range_huge_int": (
        _bad(hyperparameters={"lr": {"min": 0, "max": 10**400}}),
        "hyperparameters.lr.max=<a huge integer> must be a finite number",
    ),
    "max_rounds_huge": (_bad(max_rounds=10**400), "max_rounds=<a huge integer> must be an integer >= 1"),
    "budget_without_ledger": (
        _bad(privacy={"mode": "client", "noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-5, "max_epsilon_vs_server": 5}),
        "privacy.ledger is missing: with a budget",
    ),
    "new_ledger_not_bool": (
        _bad(privacy={"mode": "client", "noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-5, "max_epsilon_vs_server": None, "ledger": "/x", "new_ledger": "yes"}),
        "privacy.new_ledger='yes' must be true or false",
    ),
    "answer_after_negative": (_bad(answer_after_s=-1), "answer_after_s=-1 must be a finite number >= 0"),
    "answer_after_text": (_bad(answer_after_s="10s"), "answer_after_s='10s' must be a finite number >= 0"),
    "budget_not_positive": (
        _bad(privacy={"mode": "client", "noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-5, "max_epsilon_vs_server": -1}),
        "privacy.max_epsilon_vs_server=-1 must be a finite number > 0",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_policy_file_errors_name_the_key(name, tmp_path):
    changes, expected = BAD_FILES[name]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_dict(**changes)))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    line = str(info.value)
    assert "\n" not in line and expected in line, line


def test_a_policy_pads_answers_only_when_it_says_so(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_dict()))
    assert load_policy(path).answer_after_s == 0.0
    path.write_text(yaml.safe_dump(policy_dict(answer_after_s=30)))
    assert load_policy(path).answer_after_s == 30.0


def test_policy_file_missing_key_and_bad_yaml(tmp_path):
    data = policy_dict()
    del data["max_upload_bytes"]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PolicyError, match=r"^site policy: max_upload_bytes is missing$"):
        load_policy(path)
    path.write_text("tasks: [unclosed\n")
    with pytest.raises(PolicyError, match="is not valid YAML at line"):
        load_policy(path)
    with pytest.raises(PolicyError, match="cannot be read"):
        load_policy(tmp_path / "nope.yaml")


def test_example_policy_loads_and_admits_the_default_model(tmp_path, monkeypatch):
    """conf/site/policy.example.yaml is valid, and its fingerprint is that of the model
    of the schema the jobs/k8s/ manifests declare (model=mlp on their dataset.features
    and dataset.num_classes)."""
    from pathlib import Path

    from fedray.models.factory import MLP

    root = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "conf/site/policy.example.yaml").read_text())
    # Its ledger is on the site's state volume (jobs/k8s/site.yaml mounts the PVC there).
    site_yaml = (root / "jobs/k8s/site.yaml").read_text()
    assert data["privacy"]["ledger"].startswith("/var/lib/fedray/")
    assert "mountPath: /var/lib/fedray" in site_yaml and "claimName: fedray-site-state" in site_yaml
    data["privacy"]["ledger"] = str(tmp_path / "ledger.json")
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "policy.yaml")
    policy = load_policy(tmp_path / "policy.yaml", new_ledger=True)
    from tests.test_k8s_manifests import docs, entrypoint, one

    _, args = entrypoint(one(docs("site.yaml"), "RayJob"))
    width = len(args["dataset.features"].strip("[]").split(","))
    fp = model_fingerprint(MLP(width, int(args["dataset.num_classes"]), 128))
    request = TrainRequest(
        1,
        "tabular-classification",
        "1",
        fp,
        {"lr": 0.05, "local_epochs": 1, "batch_size": 32},
        10_000,
    )
    policy.check_request(request)
