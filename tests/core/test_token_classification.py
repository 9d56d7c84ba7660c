"""token-classification: the reader's checks, first-sub-token labels, the loss, seqeval metrics,
word-level augmentation in batches, and a whole run through the engine."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from core.datasets import tokens as reader
from core.errors import DataError, EngineError
from core.spec import JobSpec, TrainingConfig
from core.adapters import DataFiles, adapter_for
from core.adapters.token_classification import IGNORE, TokenClassification, align_labels
from tests.tiny_models import save_tiny_bert

FIRST_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]
LAST_NAMES = ["smith", "jones", "zorkowitz"]  # zorkowitz is not in the vocabulary: several word pieces
CITIES = ["paris", "london", "berlin", "tokyo", "oslo"]
VERBS = [["went", "to"], ["lives", "in"], ["visited"], ["flew", "to"]]
VOCAB_WORDS = FIRST_NAMES + ["smith", "jones", "paris", "london", "berlin", "tokyo", "york", "went", "lives",
                             "visited", "flew", "yesterday"]


def ner_rows(n: int, *, seed: int) -> list[dict]:
    """Sentences like "alice smith went to new york": persons B-PER/I-PER, cities B-LOC/I-LOC, rest O."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, tags = [], []
        if rng.random() < 0.3:
            words, tags = ["yesterday"], ["O"]
        words.append(rng.choice(FIRST_NAMES))
        tags.append("B-PER")
        if rng.random() < 0.5:
            words.append(rng.choice(LAST_NAMES))
            tags.append("I-PER")
        verb = rng.choice(VERBS)
        words += verb
        tags += ["O"] * len(verb)
        if rng.random() < 0.3:
            words += ["new", "york"]
            tags += ["B-LOC", "I-LOC"]
        else:
            words.append(rng.choice(CITIES))
            tags.append("B-LOC")
        rows.append({"tokens": words, "tags": tags})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ner_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("models") / "ner-bert", vocab_words=VOCAB_WORDS)


@pytest.fixture(scope="module")
def ner_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ner")
    return {
        "train": write_jsonl(root / "train.jsonl", ner_rows(160, seed=0)),
        "validation": write_jsonl(root / "validation.jsonl", ner_rows(40, seed=1)),
        "test": write_jsonl(root / "test.jsonl", ner_rows(40, seed=2)),
    }


def make_adapter(**config) -> TokenClassification:
    spec = JobSpec(task="token-classification", model="tiny", training_file="train", config=config)
    adapter = adapter_for(spec.task, spec)
    assert isinstance(adapter, TokenClassification)
    return adapter


def prepared(ner_bert, ner_files, **config):
    adapter = make_adapter(**config)
    tokenizer = adapter.load_processor(str(ner_bert))
    data = adapter.prepare(DataFiles(ner_files["train"], ner_files["validation"], ner_files["test"]), tokenizer)
    return adapter, tokenizer, data


# --- reading ---------------------------------------------------------------------------------

