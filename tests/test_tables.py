"""Site tables (dataset=csv, CSV or Parquet): columns matched by name, typed reads, one-line
errors with the option that fixes them, checked before Ray starts (issue #27)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace

import numpy as np
import pytest

from fedray.config import DatasetConfig
from fedray.data.datasets import check_site_tables, load_client_data
from fedray.data.tables import TableSpec, read_table
from fedray.errors import ConfigError, DataError
from tests.conftest import compose

COLUMNS = ["age", "bmi", "sex", "dose", "label"]
ORDERS = [  # the same columns, three orders
    COLUMNS,
    ["label", "dose", "sex", "bmi", "age"],
    ["sex", "age", "label", "bmi", "dose"],
]
SPEC = TableSpec(
    label="label", features=("age", "bmi", "sex", "dose"), categorical={"sex": ("F", "M")}
)


def _rows(n: int, seed: int) -> dict[str, list]:
    """A site's data as columns: three numbers, a category, a label that depends on all."""
    rng = np.random.default_rng(seed)
    age = np.round(rng.normal(50, 10, n), 3)
    bmi = np.round(rng.normal(25, 4, n), 3)
    dose = np.round(rng.uniform(0, 2, n), 3)
    sex = rng.choice(["F", "M"], n)
    score = (age - 50) / 10 - (bmi - 25) / 4 + dose - 1 + (sex == "F")
    return {
        "age": age.tolist(),
        "bmi": bmi.tolist(),
        "sex": sex.tolist(),
        "dose": dose.tolist(),
        "label": (score > 0).astype(int).tolist(),
    }


def _write_csv(path, data: dict[str, list], order: list[str], extra: dict | None = None):
    cols = {**data, **(extra or {})}
    names = order + list(extra or {})
    lines = [",".join(names)]
    lines += [",".join(str(cols[c][i]) for c in names) for i in range(len(data["label"]))]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _write_parquet(path, data: dict[str, list], order: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({c: data[c] for c in order}), path)
    return str(path)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------ by name


def test_column_order_and_extra_columns_do_not_change_the_matrix(tmp_path):
    data = _rows(30, 0)
    want_x, want_y = read_table(_write_csv(tmp_path / "one.csv", data, COLUMNS), SPEC)
    assert want_x.shape == (30, 5)  # age, bmi, sex=F, sex=M, dose
    np.testing.assert_array_equal(want_x[:, 0], np.float32(data["age"]))
    np.testing.assert_array_equal(want_x[:, 4], np.float32(data["dose"]))
    extra = {"site_note": ["x"] * 30, "zip": list(range(30))}
    for i, order in enumerate(ORDERS):
        path = _write_csv(tmp_path / f"order{i}.csv", data, order, extra if i == 2 else None)
        x, y = read_table(path, SPEC)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
        x, y = read_table(_write_parquet(tmp_path / f"order{i}.parquet", data, order), SPEC)
        np.testing.assert_array_equal(x, want_x)  # Parquet equals CSV
        np.testing.assert_array_equal(y, want_y)


def test_sites_are_loaded_in_client_0s_column_order_whatever_their_own(tmp_path, caplog):
    """dataset.features null: client 0's columns (logged once); every site by name."""
    data = [_rows(25, s) for s in range(3)]
    for cid in range(3):
        extra = {"ward": ["a"] * 25} if cid == 1 else None
        _write_csv(tmp_path / f"site_{cid}.csv", data[cid], ORDERS[cid], extra)
        _write_csv(tmp_path / f"same_{cid}.csv", data[cid], COLUMNS)
    common = {"name": "csv", "label": "label", "categorical": {"sex": ["F", "M"]}}
    mixed = DatasetConfig(path=str(tmp_path / "site_{client_id}.csv"), **common)
    same = DatasetConfig(path=str(tmp_path / "same_{client_id}.csv"), **common)
    with caplog.at_level(logging.INFO, logger="fedray"):
        assert check_site_tables(mixed, 3) == ["age", "bmi", "sex", "dose"]
    shown = [r.getMessage() for r in caplog.records if "features (from" in r.getMessage()]
    assert shown == ["features (from client 0's file): age, bmi, sex, dose"]
    ignored = [r.getMessage() for r in caplog.records if "ignoring column" in r.getMessage()]
    assert len(ignored) == 1 and "site_1.csv" in ignored[0] and ignored[0].endswith(": ward")
    got = load_client_data(mixed, [0, 1, 2], 3, seed=0)
    want = load_client_data(same, [0, 1, 2], 3, seed=0)
    for cid in range(3):
        np.testing.assert_array_equal(got[cid].x_train, want[cid].x_train)
        np.testing.assert_array_equal(got[cid].y_val, want[cid].y_val)


