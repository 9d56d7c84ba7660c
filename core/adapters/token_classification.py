"""token-classification: a tag per word (named entities, parts of speech) with a per-token head.

Words are tokenized as given (is_split_into_words) and only the first sub-token of each word
carries its tag; the other sub-tokens and the special tokens get -100 and count for neither loss
nor metrics, as in the Hugging Face token-classification recipe. Words cut off by max_length are
left out of training and evaluation alike.

Augmentation (config.augmentation.text) edits training sentences at the word level before
sub-tokenization (core.augment_text.augment_words), so tags stay aligned whatever the tokenizer
does: the training words are kept with each split and a batch drawn with an rng is re-tokenized
after the edits. Substitutions and insertions draw from the training set's own words.

Metrics are seqeval's entity-level precision/recall/F1 (micro, conlleval reading of the tags) and
token accuracy over the labelled tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.adapters.base import Split, TaskAdapter, TaskData, class_weights
from core.cache import Ragged, digest, processor_fingerprint
from core.datasets import ParsedFile
from core.datasets import tokens as reader
from core.heads import replace_head
from core.loading import load_classifier, load_tokenizer
from core.spec import TOKEN_METRICS, Task

IGNORE = -100  # the label of tokens that are not the first sub-token of a word (torch's ignore_index)


@dataclass
class TokenSplit(Split):
    """A Split that also keeps its sentences at the word level, for augmentation."""

    words: list[list[str]]
    tag_ids: list[list[int]]


class TokenClassification(TaskAdapter):
    task = Task.TOKEN_CLASSIFICATION

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        self.labels: list[str] = []  # tags in id order, from the training file (prepare)
        self.scheme = "IOB2"
        self.weights: torch.Tensor | None = None
        self.tokenizer: Any = None
        self.vocabulary: list[str] = []  # the training words augmentation draws from

    @property
    def metrics(self) -> dict[str, bool]:
        return TOKEN_METRICS

    # --- data ------------------------------------------------------------------------------

    def load_processor(self, source: str, *, local_files_only: bool = False) -> Any:
        """The fast tokenizer, set up for pre-split words (word_ids() needs a fast one).

        Raises:
            ModelError: as core.loading.load_tokenizer (no fast tokenizer included).
        """
        tokenizer = load_tokenizer(source, local_files_only=local_files_only)
        prefix_space_for_words(tokenizer)
        return tokenizer

    def prepare_parsed(self, parsed: dict[str, ParsedFile], processor: Any) -> TaskData:
        """Tokenize every checked split with first-sub-token labels.

        Raises:
            EngineError: config.loss.class_weights naming a tag the training file lacks.
        """
        train = parsed["training_file"].summary
        self.labels = list(train.labels or [])
        self.scheme = train.details["scheme"]
        # "balanced" weighs each tag by its word count: the loss's units are words, not sentences.
        self.weights = class_weights(self.labels, train.label_counts, self.config.loss.class_weights)
        self.tokenizer = processor
        ids = {tag: i for i, tag in enumerate(self.labels)}

        def encode(param: str, sentences: list[reader.TaggedSentence]) -> TokenSplit:
            return self._encode([s.words for s in sentences], [[ids[t] for t in s.tags] for s in sentences])

        data = TaskData.of(parsed, encode, labels=self.labels)
        # Sorted, so that the same rng draws the same words whatever the hash seed.
        self.vocabulary = sorted({word for sentence in data.train.words for word in sentence})
        return data

    def _encode(self, words: list[list[str]], tag_ids: list[list[int]]) -> TokenSplit:
        features, targets = self._tokenize(words, tag_ids, cached=True)
        return TokenSplit(
            features=features, targets=targets, lengths=[len(x) for x in features["input_ids"]],
            words=words, tag_ids=tag_ids,
        )

    def _tokenize(self, words: list[list[str]], tag_ids: list[list[int]], *,
                  cached: bool = False) -> tuple[dict[str, list], list[list[int]]]:
        """(model inputs, per-token label ids) of pre-split sentences, truncated to max_length;
        `cached`: through the adapter's cache (a split's encoding, not an augmented batch's)."""
        tokenizer = self.tokenizer
        tokenizer.truncation_side = self.config.truncation_side
        max_length = self.config.max_length

        def tokenize() -> dict[str, list[list[int]]]:
            batch = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length, padding=False)
            features = {k: list(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            # The word of each token, -1 for special tokens (BatchEncoding.word_ids() gives None).
            features["word_ids"] = [[-1 if w is None else w for w in batch.word_ids(i)] for i in range(len(words))]
            return features

        if cached:
            key = {"tokenizer": processor_fingerprint(tokenizer), "max_length": max_length,
                   "words": digest(json.dumps(sentence) for sentence in words)}
            features = self.cached("tokenized words", key, tokenize,
                                   dump=lambda f: {k: Ragged(v) for k, v in f.items()}, restore=dict)
        else:
            features = tokenize()
        word_ids = features.pop("word_ids")
        targets = [align_labels([None if w < 0 else w for w in ids], tags) for ids, tags in zip(word_ids, tag_ids)]
        return features, targets

    def collate(
        self,
        split: Split,
        indices: list[int],
        *,
        rng: np.random.Generator | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Right-padded input_ids (pad id), masks (0) and labels (-100); augmented when rng is given."""
        augment = self.config.augmentation.text
        if rng is not None and augment is not None and isinstance(split, TokenSplit):
            rows, targets = self._augmented(split, indices, augment, rng)
        else:
            rows = {key: [values[i] for i in indices] for key, values in split.features.items()}
            targets = [split.targets[i] for i in indices]
        longest = max(len(ids) for ids in rows["input_ids"])
        if pad_to_multiple_of:
            longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        pad_values = {"input_ids": self.tokenizer.pad_token_id}
        batch = {key: _pad(values, longest, pad_values.get(key, 0)) for key, values in rows.items()}
        batch["labels"] = _pad(targets, longest, IGNORE)
        return batch

    def _augmented(self, split: TokenSplit, indices: list[int], config, rng: np.random.Generator):
        """Word-level edits of the sentences at `indices`, re-tokenized (tags follow their words)."""
        from core.augment_text import augment_words

        words, tag_ids = [], []
        ids = {tag: i for i, tag in enumerate(self.labels)}
        for i in indices:
            edited, tags = augment_words(
                split.words[i], [self.labels[t] for t in split.tag_ids[i]], config, rng, vocabulary=self.vocabulary
            )
            words.append(edited)
            tag_ids.append([ids[t] for t in tags])
        return self._tokenize(words, tag_ids)

    # --- model -----------------------------------------------------------------------------

    def build_model(self, source: str, data: TaskData, processor: Any) -> torch.nn.Module:
        """AutoModelForTokenClassification for data.labels in fp32, head per config.head.

        Raises:
            ModelError: not found, not safetensors, or no token-classification head for the architecture.
        """
        labels = list(data.labels or [])
        model = load_classifier(source, labels=labels, auto_class="AutoModelForTokenClassification",
                                pad_token_id=processor.pad_token_id, problem_type=None)
        replace_head(model, self.config.head, num_outputs=len(labels), classifier_dropout=self.config.dropout.classifier)
        return model

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Labelled tokens: the first sub-token of each word within max_length."""
        return int((batch["labels"] != IGNORE).sum())

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Cross-entropy summed over labelled tokens (label smoothing, class weights); argmax tags."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()
        labels = batch["labels"]
        weights = None if self.weights is None else self.weights.to(logits.device)
        # Summed, each token scaled by its tag's weight; the engine divides by units() (torch's
        # weighted "mean" would divide by the sum of the weights instead).
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            weight=weights,
            ignore_index=IGNORE,
            label_smoothing=self.config.loss.label_smoothing,
            reduction="sum",
        )
        return loss, logits.argmax(-1).cpu()

    # --- metrics ---------------------------------------------------------------------------

    def compute_metrics(self, predictions: list[Any], targets: list[Any], *, loss: float, report: bool) -> dict[str, Any]:
        """Entity P/R/F1 (seqeval, micro) and token accuracy over labelled tokens.

        With report: per entity type P/R/F1/support under "per_class" and the tag confusion matrix.
        """
        from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

        true_ids, pred_ids = _labelled(predictions, targets)
        names = [seqeval_tag(tag) for tag in self.labels]
        y_true = [[names[t] for t in row] for row in true_ids]
        y_pred = [[names[p] for p in row] for row in pred_ids]
        flat_true = np.array([t for row in true_ids for t in row], dtype=np.int64)
        flat_pred = np.array([p for row in pred_ids for p in row], dtype=np.int64)
        result: dict[str, Any] = {
            "loss": float(loss),
            "precision": float(precision_score(y_true, y_pred, zero_division=0)),
            "recall": float(recall_score(y_true, y_pred, zero_division=0)),
            "f1": float(f1_score(y_true, y_pred, zero_division=0)),
            "accuracy": float((flat_true == flat_pred).mean()) if flat_true.size else 0.0,
        }
        if not report:
            return result
        from sklearn.metrics import confusion_matrix

        per_type = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
        result["per_class"] = {
            kind: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                   "f1": float(v["f1-score"]), "support": int(v["support"])}
            for kind, v in per_type.items()
            if not kind.endswith(" avg")
        }
        matrix = confusion_matrix(flat_true, flat_pred, labels=list(range(len(self.labels))))
        result["confusion_matrix"] = {"labels": list(self.labels), "matrix": matrix.tolist()}
        result["scheme"] = self.scheme
        return result


def align_labels(word_ids: list[int | None], tag_ids: list[int]) -> list[int]:
    """Per-token labels: a word's tag on its first sub-token, -100 on the rest and on special tokens.

    Args:
        word_ids: the word index of each token (None for special tokens), as BatchEncoding.word_ids().
        tag_ids: the tag id of each word.
    """
    labels: list[int] = []
    previous: int | None = None
    for word in word_ids:
        labels.append(IGNORE if word is None or word == previous else tag_ids[word])
        previous = word
    return labels


def prefix_space_for_words(tokenizer: Any) -> None:
    """Make a byte-level BPE tokenizer (RoBERTa, GPT-2) read each pre-split word as after a space.

    Without it such tokenizers encode "Paris" at the start of a word differently from " Paris"
    in running text, the form they were trained on (transformers 4 refused pre-split input
    without add_prefix_space=True; transformers 5 silently tokenizes it the wrong way).
    Tokenizers with another pre-tokenizer (WordPiece, SentencePiece) are left as they are.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None:
        return
    from tokenizers import pre_tokenizers

    parts = list(pre) if isinstance(pre, pre_tokenizers.Sequence) else [pre]
    changed = False
    for part in parts:
        if isinstance(part, pre_tokenizers.ByteLevel) and not part.add_prefix_space:
            part.add_prefix_space = True
            changed = True
    if changed:
        tokenizer.add_prefix_space = True  # saved with the tokenizer, so inference reads words the same way


def seqeval_tag(tag: str) -> str:
    """The tag as seqeval reads it: plain tags ("PER") become inside tags ("I-PER")."""
    prefix, kind = reader.split_tag(tag)
    return f"I-{kind}" if prefix == "" else tag


def _labelled(predictions: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """(true tag ids, predicted tag ids) per sentence, at the labelled positions only."""
    true_rows: list[list[int]] = []
    pred_rows: list[list[int]] = []
    for preds, labels in zip(predictions, targets):
        for pred_row, label_row in zip(torch.as_tensor(preds).tolist(), torch.as_tensor(labels).tolist()):
            keep = [i for i, label in enumerate(label_row) if label != IGNORE]
            true_rows.append([label_row[i] for i in keep])
            pred_rows.append([pred_row[i] for i in keep])
    return true_rows, pred_rows


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)
