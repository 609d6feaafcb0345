"""A usable model out (issue #27): export a finished run, predict in a fresh process.

The exported model, loaded without Ray or fedray's job code, reproduces the test accuracy
the job reported: for the default task (breast_cancer, MLP) and for a CSV job whose test
file has its columns in another order, an extra column and a declared category.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli


def _python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _predict(model_dir: Path, table: Path, out: Path) -> np.ndarray:
    """python -m fedray.predict in a fresh process that must not import Ray."""
    code = (
        "import sys; from fedray.predict import main; rc = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules, 'predict imported ray'; sys.exit(rc)"
    )
    res = _python("-c", code, str(model_dir), str(table), "--output", str(out))
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(out.open()))
    return np.array([int(r["prediction"]) for r in rows])


def _export(run_dir: Path, out: Path) -> dict:
    res = _python("-m", "fedray.export", str(run_dir), str(out))
    assert res.returncode == 0, res.stderr
    assert "exported round" in res.stdout
    return json.loads((out / "fedray_model.json").read_text())


@pytest.mark.slow
def test_exported_default_model_reproduces_the_reported_accuracy(tmp_path):
    from fedray.data.datasets import _bundled_split, bundled_feature_names

    run_dir = tmp_path / "run"
    res = run_cli(["crypto=none", "rounds=3", f"hydra.run.dir={run_dir}"])
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["num_features"], summary["num_classes"]) == (30, 2)

    spec = _export(run_dir, tmp_path / "model")
    assert spec["features"] == bundled_feature_names("breast_cancer")
    assert spec["scaling"]["mode"] == "per_table"
    assert spec["source"]["round"] == 3
    # The server's test split, raw, as a user would hold it: columns named, label last.
    _, _, xte, yte = _bundled_split("breast_cancer", 0.2, 0)
    table = tmp_path / "test.csv"
    with table.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*spec["features"], "target"])
        w.writerows([*map(float, row), int(label)] for row, label in zip(xte, yte, strict=True))
    predicted = _predict(tmp_path / "model", table, tmp_path / "pred.csv")
    assert len(predicted) == len(yte)
    assert abs(float((predicted == yte).mean()) - summary["final_accuracy"]) < 1e-6


def _site_tables(directory: Path, rng: np.random.Generator, n_sites: int = 3):
    """Sites' CSVs (numeric a, b and a category 'sex') with a learnable label."""
    paths = []
    for site in range(n_sites + 1):  # the last one is the server's test file
        n = 80
        a, b = rng.normal(size=n), rng.normal(size=n)
        sex = rng.choice(["F", "M"], size=n)
        label = ((a + 0.5 * b + (sex == "F")) > 0.5).astype(int)
        rows = [
            {"a": f"{x:.6f}", "b": f"{y:.6f}", "sex": s, "label": int(lab), "note": "x"}
            for x, y, s, lab in zip(a, b, sex, label, strict=True)
        ]
        name = "test.csv" if site == n_sites else f"site_{site}.csv"
        order = ["a", "b", "sex", "label"] if site == 0 else ["label", "sex", "b", "a", "note"]
        with (directory / name).open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=order, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        paths.append(directory / name)
    return paths


