"""Partitioners, per-site CSV data, and the models (cnn, custom _target_, trainable head)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from fedray.data.datasets import BUNDLED, dataset_info, load_client_data, read_csv
from fedray.data.partition import partition_indices
from fedray.errors import ConfigError, DataError
from fedray.models import ParamView, build_model
from fedray.runtime.client import ClientHost, RoundTask
from fedray.runtime.driver import run_experiment
from tests.conftest import compose


def _labels():
    from sklearn.datasets import load_digits

    return load_digits().target


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitions_cover_every_row_once_and_are_deterministic(scheme):
    y = _labels()
    parts = partition_indices(y, 20, scheme=scheme, seed=3, dirichlet_alpha=0.5)
    assert len(parts) == 20
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(len(y)))
    again = partition_indices(y, 20, scheme=scheme, seed=3, dirichlet_alpha=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_iid_sizes_are_balanced_and_non_iid_schemes_skew_labels():
    y = _labels()
    iid = partition_indices(y, 20, scheme="iid", seed=0)
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    distinct = {
        scheme: np.mean(
            [
                len(np.unique(y[p]))
                for p in partition_indices(y, 20, scheme=scheme, seed=0, dirichlet_alpha=0.1)
            ]
        )
        for scheme in ("iid", "dirichlet", "shards")
    }
    assert distinct["iid"] == 10
    assert distinct["dirichlet"] < 7
    # 2 shards of label-sorted rows per client: at most 2 labels per shard.
    shards = partition_indices(y, 20, scheme="shards", seed=0, shards_per_client=2)
    assert max(len(np.unique(y[p])) for p in shards) <= 4
    assert distinct["shards"] < 4


def test_too_many_clients_is_a_config_error():
    with pytest.raises(ConfigError, match="num_clients=1000 is too many"):
        partition_indices(_labels()[:100], 1000)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_the_drivers_shape_of_a_bundled_set_is_scikit_learns(name):
    """The driver takes a bundled set's width and class count from a table, not from the
    data (no scikit-learn import in its set-up): the table must be what the data is."""
    from fedray.config import DatasetConfig
    from fedray.data.datasets import _bundled

    x, y = _bundled(name)
    info = dataset_info(DatasetConfig(name=name))
    assert (info.num_features, info.num_classes) == (x.shape[1], len(np.unique(y)))


def test_client_data_is_loaded_per_client_and_holds_out_validation():
    cfg = compose(
        ["dataset=digits", "num_clients=5", "clients_per_round=5", "dataset.partition=dirichlet"]
    )
    data = load_client_data(cfg.dataset, [1, 3], 5, seed=0)
    assert set(data) == {1, 3}
    for d in data.values():
        assert len(d.y_val) >= 1 and d.x_train.shape[1] == 64
        assert d.x_train.max() <= 1.0  # digits scaled by a fixed 1/16


def test_three_sites_csv_job(ray_2cpus, tmp_path):
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["diagnosis"])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    test_rows, site_rows = order[:100], np.array_split(order[100:], 3)
    for name, rows in [("test", test_rows)] + [(f"site_{i}", r) for i, r in enumerate(site_rows)]:
        lines = [",".join(f"{v:.6g}" for v in x[i]) + f",{y[i]}" for i in rows]
        (tmp_path / f"{name}.csv").write_text(header + "\n" + "\n".join(lines) + "\n")
    cfg = compose(
        [
            "dataset=csv",
            f"dataset.path='{tmp_path}/site_{{client_id}}.csv'",
            "dataset.label=diagnosis",
            f"dataset.test_path='{tmp_path}/test.csv'",
            "num_clients=3",
            "clients_per_round=3",
            "crypto.key_bits=512",
            "crypto.allow_insecure_keys=true",
            "rounds=10",
        ]
    )
    summary = run_experiment(cfg, tmp_path / "out")
    assert summary["rounds_completed"] == 10
    assert summary["final_accuracy"] >= 0.9
    assert set(summary["client_nodes"]) == {"0", "1", "2"}


def test_cnn_trains_on_digits(ray_2cpus, tmp_path):
    cfg = compose(["dataset=digits", "model=cnn", "crypto=none", "rounds=8", "lr=0.1"])
    summary = run_experiment(cfg, tmp_path)
    assert summary["final_accuracy"] > 0.6  # 10 classes: chance is 0.1


def test_custom_model_by_target_through_ray(ray_2cpus, tmp_path):
    cfg = compose(
        [
            "model=custom",
            "model._target_=fedray.models.factory.MLP",
            "+model.kwargs.hidden=16",
            "crypto=none",
            "rounds=5",
        ]
    )
    summary = run_experiment(cfg, tmp_path)
    assert summary["num_parameters"] == 30 * 16 + 16 + 16 * 2 + 2
    assert summary["final_accuracy"] > 0.85
    with pytest.raises(ConfigError, match="could not be built"):
        build_model(
            compose(["model=custom", "model._target_=no.such.Module"]).model,
            dataset_info(cfg.dataset),
            0,
        )


def test_trainable_exchanges_only_the_head(ray_2cpus, tmp_path):
    cfg = compose(["model.trainable=[net.2]", "crypto=none", "rounds=4"])
    model = build_model(cfg.model, dataset_info(cfg.dataset), cfg.seed)
    view = ParamView(model, ["net.2"])
    assert view.size == 128 * 2 + 2
    assert not model.net[0].weight.requires_grad
    summary = run_experiment(cfg, tmp_path)
    assert summary["num_parameters"] == 258
    assert summary["bytes_up"] == 4 * 258 * 10 * 4  # float32 x params x clients x rounds
    with pytest.raises(ConfigError, match="matches no parameter"):
        ParamView(build_model(cfg.model, dataset_info(cfg.dataset), 0), ["nope"])


def _local_delta(overrides: list[str], runs: int = 1) -> list[np.ndarray]:
    """Client 0's update from the initial model, trained in process ``runs`` times."""
    cfg = compose(["crypto=none", "local_epochs=5", *overrides])
    host = ClientHost(cfg, [0], dataset_info(cfg.dataset), 40.0)
    assert host.ready() is True
    w = host.view.get()
    # The round options cannot switch the term on or off: they are not trusted.
    return [host.train(RoundTask(1, [0], {"proximal_mu": 0.0}), w)[0].delta for _ in range(runs)]


