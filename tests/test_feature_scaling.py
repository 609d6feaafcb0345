"""Federation-wide preprocessing (issue #27): ``dataset.standardize=global`` and
``dataset.missing=impute_mean``.

Before round 1 each host sends its clients' per-feature sums (non-empty cells, sums, sums
of squares), sealed like an update; the key holders open their sum as round 0's one sum,
so the server learns the federation's statistics, never a site's; the driver signs the
scaling they give and every host, the server's test set and the exported model use it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedray.crypto.codec import FeatureSumsCodec
from fedray.data.datasets import FeatureScaling, feature_sums
from fedray.data.tables import read_table
from fedray.errors import ConfigError, DataError
from tests.conftest import compose
from tests.test_tables import COLUMNS, ORDERS, SPEC, _rows, _write_csv

SMALL_KEY = ["crypto=paillier", "crypto.key_bits=512", "crypto.allow_insecure_keys=true"]


# ----------------------------------------------------------------------------- units


def test_feature_sums_add_up_exactly_through_the_packing():
    """Signed fixed-point slots with one offset per update: the opened sum of three
    hosts' encodings is the sum of their values to 2^-40 each, negative ones included; a value
    too large to carry exactly is refused by the host that encodes it."""
    codec = FeatureSumsCodec(key_bits=512, num_features=7, max_summands=10)
    rng = np.random.default_rng(0)
    hosts = [rng.normal(0, 1e6, 21) for _ in range(3)]
    packed = [codec.encode(v) for v in hosts]
    assert all(len(p) == codec.num_ciphertexts for p in packed)
    summed = [sum(col) for col in zip(*packed, strict=True)]  # what Paillier's sum opens to
    np.testing.assert_allclose(codec.decode_sum(summed, 3), np.sum(hosts, axis=0), atol=1e-9)
    assert codec.fits(summed)
    with pytest.raises(ValueError, match="too large to add up exactly"):
        codec.encode(np.full(21, 2.0**88))  # beyond +-2^87
    with pytest.raises(ValueError, match="does not fit|not fit"):
        codec.decode_sum([1 << 600] * codec.num_ciphertexts, 3)


def test_the_scaling_is_the_pooled_mean_and_deviation_of_every_sites_rows():
    rng = np.random.default_rng(1)
    sites = [
        rng.normal(loc, scale, (n, 4)) for loc, scale, n in ((5, 2, 30), (-3, 1, 7), (0, 9, 50))
    ]
    sites[1][2, 1] = np.nan  # an empty cell counts nowhere
    pooled = np.concatenate(sites)
    scaling = FeatureScaling.from_sums(sum(feature_sums(x) for x in sites), "global", True)
    np.testing.assert_allclose(scaling.mean, np.nanmean(pooled, axis=0), rtol=1e-12)
    np.testing.assert_allclose(scaling.std, np.nanstd(pooled, axis=0), rtol=1e-9)
    out = scaling.apply(sites[1])
    assert out[2, 1] == 0.0  # imputed with the federation's mean, which scales to 0
    np.testing.assert_allclose(
        out[0], (sites[1][0] - scaling.mean) / scaling.std, rtol=1e-5, atol=1e-6
    )
    site = replace(scaling, mode="site").apply(sites[0])  # by the table's own statistics
    np.testing.assert_allclose(site.mean(axis=0), 0, atol=1e-5)
    assert FeatureScaling.from_dict(scaling.to_dict()) == scaling
    with pytest.raises(DataError, match=r"feature column\(s\) 2 .* no value at any site"):
        FeatureScaling.from_sums(np.array([3, 3, 0, 1, 1, 0, 1, 1, 0.0]), "global", True)
    # what no honest sites send: more cells than clients, a sum of squares below the
    # square of the sum (a negative variance)
    for crafted, cells in (([5, 1, 9, 1.0, 9, 1], 4.0), ([2, 2, 4, 0, 1, 0.0], 4.0)):
        with pytest.raises(DataError, match="a site crafted its sums"):
            FeatureScaling.from_sums(np.array(crafted), "global", False, max_cells=cells)
    for bad in ({**scaling.to_dict(), "std": [1.0, 0.0, 1.0, 1.0]}, {"mode": "global"}):
        with pytest.raises(DataError, match="feature scaling"):
            FeatureScaling.from_dict(bad)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["privacy=dp", "dataset.standardize=global"],
            "dataset.standardize=global is not available here: with privacy=dp the "
            "federation's feature sums would be opened without noise",
        ),
        (
            ["dataset=synthetic", "dataset.standardize=global"],
            "dataset.standardize=global is not available here: it applies to "
            "dataset=breast_cancer|wine|csv",
        ),
        (["dataset.standardize=yes"], "dataset.standardize='yes' is not allowed; choose one of"),
    ],
)
def test_federation_wide_statistics_are_refused_where_they_cannot_hold(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert str(err.value).startswith(message), err.value
    assert "\n" not in str(err.value)


def test_site_is_the_default_global_is_asked_for_and_true_false_still_read():
    from fedray.config import needs_feature_statistics, standardization

    assert standardization(compose([])) == "site"
    assert not needs_feature_statistics(compose([]))
    assert standardization(compose(["dataset.standardize=global"])) == "global"
    assert needs_feature_statistics(compose(["dataset.standardize=global"]))
    assert standardization(compose(["dataset.standardize=true"])) == "site"
    assert standardization(compose(["dataset.standardize=false"])) == "none"
    assert standardization(compose(["dataset=digits"])) == "none"


def test_impute_mean_keeps_empty_feature_cells_and_refuses_an_empty_label(tmp_path):
    data = _rows(10, 3)
    data["bmi"][4] = ""
    data["sex"][6] = ""
    path = _write_csv(tmp_path / "holes.csv", data, ORDERS[2])
    x, y = read_table(path, replace(SPEC, missing="impute_mean"))
    assert x.shape == (10, 5) and len(y) == 10  # no row dropped
    assert np.isnan(x[4, 1]) and np.isnan(x[6, 2:4]).all()
    assert np.isfinite(np.delete(x, [4, 6], axis=0)).all()
    data["label"][2] = ""
    path = _write_csv(tmp_path / "no_label.csv", data, COLUMNS)
    with pytest.raises(DataError) as err:
        read_table(path, replace(SPEC, missing="impute_mean"))
    assert str(err.value) == (
        f"{path}: row 4, label column 'label' is empty; dataset.missing=impute_mean fills "
        "feature cells only: fill in the label, or set dataset.missing=drop_rows"
    )


def test_a_host_trains_only_on_data_prepared_with_the_drivers_signed_scaling():
    """Plain ClientHost (no Ray): before the scaling it refuses to train; an unsigned
    scaling, or a second different one, is refused; it gives its sums once."""
    from fedray.data.datasets import DatasetInfo
    from fedray.runtime.client import ClientHost, RoundTask
    from fedray.runtime.keys import HostIdentity, scaling_message

    cfg = compose(
        ["crypto=none", "num_clients=4", "clients_per_round=2", "dataset.standardize=global"]
    )
    driver = HostIdentity()
    host = ClientHost(cfg, [0, 1], DatasetInfo(30, 2), 500.0, driver.public_bytes())
    assert host.ready() is True and not host.trainable()
    weights = host.view.get()
    with pytest.raises(PermissionError, match="not prepared yet"):
        host.train(RoundTask(1, [0]), weights)
    sums = host.feature_sums(0).delta
    raw = np.concatenate([host.data[c][0].x.numpy() for c in (0, 1)]).astype(np.float64)
    np.testing.assert_allclose(sums, feature_sums(raw) / 500.0)  # over weight_ref
    with pytest.raises(PermissionError, match="once per job"):
        host.feature_sums(0)
    scaling = FeatureScaling.from_sums(sums, "global", False).to_dict()
    with pytest.raises(PermissionError, match="not signed by the job's set-up key"):
        host.set_feature_scaling(scaling, HostIdentity().sign_bytes(scaling_message(scaling)))
    assert host.set_feature_scaling(scaling, driver.sign_bytes(scaling_message(scaling)))
    prepared = np.concatenate([host.data[c][0].x.numpy() for c in (0, 1)])
    np.testing.assert_allclose(prepared.mean(axis=0), 0, atol=1e-5)  # these rows are the pool
    other = {**scaling, "mean": [0.0] * 30}
    with pytest.raises(PermissionError, match="already prepared, with another scaling"):
        host.set_feature_scaling(other, driver.sign_bytes(scaling_message(other)))
    assert host.trainable()
    assert len(host.train(RoundTask(1, [0]), weights)) == 1


def test_key_holders_open_round_0_only_in_a_job_that_asks_and_before_round_1(threshold_key):
    from fedray.runtime.keys import Contribution, HostIdentity, KeyHolder, cohort_message

    key, shares = threshold_key
    host = HostIdentity()

    def holder(feature_sums: bool) -> KeyHolder:
        peers = {0: host.public_bytes(), 1: HostIdentity().public_bytes()}
        h = KeyHolder(
            1, peers, {0: 0, 1: 0, 2: 1}, 2, HostIdentity().public_bytes(),
            max_rounds=3, feature_sums=feature_sums,
        )  # fmt: skip
        h.install(key, shares[0])
        return h

    def deposit(h: KeyHolder, n: int):
        c = Contribution(key.fingerprint, 0, f"h0-{n:032x}", 0, (0, 1), "ab" * 32)
        return h.deposit(host.sign(c))

    with pytest.raises(PermissionError, match=r"round 0 is outside this job's rounds 1\.\.3"):
        deposit(holder(False), 1)
    opens = holder(True)
    assert deposit(opens, 2)
    # A round-0 sum without every client of the federation (here client 2, at host 1)
    # would be some sites' statistics: refused, whoever approved it.
    approval = host.sign_bytes(cohort_message(key.fingerprint, 0, [f"h0-{2:032x}"]))
    with pytest.raises(PermissionError, match="with every client of the federation in them"):
        opens.share_sum(0, [f"h0-{2:032x}"], {0: approval})
    opens.restrict(1, 3)  # what the driver does once the feature sums are opened
    with pytest.raises(PermissionError, match=r"round 0 is outside this job's rounds 1\.\.3"):
        deposit(opens, 3)


# ------------------------------------------------------------------------------ jobs


def test_a_site_without_feature_sums_stops_the_run_before_round_1(ray_2cpus, tmp_path):
    """A sum of the other sites would be their statistics (and the key holders open
    round 0 only with every client in it): the run stops with one line naming the host."""
    import ray

    import tests.test_feature_scaling as this
    from fedray.errors import ClusterError
    from fedray.runtime.client import ClientHost
    from fedray.runtime.driver import run_experiment

    ray.cloudpickle.register_pickle_by_value(this)

    class NoSumsHost(ClientHost):
        def feature_sums(self, round_num=0):
            if 0 in self.client_ids:
                raise RuntimeError("the site's disk is gone")
            return super().feature_sums(round_num)

    cfg = compose(
        [
            *SMALL_KEY,
            "rounds=2",
            "checkpoint.every=0",
            "progress=false",
            "dataset.standardize=global",
        ]
    )
    with pytest.raises(ClusterError) as err:
        run_experiment(cfg, tmp_path / "run", host_class=NoSumsHost)
    assert str(err.value).startswith(
        "client host 0 gave no feature sums (RuntimeError: the site's disk is gone); the "
        "federation-wide statistics need every site, so the run stops before round 1"
    ), err.value
    assert not (tmp_path / "run" / "metrics.csv").exists()


def _sites(folder: Path, orders: list[list[str]]) -> None:
    """Three sites: site 1 has an extra column, site 2 empty cells; a test file too."""
    folder.mkdir()
    for cid, order in enumerate(orders):
        data = _rows(40 + 10 * cid, cid)
        data["age"] = [a + 15 * cid for a in data["age"]]  # non-IID: the sites differ
        extra = {"site_note": ["x"] * len(data["label"])} if cid == 1 else None
        if cid == 2:
            for i in (3, 11, 20):
                data["bmi"][i] = ""
            data["sex"][7] = ""
        _write_csv(folder / f"site_{cid}.csv", data, order, extra)
    _write_csv(folder / "test.csv", _rows(60, 9), ORDERS[1])


def _job(tmp_path: Path, name: str, orders, *more: str):
    _sites(tmp_path / name, orders)
    return compose(
        [
            "dataset=csv",
            f"dataset.path='{tmp_path / name}/site_{{client_id}}.csv'",
            f"dataset.test_path='{tmp_path / name}/test.csv'",
            "dataset.label=label",
            "+dataset.categorical.sex=[F,M]",
            "dataset.missing=impute_mean",
            "dataset.standardize=global",
            "num_clients=3",
            "clients_per_round=3",
            "rounds=2",
            "cluster.mode=simulation",
            "cluster.num_actors=2",
            "checkpoint.every=1",
            "progress=false",
            *SMALL_KEY,
            *more,
        ]
    )


def _pooled(folder: Path, cfg) -> np.ndarray:
    """Every site's training rows, computed centrally (what no party may do)."""
    from fedray.data.datasets import load_client_data

    data = load_client_data(cfg.dataset, [0, 1, 2], 3, cfg.seed, raw=True)
    return np.concatenate([data[c].x_train for c in range(3)]).astype(np.float64)


