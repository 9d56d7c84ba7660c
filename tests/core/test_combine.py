"""The combine stage of an ensemble job (core.combine, core.soup) and the loader of what it exports
(core.ensemble_model), on tiny BERT members trained once per module: the loader answers what the
combine measured, stacking's out-of-fold outputs never come from a model that trained on the row,
a soup is the plain mean of its ingredients' weights, and nothing exported is a pickle."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression

from core.adapters import DataFiles, adapter_for
from core.combine import Member, Stage, combine, fit_meta, held_out_rows
from core.engine import RunPaths, run
from core.ensemble_model import EnsembleModel, apply_meta
from core.errors import EngineError
from core.predict import predict
from core.sink import ListSink
from core.spec import JobSpec, Task
from tests.tiny_models import sentiment_rows, write_text_dataset

LEARNS = {"n_epochs": 8, "batch_size": 8, "learning_rate_multiplier": 30}  # what the tiny BERT needs to learn
QUICK = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 30}
NEUTRAL = ["the movie", "a plot and an actor", "it was the story", "this film", "very very", "the actor and it",
           "plot", "was it a movie", "the story was very", "an actor"]


# --- training the members once ------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train faster on one thread, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parent_body(ensemble: dict, *, hp: dict = LEARNS, **config) -> dict:
    return {"model": "m", "training_file": "t", "validation_file": "v", "test_file": "x",
            "task": "text-classification", "hyperparameters": hp,
            "config": {"max_length": 32, "metric_for_best_model": "f1_macro", "checkpoint_every_steps": 10_000,
                       **config, "ensemble": ensemble}}


def member_spec(parent: dict, *, seed: int, train_rows: dict | None, hp: dict | None = None, **config) -> JobSpec:
    """A member's spec as lathe plans it: the parent's body without `ensemble`, its seed and rows."""
    body = json.loads(json.dumps(parent))
    body["config"].pop("ensemble")
    body["hyperparameters"].update(hp or {})
    body["config"].update(config)
    body["seed"] = seed
    if train_rows is not None:
        body["config"]["train_rows"] = train_rows
    return JobSpec.model_validate(body)


def train(base: Path, files: DataFiles, spec: JobSpec, work: Path) -> Path:
    paths = RunPaths(model=str(base), train_file=files.train, validation_file=files.validation,
                     test_file=files.test, work_dir=work)
    return run(spec, paths, ListSink(), archive=False).model_dir


def train_members(root: Path, base: Path, files: DataFiles, parent: dict, *, folds: int | None = None) -> list[Member]:
    """Two members: on bootstrap streams 0 and 1 (bagging), or each on every fold but one (stacking)."""
    members = []
    for m in range(2):
        for fold in range(folds) if folds else [None]:
            rows = ({"method": "bootstrap", "seed": 42, "stream": m} if fold is None
                    else {"method": "folds", "folds": folds, "holdout": fold, "seed": 42})
            spec = member_spec(parent, seed=42 + m, train_rows=rows)
            model = train(base, files, spec, root / f"m{m}-{fold}")
            members.append(Member(m, f"ftjob-m{m}f{fold}", model, spec))
    return members


def combined(spec_body: dict, members: list[Member], files: DataFiles, work: Path) -> SimpleNamespace:
    spec = JobSpec.model_validate(spec_body)
    sink = ListSink()
    result = combine(spec, members, files, work, sink)
    folder = result.model_dir
    return SimpleNamespace(spec=spec, members=members, files=files, result=result, folder=folder, sink=sink,
                           report=json.loads((folder / "eval_report.json").read_text()),
                           description=(json.loads((folder / "ensemble.json").read_text())
                                        if (folder / "ensemble.json").exists() else None))


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("sentiment")
    rows = sentiment_rows(120, seed=1)
    files = DataFiles(write_text_dataset(root / "train.csv", rows[:80]),
                      write_text_dataset(root / "validation.csv", rows[80:100]),
                      write_text_dataset(root / "test.csv", rows[100:]))
    return SimpleNamespace(root=root, files=files, train=rows[:80], test=rows[100:],
                           test_texts=[r["text"] for r in rows[100:]])


@pytest.fixture(scope="module")
def bagged(sentiment, tiny_bert_dir):
    parent = parent_body({"method": "bagging", "members": 2})
    members = train_members(sentiment.root / "bagging", tiny_bert_dir, sentiment.files, parent)
    return combined(parent, members, sentiment.files, sentiment.root / "bagging-parent")


@pytest.fixture(scope="module")
def hard(sentiment, bagged):
    parent = parent_body({"method": "bagging", "members": 2, "vote": "hard"})
    return combined(parent, bagged.members, sentiment.files, sentiment.root / "hard-parent")


@pytest.fixture(scope="module")
def stacked(sentiment, tiny_bert_dir):
    parent = parent_body({"method": "stacking", "members": 2, "folds": 2})
    members = train_members(sentiment.root / "stacking", tiny_bert_dir, sentiment.files, parent, folds=2)
    return combined(parent, members, sentiment.files, sentiment.root / "stacking-parent")


@pytest.fixture(scope="module")
def souped(sentiment, tiny_bert_dir):
    """A soup's members as lathe plans overridden ones: the parent's seed (one head init), all rows."""
    overrides = [{"hyperparameters.learning_rate_multiplier": 30}, {"hyperparameters.learning_rate_multiplier": 20}]
    parent = parent_body({"method": "soup", "members": overrides})
    members = []
    for m, override in enumerate(overrides):
        spec = member_spec(parent, seed=42, train_rows=None,
                           hp={"learning_rate_multiplier": override["hyperparameters.learning_rate_multiplier"]})
        model = train(tiny_bert_dir, sentiment.files, spec, sentiment.root / f"soup-m{m}")
        members.append(Member(m, f"ftjob-soup{m}", model, spec))
    return combined(parent, members, sentiment.files, sentiment.root / "soup-parent")


@pytest.fixture(scope="module")
def regression(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("regression")
    rows = [{"text": r["text"], "label": 1.0 + 2.5 * r["label"] + 0.125 * (i % 4)}
            for i, r in enumerate(sentiment_rows(64, seed=2))]
    files = DataFiles(write_text_dataset(root / "train.csv", rows[:40]),
                      write_text_dataset(root / "validation.csv", rows[40:52]),
                      write_text_dataset(root / "test.csv", rows[52:]))
    parent = parent_body({"method": "bagging", "members": 2}, hp=QUICK, problem_type="regression",
                         metric_for_best_model="mae")
    members = train_members(root, tiny_bert_dir, files, parent)
    out = combined(parent, members, files, root / "parent")
    out.test = rows[52:]
    return out


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("multilabel")
    def labels(row: dict) -> str:
        return ("pos" if row["label"] else "neg") + ("|long" if len(row["text"].split()) > 6 else "")

    rows = [{"text": r["text"], "label": labels(r)} for r in sentiment_rows(64, seed=3)]
    files = DataFiles(write_text_dataset(root / "train.csv", rows[:40]),
                      write_text_dataset(root / "validation.csv", rows[40:52]),
                      write_text_dataset(root / "test.csv", rows[52:]))
    parent = parent_body({"method": "stacking", "members": 2, "folds": 2}, hp=QUICK, problem_type="multi_label",
                         label_separator="|", metric_for_best_model="f1_micro")
    members = train_members(root, tiny_bert_dir, files, parent, folds=2)
    out = combined(parent, members, files, root / "parent")
    out.test = rows[52:]
    return out


# --- helpers ------------------------------------------------------------------------------------


def probabilities(folder: Path, texts: list[str], labels: list[str]) -> np.ndarray:
    """One model folder's own answer (core.predict), as rows x labels in `labels` order."""
    out = np.zeros((len(texts), len(labels)))
    for r, row in enumerate(predict(folder, texts, top_k=len(labels))):
        assert len(row) == len(labels)
        for item in row:
            out[r, labels.index(item["label"])] = item["score"]
    return out