def test_reader_counts_tags_and_entities(tmp_path):
    rows = [
        {"tokens": ["alice", "smith", "went", "to", "new", "york"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"]},
        {"tokens": ["bob", "met", "carol"], "tags": ["B-PER", "O", "B-PER"]},
    ]
    summary = reader.inspect(write_jsonl(tmp_path / "a.jsonl", rows), param="training_file", config=TrainingConfig())
    assert summary.rows == 2
    assert summary.labels == ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]
    assert summary.label_counts == {"O": 3, "B-LOC": 1, "B-PER": 3, "I-LOC": 1, "I-PER": 1}
    assert summary.details == {"scheme": "IOB2", "entity_counts": {"LOC": 1, "PER": 3}, "words": 9, "max_words": 6}

    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    from_parquet = reader.read(tmp_path / "a.parquet", param="training_file", config=TrainingConfig())
    assert [(s.words, s.tags) for s in from_parquet] == [(r["tokens"], r["tags"]) for r in rows]


@pytest.mark.parametrize(
    ("tags", "scheme", "entities"),
    [
        (["I-PER", "I-PER", "B-PER", "O", "I-LOC"], "IOB1", {"PER": 2, "LOC": 1}),
        (["B-PER", "E-PER", "S-PER", "O", "S-LOC"], "IOBES", {"PER": 2, "LOC": 1}),
        (["PER", "PER", "O", "LOC", "PER"], "IO", {"PER": 2, "LOC": 1}),
        (["B-PER", "I-PER", "LOC", "O", "O"], "mixed", {"PER": 1, "LOC": 1}),
    ],
)
def test_reader_names_the_tagging_scheme(tmp_path, tags, scheme, entities):
    path = write_jsonl(tmp_path / "s.jsonl", [{"tokens": list("abcde"), "tags": tags}])
    details = reader.inspect(path, param="training_file", config=TrainingConfig()).details
    assert details["scheme"] == scheme and details["entity_counts"] == dict(sorted(entities.items()))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"tokens": ["a", "b"], "tags": ["O"]}, "line 2: 2 words but 1 tags"),
        ({"tokens": "a b", "tags": ["O", "O"]}, "line 2: 'tokens' must be a list of words, not str"),
        ({"tokens": ["a", 3], "tags": ["O", "O"]}, "line 2: word 2 of 'tokens' must be a string, not int"),
        ({"tokens": ["a", "b"], "tags": ["O", None]}, "line 2: tag 2 of 'tags' must be a string, not null"),
        ({"tokens": ["a", " "], "tags": ["O", "O"]}, "line 2: word 2 of 'tokens' is blank"),
        ({"tokens": [], "tags": []}, "line 2: 'tokens' is empty"),
        ({"words": ["a"], "tags": ["O"]}, "line 2: no 'tokens' field"),
    ],
)
def test_reader_rejects_bad_rows_naming_the_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["ok"], "tags": ["O"]}, row])
    with pytest.raises(DataError, match=message) as error:
        reader.inspect(path, param="validation_file", config=TrainingConfig())
    assert error.value.param == "validation_file"


def test_reader_refuses_csv_and_a_single_tag(tmp_path):
    (tmp_path / "a.csv").write_text("tokens,tags\na,O\n")
    with pytest.raises(DataError, match="JSON Lines") as error:
        reader.inspect(tmp_path / "a.csv", param="training_file", config=TrainingConfig())
    assert error.value.code == "invalid_file_format"
    only_o = reader.inspect(write_jsonl(tmp_path / "o.jsonl", [{"tokens": ["a"], "tags": ["O"]}]),
                            param="training_file", config=TrainingConfig())
    with pytest.raises(DataError, match="at least two tags"):
        reader.check_trainable(only_o)


def test_unknown_validation_tag_is_refused(ner_bert, ner_files, tmp_path):
    validation = write_jsonl(tmp_path / "v.jsonl", ner_rows(5, seed=3) + [{"tokens": ["acme", "hired", "bob"],
                                                                          "tags": ["B-ORG", "O", "B-PER"]}])
    adapter = make_adapter()
    tokenizer = adapter.load_processor(str(ner_bert))
    with pytest.raises(DataError) as error:
        adapter.prepare(DataFiles(ner_files["train"], validation), tokenizer)
    assert error.value.code == "unknown_label" and error.value.param == "validation_file"
    assert "'B-ORG'" in error.value.message and "1 label(s)" in error.value.message


# --- encoding --------------------------------------------------------------------------------

