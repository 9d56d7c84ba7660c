"""Tiny models and datasets built on the spot, for tests across api/, worker/ and core/.

Nothing is downloaded: a BERT with 32-dim hidden states and its own word-level vocabulary is
written to a folder the way `save_pretrained` would, safetensors weights included.
"""

from __future__ import annotations

import csv
import json
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

COMMON_WORDS = """
the a an and or but if of to in on at for with from by about as into than then so not no yes is
are was were be been am i you he she it we they me him her us them my your his its our their this
that these those what which who how when where why all any some more most very can will would
should could do does did have has had get got go going come make know think want need like love
good great bad best free win won prize cash call now text reply stop claim urgent offer today
tomorrow week day night time home work ok okay sorry thanks please later here there just only also
still back out up down new txt msg mobile phone number send sent money award guaranteed service
customer chance selected contact holiday ringtone apply www com co uk per min happy hope see u ur
movie film story actor plot boring awesome terrible wonderful fun funny sad hate enjoyed waste
""".split()


def save_tiny_bert(dir: Path, *, vocab_words: list[str] | None = None, num_labels: int | None = None) -> Path:
    """Write a tiny BERT (2 layers, hidden 32) with a fast word-piece tokenizer to `dir`.

    Args:
        dir: the folder to create (parents too).
        vocab_words: extra whole words for the vocabulary, besides letters, digits and common words.
        num_labels: save a sequence classifier with this many labels instead of a bare BertModel.

    Returns:
        `dir`, loadable with `from_pretrained(dir)` (weights as model.safetensors).
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    vocab = list(SPECIAL_TOKENS)
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = COMMON_WORDS + [w.lower() for w in (vocab_words or [])]
    for token in pieces + ["##" + c for c in string.ascii_lowercase + string.digits] + words:
        if token not in vocab:
            vocab.append(token)
    (dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")

    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    if num_labels is None:
        model = BertModel(config)
    else:
        config.num_labels = num_labels
        model = BertForSequenceClassification(config)
    model.save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return dir


def write_text_dataset(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows ({"text": ..., "label": ...}) as CSV, JSONL or parquet by the path's extension.

    Returns:
        `path`.
    """
    path = Path(path)
    rows = [dict(r) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    elif suffix in (".jsonl", ".json"):
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    elif suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path, index=False)
    else:
        raise ValueError(f"unknown dataset extension {suffix!r}")
    return path


def sentiment_rows(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """A small separable two-class set: "good" words → label 1, "bad" words → label 0."""
    import random

    rng = random.Random(seed)
    positive = ["good", "great", "love", "wonderful", "awesome", "fun", "enjoyed", "best", "happy"]
    negative = ["bad", "terrible", "hate", "boring", "waste", "sad", "sorry", "stop", "no"]
    filler = ["the", "movie", "film", "story", "was", "very", "and", "it", "a", "plot", "this", "actor"]
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(filler, rng.randint(2, 8)) + rng.sample(positive if label else negative, rng.randint(1, 3))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows
