"""The training loop on a tiny BERT: learning, invariants, resume, cancel, export."""

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from core.adapters.text_classification import TextClassification
from core.callbacks import Callback
from core.datasets import text
from core.engine import RunPaths, run
from core.errors import DataError, ModelError
from core.sink import ListSink
from core.spec import JobSpec, TrainingConfig
from tests.tiny_models import write_text_dataset

FAST = {"n_epochs": 6, "learning_rate_multiplier": 40}  # a tiny random BERT needs a large LR


def make_spec(hyperparameters=None, **config) -> JobSpec:
    return JobSpec(model="tiny", training_file="train", hyperparameters=hyperparameters or FAST, config=config)


def paths(model, files, work: Path, *, validation=True, test=False, resume_from=None) -> RunPaths:
    return RunPaths(
        model=str(model),
        train_file=files["train"],
        validation_file=files["validation"] if validation else None,
        test_file=files["test"] if test else None,
        work_dir=work,
        resume_from=resume_from,
    )


class Recorder(Callback):
    def __init__(self):
        self.losses, self.lrs, self.grad_norms = {}, {}, {}

    def on_step_end(self, state, control):
        self.losses[state.step], self.lrs[state.step], self.grad_norms[state.step] = state.loss, state.lr, state.grad_norm


def test_loss_goes_down_and_beats_chance(tiny_bert_dir, sentiment_files, tmp_path):
    sink = ListSink()
    result = run(make_spec(), paths(tiny_bert_dir, sentiment_files, tmp_path, test=True), sink)
    losses = sink.series("train", "loss")
    assert losses[-1] < 0.5 * losses[0]
    assert result.metrics["test"]["accuracy"] > 0.8 > result.metrics["baseline_test"]["accuracy"]
    assert result.metrics["latest"]["accuracy"] > 0.8
    assert result.trained_tokens > 0 and not result.cancelled
    assert result.hyperparameters == {"n_epochs": 6, "batch_size": 16, "learning_rate_multiplier": 40.0}
    assert {s for _, s, _ in sink.rows} == {"train", "valid", "test", "baseline_test"}
    report = result.metrics["test"]
    assert set(report["per_class"]) == {"0", "1"} and len(report["confusion_matrix"]["matrix"]) == 2


def test_export_round_trip_gives_in_engine_numbers(tiny_bert_dir, sentiment_files, tmp_path):
    result = run(make_spec(precision="fp32"), paths(tiny_bert_dir, sentiment_files, tmp_path / "w", test=True), ListSink())
    out = tmp_path / "extracted"
    with tarfile.open(result.archive_path) as tar:
        assert all(m.isfile() and "/" not in m.name for m in tar.getmembers())
        tar.extractall(out, filter="data")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "0", 1: "1"}
    texts, labels = text.read(sentiment_files["test"], param="test_file", config=TrainingConfig(problem_type="single_label"))
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([int(x) for x in labels]))
    assert float(loss) == pytest.approx(result.metrics["test"]["loss"], abs=1e-5)
    job = json.loads((out / "lathe_job.json").read_text())
    assert job["reproducibility"]["seed"] == 42 and len(job["reproducibility"]["datasets"]["training_file"]["sha256"]) == 64
    assert json.loads((out / "eval_report.json").read_text())["test"]["confusion_matrix"]["labels"] == ["0", "1"]


def test_grad_norm_after_clipping_is_bounded(tiny_bert_dir, sentiment_files, tmp_path, monkeypatch):
    after = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        total = clip(params, max_norm, *args, **kwargs)
        after.append(float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    recorder = Recorder()
    run(make_spec({"n_epochs": 1}, max_grad_norm=0.05), paths(tiny_bert_dir, sentiment_files, tmp_path, validation=False), ListSink(), callbacks=[recorder])
    assert after and max(after) <= 0.05 * 1.001
    assert max(recorder.grad_norms.values()) > 0.05  # clipping really happened; the pre-clip norm is reported


def test_learning_rates_follow_transformers_schedule(tiny_bert_dir, sentiment_files, tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    recorder = Recorder()
    spec = make_spec({"n_epochs": 2}, scheduler={"name": "cosine", "warmup_ratio": 0.1})
    run(spec, paths(tiny_bert_dir, sentiment_files, tmp_path, validation=False), ListSink(), callbacks=[recorder])
    max_steps = 2 * 13  # 200 examples / batch 16
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)  # auto, for an encoder this small
    reference = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=max_steps)
    expected = {}
    for step in range(1, max_steps + 1):
        expected[step] = reference.get_last_lr()[0]
        optimizer.step()
        reference.step()
    assert recorder.lrs == pytest.approx(expected, rel=1e-9)