def test_an_excel_export_with_a_byte_order_mark_matches_by_name(tmp_path):
    data = _rows(10, 4)
    plain = _write_csv(tmp_path / "plain.csv", data, COLUMNS)
    excel = tmp_path / "excel.csv"  # Excel's "CSV UTF-8": a BOM before the first name
    excel.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.csv").read_bytes())
    np.testing.assert_array_equal(read_table(str(excel), SPEC)[0], read_table(plain, SPEC)[0])


def test_one_hot_columns_follow_the_declared_vocabulary(tmp_path):
    path = _write_csv(tmp_path / "s.csv", _rows(20, 1), COLUMNS)
    fm, _ = read_table(path, SPEC)
    mf, _ = read_table(path, replace(SPEC, categorical={"sex": ("M", "F")}))
    is_f = np.array(_rows(20, 1)["sex"]) == "F"
    np.testing.assert_array_equal(fm[:, 2], is_f)  # sex=F first, as declared
    np.testing.assert_array_equal(fm[:, 3], ~is_f)
    np.testing.assert_array_equal(mf[:, 2:4], fm[:, [3, 2]])
    assert SPEC.matrix_columns(SPEC.features) == ["age", "bmi", "sex=F", "sex=M", "dose"]


def test_drop_rows_drops_exactly_the_rows_with_a_missing_cell(tmp_path):
    data = _rows(20, 2)
    full_x, full_y = read_table(_write_csv(tmp_path / "full.csv", data, COLUMNS), SPEC)
    holes = {3: "bmi", 7: "sex", 11: "label", 15: "age"}
    for row, col in holes.items():
        data[col][row] = "NA" if row == 15 else ""
    path = _write_csv(tmp_path / "holes.csv", data, ORDERS[1], {"note": [""] * 20})
    with pytest.raises(DataError) as err:
        read_table(path, SPEC)
    assert _one_line(err) == (
        f"{path}: row 5, column 'bmi' is empty (a missing value); set "
        "dataset.missing=drop_rows to drop the rows with a missing cell, or impute_mean to "
        "fill them with the federation-wide mean"
    )
    x, y = read_table(path, replace(SPEC, missing="drop_rows"))
    keep = [i for i in range(20) if i not in holes]  # the empty 'note' cells do not count
    np.testing.assert_array_equal(x, full_x[keep])
    np.testing.assert_array_equal(y, full_y[keep])


# --------------------------------------------------------------------- bad tables