def test_fedprox_term_pulls_the_local_model_toward_the_global_one():
    """mu comes from the site's own config (strategy=fedprox), not from the server."""
    free, again = _local_delta([], runs=2)
    np.testing.assert_array_equal(again, free)  # same seed: only mu differs between runs
    (prox,) = _local_delta(["strategy=fedprox", "strategy.proximal_mu=10.0"])
    (weaker,) = _local_delta(["strategy=fedprox", "strategy.proximal_mu=2.0"])
    assert np.linalg.norm(prox) < 0.8 * np.linalg.norm(free)
    assert np.linalg.norm(prox) < np.linalg.norm(weaker) < np.linalg.norm(free)


def test_text_class_labels_get_a_hint_that_labels_are_integer_ids(tmp_path):
    path = tmp_path / "site_0.csv"
    path.write_text("f1,diagnosis\n1.0,0\n2.0,malignant\n")
    with pytest.raises(DataError) as err:
        read_csv(str(path), "diagnosis")
    assert "row 3, column 'diagnosis': 'malignant' is not a number" in str(err.value)
    assert "labels must be integer class ids" in str(err.value)
    path.write_text("f1,diagnosis\nabc,0\n")  # a feature cell: no label hint
    with pytest.raises(DataError) as err:
        read_csv(str(path), "diagnosis")
    assert "class ids" not in str(err.value)


_LOAD_IN_A_FRESH_PROCESS = """
import sys
from fedray.config import DatasetConfig
from fedray.data.datasets import load_client_data, load_test_set
import numpy as np
cfg = DatasetConfig()
data = load_client_data(cfg, [0, 1], 5, 0)
xte, yte = load_test_set(cfg, 5, 0)
np.savez(sys.argv[1], x0=data[0].x_train, y1=data[1].y_val, xte=xte, yte=yte)
print("sklearn imported:", "sklearn" in sys.modules)
"""


def test_bundled_split_is_cached_so_actors_skip_importing_sklearn(tmp_path):
    """The second actor to load a bundled set reads the cached split (no scikit-learn
    import, ~1 s of CPU per actor), and gets the very same arrays; a damaged cache file is
    computed again."""
    env = {**os.environ, "FEDRAY_CACHE_DIR": str(tmp_path / "cache")}

    def load(name):
        out = subprocess.run(
            [sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS, str(tmp_path / f"{name}.npz")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        with np.load(tmp_path / f"{name}.npz") as z:
            return out.stdout.strip(), {k: z[k] for k in z.files}

    said, first = load("first")
    assert said == "sklearn imported: True"
    [cached] = (tmp_path / "cache" / "bundled").glob("breast_cancer-*.npz")
    said, second = load("second")
    assert said == "sklearn imported: False"
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
        assert first[k].dtype == second[k].dtype
    cached.write_bytes(b"not an npz file")
    said, third = load("third")
    assert said == "sklearn imported: True"
    np.testing.assert_array_equal(first["x0"], third["x0"])
