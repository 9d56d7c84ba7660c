"""A search's steps (lathe.search.orchestrate.advance) called directly against real databases, with
its trials' outcomes written by the test: how many trials start and when, what the parent records,
how it ends, the quota it waits under, and that concurrent steps create no trial twice. The trials'
training itself is tests/e2e/test_search.py's."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from lathe import jobs
from lathe.db.queries import add_event
from lathe.db.session import session_scope
from lathe.db.tables import Event, Job, JobStatus, Tenant, now
from lathe.lifecycle import Actor, claim_job, move
from lathe.quotas import active_jobs
from lathe.parents import advance
from tests.tiny_models import sentiment_rows
from tests.worker.conftest import add_file, get_job, make_job
from worker import tasks

SPACE = {"config.optimizer.weight_decay": {"type": "float", "low": 0.0, "high": 0.1}}


def create_search(settings, *, tenant_id: str | None = None, **search) -> str:
    """A search of the tiny BERT (validated), as the API creates it."""
    if tenant_id is None:
        tenant_id = tenant_of(settings, make_job(settings))
    train = add_file(settings, tenant_id, sentiment_rows(32))
    valid = add_file(settings, tenant_id, sentiment_rows(8, seed=1), name="valid.csv")
    payload = {"model": "tiny-bert", "training_file": train, "validation_file": valid, "seed": 5,
               "hyperparameters": {"n_epochs": 1}, "config": {"max_length": 16, "search": {"space": SPACE, **search}}}
    with session_scope(settings.sqlalchemy_url) as session:
        job, _ = jobs.create_job(session, settings, tenant_id=tenant_id, payload=payload)
        job_id = job.id
    assert tasks.validate_job(job_id, settings=settings) == JobStatus.QUEUED
    return job_id


def tenant_of(settings, job_id: str) -> str:
    return get_job(settings, job_id).tenant_id


def trials(settings, parent: str) -> list[Job]:
    with session_scope(settings.sqlalchemy_url) as session:
        return list(session.scalars(select(Job).where(Job.parent_job == parent).order_by(Job.child_index)))


def messages(settings, job_id: str) -> list[str]:
    with session_scope(settings.sqlalchemy_url) as session:
        return list(session.scalars(select(Event.message).where(Event.job_id == job_id).order_by(Event.seq)))


def finish(settings, trial_id: str, *, loss: float | None = None, fail: bool = False) -> None:
    """Take a trial through validation and a claim, then succeed it with `loss` or fail it."""
    assert tasks.validate_job(trial_id, settings=settings) == JobStatus.QUEUED
    with session_scope(settings.sqlalchemy_url) as session:
        attempt = claim_job(session, job_id=trial_id, lease_owner="test", lease_until=now() + 60)
        values = ({"error": {"code": "internal_error", "message": "boom", "param": None}} if fail else
                  {"fine_tuned_model": f"ft:tiny-bert:{trial_id}", "metrics": {"best": {"loss": loss}, "latest": {"loss": loss}}})
        assert move(session, job_id=trial_id, source=JobStatus.RUNNING,
                    target=JobStatus.FAILED if fail else JobStatus.SUCCEEDED, by=Actor.RUNNER, attempt=attempt,
                    finished_at=now(), **values)


def test_a_search_starts_parallel_trials_then_one_per_finished_trial_and_ends_with_the_best(settings):
    parent = create_search(settings, trials=3, parallel=2, sampler="random")
    assert advance(settings, parent) == "started 2"
    assert advance(settings, parent) == ""  # nothing due: a step is idempotent
    first, second = trials(settings, parent)
    assert [first.child_index, second.child_index] == [0, 1]
    assert {first.status, second.status} == {JobStatus.VALIDATING_FILES}
    assert get_job(settings, parent).status == JobStatus.RUNNING
    # A trial is the parent's job with the proposed value set, the objective as its metric, no search.
    assert first.spec["config"]["optimizer"]["weight_decay"] == first.child_info["params"]["config.optimizer.weight_decay"]
    assert first.spec["config"]["metric_for_best_model"] == "loss" and "search" not in first.spec["config"]
    assert (first.model, first.training_file, first.seed) == (get_job(settings, parent).model,
                                                             get_job(settings, parent).training_file, 5)

    finish(settings, second.id, loss=0.4)
    assert advance(settings, parent) == "started 1"  # trial 1 ended: room for trial 2
    assert any(m.startswith(f"Trial 1 ({second.id}) finished: loss=0.4000 (best so far)") for m in messages(settings, parent))
    third = trials(settings, parent)[2]
    finish(settings, first.id, loss=0.3)
    finish(settings, third.id, fail=True)
    assert advance(settings, parent) == "succeeded"
    job = get_job(settings, parent)
    assert job.status == JobStatus.SUCCEEDED and job.fine_tuned_model == f"ft:tiny-bert:{first.id}"
    assert job.metrics["best"]["loss"] == 0.3
    board = job.search
    assert [(r["trial"], r["state"]) for r in board["trials"]] == [(0, "complete"), (1, "complete"), (2, "failed")]
    assert board["best_trial"]["job"] == first.id and board["trials_planned"] == 3
    assert messages(settings, parent)[-3:] == [
        f"Search finished: the best of 3 trials is trial 0 ({first.id}), loss=0.3000",
        f"New fine-tuned model created: ft:tiny-bert:{first.id}", "The job has successfully completed"]
    assert any(f"Trial 2 ({third.id}) failed: boom" == m for m in messages(settings, parent))


def test_a_search_whose_every_trial_fails_fails_saying_so(settings):
    parent = create_search(settings, trials=2, parallel=2)
    advance(settings, parent)
    for trial in trials(settings, parent):
        finish(settings, trial.id, fail=True)
    assert advance(settings, parent) == "failed"
    job = get_job(settings, parent)
    assert job.status == JobStatus.FAILED and job.error["code"] == "search_failed"
    assert job.error["message"] == "No trial of the search finished (2 failed); the first error: boom"


def test_the_same_seed_proposes_the_same_parameters(settings):
    proposed = []
    for _ in range(2):
        parent = create_search(settings, trials=3, parallel=3, sampler="tpe")
        advance(settings, parent)
        proposed.append([t.child_info["params"] for t in trials(settings, parent)])
    assert proposed[0] == proposed[1] and len({str(p) for p in proposed[0]}) == 3


def test_a_search_waits_for_room_under_the_quota_and_says_so(settings):
    other = make_job(settings)  # an unfinished job of the same tenant
    tenant = tenant_of(settings, other)
    parent = create_search(settings, tenant_id=tenant, trials=3, parallel=3)
    with session_scope(settings.sqlalchemy_url) as session:
        assert active_jobs(session, tenant_id=tenant) == 2  # the other job and the queued search
        session.get(Tenant, tenant).max_active_jobs = 1  # lowered meanwhile: no room for any trial
    assert advance(settings, parent) == ""
    assert advance(settings, parent) == ""
    waiting = [m for m in messages(settings, parent) if m.startswith("Waiting for room")]
    assert waiting == ["Waiting for room under the active-jobs quota (2 of 1 in use); the next trial starts when a "
                       "job finishes"]  # said once, not at every step
    assert get_job(settings, parent).status == JobStatus.QUEUED  # waiting, not failed
    with session_scope(settings.sqlalchemy_url) as session:
        move(session, job_id=other, source=JobStatus.VALIDATING_FILES, target=JobStatus.CANCELLED, by=Actor.USER,
             finished_at=now())
    assert advance(settings, parent) == "started 1"  # the search's own place, now that the other job ended
    with session_scope(settings.sqlalchemy_url) as session:
        assert active_jobs(session, tenant_id=tenant) == 1  # its trial; the search itself no longer counts
    assert advance(settings, parent) == ""  # still at the quota: the other two trials wait


def test_concurrent_steps_create_each_trial_once(settings):
    parent = create_search(settings, trials=4, parallel=3)
    threads = [threading.Thread(target=advance, args=(settings, parent)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [t.child_index for t in trials(settings, parent)] == [0, 1, 2]
    assert sum(m.startswith("Trial ") and " started: " in m for m in messages(settings, parent)) == 3


def test_cancelling_a_search_cancels_its_trials_and_closes_once_they_stopped(settings):
    parent = create_search(settings, trials=3, parallel=2)
    advance(settings, parent)
    running, waiting = trials(settings, parent)
    assert tasks.validate_job(running.id, settings=settings) == JobStatus.QUEUED
    with session_scope(settings.sqlalchemy_url) as session:
        claim_job(session, job_id=running.id, lease_owner="test", lease_until=now() + 60)
    with session_scope(settings.sqlalchemy_url) as session:
        job, publish = jobs.act(session, tenant_id=get_job(settings, parent).tenant_id, job_id=parent, action="cancel")
    assert job.status == JobStatus.CANCELLING and publish == [("lathe.advance_search", parent)]
    assert get_job(settings, waiting.id).status == JobStatus.CANCELLED
    assert get_job(settings, running.id).status == JobStatus.CANCELLING  # its worker stops it
    assert advance(settings, parent) == ""  # not before the running trial has stopped
    with session_scope(settings.sqlalchemy_url) as session:
        move(session, job_id=running.id, source=JobStatus.CANCELLING, target=JobStatus.CANCELLED, by=Actor.RUNNER,
             finished_at=now())
        add_event(session, job_id=running.id, message="The job was cancelled")
    assert advance(settings, parent) == "cancelled"
    assert get_job(settings, parent).status == JobStatus.CANCELLED and len(trials(settings, parent)) == 2
    assert {r["state"] for r in get_job(settings, parent).search["trials"]} == {"cancelled"}


@pytest.mark.parametrize("action", ["pause", "resume"])
def test_a_search_is_not_paused_or_resumed(settings, action):
    parent = create_search(settings)
    with pytest.raises(Exception) as e:
        with session_scope(settings.sqlalchemy_url) as session:
            jobs.act(session, tenant_id=get_job(settings, parent).tenant_id, job_id=parent, action=action)
    assert getattr(e.value, "code", None) == "search_not_pausable"


def test_warm_start_seeds_a_new_search_with_an_earlier_ones_finished_trials(settings):
    earlier = create_search(settings, trials=3, parallel=3, sampler={"type": "tpe", "n_startup_trials": 2})
    advance(settings, earlier)
    done = trials(settings, earlier)
    for trial, loss in zip(done, (0.6, 0.2, 0.5)):
        finish(settings, trial.id, loss=loss)
    advance(settings, earlier)
    tenant = tenant_of(settings, earlier)
    cold = create_search(settings, tenant_id=tenant, trials=1, parallel=1, sampler={"type": "tpe", "n_startup_trials": 2})
    warm = create_search(settings, tenant_id=tenant, trials=1, parallel=1, warm_start_from=earlier,
                         sampler={"type": "tpe", "n_startup_trials": 2})
    records = get_job(settings, warm).search["warm_start"]
    assert [r["from"] for r in records] == [t.id for t in done]
    assert [r["value"] for r in records] == [0.6, 0.2, 0.5] and {r["state"] for r in records} == {"complete"}
    advance(settings, cold)
    advance(settings, warm)
    [cold_trial], [warm_trial] = trials(settings, cold), trials(settings, warm)
    # Past its 2 startup trials thanks to the 3 it was given, TPE models them; the cold search samples at random.
    assert warm_trial.child_index == 0 and warm_trial.child_info["params"] != cold_trial.child_info["params"]
    assert get_job(settings, warm).search["trials"][0]["trial"] == 0
