"""The toolbox through real engine runs on a tiny BERT: label kinds, L1, freezing, LoRA,
augmentation with exact resume, metric checks, the reproducibility record."""

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import core.engine
from core.callbacks import Callback
from core.engine import RunPaths, run
from core.errors import EngineError
from core.sink import ListSink
from core.spec import JobSpec
from core.adapters.base import class_weights
from tests.tiny_models import write_text_dataset

FAST = {"n_epochs": 4, "learning_rate_multiplier": 40}


def spec(hyperparameters=None, **config) -> JobSpec:
    return JobSpec(model="tiny", training_file="t", hyperparameters=hyperparameters or FAST,
                   config={"device": "cpu", **config})


def paths(model, train, work, validation=None, test=None, resume_from=None) -> RunPaths:
    return RunPaths(str(model), train, validation, test, work, resume_from)


class Losses(Callback):
    def __init__(self):
        self.losses = {}

    def on_step_end(self, state, control):
        self.losses[state.step] = state.loss


CUES = {"pos": ["good", "great", "love", "wonderful", "awesome"], "neg": ["bad", "terrible", "hate", "boring", "waste"]}


def multilabel_rows(n, seed):
    """Each row carries words of neither, one or both classes: labels [], ["pos"], ["neg"] or both."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        labels = [label for label in ("neg", "pos") if rng.random() < 0.5]
        words = rng.sample(["the", "movie", "was", "it", "a", "plot"], 3)
        words += [w for label in labels for w in rng.sample(CUES[label], 2)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": labels})
    return rows


def test_multi_label_learns_each_label(tiny_bert_dir, tmp_path):
    train = write_text_dataset(tmp_path / "t.jsonl", multilabel_rows(200, 0))
    test = write_text_dataset(tmp_path / "s.jsonl", multilabel_rows(40, 1))
    result = run(spec({"n_epochs": 12, "learning_rate_multiplier": 40}), paths(tiny_bert_dir, train, tmp_path / "w", test=test), ListSink())
    report = result.metrics["test"]
    assert set(report["per_class"]) == {"neg", "pos"}
    assert min(c["f1"] for c in report["per_class"].values()) > 0.85
    assert report["f1_micro"] > 0.85 > result.metrics["baseline_test"]["f1_micro"]
    model = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert model.config.problem_type == "multi_label_classification"


def test_regression_learns_in_the_labels_units_and_exports_them(tiny_bert_dir, tmp_path):
    def rows(n, seed):  # a price-like label: 1000 + 250 per "good", far from the head's initial 0
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            k = rng.randint(0, 2)
            words = ["good"] * k + rng.sample(["the", "movie", "was", "it", "plot"], 3)
            rng.shuffle(words)
            out.append({"text": " ".join(words), "label": 1000.5 + 250 * k})
        return out

    train = write_text_dataset(tmp_path / "t.csv", rows(200, 0))
    test = write_text_dataset(tmp_path / "s.csv", rows(40, 1))
    result = run(spec({"n_epochs": 10, "learning_rate_multiplier": 20}, metric_for_best_model="r2"),
                 paths(tiny_bert_dir, train, tmp_path / "w", validation=test, test=test), ListSink())
    metrics = result.metrics["test"]
    assert metrics["r2"] > 0.8 and result.metrics["baseline_test"]["r2"] < 0.2
    assert metrics["rmse"] == pytest.approx(metrics["mse"] ** 0.5) and metrics["mae"] < 100
    # The exported head speaks the label's units: plain transformers predicts ~1000-1500.
    from core.predict import predict

    values = [p[0]["value"] for p in predict(result.model_dir, ["the movie", "good good the movie"])]
    assert 900 < values[0] < 1150 and 1350 < values[1] < 1600


def test_metric_must_belong_to_the_task(tiny_bert_dir, sentiment_files, tmp_path):
    with pytest.raises(EngineError) as e:
        run(spec(metric_for_best_model="r2"), paths(tiny_bert_dir, sentiment_files["train"], tmp_path), ListSink())
    assert e.value.param == "config.metric_for_best_model" and "accuracy" in e.value.message


def test_l1_term_adds_exactly_its_value_to_the_loss(tiny_bert_dir, sentiment_files, tmp_path, monkeypatch):
    penalties = []
    original = core.engine.l1_penalty

    def spy(params, coefficient):
        params = list(params)
        value = original(params, coefficient)
        expected = coefficient * sum(float(p.detach().abs().sum()) for p in params)
        penalties.append((float(value), expected, len(params)))
        return value

    monkeypatch.setattr(core.engine, "l1_penalty", spy)
    one_step = {"n_epochs": 1, "learning_rate_multiplier": 40, "batch_size": 200}
    plain, with_l1 = Losses(), Losses()
    run(spec(one_step), paths(tiny_bert_dir, sentiment_files["train"], tmp_path / "a"), ListSink(), callbacks=[plain])
    run(spec(one_step, optimizer={"l1_penalty": 1e-4}), paths(tiny_bert_dir, sentiment_files["train"], tmp_path / "b"),
        ListSink(), callbacks=[with_l1])
    value, expected, n_params = penalties[0]
    assert value == pytest.approx(expected, rel=1e-5) and n_params > 10
    assert with_l1.losses[1] - plain.losses[1] == pytest.approx(value, rel=1e-4)


def test_frozen_embeddings_and_first_layer_are_exported_unchanged(tiny_bert_dir, sentiment_files, tmp_path):
    result = run(spec(freeze={"embeddings": True, "first_n_layers": 1}),
                 paths(tiny_bert_dir, sentiment_files["train"], tmp_path), ListSink())
    base, trained = load_file(tiny_bert_dir / "model.safetensors"), load_file(result.model_dir / "model.safetensors")
    frozen = [k for k in base if ".embeddings." in k or ".layer.0." in k]
    moving = [k for k in base if ".layer.1." in k]
    assert frozen and all(torch.equal(base[k], trained["bert." + k]) for k in frozen)  # the base is a bare BertModel
    assert moving and all(not torch.equal(base[k], trained["bert." + k]) for k in moving if k.endswith("weight"))


def test_lora_export_loads_with_plain_transformers(tiny_bert_dir, sentiment_files, tmp_path):
    sink = ListSink()
    result = run(spec({"n_epochs": 6, "learning_rate_multiplier": 10},  # a random tiny base needs a large LR
                      lora={"r": 4, "alpha": 8, "target_modules": ["query", "value"]}),
                 paths(tiny_bert_dir, sentiment_files["train"], tmp_path, test=sentiment_files["test"]), sink)
    assert (result.model_dir / "adapter" / "adapter_config.json").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert result.metrics["test"]["accuracy"] > result.metrics["baseline_test"]["accuracy"]
    assert "trainable" in sink.events[0][1] or any("trainable" in m for _, m, _ in sink.events)


def test_augmented_training_resumes_exactly(tiny_bert_dir, sentiment_files, tmp_path):
    job = spec({"n_epochs": 2, "learning_rate_multiplier": 20}, checkpoint_every_steps=4,
               augmentation={"text": {"deletion": 0.1, "swap": 0.1, "substitution": 0.1, "insertion": 0.1}})
    saved = tmp_path / "saved"

    class Copy(ListSink):
        def checkpoint(self, step, path, metrics):
            super().checkpoint(step, path, metrics)
            if step == 4:
                shutil.copytree(path, saved)

    full, resumed, plain = Losses(), Losses(), Losses()
    run(job, paths(tiny_bert_dir, sentiment_files["train"], tmp_path / "a"), Copy(), callbacks=[full])
    run(job, paths(tiny_bert_dir, sentiment_files["train"], tmp_path / "b", resume_from=saved), ListSink(), callbacks=[resumed])
    assert resumed.losses == {s: full.losses[s] for s in range(5, max(full.losses) + 1)}
    no_aug = spec({"n_epochs": 2, "learning_rate_multiplier": 20}, checkpoint_every_steps=4)
    run(no_aug, paths(tiny_bert_dir, sentiment_files["train"], tmp_path / "c"), ListSink(), callbacks=[plain])
    assert plain.losses[1] != full.losses[1]  # augmentation really changed the batches


def test_reproducibility_record_in_checkpoints_and_export(tiny_bert_dir, sentiment_files, tmp_path):
    result = run(spec({"n_epochs": 1}), paths(tiny_bert_dir, sentiment_files["train"], tmp_path,
                                              validation=sentiment_files["validation"]), ListSink())
    exported = json.loads((result.model_dir / "lathe_job.json").read_text())["reproducibility"]
    checkpoint = next((tmp_path / "checkpoints").glob("step-*"))
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["reproducibility"]
    assert exported == saved
    assert exported["task"] == "text-classification" and exported["seed"] == 42
    assert exported["versions"]["torch"] == torch.__version__.split("+")[0] or exported["versions"]["torch"]
    assert set(exported["datasets"]) == {"training_file", "validation_file"}


def test_balanced_class_weights():
    weights = class_weights(["a", "b"], {"a": 30, "b": 10}, "balanced")
    assert weights.tolist() == pytest.approx([40 / (2 * 30), 40 / (2 * 10)])
    assert class_weights(["a", "b"], {"a": 1, "b": 1}, {"b": 3.0}).tolist() == [1.0, 3.0]
    with pytest.raises(EngineError) as e:
        class_weights(["a"], {"a": 1}, {"z": 2.0})
    assert e.value.param == "config.loss.class_weights"