@pytest.mark.slow
def test_exported_csv_model_reads_columns_by_name(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    *_, test_file = _site_tables(data, np.random.default_rng(3))
    run_dir = tmp_path / "run"
    res = run_cli(
        [
            "dataset=csv",
            f"dataset.path={data}/site_{{client_id}}.csv",
            "dataset.label=label",
            f"dataset.test_path={test_file}",
            "+dataset.categorical.sex=[F,M]",
            "num_clients=3",
            "crypto=none",
            "rounds=3",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["features"] == ["a", "b", "sex"]  # client 0's order

    spec = _export(run_dir, tmp_path / "model")
    assert spec["features"] == ["a", "b", "sex"] and spec["categorical"] == {"sex": ["F", "M"]}
    assert spec["model"]["num_features"] == 4  # a, b, sex=F, sex=M
    # The test file has its columns in another order and an extra one ('note').
    predicted = _predict(tmp_path / "model", test_file, tmp_path / "pred.csv")
    labels = np.array([int(r["label"]) for r in csv.DictReader(test_file.open())])
    assert abs(float((predicted == labels).mean()) - summary["final_accuracy"]) < 1e-6
    assert summary["final_accuracy"] > 0.7  # it learned something: the check is not vacuous

    # New rows without the label column predict too; a missing feature is one clear line.
    unlabelled = tmp_path / "new.csv"
    unlabelled.write_text("sex,b,a\nF,0.1,0.2\nM,-1.0,0.3\nF,2.0,-0.5\n")
    assert len(_predict(tmp_path / "model", unlabelled, tmp_path / "new_pred.csv")) == 3
    broken = tmp_path / "broken.csv"
    broken.write_text("sex,a\nF,0.2\nM,0.3\n")
    res = _python("-m", "fedray.predict", str(tmp_path / "model"), str(broken))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing feature column(s) b" in lines[0], res.stderr


def test_export_refuses_what_it_cannot_export(tmp_path):
    res = _python("-m", "fedray.export", str(tmp_path), str(tmp_path / "out"))
    assert res.returncode == 2
    assert "no .hydra/config.yaml" in res.stderr and "Traceback" not in res.stderr
    res = _python("-m", "fedray.predict", str(tmp_path), str(tmp_path / "x.csv"))
    assert res.returncode == 2 and "no fedray_model.json" in res.stderr


# The fresh process that loads a model=hf export with transformers/peft only (no fedray
# job code, no Ray) and evaluates it on the job's synthetic test set as the task does.
_HF_EVAL = """
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from fedray.data.text import synthetic_test

out, base, how, strength = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if how == "adapter":
    from peft import PeftModel
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base), out)
    tokenizer = AutoTokenizer.from_pretrained(base)
else:
    model = AutoModelForSequenceClassification.from_pretrained(out + "/merged")
    tokenizer = AutoTokenizer.from_pretrained(out + "/merged")
model.eval()
texts, labels = synthetic_test(num_samples=1000, num_topics=4, topic_strength=strength, seed=0)
enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=32,
                return_tensors="pt")
correct = 0
with torch.no_grad():
    for s in range(0, len(labels), 256):
        logits = model(input_ids=enc["input_ids"][s:s + 256],
                       attention_mask=enc["attention_mask"][s:s + 256]).logits
        correct += int((logits.argmax(1) == torch.as_tensor(labels[s:s + 256])).sum())
assert "ray" not in sys.modules
print(json.dumps({"accuracy": correct / len(labels)}))
"""


@pytest.mark.slow
def test_exported_lora_model_loads_with_peft_and_transformers(tmp_path):
    from fedray.tools.tiny_model import main as tiny_model

    tiny = tmp_path / "tiny"
    tiny_model([str(tiny)])
    run_dir = tmp_path / "run"
    res = run_cli(
        [
            "model=hf",
            f"model.path={tiny}",
            "crypto=none",
            "num_clients=4",
            "rounds=4",
            "dataset.topic_strength=0.7",
            "dataset.dirichlet_alpha=2.0",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    res = _python("-m", "fedray.export", str(run_dir), str(tmp_path / "model"), "--merge")
    assert res.returncode == 0, res.stderr
    assert "LoRA r=8 adapters" in res.stdout and "merged copy" in res.stdout
    assert (tmp_path / "model" / "adapter_config.json").is_file()
    for how in ("adapter", "merged"):
        res = _python("-c", _HF_EVAL, str(tmp_path / "model"), str(tiny), how, "0.7", timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        accuracy = json.loads(res.stdout.strip().splitlines()[-1])["accuracy"]
        assert abs(accuracy - summary["final_accuracy"]) < 1e-6, how
    assert summary["final_accuracy"] > 0.5  # 4 topics, chance 0.25: the check bites