def test_resume_continues_exactly(tiny_bert_dir, sentiment_files, tmp_path):
    spec = make_spec({"n_epochs": 2, "learning_rate_multiplier": 20}, checkpoint_every_steps=3, gradient_accumulation_steps=2)
    saved = tmp_path / "saved-step-3"

    class CopyingSink(ListSink):
        def checkpoint(self, step, path, metrics):
            super().checkpoint(step, path, metrics)
            if step == 3:  # mid-epoch 0: batch 6 of 13
                shutil.copytree(path, saved)

    full = Recorder()
    run(spec, paths(tiny_bert_dir, sentiment_files, tmp_path / "a"), CopyingSink(), callbacks=[full])
    resumed = Recorder()
    sink = ListSink()
    run(spec, paths(tiny_bert_dir, sentiment_files, tmp_path / "b", resume_from=saved), sink, callbacks=[resumed])
    assert min(resumed.losses) == 4 and max(full.losses) == 14  # 7 steps per epoch (13 batches, accumulation 2)
    assert resumed.losses == {s: full.losses[s] for s in range(4, 15)}
    assert sink.series("valid", "loss")  # evaluations continue after resume


def test_should_stop_cancels_after_a_checkpoint(tiny_bert_dir, sentiment_files, tmp_path):
    calls = iter(range(100))
    sink = ListSink()
    result = run(make_spec(), paths(tiny_bert_dir, sentiment_files, tmp_path, test=True), sink, should_stop=lambda: next(calls) >= 2)
    assert result.cancelled and result.model_dir is None and result.archive_path is None
    step, path, _ = sink.checkpoints[-1]
    assert step == 3 and (path / "model.safetensors").is_file()
    assert not (tmp_path / "output").exists()
    # A paused job resumes from that checkpoint and trains to the end.
    resumed = run(make_spec(), paths(tiny_bert_dir, sentiment_files, tmp_path, test=True, resume_from=path), ListSink())
    assert not resumed.cancelled and resumed.model_dir is not None and resumed.metrics["test"] is not None


def test_early_stopping_restores_the_best_weights(tiny_bert_dir, sentiment_files, tmp_path, monkeypatch):
    scripted = iter([0.5, 0.8, 0.7, 0.75, 0.9, 0.95])
    monkeypatch.setattr(
        TextClassification, "evaluate", lambda self, model, split, **kw: {"loss": 1.0, "accuracy": next(scripted)}
    )
    spec = make_spec(eval_every_steps=1, metric_for_best_model="accuracy", early_stopping={"patience": 2})
    sink = ListSink()
    result = run(spec, paths(tiny_bert_dir, sentiment_files, tmp_path), sink)
    assert result.stopped_early and result.metrics["best"]["accuracy"] == 0.8
    assert [s for s, *_ in sink.checkpoints] == [1, 2, 3, 4]
    best = load_file(tmp_path / "checkpoints" / "step-00000002" / "model.safetensors")
    exported = load_file(result.model_dir / "model.safetensors")
    assert all(torch.equal(best[k], exported[k]) for k in best)
    assert not torch.equal(best["classifier.weight"], load_file(tmp_path / "checkpoints" / "step-00000004" / "model.safetensors")["classifier.weight"])


def test_model_without_safetensors_is_refused(tiny_bert, sentiment_files, tmp_path):
    (tiny_bert / "model.safetensors").unlink()
    (tiny_bert / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError) as e:
        run(make_spec(), paths(tiny_bert, sentiment_files, tmp_path), ListSink())
    assert (e.value.code, e.value.param) == ("invalid_model", "model") and "safetensors" in e.value.message


def test_missing_model_folder(sentiment_files, tmp_path):
    with pytest.raises(ModelError) as e:
        run(make_spec(), paths(tmp_path / "nope", sentiment_files, tmp_path), ListSink())
    assert e.value.code == "model_not_found"


def test_unknown_validation_label_is_rejected(tiny_bert_dir, sentiment_files, tmp_path):
    files = dict(sentiment_files, validation=write_text_dataset(tmp_path / "v.csv", [{"text": "good", "label": 7}]))
    with pytest.raises(DataError) as e:
        run(make_spec(), paths(tiny_bert_dir, files, tmp_path), ListSink())
    assert (e.value.code, e.value.param) == ("unknown_label", "validation_file")


@pytest.mark.parametrize("task", ["text-classification", None])
def test_a_run_parses_each_dataset_file_once(tiny_bert_dir, sentiment_files, tmp_path, monkeypatch, task):
    """Checks, labels, training, baseline and test evaluation all use the rows of one pass per file
    (train CSV, validation JSONL, test Parquet); inferring the task reads the training file's first row."""
    from collections import Counter

    from core import formats

    opened, read_through = Counter(), Counter()
    records = formats.records

    def counting(path, fmt, *, param):
        opened[Path(path).name] += 1
        yield from records(path, fmt, param=param)
        read_through[Path(path).name] += 1

    monkeypatch.setattr(formats, "records", counting)
    spec = JobSpec(model="tiny", training_file="train", task=task, hyperparameters={"n_epochs": 1},
                   config={"eval_every_steps": 5})
    sink = ListSink()
    result = run(spec, paths(tiny_bert_dir, sentiment_files, tmp_path, test=True), sink)
    names = [sentiment_files[split].name for split in ("train", "validation", "test")]
    assert result.metrics["test"] is not None and result.metrics["baseline_test"] is not None
    assert sink.series("valid", "loss")  # validation ran, from the same rows
    assert read_through == Counter(names)
    assert opened == Counter(names) + (Counter() if task else Counter([names[0]]))