def values(folder: Path, texts: list[str]) -> np.ndarray:
    return np.array([[row[0]["value"]] for row in predict(folder, texts)])


def member_outputs(ens: SimpleNamespace, texts: list[str]) -> list[np.ndarray]:
    """Each member's outputs from its own folders (the mean of its fold models' for stacking)."""
    labels = ens.description["labels"]
    answer = (lambda f: values(f, texts)) if not labels else (lambda f: probabilities(f, texts, labels))
    return [np.mean([answer(ens.folder / path) for path in member["paths"]], axis=0)
            for member in ens.description["members"]]


def log_loss(p: np.ndarray, targets: list[int]) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(p)), targets], 1e-7, 1))))


def finite(figures: dict) -> bool:
    return all(math.isfinite(v) for v in figures.values() if isinstance(v, float | int))


# --- bagging ------------------------------------------------------------------------------------


def test_bagging_exports_members_and_the_loader_averages_their_own_answers(bagged, sentiment):
    folder = bagged.folder
    assert {p.name for p in folder.iterdir()} == {"members", "ensemble.json", "eval_report.json", "lathe_job.json"}
    assert sorted(p.name for p in (folder / "members").iterdir()) == ["m0", "m1"]
    for i, member in enumerate(bagged.members):  # each member's folder as it was exported
        copied = folder / f"members/m{i}/model.safetensors"
        assert copied.read_bytes() == (member.model_dir / "model.safetensors").read_bytes()
    d = bagged.description
    assert (d["format"], d["method"], d["vote"], d["problem_type"], d["labels"]) == (
        "lathe-ensemble", "bagging", "soft", "single_label", ["0", "1"])
    assert [m["paths"] for m in d["members"]] == [["members/m0"], ["members/m1"]]
    assert [m["job"] for m in d["members"]] == ["ftjob-m0fNone", "ftjob-m1fNone"] and d["meta_learner"] is None

    texts = sentiment.test_texts + NEUTRAL
    outputs = EnsembleModel.load(folder).outputs(texts)
    own = member_outputs(bagged, texts)
    assert outputs.shape == (len(texts), 2)
    np.testing.assert_allclose(outputs, (own[0] + own[1]) / 2, atol=1e-5)
    np.testing.assert_allclose(outputs.sum(1), 1, atol=1e-6)
    assert not np.allclose(own[0], own[1], atol=1e-3)  # the members differ: the mean is not either one's

    top = predict(folder, texts)
    assert [row[0]["label"] for row in top] == [d["labels"][i] for i in outputs.argmax(1)]
    np.testing.assert_allclose([row[0]["score"] for row in top], outputs.max(1), atol=1e-9)


