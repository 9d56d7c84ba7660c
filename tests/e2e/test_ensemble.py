"""Ensembles with real processes (tests/e2e/crash_harness.py): the HTTP API, two `lathe worker`
subprocesses on a redis-server of the test's own, SQLite, and a tiny BERT trained in real training
processes. A stacking ensemble trains members x folds child jobs on both workers, then combines
them; its model downloads as one folder without pickle and answers /predict as its loader does.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from core.ensemble_model import EnsembleModel
from lathe.db.session import session_scope
from lathe.db.tables import JobStatus, Model
from tests.e2e.crash_harness import Stack
from tests.e2e.test_search import LEARNS, trials, upload
from tests.tiny_models import sentiment_rows

pytestmark = pytest.mark.timeout(300)


def test_a_stacking_ensemble_trains_its_folds_on_two_workers_and_answers_predict(stack: Stack, tmp_path):
    api = stack.api()
    stack.worker("a")
    stack.worker("b")
    body = {"model": "tiny-bert", "seed": 3, "task": "text-classification",
            "training_file": upload(api, tmp_path, "train", sentiment_rows(64)),
            "validation_file": upload(api, tmp_path, "valid", sentiment_rows(16, seed=1)),
            "test_file": upload(api, tmp_path, "test", sentiment_rows(16, seed=2)),
            "hyperparameters": {"batch_size": 8, "n_epochs": 2, "learning_rate_multiplier": LEARNS},
            "config": {"device": "cpu", "max_length": 16, "metric_for_best_model": "f1_macro",
                       "ensemble": {"method": "stacking", "folds": 2, "parallel": 2,
                                    "members": [{}, {"hyperparameters.learning_rate_multiplier": LEARNS / 2}]}}}
    r = api.post("/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    parent = r.json()["id"]
    job = stack.wait_status(parent, timeout=280)
    assert job.status == JobStatus.SUCCEEDED, stack.explain(parent)

    members = trials(api, parent)
    assert len(members) == 4 and all(m["status"] == "succeeded" and m["parent_job"] == parent for m in members)
    assert sorted(m["hyperparameters"]["learning_rate_multiplier"] for m in members) == [LEARNS / 2] * 2 + [LEARNS] * 2
    shown = api.get(f"/fine_tuning/jobs/{parent}").json()
    assert shown["ensemble"]["method"] == "stacking" and shown["ensemble"]["phase"] == "combine"
    assert [(m["member"], m["fold"]) for m in shown["ensemble"]["members"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    figures = shown["metrics"]
    assert len(figures["members"]) == 2 and {"validation", "test"} <= set(figures["members"][0])
    assert figures["test"]["f1_macro"] >= 0

    # The download: one folder, each fold model a Hugging Face folder, ensemble.json; no pickle.
    archive = api.get(f"/models/{shown['fine_tuned_model']}/content")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        names = tar.getnames()
        heads = {n: tar.extractfile(n).read(1) for n in names}
        description = json.loads(tar.extractfile("ensemble.json").read())
    assert {"members/m0/fold0/model.safetensors", "members/m1/fold1/model.safetensors", "eval_report.json"} <= set(names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pickle", ".joblib")) or heads[n] == b"\x80"]
    meta = description["meta_learner"]
    assert meta["type"] == "logistic_regression" and np.asarray(meta["coef"]).shape == (1, 4)  # binary: 2 members x 2

    # /predict answers as the loader does on the same folder.
    texts = [r["text"] for r in sentiment_rows(4, seed=7)]
    answer = api.post(f"/models/{shown['fine_tuned_model']}/predict", json={"inputs": texts, "top_k": 2})
    assert answer.status_code == 200, answer.text
    with session_scope(stack.settings.sqlalchemy_url) as session:
        folder = session.get(Model, shown["fine_tuned_model"]).path
    expected = EnsembleModel.load(folder).outputs(texts)
    for row, probabilities in zip(answer.json()["data"], expected, strict=True):
        assert {p["label"]: round(p["score"], 5) for p in row} == {
            label: round(float(v), 5) for label, v in zip(description["labels"], probabilities)}