BAD_TABLES = {
    # id: (header, one data row, the fragments the one line must hold)
    "missing-column": (
        "age,sex,dose,label",
        "50,F,1,0",
        ["missing feature column(s) bmi (dataset.features)", "columns are: age, sex, dose, label"],
    ),
    "missing-label": (
        "age,bmi,sex,dose,outcome",
        "50,25,F,1,0",
        ["no label column 'label' (dataset.label)", "columns are: age, bmi, sex, dose, outcome"],
    ),
    "text-cell": (
        "age,bmi,sex,dose,label",
        "50,high,F,1,0",
        [
            "row 3, column 'bmi': 'high' is not a number",
            "declare it in dataset.categorical={bmi: [values...]} or drop it from dataset.features",
        ],
    ),
    "empty-cell": (
        "age,bmi,sex,dose,label",
        "50,25,F,,0",
        ["row 3, column 'dose' is empty", "dataset.missing=drop_rows"],
    ),
    "unknown-category": (
        "age,bmi,sex,dose,label",
        "50,25,X,1,0",
        [
            "row 3, column 'sex': 'X' is not a declared category",
            "(dataset.categorical.sex: F, M)",
        ],
    ),
    "extra-column": (
        "age,bmi,sex,dose,label,ward",
        "50,25,F,1,0,a",
        ["extra column(s) ward not in dataset.features", "dataset.extra_columns=ignore"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_each_bad_table_is_one_line_naming_the_file_and_the_fix(tmp_path, case):
    header, row, fragments = BAD_TABLES[case]
    width = len(header.split(","))
    path = tmp_path / f"{case}.csv"
    path.write_text(f"{header}\n{','.join(['1', '2', 'M', '1', '1', 'b'][:width])}\n{row}\n")
    spec = replace(SPEC, extra_columns="error")
    with pytest.raises(DataError) as err:
        read_table(str(path), spec)
    line = _one_line(err)
    assert line.startswith(f"{path}: "), line
    for fragment in fragments:
        assert fragment in line, line


def test_a_text_column_in_parquet_names_the_row_and_the_hint(tmp_path):
    data = _rows(6, 3)
    data["bmi"] = [str(v) for v in data["bmi"]]
    assert read_table(_write_parquet(tmp_path / "ok.parquet", data, COLUMNS), SPEC)[0].shape[0] == 6
    data["bmi"][4] = "obese"
    path = _write_parquet(tmp_path / "bad.parquet", data, COLUMNS)
    with pytest.raises(DataError) as err:
        read_table(path, SPEC)
    assert _one_line(err).startswith(f"{path}: row 5, column 'bmi': 'obese' is not a number; ")
    assert "dataset.categorical={bmi: [values...]}" in str(err.value)


def test_the_check_before_ray_reads_headers_only(tmp_path):
    """check_site_tables finds a wrong header at any site, and reads no value (a bad cell
    passes it: the site finds that itself, at set-up)."""
    for cid in range(3):
        _write_csv(tmp_path / f"site_{cid}.csv", _rows(5, cid), ORDERS[cid])
    (tmp_path / "site_1.csv").write_text("age,bmi,sex,dose,label\n1,oops,F,1,0\n")
    cfg = DatasetConfig(name="csv", path=str(tmp_path / "site_{client_id}.csv"), label="label")
    assert check_site_tables(cfg, 3) == ["age", "bmi", "sex", "dose"]
    (tmp_path / "site_2.csv").write_text("age,sex,dose,label\n1,F,1,0\n")
    with pytest.raises(DataError) as err:
        check_site_tables(cfg, 3)
    assert _one_line(err).startswith(f"{tmp_path}/site_2.csv: missing feature column(s) bmi")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"missing": "zero"},
            "dataset.missing='zero' is not allowed; choose one of: error, drop_rows, impute_mean",
        ),
        ({"extra_columns": "warn"}, "dataset.extra_columns='warn' is not allowed; choose one of"),
        ({"features": ["age", "age"]}, "dataset.features names age more than once"),
        ({"features": ["age", "label"]}, "must not include the label column 'label'"),
        ({"categorical": {"sex": []}}, "dataset.categorical.sex must be a non-empty list"),
        ({"categorical": ["sex"]}, "dataset.categorical=['sex'] must map each categorical"),
        ({"categorical": {"sex": ["F", "F"]}}, "dataset.categorical.sex lists F more than once"),
        ({"categorical": {"label": ["0", "1"]}}, "the label column cannot be categorical"),
        (
            {"features": ["age"], "categorical": {"sex": ["F"]}},
            "dataset.categorical.sex: 'sex' is not in dataset.features (age)",
        ),
    ],
)
def test_bad_table_options_are_one_config_error_line(options, message):
    with pytest.raises(ConfigError, match=None) as err:
        DatasetConfig(name="csv", path="d/site_{client_id}.csv", label="label", **options)
    assert message in _one_line(err)


