"""The tiny local Hugging Face model, and text data (JSON lines, synthetic topics)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedray.data.text import read_jsonl, synthetic_site, synthetic_test, vocabulary
from fedray.errors import DataError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from fedray.tools.tiny_model import main

    path = tmp_path_factory.mktemp("tiny")
    assert main([str(path)]) == 0
    return path


def test_tiny_model_loads_with_from_pretrained_offline(tiny_dir, monkeypatch):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.model_type == "bert" and model.config.num_labels == 4
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    texts, _ = synthetic_site(
        0, num_samples=3, num_topics=4, topic_strength=0.3, dirichlet_alpha=0.5, seed=0
    )
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt"
    )
    # A tokenizer trained on the corpus knows its words: no unknown tokens.
    assert tokenizer.unk_token_id not in enc["input_ids"].tolist()[0]
    assert enc["input_ids"][0, 0] == tokenizer.cls_token_id
    with torch.no_grad():
        assert model(**enc).logits.shape == (3, 4)


def test_tiny_model_is_deterministic(tiny_dir, tmp_path):
    from safetensors.numpy import load_file

    from fedray.tools.tiny_model import main

    main([str(tmp_path)])
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_synthetic_text_is_non_iid_and_the_vocabulary_is_fixed():
    topics, filler = vocabulary(4)
    assert len({w for t in topics for w in t} | set(filler)) == 4 * len(topics[0]) + len(filler)
    mixes = []
    for cid in range(6):
        _, y = synthetic_site(
            cid, num_samples=400, num_topics=4, topic_strength=0.3, dirichlet_alpha=0.5, seed=0
        )
        mixes.append(np.bincount(y, minlength=4) / len(y))
    # Each site leans to some topics: its largest topic share is far above a quarter.
    assert np.mean([m.max() for m in mixes]) > 0.45
    # Sites lean to different topics.
    assert len({int(m.argmax()) for m in mixes}) >= 2
    texts, y = synthetic_test(num_samples=400, num_topics=4, topic_strength=0.3, seed=0)
    assert np.bincount(y).tolist() == [100] * 4
    # The label is in the words: a document holds words of its own topic.
    own = [
        sum(w in set(topics[label]) for w in t.split()) for t, label in zip(texts, y, strict=True)
    ]
    assert np.mean(own) > 2
    again, _ = synthetic_test(num_samples=400, num_topics=4, topic_strength=0.3, seed=0)
    assert again == texts


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_read_jsonl_reads_text_and_integer_labels(tmp_path):
    path = _write(
        tmp_path / "a.jsonl",
        [
            json.dumps({"text": "hi there", "label": 1}),
            "",
            json.dumps({"text": "bye", "label": 0, "x": 3}),
        ],
    )
    texts, labels = read_jsonl(path)
    assert texts == ["hi there", "bye"] and labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"label": 1}', "line 1 has no field 'text'"),
        ('{"text": "a"}', "line 1 has no field 'label'"),
        ('{"text": "a", "label": "pos"}', "line 1: label 'pos' must be an integer class id"),
        ('{"text": "a", "label": 1.5}', "line 1: label 1.5 must be an integer class id"),
        ('{"text": "a", "label": -1}', "line 1: label -1 must be an integer class id"),
        ('{"text": 3, "label": 1}', "line 1: text must be a string"),
        ("not json", "line 1 is not valid JSON"),
    ],
)
def test_read_jsonl_bad_input_is_one_clear_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [line])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert message in str(err.value) and str(tmp_path) in str(err.value)
    assert "\n" not in str(err.value)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*site_3.jsonl"):
        read_jsonl(str(tmp_path / "site_3.jsonl"))


def test_model_hf_defaults_to_synthetic_text_and_its_own_lr():
    from tests.conftest import compose

    cfg = compose(["model=hf", "model.path=/nowhere"])
    assert cfg.dataset.name == "text_synthetic" and cfg.dataset.num_classes == 4
    assert cfg.lr == 0.01 and cfg.batch_size == 8 and cfg.model.lora.r == 8
    cfg = compose(
        [
            "model=hf",
            "model.path=/x",
            "dataset=text",
            "dataset.path='d/s_{client_id}.jsonl'",
            "lr=0.01",
        ]
    )
    assert cfg.dataset.name == "text" and cfg.lr == 0.01


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=hf"], "model=hf needs model.path=DIR"),
        (["dataset=text_synthetic"], "dataset=text_synthetic needs model=hf"),
        (["model=hf", "model.path=x", "dataset=digits"], "model=hf classifies text"),
        (["model=hf", "model.path=x", "dataset=text"], "dataset.path must be set for dataset=text"),
        (["model=hf", "model.path=x", "model.precision=fp8"], "model.precision='fp8'"),
        (["model=hf", "model.path=x", "model.lora.r=-1"], "model.lora.r=-1"),
    ],
)
def test_text_config_errors_name_the_key(overrides, message):
    from fedray.errors import ConfigError
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        compose(overrides)