def test_only_the_first_sub_token_of_a_word_is_labelled(ner_bert, ner_files):
    adapter, tokenizer, data = prepared(ner_bert, ner_files)
    names = data.labels
    split = data.train
    for i in range(len(split)):
        labels = split.targets[i]
        encoding = tokenizer(split.words[i], is_split_into_words=True)
        word_ids = encoding.word_ids()
        starts = [p for p, w in enumerate(word_ids) if w is not None and (p == 0 or word_ids[p - 1] != w)]
        assert [p for p, label in enumerate(labels) if label != IGNORE] == starts
        assert [names[labels[p]] for p in starts] == [names[t] for t in split.tag_ids[i]]
        assert split.features["input_ids"][i] == encoding["input_ids"] and split.lengths[i] == len(labels)
    # A sentence with the out-of-vocabulary surname: its pieces carry one label between them.
    i = next(i for i, words in enumerate(split.words) if "zorkowitz" in words)
    position = split.words[i].index("zorkowitz")
    word_ids = tokenizer(split.words[i], is_split_into_words=True).word_ids()
    pieces = [p for p, w in enumerate(word_ids) if w == position]
    assert len(pieces) > 3
    assert [names[split.targets[i][p]] if split.targets[i][p] != IGNORE else None for p in pieces] == \
        ["I-PER"] + [None] * (len(pieces) - 1)


def test_align_labels_skips_special_tokens_and_continuations():
    assert align_labels([None, 0, 1, 1, 1, 2, None], [4, 0, 2]) == [IGNORE, 4, 0, IGNORE, IGNORE, 2, IGNORE]


def test_truncation_drops_the_labels_of_cut_words(ner_bert, tmp_path):
    words = ["alice"] + ["went"] * 20 + ["paris"]
    rows = [{"tokens": words, "tags": ["B-PER"] + ["O"] * 20 + ["B-LOC"]}]
    files = DataFiles(write_jsonl(tmp_path / "t.jsonl", rows))
    for side, kept in (("right", "B-PER"), ("left", "B-LOC")):
        adapter = make_adapter(max_length=8, truncation_side=side)
        data = adapter.prepare(files, adapter.load_processor(str(ner_bert)))
        labels = data.train.targets[0]
        assert len(labels) == 8 and sum(label != IGNORE for label in labels) == 6
        assert kept in [data.labels[label] for label in labels if label != IGNORE]


def test_byte_level_tokenizers_read_each_word_after_a_space(tmp_path):
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "Ġ": 5, "h": 6, "i": 7, "Ġh": 8, "Ġhi": 9}
    folder = tmp_path / "roberta"
    RobertaTokenizer(vocab=vocab, merges=[("Ġ", "h"), ("Ġh", "i")]).save_pretrained(folder)
    RobertaModel(RobertaConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16)).save_pretrained(folder)
    tokenizer = make_adapter().load_processor(str(folder))
    encoding = tokenizer(["hi", "hi"], is_split_into_words=True)
    assert encoding.tokens() == ["<s>", "Ġhi", "Ġhi", "</s>"]  # without the fix: "h", "i", "h", "i"
    assert encoding.word_ids() == [None, 0, 1, None]


# --- batches, loss, metrics -------------------------------------------------------------------

def test_collate_pads_right_with_ignored_labels(ner_bert, ner_files):
    adapter, tokenizer, data = prepared(ner_bert, ner_files)
    indices = [0, 1, 2, 3]
    batch = adapter.collate(data.train, indices, pad_to_multiple_of=8)
    longest = max(data.train.lengths[i] for i in indices)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, -(-longest // 8) * 8)
    for row, i in enumerate(indices):
        n = data.train.lengths[i]
        assert batch["input_ids"][row, :n].tolist() == data.train.features["input_ids"][i]
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["attention_mask"][row, n:] == 0).all() and (batch["labels"][row, n:] == IGNORE).all()
    assert adapter.units(batch) == sum(len(data.train.words[i]) for i in indices)


def word_tags(adapter, batch) -> list[list[str]]:
    return [[adapter.labels[x] for x in row if x != IGNORE] for row in batch["labels"].tolist()]