def test_the_combines_metrics_are_the_loaders_outputs_scored(bagged, sentiment):
    labels = bagged.description["labels"]
    targets = [labels.index(str(r["label"])) for r in sentiment.test]
    outputs = EnsembleModel.load(bagged.folder).outputs(sentiment.test_texts)
    test = bagged.report["ensemble"]["test"]
    assert test["accuracy"] == pytest.approx(float(np.mean(outputs.argmax(1) == targets)), abs=1e-12)
    assert test["loss"] == pytest.approx(log_loss(outputs, targets), abs=1e-5)
    assert test["confusion_matrix"]["matrix"] == [[int(np.sum((np.array(targets) == t) & (outputs.argmax(1) == p)))
                                                   for p in range(2)] for t in range(2)]
    # The job's metrics are the report's ensemble figures; each member's test figures are its own.
    assert bagged.result.metrics["test"]["loss"] == pytest.approx(test["loss"], abs=1e-12)
    assert bagged.result.metrics["best"] == bagged.report["ensemble"]["validation"]
    for member, own in zip(bagged.report["members"], member_outputs(bagged, sentiment.test_texts)):
        assert member["test"]["loss"] == pytest.approx(log_loss(own, targets), abs=1e-5)
    assert any(e[1].startswith("Ensemble: validation f1_macro=") for e in bagged.sink.events)


