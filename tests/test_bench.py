"""`make bench`'s two scripts: benchmarks/bench.py runs benchmarks and writes one results
file per run (commit, machine, load, figures); benchmarks/compare.py compares two files
figure by figure, each by its own direction, and exits 1 on a regression."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "benchmarks"


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def _bench_noise(out, noise_args: str) -> subprocess.CompletedProcess:
    """benchmarks/bench.py, the noise benchmark only, with ``noise_args``, into ``out``."""
    return subprocess.run(
        [sys.executable, str(BENCH / "bench.py"), "--only", "noise", "--out", str(out)]
        + ["--args", f"noise={noise_args}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory):
    """One real, small run of benchmarks/bench.py: the noise benchmark at 20,000 values."""
    out = tmp_path_factory.mktemp("bench")
    proc = _bench_noise(out, "--size 20000 --repeats 2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return files[0], proc.stdout


def test_a_run_writes_commit_machine_load_and_the_figures(noise_run):
    path, stdout = noise_run
    data = json.loads(path.read_text())
    assert data["commit"] == _git("rev-parse", "HEAD") and path.name.endswith(
        f"-{data['commit'][:8]}.json"
    )
    assert data["machine"]["cores"] == os.cpu_count() and data["machine"]["cpu"]
    assert data["versions"]["numpy"] and data["versions"]["python"]
    record = data["benchmarks"]["noise"]
    assert record["exit_code"] == 0 and record["seconds"] > 0
    assert "--size 20000" in record["command"]
    assert len(record["load_average_before"]) == 3 and len(record["load_average_after"]) == 3
    figures = record["figures"]
    assert set(figures) == {"csprng normal draws", "numpy normal draws", "csprng / numpy"}
    ratio = figures["csprng / numpy"]
    assert ratio["better"] == "lower" and ratio["unit"] == "ratio"
    per_million = figures["csprng normal draws"]["value"]
    assert per_million > 0 and ratio["value"] == pytest.approx(
        per_million / figures["numpy normal draws"]["value"], rel=1e-9
    )
    assert "ratio default / numpy" in stdout  # the benchmark's own output is shown


def test_a_failed_benchmark_is_recorded_and_the_run_exits_1(tmp_path):
    proc = _bench_noise(tmp_path, "--size -1")
    assert proc.returncode == 1 and "noise FAILED" in proc.stdout
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())["benchmarks"]["noise"]
    assert record["exit_code"] != 0 and record["output_tail"] and record["figures"] == {}


def test_bad_benchmark_arguments_are_one_line_naming_the_choices(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench.py"), "--args", "nosuch=1", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "NAME one of crypto, round_overhead" in proc.stderr
    assert not list(tmp_path.iterdir())


def _compare(old, new, tmp_path, *extra):
    a, b = tmp_path / "old.json", tmp_path / "new.json"
    a.write_text(json.dumps(old))
    b.write_text(json.dumps(new))
    return subprocess.run(
        [sys.executable, str(BENCH / "compare.py"), str(a), str(b), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_compare_judges_each_figure_by_its_direction(noise_run, tmp_path):
    path, _ = noise_run
    old = json.loads(path.read_text())
    same = _compare(old, old, tmp_path)
    assert same.returncode == 0 and "0 of 3 figures worse" in same.stdout
    slower = copy.deepcopy(old)
    slower["benchmarks"]["noise"]["figures"]["csprng normal draws"]["value"] *= 1.5
    worse = _compare(old, slower, tmp_path)
    assert worse.returncode == 1
    line = next(x for x in worse.stdout.splitlines() if x.startswith("noise/csprng normal"))
    assert "+50.0%" in line and "worse" in line
    # the same change to a figure where higher is better is an improvement
    higher = copy.deepcopy(slower)
    higher["benchmarks"]["noise"]["figures"]["csprng normal draws"]["better"] = "higher"
    assert _compare(old, higher, tmp_path).returncode == 0
    # within the tolerance: the same
    close = copy.deepcopy(old)
    close["benchmarks"]["noise"]["figures"]["csprng / numpy"]["value"] *= 1.05
    assert _compare(old, close, tmp_path).returncode == 0
    assert _compare(old, close, tmp_path, "--tolerance", "0.01").returncode == 1


def test_compare_warns_of_another_machine_or_load_and_refuses_other_files(noise_run, tmp_path):
    path, _ = noise_run
    old = json.loads(path.read_text())
    other = copy.deepcopy(old)
    other["machine"]["cores"] = 64
    other["benchmarks"]["noise"]["load_average_before"][0] = 40.0  # of 64 cores
    out = _compare(old, other, tmp_path).stdout
    assert "different machines" in out and "load average above half its cores" in out
    bad = _compare(old, {"benchmarks": {}}, tmp_path)
    assert bad.returncode == 2 and "not a results file" in bad.stderr
