"""Text classification data: JSON-lines files per site, and a generated non-IID topic task.

``dataset=text`` reads one file per site (``dataset.path='data/site_{client_id}.jsonl'``),
each line a JSON object with a string ``text`` and an integer ``label``. It is opened only
inside that site's actor.

``dataset=text_synthetic`` generates documents about ``num_classes`` topics. Each topic
owns a set of made-up words; a document mixes its topic's words (a share of
``topic_strength``) with filler words common to all topics, so the label is learnable
from the words alone. Sites are non-IID: each draws its topic mix from
Dirichlet(``dirichlet_alpha``), so it leans to a few topics. The vocabulary is fixed (it
does not depend on the job seed), so a tokenizer trained once on :func:`corpus` by
``python -m fedray.tools.tiny_model`` fits every run; the seed picks the documents.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import numpy as np

from fedray.errors import DataError

TOPIC_WORDS = 16  # per topic
FILLER_WORDS = 200
_VOCAB_SEED = 20240521  # fixed: the vocabulary is part of the task, not of a run
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")


@lru_cache(maxsize=8)
def vocabulary(num_topics: int) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]:
    """(words of each topic, filler words): disjoint, pronounceable, fixed for a topic count."""
    rng = np.random.default_rng([_VOCAB_SEED, num_topics])
    words: list[str] = []
    seen: set[str] = set()
    needed = num_topics * TOPIC_WORDS + FILLER_WORDS
    while len(words) < needed:
        syllables = rng.integers(2, 4)
        word = "".join(
            _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
            for _ in range(syllables)
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    topics = tuple(tuple(words[t * TOPIC_WORDS : (t + 1) * TOPIC_WORDS]) for t in range(num_topics))
    return topics, tuple(words[num_topics * TOPIC_WORDS :])


def documents(
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    num_topics: int,
    topic_strength: float,
    min_words: int = 10,
    max_words: int = 20,
) -> list[str]:
    """One generated document per label."""
    topics, filler = vocabulary(num_topics)
    filler_arr = np.asarray(filler)
    out = []
    for label in labels:
        n = int(rng.integers(min_words, max_words + 1))
        own = rng.random(n) < topic_strength
        words = np.where(
            own,
            np.asarray(topics[int(label)])[rng.integers(TOPIC_WORDS, size=n)],
            filler_arr[rng.integers(len(filler), size=n)],
        )
        out.append(" ".join(words.tolist()))
    return out


def synthetic_site(
    client_id: int,
    *,
    num_samples: int,
    num_topics: int,
    topic_strength: float,
    dirichlet_alpha: float,
    seed: int,
) -> tuple[list[str], np.ndarray]:
    """One site's documents and labels; the site's topic mix leans to a few topics."""
    rng = np.random.default_rng([seed, client_id, 31])
    mix = rng.dirichlet(np.full(num_topics, dirichlet_alpha))
    labels = rng.choice(num_topics, size=num_samples, p=mix).astype(np.int64)
    texts = documents(labels, rng, num_topics=num_topics, topic_strength=topic_strength)
    return texts, labels


def synthetic_test(
    *, num_samples: int, num_topics: int, topic_strength: float, seed: int
) -> tuple[list[str], np.ndarray]:
    """A balanced central test set (every topic equally often), independent of the sites."""
    rng = np.random.default_rng([seed, 1 << 20, 37])
    labels = (np.arange(num_samples) % num_topics).astype(np.int64)
    rng.shuffle(labels)
    texts = documents(labels, rng, num_topics=num_topics, topic_strength=topic_strength)
    return texts, labels


def corpus(num_topics: int = 4, num_docs: int = 4000, seed: int = 0) -> list[str]:
    """Documents covering every topic and filler word: what a tokenizer is trained on."""
    topics, filler = vocabulary(num_topics)
    rng = np.random.default_rng([seed, 41])
    labels = rng.integers(num_topics, size=num_docs)
    docs = documents(labels, rng, num_topics=num_topics, topic_strength=0.3)
    # Every word at least once, so none is split by chance.
    docs.append(" ".join(w for t in topics for w in t))
    docs.append(" ".join(filler))
    return docs


def read_jsonl(path: str) -> tuple[list[str], np.ndarray]:
    """Read ``{"text": str, "label": int}`` lines. Errors name the file, line and field."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}: line {lineno} is not valid JSON") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno} must be a JSON object with text and label")
            for key in ("text", "label"):
                if key not in row:
                    raise DataError(f"{path}: line {lineno} has no field {key!r}")
            text, label = row["text"], row["label"]
            if not isinstance(text, str):
                raise DataError(f"{path}: line {lineno}: text must be a string")
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise DataError(
                    f"{path}: line {lineno}: label {label!r} must be an integer class id >= 0"
                )
            texts.append(text)
            labels.append(label)
    if not texts:
        raise DataError(f"{path}: no data lines")
    return texts, np.asarray(labels, dtype=np.int64)