def test_a_hard_vote_outputs_the_members_vote_shares(hard, sentiment):
    assert hard.description["vote"] == "hard"
    texts = sentiment.test_texts + NEUTRAL
    outputs = EnsembleModel.load(hard.folder).outputs(texts)
    votes = [np.eye(2)[own.argmax(1)] for own in member_outputs(hard, texts)]
    np.testing.assert_array_equal(outputs, (votes[0] + votes[1]) / 2)
    assert set(np.unique(outputs)) <= {0.0, 0.5, 1.0}
    labels = hard.description["labels"]
    targets = [labels.index(str(r["label"])) for r in sentiment.test]
    test_out = outputs[: len(sentiment.test)]
    assert hard.report["ensemble"]["test"]["accuracy"] == pytest.approx(float(np.mean(test_out.argmax(1) == targets)))


# --- stacking -----------------------------------------------------------------------------------


def test_stacking_out_of_fold_rows_never_come_from_a_model_that_trained_on_them(stacked, sentiment):
    stage = Stage(stacked.spec, sentiment.files)
    adapter, splits, _ = stage.prepare(stacked.members[0], with_train=True)
    train = splits["train"]
    n = len(train)
    assert n == 80
    for index in (0, 1):
        held_by_fold = []
        for member in [m for m in stacked.members if m.index == index]:
            held = held_out_rows(stage, member, train)
            drawn = adapter_for(Task.TEXT_CLASSIFICATION, member.spec).drawn_rows(train).tolist()
            assert held and drawn and set(held).isdisjoint(drawn), member.job
            assert sorted(set(held) | set(drawn)) == list(range(n))
            held_by_fold.append(held)
            # What the fold model really trained on: the full split's drawn rows, none of `held`.
            own = adapter_for(Task.TEXT_CLASSIFICATION, member.spec)
            assert own.prepare(sentiment.files, own.load_processor(str(member.model_dir))).train == train.take(drawn)
        assert sorted(i for held in held_by_fold for i in held) == list(range(n))  # each row out of fold once


