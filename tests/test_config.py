"""Bad configs fail before Ray starts, with one line naming the key and allowed values."""

from __future__ import annotations

import pytest

from fedray.errors import ConfigError
from tests.conftest import compose, run_cli


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["clients_per_round=20"], "clients_per_round=20 must be between 1 and num_clients=10"),
        (["num_clients=0"], "num_clients=0 must be an integer >= 1"),
        (["lr=-1"], "lr=-1"),
        (["crypto.key_bits=1024"], "crypto.allow_insecure_keys=true"),
        (["strategy=median"], "cannot run with crypto=paillier"),
        (["dataset.partition=zipf"], "dataset.partition='zipf' is not allowed; choose one of"),
        (["min_clients_per_round=11"], "min_clients_per_round=11 must be between 1 and"),
        (["ray.address=nonsense"], "ray.address='nonsense' must be null"),
        (["model=cnn"], "model=cnn"),
        (["privacy=dp", "privacy.noise=central"], "privacy.noise=central cannot be used"),
        (["privacy=dp", "privacy.delta=2"], "privacy.delta=2"),
        (["dataset=csv", "dataset.label=y"], "dataset.path must be set"),
        (["dataset=csv", "dataset.path='d/{client_id}.csv'"], "dataset.label must name"),
        (["crypto.quant_bits=40"], "crypto.quant_bits=40"),
        (
            ["privacy=dp", "privacy.target_epsilon_vs_server=0"],
            "privacy.target_epsilon_vs_server=0",
        ),
        (
            ["privacy=dp", "crypto=none", "privacy.target_epsilon_vs_server=8"],
            "no DP holds against the server (with crypto=none the server sees each",
        ),
        (
            ["privacy=dp", "privacy.reproducible_noise=true", "privacy.target_epsilon_vs_server=8"],
            "no DP holds against the server (with privacy.reproducible_noise=true",
        ),
        (
            [
                "privacy=dp",
                "privacy.mode=sample",
                "crypto=none",
                "privacy.secure_rng=false",
                "privacy.target_epsilon_vs_server=8",
            ],
            "the server can replay the noise",
        ),
        (
            [
                "privacy=dp",
                "privacy.mode=sample",
                "crypto=none",
                "privacy.target_epsilon_vs_server=8",
            ],
            "it sees each DP-SGD update in the clear and only it counts them",
        ),
    ],
)
def test_invalid_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_target_against_the_server_is_taken_where_dp_holds_against_it():
    """Encrypted client level (distributed noise) and encrypted sample level (the key
    holders open one sum per round) have an epsilon against the server that the key
    holders bound."""
    for overrides in (["privacy=dp"], ["privacy=dp", "privacy.mode=sample"]):
        cfg = compose([*overrides, "privacy.target_epsilon_vs_server=8"])
        assert cfg.privacy.target_epsilon_vs_server == 8


def test_insecure_keys_allowed_only_when_asked():
    cfg = compose(["crypto.key_bits=512", "crypto.allow_insecure_keys=true"])
    assert cfg.crypto.key_bits == 512
    assert compose([]).crypto.key_bits >= 2048


def test_defaults_match_the_contract():
    cfg = compose([])
    assert cfg.dataset.name == "breast_cancer" and cfg.num_clients == 10
    assert cfg.model.name == "mlp" and cfg.model.hidden == 128
    assert cfg.crypto.name == "paillier" and cfg.crypto.key_bits == 2048
    assert cfg.privacy.name == "none" and cfg.ray.address is None


def test_cli_bad_config_prints_one_line_and_exits_nonzero():
    res = run_cli(["clients_per_round=50"], timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert lines == ["fedray: error: clients_per_round=50 must be between 1 and num_clients=10"]
    assert "Traceback" not in res.stderr


def test_clients_per_round_follows_num_clients_by_default():
    assert compose(["num_clients=3"]).clients_per_round == 3
    assert compose(["num_clients=30", "clients_per_round=5"]).clients_per_round == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["+round=5"], "override '+round=5': unknown key 'round'; did you mean rounds?"),
        (["rouns=5"], "override 'rouns=5': unknown key 'rouns'; did you mean rounds?"),
        (["+crypto.keybits=512"], "unknown key 'crypto.keybits'; did you mean crypto.key_bits?"),
        (["model.kwargs={a:"], "cannot parse the override 'model.kwargs={a:'"),
        (["dataset=nope"], "Could not find 'dataset/nope'"),  # Hydra's error, one line
        (["rounds=abc"], "rounds"),
    ],
)
def test_cli_config_errors_from_hydra_or_fedray_share_one_line_and_exit_2(args, message):
    res = run_cli(args, timeout=120)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("fedray: error: "), lines
    assert message in lines[0]


def test_unquoted_csv_path_pastes_from_bash_and_missing_sites_fail_before_ray(tmp_path):
    for cid in range(2):
        (tmp_path / f"site_{cid}.csv").write_text("f1,label\n1.0,0\n2.0,1\n")
    # As bash passes `dataset.path=DIR/site_{client_id}.csv` (unquoted): braces intact.
    res = run_cli(
        [
            "dataset=csv",
            f"dataset.path={tmp_path}/site_{{client_id}}.csv",
            "dataset.label=label",
            "num_clients=3",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        timeout=120,
    )
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1, lines
    assert f"data file not found: {tmp_path}/site_2.csv" in lines[0]
    assert "1 of num_clients=3 missing" in lines[0]
    assert "Started a local Ray instance" not in res.stdout + res.stderr


def test_overrides_are_checked_and_fixed_before_hydra_sees_them():
    from fedray.launch import prepare_overrides

    # Bash ate the quotes: the {client_id} pattern is quoted again for Hydra's grammar.
    assert prepare_overrides(["dataset.path=d/site_{client_id}.csv"]) == [
        "dataset.path='d/site_{client_id}.csv'"
    ]
    assert prepare_overrides(["dataset.path='d/site_{client_id}.csv'"]) == [
        "dataset.path='d/site_{client_id}.csv'"
    ]
    # Open mappings, Hydra's own keys and flags pass; so does a sweep.
    ok = ["+model.kwargs.width=3", "+cluster.sites.0.site_a=1", "hydra/job_logging=disabled"]
    assert prepare_overrides([*ok, "-m", "num_clients=10,100"]) == [*ok, "-m", "num_clients=10,100"]
    with pytest.raises(ConfigError, match="unknown key 'rounds2'; did you mean rounds"):
        prepare_overrides(["~rounds2"])
    # Resuming in place: Hydra must not rewrite the old run's .hydra/ record.
    assert prepare_overrides(["hydra.run.dir=old", "resume=true"])[-1] == "hydra.output_subdir=null"
    assert "hydra.output_subdir=null" not in prepare_overrides(["hydra.run.dir=new"])
