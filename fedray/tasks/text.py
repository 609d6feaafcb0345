"""The built-in ``model=hf`` task: fine-tune a local Hugging Face text classifier.

``model.path`` is any ``AutoModelForSequenceClassification`` checkpoint on disk (config,
weights, tokenizer); nothing is downloaded. With ``model.lora.r > 0`` the base model is
frozen and peft adds LoRA adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models", ICLR 2022) to ``model.lora.target_modules``; the classification head
trains too. Only those trainable parameters are exchanged (and encrypted).
Each site's texts are read and tokenized inside its own actor.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedray.errors import ConfigError, DataError
from fedray.tasks.base import ProximalTerm, Task, epoch_batches

EVAL_BATCH = 256
PROGRESS_EVERY_S = 15.0  # local training that runs longer reports progress this often


@dataclass
class Encoded:
    """Tokenized texts and their labels, as tensors on the training device."""

    input_ids: Any
    attention_mask: Any
    labels: Any

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx) -> dict[str, Any]:
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx]}


def _quiet_transformers() -> None:
    """No download-progress bars or hub warnings in every actor's log."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _check_path(path: str) -> None:
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(
            f"model.path={path!r} is not a Hugging Face checkpoint directory (no config.json); "
            "make a small one with: python -m fedray.tools.tiny_model DIR"
        )


def load_hf_model(model_cfg: Any):
    """The checkpoint at ``model.path``, wrapped with LoRA adapters unless ``lora.r=0``."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    _check_path(model_cfg.path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_cfg.path, local_files_only=True
    )
    lora = model_cfg.lora
    if lora.r == 0:
        return model  # full fine-tuning: every parameter trains and travels
    from peft import LoraConfig, get_peft_model

    try:
        config = LoraConfig(
            task_type="SEQ_CLS",  # also keeps the classification head trainable
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules) if lora.target_modules else None,
        )
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(
            f"model.lora.target_modules={lora.target_modules}: " + str(exc).strip().splitlines()[0]
        ) from None


class TextClassificationTask(Task):
    """Sequence classification with a local Hugging Face model, AdamW, optional bf16."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self._tokenizer = None
        self._num_labels: int | None = None

    # -- data ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            _quiet_transformers()
            _check_path(self.cfg.model.path)
            self._tokenizer = AutoTokenizer.from_pretrained(
                self.cfg.model.path, local_files_only=True
            )
        return self._tokenizer

    @property
    def num_labels(self) -> int:
        if self._num_labels is None:
            from transformers import AutoConfig

            _quiet_transformers()
            _check_path(self.cfg.model.path)
            config = AutoConfig.from_pretrained(self.cfg.model.path, local_files_only=True)
            self._num_labels = int(config.num_labels)
        return self._num_labels

    def encode(self, texts: list[str], labels: np.ndarray, source: str) -> Encoded:
        """Tokenize (padded and cut to ``dataset.max_length``) after checking the labels."""
        import torch

        if len(labels) and int(labels.max()) >= self.num_labels:
            raise DataError(
                f"{source}: label {int(labels.max())} is out of range: the model at "
                f"model.path has {self.num_labels} classes (0..{self.num_labels - 1})"
            )
        enc = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.cfg.dataset.max_length,
            return_tensors="pt",
        )
        return Encoded(
            enc["input_ids"].to(self.device),
            enc["attention_mask"].to(self.device),
            torch.as_tensor(labels, dtype=torch.long, device=self.device),
        )

    def load_data(self, client_id: int, num_clients: int) -> tuple[Encoded, Encoded]:
        from fedray.data.text import read_jsonl, synthetic_site

        d = self.cfg.dataset
        if d.name == "text_synthetic":
            source = f"text_synthetic site {client_id}"
            texts, labels = synthetic_site(
                client_id,
                num_samples=d.samples_per_client,
                num_topics=d.num_classes,
                topic_strength=d.topic_strength,
                dirichlet_alpha=d.dirichlet_alpha,
                seed=self.cfg.seed,
            )
        else:
            source = d.path.format(client_id=client_id)
            texts, labels = read_jsonl(source)
        rng = np.random.default_rng([self.cfg.seed, client_id, 7])
        order = rng.permutation(len(labels))
        n_val = min(int(round(len(labels) * d.holdout_fraction)), len(labels) - 1)
        val, train = order[:n_val], order[n_val:]
        pick = [texts[i] for i in train], labels[train]
        held = [texts[i] for i in val], labels[val]
        return self.encode(*pick, source), self.encode(*held, source)

    def load_test_data(self) -> Encoded | None:
        from fedray.data.text import read_jsonl, synthetic_test

        d = self.cfg.dataset
        if d.name == "text_synthetic":
            texts, labels = synthetic_test(
                num_samples=d.test_samples,
                num_topics=d.num_classes,
                topic_strength=d.topic_strength,
                seed=self.cfg.seed,
            )
            return self.encode(texts, labels, "text_synthetic test set")
        if d.test_path:
            return self.encode(*read_jsonl(d.test_path), d.test_path)
        return None

    def describe(self, train: Encoded, validation: Encoded) -> dict:
        from fedray.data.partition import label_histogram

        return {"labels": label_histogram(train.labels.cpu().numpy(), self.num_labels)}

    # -- model, train, evaluate ---------------------------------------------------------
    def build_model(self):
        return load_hf_model(self.cfg.model)

    def _autocast(self):
        import torch

        if self.cfg.model.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(
        self,
        model,
        data: Encoded,
        *,
        epochs: int,
        lr: float,
        seed: int,
        client_id: int = 0,
        proximal_mu: float = 0.0,
    ) -> dict:
        import time

        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        proximal = ProximalTerm(params, proximal_mu)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout
        n, bs = len(data), self.cfg.batch_size
        total, batches = 0.0, 0
        steps = epochs * -(-n // bs)
        started = last_report = time.monotonic()
        model.train()
        for idx in epoch_batches(n, bs, epochs, gen, self.device):
            opt.zero_grad(set_to_none=True)
            with self._autocast():
                logits = model(**data.batch(idx)).logits
            loss = proximal(torch.nn.functional.cross_entropy(logits.float(), data.labels[idx]))
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
            if self.cfg.progress and time.monotonic() - last_report > PROGRESS_EVERY_S:
                last_report = time.monotonic()
                print(
                    f"[fedray] client {client_id}: local step {batches}/{steps}, "
                    f"loss {total / batches:.4f}, {last_report - started:.0f}s",
                    flush=True,
                )
        model.eval()
        return {"loss": total / max(1, batches)}

    def evaluate(self, model, data: Encoded) -> dict:
        import torch

        model.eval()
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(data), EVAL_BATCH):
                idx = slice(start, start + EVAL_BATCH)
                with self._autocast():
                    logits = model(**data.batch(idx)).logits.float()
                y = data.labels[idx]
                loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
        n = max(1, len(data))
        return {"loss": loss_sum / n, "accuracy": correct / n}
