"""``python -m fedray.tools.tiny_model DIR``: a small local Hugging Face text classifier.

Writes a randomly initialised BERT-style ``AutoModelForSequenceClassification`` (config
and safetensors weights) and a WordPiece tokenizer trained here, offline, on the
synthetic corpus of ``dataset=text_synthetic``. Everything loads with
``from_pretrained(DIR)``; nothing is downloaded. It serves tests, demos and benchmarks
on machines without a GPU or hub access.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """A BERT-style WordPiece tokenizer trained on ``texts`` (in memory)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def write_tiny_model(
    directory: str | Path,
    *,
    num_labels: int = 4,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 256,
    vocab_size: int = 1000,
    max_length: int = 64,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> Path:
    """Write the model and tokenizer into ``directory``; return it."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from fedray.data.text import corpus

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus(num_labels), vocab_size, max_length)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_length,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedray.tools.tiny_model", description=__doc__.splitlines()[0]
    )
    parser.add_argument("directory", help="where to write config, weights and tokenizer")
    parser.add_argument("--num-labels", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=600)
    parser.add_argument("--init-std", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.hidden % args.heads:
        parser.error(f"--hidden={args.hidden} must be a multiple of --heads={args.heads}")
    path = write_tiny_model(
        args.directory,
        num_labels=args.num_labels,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=4 * args.hidden,
        vocab_size=args.vocab_size,
        initializer_range=args.init_std,
        seed=args.seed,
    )
    print(f"wrote a tiny classifier and its tokenizer to {path}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