def test_categorical_takes_both_command_line_spellings():
    base = ["dataset=csv", "dataset.path='d/s_{client_id}.csv'", "dataset.label=y"]
    a = compose([*base, "dataset.categorical={sex:[F,M],grade:[1,2]}"]).dataset.categorical
    b = compose([*base, "+dataset.categorical.sex=[F,M]", "+dataset.categorical.grade=[1,2]"])
    assert a == b.dataset.categorical == {"sex": ["F", "M"], "grade": ["1", "2"]}
    with pytest.raises(ConfigError, match="applies to dataset=csv only"):
        compose(["dataset.features=[a]"])


# ----------------------------------------------------------------------- real jobs


def _job(tmp_path, name: str, orders: list[list[str]], extra_at: int | None, *more: str):
    folder = tmp_path / name
    folder.mkdir()
    for cid in range(3):
        extra = {"ward": ["a"] * 40} if cid == extra_at else None
        _write_csv(folder / f"site_{cid}.csv", _rows(40, cid), orders[cid], extra)
    return compose(
        [
            "dataset=csv",
            f"dataset.path='{folder}/site_{{client_id}}.csv'",
            "dataset.label=label",
            "+dataset.categorical.sex=[F,M]",
            "num_clients=3",
            "clients_per_round=3",
            "crypto=none",
            "rounds=2",
            "cluster.mode=simulation",  # one actor hosts the three sites: a fast test
            "cluster.num_actors=1",
            "checkpoint.every=0",
            "progress=false",
            *more,
        ]
    )


def test_a_job_on_shuffled_columns_ends_with_the_same_weights(ray_2cpus, tmp_path, caplog):
    """The one-order job runs as embedded (tables checked before Ray); the shuffled one as
    on a cluster (ray.address set): client 0's header is read at its site, and each
    site's table at set-up."""
    from fedray.runtime.driver import run_experiment
    from fedray.runtime.outputs import load_checkpoint

    same = _job(tmp_path, "same", [COLUMNS] * 3, None)
    mixed = _job(tmp_path, "mixed", ORDERS, 1, f"ray.address={ray_2cpus}")
    a = run_experiment(same, tmp_path / "out_same")
    with caplog.at_level(logging.INFO, logger="fedray"):
        b = run_experiment(mixed, tmp_path / "out_mixed")
    shown = [r.getMessage() for r in caplog.records if "features (from" in r.getMessage()]
    assert shown == ["features (from client 0's file): age, bmi, sex, dose"]
    assert a["rounds_completed"] == b["rounds_completed"] == 2
    wa = load_checkpoint(tmp_path / "out_same" / "checkpoints")["weights"]
    wb = load_checkpoint(tmp_path / "out_mixed" / "checkpoints")["weights"]
    assert np.array_equal(wa, wb)


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_bad_table_fails_before_ray_and_keeps_the_run_directory(tmp_path, monkeypatch):
    """The launcher prints this DataError as its one `fedray: error:` line, exit 2 (the
    same block as the file check that tests/test_config.py runs through the CLI)."""
    import fedray.runtime.cluster
    from fedray.runtime.driver import run_experiment

    cfg = _job(tmp_path, "data", ORDERS, None)
    (tmp_path / "data" / "site_2.csv").write_text("age,bmi,dose,label\n1,2,3,0\n")
    run = tmp_path / "run"
    (run / "checkpoints" / "round_00002").mkdir(parents=True)
    (run / "checkpoints" / "round_00002" / "state.json").write_text('{"round": 2}')
    (run / "metrics.csv").write_text("round,seconds\n1,0.5\n2,0.4\n")
    (run / "summary.json").write_text('{"rounds_completed": 2}')
    before = _snapshot(run)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the tables were checked")

    monkeypatch.setattr(fedray.runtime.cluster, "connect", no_ray)
    with pytest.raises(DataError) as err:
        run_experiment(cfg, run)
    assert _one_line(err) == (
        f"{tmp_path}/data/site_2.csv: missing feature column(s) sex (dataset.features); "
        "columns are: age, bmi, dose, label"
    )
    assert _snapshot(run) == before