def test_augmented_batches_keep_tags_aligned(ner_bert, ner_files):
    indices = list(range(16))
    adapter, _, data = prepared(ner_bert, ner_files, augmentation={"text": {"insertion": 0.4}})
    plain = word_tags(adapter, adapter.collate(data.train, indices))
    first = adapter.collate(data.train, indices, rng=np.random.default_rng(0))
    again = adapter.collate(data.train, indices, rng=np.random.default_rng(0))
    assert all(torch.equal(first[k], again[k]) for k in first)
    augmented = word_tags(adapter, first)
    assert sum(map(len, augmented)) > sum(map(len, plain))  # words were inserted ...
    assert [[t for t in row if t != "O"] for row in augmented] == [[t for t in row if t != "O"] for row in plain]

    adapter, _, data = prepared(ner_bert, ner_files, augmentation={"text": {"substitution": 0.4}})
    substituted = adapter.collate(data.train, indices, rng=np.random.default_rng(0))
    assert not torch.equal(substituted["input_ids"][:, :5], adapter.collate(data.train, indices)["input_ids"][:, :5])
    assert word_tags(adapter, substituted) == plain  # ... and a substituted word keeps its tag


def test_loss_sum_over_units_is_the_mean_over_labelled_tokens(ner_bert, ner_files):
    adapter, tokenizer, data = prepared(ner_bert, ner_files)
    torch.manual_seed(0)
    model = adapter.build_model(str(ner_bert), data, tokenizer).eval()
    batch = adapter.collate(data.train, [0, 5, 9, 30])
    with torch.no_grad():
        loss_sum, preds = adapter.loss_sum(model, batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    mask = batch["labels"] != IGNORE
    log_probs = logits.log_softmax(-1)[mask]
    targets = batch["labels"][mask]
    manual = -log_probs.gather(1, targets[:, None]).mean()
    assert adapter.units(batch) == int(mask.sum()) == sum(len(data.train.words[i]) for i in [0, 5, 9, 30])
    assert torch.allclose(loss_sum / adapter.units(batch), manual, atol=1e-6)
    assert torch.equal(preds, logits.argmax(-1))

    # Balanced class weights: each token's loss times n / (k x count of its tag).
    adapter, _, data = prepared(ner_bert, ner_files, loss={"class_weights": "balanced", "label_smoothing": 0.1})
    counts = data.summaries["training_file"].label_counts
    weights = torch.tensor([sum(counts.values()) / (len(counts) * counts[t]) for t in data.labels])
    with torch.no_grad():
        weighted, _ = adapter.loss_sum(model, batch)
    # Label smoothing 0.1 over C tags, as torch weighs it: 0.9 w_y nll_y + 0.1 / C sum_c w_c nll_c.
    nll = -log_probs.gather(1, targets[:, None])[:, 0]
    expected = 0.9 * weights[targets] * nll - 0.1 / len(weights) * (log_probs * weights).sum(-1)
    assert torch.allclose(weighted, expected.sum(), atol=1e-5)


def test_an_mlp_head_tags_every_token(ner_bert, ner_files):
    adapter, tokenizer, data = prepared(ner_bert, ner_files, head={"type": "mlp", "hidden_sizes": [24], "batch_norm": True})
    model = adapter.build_model(str(ner_bert), data, tokenizer)
    batch = adapter.collate(data.train, [0, 1, 2])
    loss_sum, preds = adapter.loss_sum(model, batch)
    loss_sum.backward()
    assert preds.shape == batch["labels"].shape
    assert model.classifier.layers[1].weight.grad is not None  # the new hidden layer is in the graph
    assert model.classifier.layers[-1].out_features == len(data.labels) == model.config.num_labels


def test_class_weights_must_name_training_tags(ner_bert, ner_files):
    with pytest.raises(EngineError) as error:
        prepared(ner_bert, ner_files, loss={"class_weights": {"B-ORG": 2.0}})
    assert error.value.param == "config.loss.class_weights"


def scripted(adapter, rows: list[tuple[list[str], list[str]]]):
    """One batch of (true tags, predicted tags) per sentence, with ignored positions around them."""
    ids = {t: i for i, t in enumerate(adapter.labels)}
    width = max(len(t) for t, _ in rows) * 2 + 2
    labels = torch.full((len(rows), width), IGNORE)
    preds = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (true, pred) in enumerate(rows):
        for w, (t, p) in enumerate(zip(true, pred)):
            labels[r, 1 + 2 * w], preds[r, 1 + 2 * w] = ids[t], ids[p]
            preds[r, 2 + 2 * w] = ids[true[0]]  # a continuation piece: must not count, right or wrong
    return [preds], [labels]


def test_entity_metrics_match_a_hand_count():
    adapter = make_adapter()
    adapter.labels = ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]
    preds, labels = scripted(adapter, [
        (["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "O"]),  # PER found, LOC missed
        (["O", "B-PER", "O"], ["O", "B-LOC", "O"]),  # PER missed, a LOC that is not there
    ])
    # Entities: 3 true, 2 predicted, 1 right. P = 1/2, R = 1/3, F1 = 2PR/(P+R) = 0.4. Tokens: 5 of 7.
    metrics = adapter.compute_metrics(preds, labels, loss=0.5, report=False)
    assert metrics == pytest.approx({"loss": 0.5, "precision": 0.5, "recall": 1 / 3, "f1": 0.4, "accuracy": 5 / 7})
    assert set(metrics) == set(adapter.metrics)

    report = adapter.compute_metrics(preds, labels, loss=0.5, report=True)
    assert report["per_class"] == {
        "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "PER": {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2},
    }
    matrix = np.array(report["confusion_matrix"]["matrix"])
    assert report["confusion_matrix"]["labels"] == adapter.labels
    assert matrix.sum() == 7 and np.trace(matrix) == 5
    assert matrix[1, 0] == 1 and matrix[2, 1] == 1  # B-LOC read as O, B-PER read as B-LOC


def test_plain_tags_count_runs_as_entities():
    adapter = make_adapter()
    adapter.labels = ["O", "LOC", "PER"]
    preds, labels = scripted(adapter, [(["PER", "PER", "O", "LOC"], ["PER", "O", "O", "LOC"])])
    # True: PER(0-1), LOC(3); predicted: PER(0), LOC(3). One of two right both ways.
    report = adapter.compute_metrics(preds, labels, loss=0.0, report=True)
    assert (report["precision"], report["recall"], report["accuracy"]) == (0.5, 0.5, 0.75)
    assert report["per_class"]["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["per_class"]["LOC"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}


# --- the whole run ---------------------------------------------------------------------------

def test_engine_learns_to_tag_and_exports_a_plain_transformers_model(ner_bert, ner_files, tmp_path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from core.engine import RunPaths, run
    from core.sink import ListSink

    spec = JobSpec(
        task="token-classification", model="tiny", training_file="train",
        hyperparameters={"n_epochs": 6, "batch_size": 16, "learning_rate_multiplier": 40},
        config={"device": "cpu", "precision": "fp32", "metric_for_best_model": "f1",
                "augmentation": {"text": {"substitution": 0.1, "probability": 0.5}}},
    )
    paths = RunPaths(model=str(ner_bert), train_file=ner_files["train"], validation_file=ner_files["validation"],
                     test_file=ner_files["test"], work_dir=tmp_path)
    sink = ListSink()
    result = run(spec, paths, sink)
    test, baseline = result.metrics["test"], result.metrics["baseline_test"]
    assert test["f1"] > 0.8 and test["f1"] > baseline["f1"] + 0.5
    assert set(test["per_class"]) == {"LOC", "PER"}
    losses = sink.series("train", "loss")
    assert losses[-1] < 0.5 * losses[0]

    model = AutoModelForTokenClassification.from_pretrained(result.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    assert model.config.id2label == dict(enumerate(["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]))
    encoding = tokenizer(["bob", "flew", "to", "paris"], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**encoding).logits.argmax(-1)[0].tolist()
    assert [model.config.id2label[predicted[p]] for p in (1, 2, 3, 4)] == ["B-PER", "O", "O", "B-LOC"]