@pytest.mark.slow
def test_sites_in_any_column_order_train_alike_on_the_federations_statistics(ray_2cpus, tmp_path):
    """Three sites' tables in three column orders (one with an extra column, one with
    empty cells under impute_mean), encrypted: the job ends with the weights of the same
    job on one column order; the opened statistics are the pooled mean and deviation of
    every site's training rows; everything the server received is on the allow-list (it
    saw each site's sums sealed only); a resume prepares the data with the checkpoint's
    scaling without opening the sums again; the exported model reproduces the accuracy."""
    import subprocess
    import sys

    import ray

    from fedray.runtime.driver import run_experiment
    from fedray.runtime.outputs import load_checkpoint
    from tests.conftest import ROOT
    from tests.test_server_view import RecordingServer, server_view_problems

    same = _job(tmp_path, "same", [COLUMNS] * 3)
    mixed = _job(tmp_path, "mixed", ORDERS)
    record = tmp_path / "received"
    record.mkdir()
    server = type("Recording", (RecordingServer,), {"record_dir": str(record)})
    a = run_experiment(same, tmp_path / "out_same")
    b = run_experiment(mixed, tmp_path / "out_mixed", server_class=server)
    assert a["rounds_completed"] == b["rounds_completed"] == 2
    assert (a["standardize"], a["impute_mean"]) == ("global", True)
    wa = load_checkpoint(tmp_path / "out_same" / "checkpoints")["weights"]
    wb = load_checkpoint(tmp_path / "out_mixed" / "checkpoints")["weights"]
    assert np.array_equal(wa, wb)

    scaling = json.loads((tmp_path / "out_mixed" / "feature_scaling.json").read_text())
    pooled = _pooled(tmp_path / "mixed", mixed)
    assert np.isnan(pooled).any()  # site 2's empty cells: counted nowhere, then imputed
    np.testing.assert_allclose(scaling["mean"], np.nanmean(pooled, axis=0), rtol=1e-9)
    np.testing.assert_allclose(scaling["std"], np.nanstd(pooled, axis=0), rtol=1e-9)

    import pickle

    received = [pickle.loads(p.read_bytes()) for p in sorted(record.glob("0*.pkl"))]
    facts = pickle.loads((record / "facts.pkl").read_bytes())
    nodes = {node["NodeID"] for node in ray.nodes()}
    assert server_view_problems(mixed, received, facts, nodes) == []
    assert [r["round"] for r in received if r["channel"] == "open_feature_sums"] == [0, 0]

    # Resume to round 3: the checkpoint's scaling, round 0 not opened again.
    record = tmp_path / "received_on_resume"
    record.mkdir()
    server = type("Recording", (RecordingServer,), {"record_dir": str(record)})
    c = run_experiment(
        replace(mixed, rounds=3, resume=True), tmp_path / "out_mixed", server_class=server
    )
    assert c["rounds_completed"] == 3
    again = [pickle.loads(p.read_bytes()) for p in sorted(record.glob("0*.pkl"))]
    assert {r["round"] for r in again} == {3}  # no round 0: the sums stay opened once
    assert json.loads((tmp_path / "out_mixed" / "feature_scaling.json").read_text()) == scaling

    # The exported model prepares new rows with the federation's scaling.
    run = tmp_path / "out_mixed"
    (run / ".hydra").mkdir(exist_ok=True)
    from omegaconf import OmegaConf

    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(mixed)))
    out = tmp_path / "model"
    res = subprocess.run(
        [sys.executable, "-m", "fedray.export", str(run), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    spec = json.loads((out / "fedray_model.json").read_text())
    assert spec["scaling"]["mode"] == "global"
    assert spec["scaling"]["mean"] == scaling["mean"]
    assert spec["scaling"]["impute_mean"] == scaling["mean"]
    from fedray.predict import load_model

    model = load_model(out)
    x, y = model.read(str(tmp_path / "mixed" / "test.csv"))
    assert float((model.predict(x) == y).mean()) == pytest.approx(c["final_accuracy"], abs=1e-6)