def test_stacking_meta_learner_is_fit_on_the_out_of_fold_outputs(stacked, sentiment):
    """Refit the meta-learner from out-of-fold outputs computed here: the same numbers as ensemble.json."""
    stage = Stage(stacked.spec, sentiment.files)
    oof = []
    for index in (0, 1):
        matrix = np.full((80, 2), np.nan)
        for member in [m for m in stacked.members if m.index == index]:
            adapter, splits, model = stage.prepare(member, with_train=True)
            held = held_out_rows(stage, member, splits["train"])
            matrix[held] = stage.outputs(adapter, model, splits["train"], held)
        assert not np.isnan(matrix).any()
        oof.append(matrix)
    meta = stacked.description["meta_learner"]
    refit = fit_meta(1.0, oof, np.asarray(stage.splits["train"].targets), "single_label", stage.adapter)
    np.testing.assert_allclose(refit["coef"], meta["coef"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(refit["intercept"], meta["intercept"], rtol=1e-4, atol=1e-6)


def test_stacking_exports_its_meta_learner_as_numbers_and_the_loader_applies_it(stacked, sentiment):
    d = stacked.description
    assert d["method"] == "stacking" and d["vote"] == "soft"
    assert [m["paths"] for m in d["members"]] == [["members/m0/fold0", "members/m0/fold1"],
                                                  ["members/m1/fold0", "members/m1/fold1"]]
    assert all((stacked.folder / p / "model.safetensors").is_file() for m in d["members"] for p in m["paths"])
    meta = d["meta_learner"]
    assert meta["type"] == "logistic_regression"
    # Binary: scikit-learn's one row of coefficients over members x classes features, one intercept.
    assert len(meta["coef"]) == 1 and len(meta["coef"][0]) == 4 and len(meta["intercept"]) == 1
    numbers = meta["coef"][0] + meta["intercept"]
    assert all(type(x) is float and math.isfinite(x) for x in numbers)
    assert any(abs(x) > 1e-3 for x in meta["coef"][0])

    texts = sentiment.test_texts + NEUTRAL
    outputs = EnsembleModel.load(stacked.folder).outputs(texts)
    np.testing.assert_allclose(outputs, apply_meta(meta, member_outputs(stacked, texts), problem_type="single_label"),
                               atol=1e-5)
    np.testing.assert_allclose(outputs.sum(1), 1, atol=1e-9)
    # The numbers mean what scikit-learn's model meant: its predict_proba on the members' outputs side by side.
    sklearn = LogisticRegression()
    sklearn.coef_, sklearn.intercept_, sklearn.classes_ = (np.array(meta["coef"]), np.array(meta["intercept"]),
                                                           np.array([0, 1]))
    np.testing.assert_allclose(outputs, sklearn.predict_proba(np.concatenate(member_outputs(stacked, texts), axis=1)),
                               atol=1e-5)
    labels = d["labels"]
    targets = [labels.index(str(r["label"])) for r in sentiment.test]
    test = stacked.report["ensemble"]["test"]
    assert test["loss"] == pytest.approx(log_loss(outputs[: len(targets)], targets), abs=1e-5)
    assert test["accuracy"] == pytest.approx(float(np.mean(outputs[: len(targets)].argmax(1) == targets)))


# --- soup ---------------------------------------------------------------------------------------


def test_a_soup_is_the_mean_of_its_ingredients_weights(souped, sentiment):
    folder = souped.folder
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "eval_report.json" in names
    assert "ensemble.json" not in names and "members" not in names
    report = souped.report
    ingredients = report["ingredients"]
    # Members from one head init that both fit the data: the second does not hurt validation and joins.
    assert ingredients == [0, 1], report
    states = {m.index: load_file(str(m.model_dir / "model.safetensors")) for m in souped.members}
    exported = load_file(str(folder / "model.safetensors"))
    assert exported.keys() == states[0].keys()
    for key, value in exported.items():
        if value.is_floating_point():
            expected = sum(states[i][key].double() for i in ingredients) / len(ingredients)
            np.testing.assert_allclose(value.double().numpy(), expected.numpy(), atol=1e-6, err_msg=key)
        else:
            assert (value == states[ingredients[0]][key]).all(), key
    floats = [k for k in exported if exported[k].is_floating_point()]
    assert not all((states[0][k] == states[1][k]).all() for k in floats)  # two different members: a real mean
    # Greedy soup: an ingredient joins only if validation does not get worse, so the soup is at least
    # as good as the best member on validation.
    metric = report["metric"]
    assert metric == "f1_macro" and [m["member"] for m in report["members"]] == [0, 1]
    assert report["ensemble"]["validation"][metric] >= max(m["validation"][metric] for m in report["members"])
    labels = ["0", "1"]
    targets = [int(r["label"]) for r in sentiment.test]
    out = probabilities(folder, sentiment.test_texts, labels)
    assert report["ensemble"]["test"]["loss"] == pytest.approx(log_loss(out, targets), abs=1e-5)


def test_a_soup_of_members_with_different_heads_is_refused(souped, sentiment, tiny_bert_dir):
    parent = parent_body({"method": "soup", "members": 2})
    spec = member_spec(parent, seed=42, train_rows=None, hp={"n_epochs": 1}, head={"type": "mlp", "hidden_sizes": [16]})
    mlp = train(tiny_bert_dir, sentiment.files, spec, sentiment.root / "mlp")
    work = sentiment.root / "bad-soup"
    with pytest.raises(EngineError) as e:
        combine(JobSpec.model_validate(parent), [souped.members[0], Member(1, "ftjob-mlp", mlp, spec)],
                sentiment.files, work, ListSink())
    assert e.value.param == "config.ensemble.members"
    assert "member 1 (ftjob-mlp)" in e.value.message and "another head" in e.value.message
    assert not (work / "output" / "model").exists()


# --- regression and multi-label -----------------------------------------------------------------


def test_regression_bagging_averages_values_in_the_labels_units(regression):
    d = regression.description
    assert (d["problem_type"], d["vote"], d["labels"]) == ("regression", "mean", [])
    texts = [r["text"] for r in regression.test]
    outputs = EnsembleModel.load(regression.folder).outputs(texts)
    own = member_outputs(regression, texts)
    assert outputs.shape == (len(texts), 1)
    np.testing.assert_allclose(outputs, (own[0] + own[1]) / 2, atol=1e-5)
    test = regression.report["ensemble"]["test"]
    assert {"mse", "rmse", "mae", "r2", "loss"} <= test.keys() and finite(test)
    truth = np.array([r["label"] for r in regression.test])
    assert test["mae"] == pytest.approx(float(np.mean(np.abs(outputs[:, 0] - truth))), abs=1e-4)
    assert test["mse"] == pytest.approx(float(np.mean((outputs[:, 0] - truth) ** 2)), abs=1e-4)
    assert all(finite(m["validation"]) and finite(m["test"]) for m in regression.report["members"])
    value = predict(regression.folder, texts[:3])
    np.testing.assert_allclose([row[0]["value"] for row in value], outputs[:3, 0], atol=1e-9)


def test_multi_label_stacking_fits_one_meta_learner_per_label(multilabel):
    d = multilabel.description
    assert d["problem_type"] == "multi_label" and d["labels"] == ["long", "neg", "pos"]
    meta = d["meta_learner"]
    assert len(meta["coef"]) == 3 and all(len(c) == 2 for c in meta["coef"]) and len(meta["intercept"]) == 3
    assert all(type(x) is float and math.isfinite(x) for c in meta["coef"] for x in c)
    texts = [r["text"] for r in multilabel.test]
    outputs = EnsembleModel.load(multilabel.folder).outputs(texts)
    assert outputs.shape == (len(texts), 3) and ((outputs > 0) & (outputs < 1)).all()
    own = member_outputs(multilabel, texts)
    np.testing.assert_allclose(outputs, apply_meta(meta, own, problem_type="multi_label"), atol=1e-5)
    for label in range(3):  # one logistic regression per label over that label's member outputs
        (a, b), c = meta["coef"][label], meta["intercept"][label]
        z = own[0][:, label] * a + own[1][:, label] * b + c
        np.testing.assert_allclose(outputs[:, label], 1 / (1 + np.exp(-z)), atol=1e-5)
    test = multilabel.report["ensemble"]["test"]
    assert finite(test) and 0 <= test["f1_micro"] <= 1
    truth = np.array([[float(label in r["label"].split("|")) for label in d["labels"]] for r in multilabel.test])
    p = np.clip(outputs, 1e-7, 1 - 1e-7)
    assert test["loss"] == pytest.approx(float(-np.mean(truth * np.log(p) + (1 - truth) * np.log(1 - p))), abs=1e-5)
    top = predict(multilabel.folder, texts[:2], top_k=3)
    assert [{x["label"] for x in row} for row in top] == [set(d["labels"])] * 2


# --- no pickle ----------------------------------------------------------------------------------

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt")


def test_nothing_exported_is_a_pickle(bagged, hard, stacked, souped, regression, multilabel):
    files = 0
    for ens in (bagged, hard, stacked, souped, regression, multilabel):
        for path in sorted(p for p in ens.folder.rglob("*") if p.is_file()):
            files += 1
            assert not path.name.endswith(PICKLE_SUFFIXES), path
            data = path.read_bytes()
            if path.suffix == ".safetensors":  # an 8-byte header length, then that much JSON
                (size,) = struct.unpack("<Q", data[:8])
                assert isinstance(json.loads(data[8:8 + size]), dict), path
                continue
            assert data[:1] != b"\x80" and not data.startswith(b"PK\x03\x04"), path  # pickle, torch.save's zip
            data.decode("utf-8")  # everything else is text (JSON, vocabularies)
    assert files > 40
