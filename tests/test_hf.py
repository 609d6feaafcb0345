"""model=hf: a local Hugging Face checkpoint, LoRA through peft, text data, GPUs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedray.data.text import synthetic_site
from fedray.models import ParamView, count_model_parameters
from fedray.runtime.client import ClientHost, RoundTask
from fedray.tasks.base import build_task, build_task_model
from tests.conftest import compose


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from fedray.tools.tiny_model import main

    path = tmp_path_factory.mktemp("tiny")
    main([str(path)])
    return path


def _exchanged(cfg):
    task = build_task(cfg)
    model = build_task_model(task, cfg.seed)
    return ParamView(model), count_model_parameters(model)


def test_lora_exchanges_only_adapters_and_head(tiny_dir):
    view, total = _exchanged(compose(["model=hf", f"model.path={tiny_dir}", "crypto=none"]))
    assert view.names and all("lora_" in n or "classifier" in n for n in view.names)
    assert any("lora_A" in n for n in view.names) and any("classifier" in n for n in view.names)
    assert view.size <= 0.05 * total
    full, total_full = _exchanged(
        compose(["model=hf", f"model.path={tiny_dir}", "crypto=none", "model.lora.r=0"])
    )
    assert full.size == total_full  # r=0: every parameter is exchanged
    assert total_full < total  # LoRA adds adapters (and peft a trainable copy of the head)
    bigger, _ = _exchanged(
        compose(["model=hf", f"model.path={tiny_dir}", "crypto=none", "model.lora.r=16"])
    )
    assert bigger.size > view.size


def test_missing_checkpoint_and_site_file_are_one_line(tiny_dir, tmp_path):
    cfg = compose(["model=hf", f"model.path={tmp_path / 'nope'}", "crypto=none"])
    host = ClientHost(cfg, [0], None)
    assert "is not a Hugging Face checkpoint directory" in host.ready()
    cfg = compose(
        [
            "model=hf",
            f"model.path={tiny_dir}",
            "crypto=none",
            "dataset=text",
            f"dataset.path='{tmp_path}/site_{{client_id}}.jsonl'",
        ]
    )
    host = ClientHost(cfg, [2], None)
    assert host.ready() == f"data file not found: {tmp_path}/site_2.jsonl"
    (tmp_path / "site_2.jsonl").write_text(
        '{"text": "a b", "label": 7}\n{"text": "c", "label": 0}\n'
    )
    assert "label 7 is out of range" in ClientHost(cfg, [2], None).ready()


def _write_sites(tmp_path, num_sites):
    for cid in range(num_sites):
        texts, labels = synthetic_site(
            cid, num_samples=150, num_topics=4, topic_strength=0.7, dirichlet_alpha=2.0, seed=5
        )
        lines = [
            json.dumps({"text": t, "label": int(y)}) for t, y in zip(texts, labels, strict=True)
        ]
        (tmp_path / f"site_{cid}.jsonl").write_text("\n".join(lines))
    texts, labels = synthetic_site(
        99, num_samples=300, num_topics=4, topic_strength=0.7, dirichlet_alpha=100.0, seed=6
    )
    lines = [json.dumps({"text": t, "label": int(y)}) for t, y in zip(texts, labels, strict=True)]
    (tmp_path / "test.jsonl").write_text("\n".join(lines))


@pytest.mark.slow
def test_lora_job_on_jsonl_sites_learns_and_sends_only_adapters(ray_2cpus, tiny_dir, tmp_path):
    """Plaintext, so the bytes sent show that only the adapters travel (the encrypted
    LoRA job is test_smaller_acceptance_job_on_synthetic_text_encrypted)."""
    from fedray.runtime.driver import run_experiment

    _write_sites(tmp_path, 4)
    cfg = compose(
        [
            "model=hf",
            f"model.path={tiny_dir}",
            "dataset=text",
            f"dataset.path='{tmp_path}/site_{{client_id}}.jsonl'",
            f"dataset.test_path={tmp_path}/test.jsonl",
            "num_clients=4",
            "clients_per_round=4",
            "rounds=6",
            "crypto=none",
            "progress=false",
            "checkpoint.every=0",
        ]
    )
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["rounds_completed"] == 6 and summary["client_failures"] == 0
    assert summary["final_accuracy"] > 0.6  # chance: 0.25
    view, total = _exchanged(cfg)
    assert summary["num_parameters"] == view.size and summary["num_model_parameters"] == total
    assert summary["num_parameters"] <= 0.05 * summary["num_model_parameters"]
    # float32 deltas (4 bytes) of the exchanged values only, 4 clients a round
    assert summary["bytes_up"] / summary["rounds_completed"] == 4 * 4 * view.size


@pytest.mark.gpu
def test_training_runs_on_the_actors_gpu_in_bf16(tiny_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = compose(
        [
            "model=hf",
            f"model.path={tiny_dir}",
            "crypto=none",
            "client.num_gpus=1",
            "model.precision=bf16",
            "num_clients=2",
            "clients_per_round=2",
        ]
    )
    host = ClientHost(cfg, [0, 1], None, 150.0)
    assert host.ready() is True
    assert host.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in host.model.parameters())
    assert host.data[0][0].input_ids.device.type == "cuda"
    w = host.view.get()
    results = host.train(RoundTask(1, [0, 1], {}), w)
    assert all(r.error is None for r in results), [r.error for r in results]
    assert all(np.isfinite(r.delta).all() and np.abs(r.delta).max() > 0 for r in results)
    assert host.describe()[0]["device"].startswith("cuda")


@pytest.mark.slow
def test_smaller_acceptance_job_on_synthetic_text_encrypted(ray_2cpus, tiny_dir, tmp_path):
    """The acceptance command, smaller: text_synthetic, LoRA r=8, Paillier (512-bit)."""
    from fedray.runtime.driver import run_experiment

    cfg = compose(
        [
            "dataset=text_synthetic",
            "model=hf",
            f"model.path={tiny_dir}",
            "model.lora.r=8",
            "num_clients=4",
            "clients_per_round=4",
            "rounds=6",
            "dataset.topic_strength=0.7",
            "dataset.dirichlet_alpha=2.0",
            "crypto=paillier",
            "crypto.key_bits=512",
            "crypto.allow_insecure_keys=true",
            "progress=false",
            "checkpoint.every=0",
        ]
    )
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["rounds_completed"] == 6 and summary["client_failures"] == 0
    assert summary["final_accuracy"] > 0.6  # chance: 0.25
    assert summary["num_parameters"] <= 0.05 * summary["num_model_parameters"]


def test_bf16_autocast_trains_on_the_cpu_too(tiny_dir):
    cfg = compose(
        [
            "model=hf",
            f"model.path={tiny_dir}",
            "crypto=none",
            "model.precision=bf16",
            "num_clients=2",
            "clients_per_round=2",
        ]
    )
    host = ClientHost(cfg, [0], None, 150.0)
    assert host.ready() is True
    result = host.train(RoundTask(1, [0], {}), host.view.get())[0]
    assert result.error is None and np.isfinite(result.delta).all()
    assert np.abs(result.delta).max() > 0


def test_long_local_training_reports_progress(tiny_dir, monkeypatch, capsys):
    import fedray.tasks.text as text_task

    monkeypatch.setattr(text_task, "PROGRESS_EVERY_S", 0.0)
    cfg = compose(["model=hf", f"model.path={tiny_dir}", "crypto=none"])
    host = ClientHost(cfg, [3], None, 150.0)
    host.train(RoundTask(1, [3], {}), host.view.get())
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "client 3: local step" in ln]
    assert lines and lines[-1].startswith("[fedray] client 3: local step 40/40, loss ")
