"""Issue #27's paper cuts: no server test set, which cluster was joined, a silent
ray.address, the run directory's log, failed starts, Poisson cohorts.

Every socket here is on loopback: the silent and the wrong-protocol "heads" listen on
loopback_node_ip() (which Ray keeps as given, unlike 127.0.0.1), and nothing dials out.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from fedray.runtime import driver
from tests.conftest import compose

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
