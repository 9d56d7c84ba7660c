"""An ensemble's steps (lathe.parents.advance -> lathe.ensemble) and its combine stage, called directly
against real databases: members are created as child jobs with their rows drawn, trained by run_job
(real training processes, tiny BERT), and the parent queues itself to combine them and exports one
folder that /predict's loader answers for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from core.ensemble_model import EnsembleModel
from lathe import jobs
from lathe.db.session import session_scope
from lathe.db.tables import Job, JobStatus, Model
from lathe.errors import BadRequest
from lathe.parents import advance
from tests.tiny_models import sentiment_rows
from tests.worker.conftest import add_file, get_job, make_job
from tests.worker.test_search_steps import messages, tenant_of
from worker import tasks


def create(settings, ensemble: dict, *, config: dict | None = None, test: bool = True,
           tenant_id: str | None = None, hyperparameters: dict | None = None) -> str:
    tenant_id = tenant_id or tenant_of(settings, make_job(settings))
    train = add_file(settings, tenant_id, sentiment_rows(48))
    valid = add_file(settings, tenant_id, sentiment_rows(16, seed=1), name="valid.csv")
    payload = {"model": "tiny-bert", "training_file": train, "validation_file": valid, "seed": 5,
               "hyperparameters": hyperparameters or {"n_epochs": 1, "batch_size": 8},
               "config": {"max_length": 16, "device": "cpu", "ensemble": ensemble, **(config or {})}}
    if test:
        payload["test_file"] = add_file(settings, tenant_id, sentiment_rows(16, seed=2), name="test.csv")
    with session_scope(settings.sqlalchemy_url) as session:
        job, _ = jobs.create_job(session, settings, tenant_id=tenant_id, payload=payload)
        job_id = job.id
    assert tasks.validate_job(job_id, settings=settings) == JobStatus.QUEUED
    return job_id


def children(settings, parent: str) -> list[Job]:
    with session_scope(settings.sqlalchemy_url) as session:
        return list(session.scalars(select(Job).where(Job.parent_job == parent).order_by(Job.child_index)))


def train(settings, child: Job) -> None:
    assert tasks.validate_job(child.id, settings=settings) == JobStatus.QUEUED
    assert tasks.run_job(child.id, settings=settings) == JobStatus.SUCCEEDED, get_job(settings, child.id).error


def test_stacking_plans_members_times_folds_with_their_rows_and_seeds(settings):
    parent = create(settings, {"method": "stacking", "members": [{"config.optimizer.weight_decay": 0.05}, {}], "folds": 2,
                               "parallel": 8})
    assert advance(settings, parent) == "started 4"
    made = children(settings, parent)
    assert [(c.child_info["member"], c.child_info["fold"]) for c in made] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    rows = [c.spec["config"]["train_rows"] for c in made]
    assert rows[0] == {"method": "folds", "folds": 2, "holdout": 0, "seed": 5} and rows[1]["holdout"] == 1
    assert [c.spec["seed"] for c in made] == [5, 5, 6, 6]  # a member's folds share its seed
    assert made[0].spec["config"]["optimizer"]["weight_decay"] == 0.05 and "optimizer" not in made[2].spec["config"]
    assert all("ensemble" not in c.spec["config"] for c in made)
    job = get_job(settings, parent)
    assert job.status == JobStatus.RUNNING and job.ensemble["phase"] == "members"


def test_a_failed_member_fails_the_ensemble_and_cancels_the_others(settings):
    parent = create(settings, {"method": "bagging", "members": 2})
    advance(settings, parent)
    first, second = children(settings, parent)
    assert tasks.validate_job(first.id, settings=settings) == JobStatus.QUEUED
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, second.id).training_file = "file-gone"
    tasks.validate_job(second.id, settings=settings)
    assert get_job(settings, second.id).status == JobStatus.FAILED
    advance(settings, parent)
    assert get_job(settings, first.id).status == JobStatus.CANCELLED
    assert advance(settings, parent) == "failed" or get_job(settings, parent).status == JobStatus.FAILED
    job = get_job(settings, parent)
    assert job.status == JobStatus.FAILED and job.error["code"] == "ensemble_failed"
    assert job.error["message"].startswith(f"Member 1 ({second.id}) failed")


@pytest.mark.parametrize("bad, param", [
    ({"method": "bagging", "members": [{"config.ensemble.vote": "hard"}, {}]}, "config.ensemble.members"),
    ({"method": "bagging", "members": [{"config.train_rows.seed": 3}, {}]}, "config.ensemble.members"),
    ({"method": "bagging", "members": [{"config.nope": 1}, {}]}, "config.ensemble.members"),
    ({"method": "bagging", "members": [{"hyperparameters.batch_size": 0}, {}]}, "config.ensemble.members"),
    ({"from_search": "ftjob-missing"}, "config.ensemble.from_search"),
])
def test_a_bad_ensemble_is_refused_before_anything_is_stored(settings, bad, param):
    with pytest.raises(Exception) as e:
        create(settings, bad)
    assert getattr(e.value, "param", None) == param, e.value


def test_from_search_needs_a_search(settings):
    other = make_job(settings)
    with pytest.raises(BadRequest) as e:
        create(settings, {"from_search": other}, tenant_id=tenant_of(settings, other))
    assert e.value.param == "config.ensemble.from_search"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # real training: one database is enough
def test_bagging_trains_its_members_then_combines_them_into_one_folder(settings):
    parent = create(settings, {"method": "bagging", "members": 2, "parallel": 2})
    assert advance(settings, parent) == "started 2"
    for child in children(settings, parent):
        assert child.spec["config"]["train_rows"]["method"] == "bootstrap"
        train(settings, child)
    assert advance(settings, parent) == "combine"
    assert get_job(settings, parent).status == JobStatus.QUEUED and advance(settings, parent) == ""
    assert tasks.run_job(parent, settings=settings) == JobStatus.SUCCEEDED, get_job(settings, parent).error

    job = get_job(settings, parent)
    assert job.ensemble["phase"] == "combine" and [m["status"] for m in job.ensemble["members"]] == ["succeeded"] * 2
    assert [m["member"] for m in job.metrics["members"]] == [0, 1]
    assert job.trained_tokens == sum(c.trained_tokens for c in children(settings, parent)) > 0
    assert set(job.metrics["test"]) >= {"accuracy", "f1_macro", "confusion_matrix"}
    with session_scope(settings.sqlalchemy_url) as session:
        model = session.get(Model, job.fine_tuned_model)
        folder, archive = Path(model.path), Path(model.archive_path)
    description = json.loads((folder / "ensemble.json").read_text())
    assert description["method"] == "bagging" and len(description["members"]) == 2
    assert all((folder / m["paths"][0] / "model.safetensors").is_file() for m in description["members"])
    report = json.loads((folder / "eval_report.json").read_text())
    assert report["ensemble"]["test"]["accuracy"] == job.metrics["test"]["accuracy"]
    assert archive.is_file()
    out = EnsembleModel.load(folder).outputs([r["text"] for r in sentiment_rows(4, seed=9)])
    assert out.shape == (4, 2) and np.allclose(out.sum(1), 1)
    assert any(m.startswith("Combining the ensemble's 2 member models") for m in messages(settings, parent))
    # An ensemble is not a base model to fine-tune further.
    with pytest.raises(BadRequest) as e:
        make_ensemble_base(settings, job)
    assert e.value.code == "model_not_allowed"


def make_ensemble_base(settings, ensemble: Job) -> None:
    from lathe.model_source import resolve_model

    with session_scope(settings.sqlalchemy_url) as session:
        resolve_model(session, settings, tenant_id=ensemble.tenant_id, name=ensemble.fine_tuned_model)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # real training: one database is enough
def test_from_search_combines_the_search_trials_by_selection_without_training(settings):
    from tests.worker.test_search_steps import create_search

    search = create_search(settings, trials=2, parallel=2, sampler="random")
    advance(settings, search)
    for trial in children(settings, search):
        train(settings, trial)
    assert advance(settings, search) == "succeeded"
    found = get_job(settings, search)
    payload = {"model": "tiny-bert", "training_file": found.training_file, "validation_file": found.validation_file,
               "config": {"max_length": 16, "device": "cpu", "metric_for_best_model": "accuracy",
                          "ensemble": {"from_search": search}}}
    with session_scope(settings.sqlalchemy_url) as session:
        job, _ = jobs.create_job(session, settings, tenant_id=found.tenant_id, payload=payload)
        parent = job.id
    assert tasks.validate_job(parent, settings=settings) == JobStatus.QUEUED
    assert advance(settings, parent) == "combine" and children(settings, parent) == []  # nothing trained
    assert tasks.run_job(parent, settings=settings) == JobStatus.SUCCEEDED, get_job(settings, parent).error
    job = get_job(settings, parent)
    with session_scope(settings.sqlalchemy_url) as session:
        folder = Path(session.get(Model, job.fine_tuned_model).path)
    description = json.loads((folder / "ensemble.json").read_text())
    assert description["method"] == "selection"
    assert [m["job"] for m in description["members"]] == [t.id for t in children(settings, search)]
    weights = [m["weight"] for m in description["members"]]
    assert all(w == int(w) and w >= 0 for w in weights) and sum(weights) >= 1  # picks, with replacement
    assert job.metrics["best"]["accuracy"] >= max(m["validation"]["accuracy"] for m in job.metrics["members"])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # real training: one database is enough
def test_boosting_trains_members_one_after_another_on_reweighted_rows_and_votes_by_samme(settings):
    from core.ensemble import samme_step
    from core.predict import predict

    parent = create(settings, {"method": "boosting", "members": 2}, test=False,  # members that learn something
                    hyperparameters={"n_epochs": 8, "batch_size": 8, "learning_rate_multiplier": 30})
    assert advance(settings, parent) == "started 1"  # one at a time: each learns from the ones before
    first = children(settings, parent)[0]
    train(settings, first)
    assert advance(settings, parent) == "started 1"
    second = children(settings, parent)[1]
    train(settings, second)
    boosted = [m for m in messages(settings, second.id) if m.startswith("Boosting: rows weighted by the 1 member")]
    assert boosted and not any(m.startswith("Boosting") for m in messages(settings, first.id))
    assert advance(settings, parent) == "combine"
    assert tasks.run_job(parent, settings=settings) == JobStatus.SUCCEEDED, (get_job(settings, parent).error, boosted,
                                                                            get_job(settings, first.id).metrics)

    # The vote weights are SAMME's alphas, computed by hand from each member's predictions on the training rows.
    rows = sentiment_rows(48)
    texts, labels = [r["text"] for r in rows], [str(r["label"]) for r in rows]
    with session_scope(settings.sqlalchemy_url) as session:
        folders = [Path(session.get(Model, get_job(settings, c.id).fine_tuned_model).path) for c in (first, second)]
        folder = Path(session.get(Model, get_job(settings, parent).fine_tuned_model).path)
    weights, alphas = np.ones(len(rows)), []
    for member in folders:
        correct = np.array([p[0]["label"] == y for p, y in zip(predict(member, texts), labels)])
        step = samme_step(weights, correct, 2)
        alphas.append(step.alpha)
        weights = step.weights if step.alpha > 0 else weights
    description = json.loads((folder / "ensemble.json").read_text())
    assert description["vote"] == "hard"
    assert [m["weight"] for m in description["members"]] == pytest.approx([max(a, 0) for a in alphas], rel=1e-6)
