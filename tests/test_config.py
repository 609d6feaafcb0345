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
        (["dataset=csv"], "dataset.path must be set"),
        (["crypto.quant_bits=40"], "crypto.quant_bits=40"),
    ],
)
def test_invalid_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


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
