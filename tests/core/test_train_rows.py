"""config.train_rows: which rows of the training file a job trains on (an ensemble's resamples and
folds). Split.take keeps every per-example column aligned; TaskAdapter.prepare trains on exactly
core.ensemble.train_rows' draw of the full split, a pure function of (seed, stream); folds drop one
stratified fold; validation and test splits are never drawn from. And the spec's checks of
train_rows and ensemble bodies, with the field they blame."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from core import ensemble
from core.adapters import DataFiles, Split, adapter_for
from core.adapters.token_classification import TokenSplit
from core.spec import JobSpec, Task
from tests.tiny_models import sentiment_rows, write_text_dataset
from tests.tiny_vision import digits, save_tiny_resnet, write_image_parquet

BASE = {"model": "m", "training_file": "t"}

# --- Split.take -------------------------------------------------------------------------------


def text_split(n: int = 6, *, weights: bool = True) -> Split:
    """Example i: input_ids [100+i] * (i+1), target i % 3, weight i / 10."""
    ids = [[100 + i] * (i + 1) for i in range(n)]
    return Split(features={"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]},
                 targets=[i % 3 for i in range(n)], lengths=[len(x) for x in ids],
                 weights=[i / 10 for i in range(n)] if weights else None)


def test_take_keeps_every_column_aligned_and_allows_repeats():
    split = text_split()
    taken = split.take([4, 0, 4, 2])
    assert type(taken) is Split and len(taken) == 4
    assert taken.features["input_ids"] == [[104] * 5, [100], [104] * 5, [102] * 3]
    assert taken.features["attention_mask"] == [[1] * 5, [1], [1] * 5, [1] * 3]
    assert taken.targets == [1, 0, 1, 2]
    assert taken.lengths == [5, 1, 5, 3]
    assert taken.weights == [0.4, 0.0, 0.4, 0.2]
    # A numpy index array (what core.ensemble returns) works the same; the original is untouched.
    assert split.take(np.array([4, 0, 4, 2])) == taken
    assert len(split) == 6 and split.targets == [0, 1, 2, 0, 1, 2]
    # The picked rows are copies of the lists, not the same list objects re-ordered in place.
    taken.targets.append(9)
    assert split.targets == [0, 1, 2, 0, 1, 2]


def test_take_without_weights_and_of_nothing():
    split = text_split(weights=False)
    assert split.take([1, 1]).weights is None
    empty = split.take([])
    assert len(empty) == 0 and empty.targets == [] and empty.features["input_ids"] == []


def test_take_of_a_token_split_picks_its_words_and_tags_too():
    words = [["w%d" % i] * (i + 1) for i in range(5)]
    tag_ids = [[i] * (i + 1) for i in range(5)]
    split = TokenSplit(features={"input_ids": [[7] * (i + 3) for i in range(5)],
                                 "word_ids": [[-1] + list(range(i + 1)) + [-1] for i in range(5)]},
                       targets=[[-100] + [i] * (i + 1) + [-100] for i in range(5)],
                       lengths=[i + 3 for i in range(5)], words=words, tag_ids=tag_ids)
    taken = split.take([3, 3, 0])
    assert type(taken) is TokenSplit
    assert taken.words == [words[3], words[3], words[0]]
    assert taken.tag_ids == [tag_ids[3], tag_ids[3], tag_ids[0]]
    assert taken.targets == [split.targets[3], split.targets[3], split.targets[0]]
    assert taken.features["word_ids"] == [split.features["word_ids"][i] for i in (3, 3, 0)]
    assert taken.lengths == [6, 6, 3] and taken.weights is None


@pytest.mark.parametrize("kind", ["tensor", "array", "list"])
def test_take_of_an_image_split_indexes_stacked_pixels(kind):
    pixels = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).reshape(5, 3, 2, 2)
    column = {"tensor": pixels, "array": pixels.numpy(), "list": list(pixels.unbind(0))}[kind]
    split = Split(features={"pixel_values": column}, targets=[0, 1, 2, 3, 4], lengths=[1] * 5, weights=[1.0] * 5)
    taken = split.take([2, 4, 2])
    got = taken.features["pixel_values"]
    if kind == "list":
        assert isinstance(got, list)
        got = torch.stack(got)
    assert len(got) == 3 and type(got) is type(column if kind != "list" else pixels)
    assert torch.equal(torch.as_tensor(np.asarray(got)), pixels[[2, 4, 2]])
    assert taken.targets == [2, 4, 2] and taken.lengths == [1, 1, 1] and taken.weights == [1.0] * 3


# --- TaskAdapter.prepare with config.train_rows -----------------------------------------------


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> DataFiles:
    root = tmp_path_factory.mktemp("rows")
    train = [dict(r, w=round(0.5 + (i % 7) / 10, 2)) for i, r in enumerate(sentiment_rows(45, seed=3))]
    for i, r in enumerate(train):  # three classes, unbalanced: 0, 1 and a rarer 2
        if i % 5 == 0:
            r["label"] = 2
    return DataFiles(write_text_dataset(root / "train.csv", train),
                     write_text_dataset(root / "validation.csv", sentiment_rows(12, seed=4)))


def text_job(tiny_bert_dir: Path, files: DataFiles, *, seed: int = 42, **config):
    """(adapter, TaskData) of a text-classification job with `config`."""
    spec = JobSpec.model_validate({**BASE, "seed": seed, "task": "text-classification",
                                   "config": {"max_length": 16, "weight_column": "w", **config}})
    adapter = adapter_for(Task.TEXT_CLASSIFICATION, spec)
    return adapter, adapter.prepare(files, adapter.load_processor(str(tiny_bert_dir)))


@pytest.fixture(scope="module")
def full(tiny_bert_dir, text_files):
    return text_job(tiny_bert_dir, text_files)[1]


DRAWS = [
    {"method": "bootstrap", "seed": 7, "stream": 0},
    {"method": "bootstrap", "seed": 7, "stream": 3},
    {"method": "subsample", "fraction": 0.4, "seed": 7, "stream": 1},
    {"method": "folds", "folds": 3, "holdout": 1, "seed": 7},
]


@pytest.mark.parametrize("draw", DRAWS, ids=lambda d: f"{d['method']}-{d.get('stream', d.get('holdout'))}")
def test_prepare_trains_on_the_draw_of_the_full_split(tiny_bert_dir, text_files, full, draw):
    adapter, data = text_job(tiny_bert_dir, text_files, train_rows=draw)
    n = len(full.train)
    assert n == 45
    rows = ensemble.train_rows(draw["method"], n, seed=7, stream=draw.get("stream", 0), fraction=draw.get("fraction"),
                               folds_=draw.get("folds"), holdout=draw.get("holdout"),
                               labels=full.train.targets if draw["method"] == "folds" else None)
    np.testing.assert_array_equal(adapter.drawn_rows(full.train), rows)
    expected = full.train.take(rows)
    assert data.train == expected  # features, targets, lengths and weights, row for row
    assert data.train.weights == [full.train.weights[i] for i in rows]
    assert data.validation == full.validation and len(data.validation) == 12  # never drawn from
    assert data.labels == full.labels
    if draw["method"] == "bootstrap":
        assert len(data.train) == n and len(set(rows.tolist())) < n  # repeats, some rows out of the bag
    elif draw["method"] == "subsample":
        assert len(data.train) == 18 and len(set(rows.tolist())) == 18  # round(0.4 x 45), no repeats
    # Same (seed, stream), another adapter: the same rows (a retried member trains on the same data).
    assert text_job(tiny_bert_dir, text_files, train_rows=draw)[1].train == data.train


def test_streams_and_seeds_give_other_draws_and_the_default_seed_is_the_jobs(tiny_bert_dir, text_files, full):
    def train(job_seed=42, **draw):
        return text_job(tiny_bert_dir, text_files, seed=job_seed, train_rows=draw)[1].train

    a, b = train(method="bootstrap", seed=7, stream=0), train(method="bootstrap", seed=7, stream=1)
    assert a != b and len(a) == len(b) == 45
    assert train(method="subsample", fraction=0.5, seed=7) != train(method="subsample", fraction=0.5, seed=8)
    # seed left out: the job's seed.
    assert train(11, method="bootstrap") == train(99, method="bootstrap", seed=11)
    assert train(11, method="bootstrap") != train(12, method="bootstrap")


def test_folds_drop_exactly_the_holdout_fold_stratified_by_class(tiny_bert_dir, text_files, full):
    n, k = len(full.train), 3
    targets = full.train.targets
    kept_rows = []
    for holdout in range(k):
        adapter, data = text_job(tiny_bert_dir, text_files, train_rows={"method": "folds", "folds": k,
                                                                         "holdout": holdout, "seed": 5})
        kept = adapter.drawn_rows(full.train)
        assert np.all(np.diff(kept) > 0)  # sorted, no repeats
        kept_rows.append(set(kept.tolist()))
        assert data.train == full.train.take(kept)
    held = [set(range(n)) - kept for kept in kept_rows]
    # The held-out folds partition the rows: every row is held out by exactly one fold model.
    assert sorted(i for fold in held for i in fold) == list(range(n))
    assert all(len(fold) == n // k for fold in held)  # 45 rows, 3 folds: 15 each
    # Each class spread as evenly as it can be: its count per fold within one of its share.
    counts = Counter(targets)
    assert sorted(counts) == [0, 1, 2] and counts[2] == 9
    for fold in held:
        per_class = Counter(targets[i] for i in fold)
        for label, total in counts.items():
            assert total // k <= per_class[label] <= -(-total // k), (label, per_class)
    # The assignment is the one core.ensemble.folds gives for these labels and that seed.
    assignment = ensemble.folds(n, k, seed=5, labels=targets)
    assert held == [set(np.flatnonzero(assignment == h).tolist()) for h in range(k)]


def test_folds_of_a_multi_label_or_regression_job_are_not_stratified(tiny_bert_dir, tmp_path):
    rows = sentiment_rows(20, seed=5)
    ml = write_text_dataset(tmp_path / "ml.csv", [{"text": r["text"], "label": "a|b" if r["label"] else "b"}
                                                   for r in rows])
    reg = write_text_dataset(tmp_path / "reg.csv", [{"text": r["text"], "label": r["label"] + i / 7}
                                                    for i, r in enumerate(rows)])
    draw = {"method": "folds", "folds": 4, "holdout": 2, "seed": 3}
    expected = np.flatnonzero(ensemble.folds(20, 4, seed=3) != 2)
    for path, config in ((ml, {"problem_type": "multi_label", "label_separator": "|"}),
                         (reg, {"problem_type": "regression"})):
        spec = JobSpec.model_validate({**BASE, "task": "text-classification", "config": {"max_length": 16, **config}})
        adapter = adapter_for(Task.TEXT_CLASSIFICATION, spec)
        whole = adapter.prepare(DataFiles(path), adapter.load_processor(str(tiny_bert_dir))).train
        with_rows = JobSpec.model_validate({**BASE, "task": "text-classification",
                                            "config": {"max_length": 16, **config, "train_rows": draw}})
        drawn = adapter_for(Task.TEXT_CLASSIFICATION, with_rows)
        np.testing.assert_array_equal(drawn.drawn_rows(whole), expected)
        data = drawn.prepare(DataFiles(path), drawn.load_processor(str(tiny_bert_dir)))
        assert data.train == whole.take(expected) and len(data.train) == 15


def test_a_token_classification_job_draws_sentences_with_their_words(tiny_bert_dir, tmp_path):
    rows = [{"tokens": ["alice", "went", "to", "paris"][: 2 + i % 3], "tags": ["B-PER", "O", "O", "B-LOC"][: 2 + i % 3]}
            for i in range(12)]
    for i, r in enumerate(rows):
        r["tokens"] = [f"{r['tokens'][0]}{i}"] + r["tokens"][1:]
    path = tmp_path / "ner.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def prepare(**config):
        spec = JobSpec.model_validate({**BASE, "task": "token-classification", "config": {"max_length": 16, **config}})
        adapter = adapter_for(Task.TOKEN_CLASSIFICATION, spec)
        return adapter, adapter.prepare(DataFiles(path, path), adapter.load_processor(str(tiny_bert_dir)))

    _, whole = prepare()
    adapter, data = prepare(train_rows={"method": "bootstrap", "seed": 1, "stream": 2})
    rows_drawn = ensemble.bootstrap_rows(12, seed=1, member=2)
    np.testing.assert_array_equal(adapter.drawn_rows(whole.train), rows_drawn)
    assert type(data.train) is TokenSplit and data.train == whole.train.take(rows_drawn)
    assert data.train.words == [whole.train.words[i] for i in rows_drawn]
    assert [w[0] for w in data.train.words] == [f"alice{i}" for i in rows_drawn]
    assert data.validation == whole.validation and len(data.validation) == 12


def test_an_image_job_draws_images_with_their_labels(tmp_path):
    model = save_tiny_resnet(tmp_path / "resnet")
    images, labels = digits(8)
    path = write_image_parquet(tmp_path / "train.parquet", images[:30], labels[:30])

    def prepare(**config):
        spec = JobSpec.model_validate({**BASE, "task": "image-classification",
                                       "config": {"image_size": 8, **config}})
        adapter = adapter_for(Task.IMAGE_CLASSIFICATION, spec)
        return adapter, adapter.prepare(DataFiles(path, path), adapter.load_processor(str(model)))

    _, whole = prepare()
    adapter, data = prepare(train_rows={"method": "subsample", "fraction": 0.5, "seed": 4})
    rows = ensemble.subsample_rows(30, 0.5, seed=4, member=0)
    np.testing.assert_array_equal(adapter.drawn_rows(whole.train), rows)
    assert len(data.train) == 15 and data.train.lengths == [1] * 15
    assert data.train.targets == [whole.train.targets[i] for i in rows]
    assert [data.labels[t] for t in data.train.targets] == [str(labels[i]) for i in rows]
    for got, i in zip(data.train.features["pixel_values"], rows):
        assert torch.equal(got, whole.train.features["pixel_values"][i])
    assert len(data.validation) == 30


# --- the spec's checks ------------------------------------------------------------------------


def error_of(config: dict) -> tuple[str, str]:
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({**BASE, "config": config})
    errors = e.value.errors()
    assert len(errors) == 1, errors
    return ".".join(str(p) for p in errors[0]["loc"]), errors[0]["msg"]


@pytest.mark.parametrize("config, where, message", [
    ({"train_rows": {"method": "subsample"}}, "config.train_rows", "subsample needs a fraction"),
    ({"train_rows": {"method": "bootstrap", "fraction": 0.5}}, "config.train_rows", "fraction does not apply"),
    ({"train_rows": {"method": "subsample", "fraction": 0}}, "config.train_rows.fraction", "greater than 0"),
    ({"train_rows": {"method": "subsample", "fraction": 1.5}}, "config.train_rows.fraction", "less than or equal"),
    ({"train_rows": {"method": "folds", "folds": 3}}, "config.train_rows", "folds needs folds and holdout"),
    ({"train_rows": {"method": "folds", "folds": 3, "holdout": 3}}, "config.train_rows", "holdout must be below"),
    ({"train_rows": {"method": "folds", "folds": 1, "holdout": 0}}, "config.train_rows.folds", "greater than or equal"),
    ({"train_rows": {"method": "bootstrap", "holdout": 0}}, "config.train_rows", "do not apply to bootstrap"),
    ({"train_rows": {"method": "jackknife"}}, "config.train_rows.method", "'bootstrap', 'subsample' or 'folds'"),
    ({"train_rows": {"method": "bootstrap", "stream": -1}}, "config.train_rows.stream", "greater than or equal"),
    ({"train_rows": {"method": "bootstrap", "rows": 3}}, "config.train_rows.rows", "Extra inputs"),
    ({"ensemble": {"method": "boosting", "parallel": 2}}, "config.ensemble", "parallel applies to bagging, stacking and soup only"),
    ({"ensemble": {"method": "bagging", "members": 1}}, "config.ensemble", "2 to 16 members, not 1"),
    ({"ensemble": {"method": "bagging", "members": 17}}, "config.ensemble", "2 to 16 members, not 17"),
    ({"ensemble": {"method": "soup", "members": [{"seed": 1}]}}, "config.ensemble", "not 1"),
    ({"ensemble": {"method": "soup", "from_search": "ftjob-abc"}}, "config.ensemble",
     "from_search builds its ensemble by selection"),
    ({"ensemble": {"from_search": "ftjob-abc", "members": 3}}, "config.ensemble", "members does not apply"),
    ({"ensemble": {"method": "selection"}}, "config.ensemble", "selection needs from_search"),
    ({"ensemble": {}}, "config.ensemble", "method is required"),
    ({"ensemble": {"method": "stacking", "subsample": 0.5}}, "config.ensemble", "subsample applies to bagging only"),
    ({"ensemble": {"method": "stacking", "members": 16, "folds": 5}}, "config.ensemble", "at most 64"),
    ({"ensemble": {"method": "bagging", "vote": "majority"}}, "config.ensemble.vote", "'soft' or 'hard'"),
    ({"search": {"trials": 2}, "ensemble": {"method": "bagging"}}, "config.ensemble",
     "search and ensemble cannot be combined"),
])
def test_bad_train_rows_and_ensemble_bodies_name_the_field(config, where, message):
    loc, msg = error_of(config)
    assert loc == where and message in msg, (loc, msg)


def test_good_bodies_validate():
    config = JobSpec.model_validate({**BASE, "config": {
        "train_rows": {"method": "folds", "folds": 5, "holdout": 4},
        "ensemble": {"method": "stacking", "members": [{"config.lora.r": 8}, {"seed": 3}], "folds": 2}}}).config
    assert config.train_rows.seed is None and config.train_rows.stream == 0
    assert config.ensemble.resolved_method == "stacking" and config.ensemble.overrides() == [{"config.lora.r": 8},
                                                                                             {"seed": 3}]
    selection = JobSpec.model_validate({**BASE, "config": {"ensemble": {"from_search": "ftjob-abc"}}}).config.ensemble
    assert selection.resolved_method == "selection"
