"""The lease sweeper and the exit-code mapping of `finalise`, without training processes."""

from __future__ import annotations

import time

import pytest

from lathe.db.tables import Job, JobStatus
from lathe.db.session import session_scope
from lathe.queue import validate_queue
from tests.worker.conftest import get_job, make_job, queued_messages
from worker.finalise import finalise
from worker.supervisor import ChildExit
from worker.sweeper import sweep


def set_job(settings, job_id: str, **values) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        for k, v in values.items():
            setattr(job, k, v)


def test_expired_lease_is_requeued_and_republished(settings):
    job_id = make_job(settings, status=JobStatus.RUNNING)
    set_job(settings, job_id, attempt=1, lease_owner="host:1:abc", lease_until=time.time() - 1)
    fresh = make_job(settings, status=JobStatus.RUNNING)
    set_job(settings, fresh, attempt=1, lease_owner="host:2:def", lease_until=time.time() + 60)

    assert sweep(settings)["requeued"] == [job_id]
    job = get_job(settings, job_id)
    assert job.status == JobStatus.QUEUED and job.attempt == 1 and job.lease_owner is None
    assert get_job(settings, fresh).status == JobStatus.RUNNING
    assert [m["argsrepr"] for m in queued_messages(settings)] == [repr([job_id])]
    assert sweep(settings)["requeued"] == []  # nothing twice


def test_expired_lease_on_last_attempt_fails_worker_lost(settings):
    job_id = make_job(settings, status=JobStatus.RUNNING, max_attempts=2)
    set_job(settings, job_id, attempt=2, lease_until=time.time() - 1)
    assert sweep(settings)["failed"] == [job_id]
    job = get_job(settings, job_id)
    assert job.status == JobStatus.FAILED and job.error["code"] == "worker_lost" and job.finished_at


def test_expired_lease_while_cancelling_cancels(settings):
    job_id = make_job(settings, status=JobStatus.CANCELLING)
    set_job(settings, job_id, attempt=1, lease_until=time.time() - 1)
    assert sweep(settings)["cancelled"] == [job_id]
    assert get_job(settings, job_id).status == JobStatus.CANCELLED


def test_stale_waiting_jobs_are_republished_once_per_period(settings):
    queued = make_job(settings, status=JobStatus.QUEUED)
    validating = make_job(settings, status=JobStatus.VALIDATING_FILES)
    recent = make_job(settings, status=JobStatus.QUEUED)
    old = int(time.time()) - 3600
    set_job(settings, queued, queued_at=old)
    set_job(settings, validating, created_at=old)
    assert sorted(sweep(settings, stale_after=600)["republished"]) == sorted([queued, validating])
    assert [m["task"] for m in queued_messages(settings)] == ["lathe.run_job"]
    validation = settings.model_copy(update={"queue": validate_queue(settings)})
    assert [m["task"] for m in queued_messages(validation)] == ["lathe.validate_job"]  # its own queue
    assert sweep(settings, stale_after=600)["republished"] == []  # spaced out by stale_after
    assert get_job(settings, recent).lease_until is None


@pytest.mark.parametrize(
    ("returncode", "result", "attempt", "status", "code"),
    [
        (-9, None, 1, JobStatus.QUEUED, None),  # SIGKILL: retried
        (137, None, 1, JobStatus.QUEUED, None),  # 128+9 as a shell reports it
        (0, None, 1, JobStatus.QUEUED, None),  # vanished without a word
        (-9, None, 3, JobStatus.FAILED, "worker_lost"),  # out of attempts
        (1, None, 1, JobStatus.FAILED, "internal_error"),  # 1..127: not retryable
        (1, {"status": "failed", "user_error": False,
             "error": {"code": "internal_error", "message": "boom", "param": None}}, 1, JobStatus.FAILED, "internal_error"),
        (0, {"status": "failed", "user_error": True,
             "error": {"code": "unknown_label", "message": "x", "param": "test_file"}}, 1, JobStatus.FAILED, "unknown_label"),
        (0, {"status": "cancelled"}, 1, JobStatus.QUEUED, None),  # SIGTERM from outside, not a cancel
    ],
)
def test_exit_mapping(settings, returncode, result, attempt, status, code):
    job_id = make_job(settings, status=JobStatus.RUNNING)
    set_job(settings, job_id, attempt=attempt, lease_until=time.time() + 60)
    done = ChildExit(returncode=returncode, result=result, lost=False, signalled=False)
    assert finalise(settings, job_id, attempt, done) == status
    job = get_job(settings, job_id)
    assert job.status == status and job.lease_until is None
    assert (job.error or {}).get("code") == code
    # The same outcome reported again (a stale supervisor) changes nothing.
    assert finalise(settings, job_id, attempt, done) == ""


def test_finalise_is_fenced_on_the_attempt(settings):
    job_id = make_job(settings, status=JobStatus.RUNNING)
    set_job(settings, job_id, attempt=2)
    done = ChildExit(returncode=-9, result=None, lost=False, signalled=False)
    assert finalise(settings, job_id, 1, done) == ""
    assert get_job(settings, job_id).status == JobStatus.RUNNING


def test_a_retry_is_published_after_its_backoff_in_the_freed_slot(settings, monkeypatch):
    """No Celery countdown: such a message is reserved by whichever worker fetches it and waits for
    that worker's slot, however long its job runs. The backoff is waited here, then published."""
    import worker.finalise as finalise_module

    calls: list[tuple] = []
    monkeypatch.setattr(finalise_module.time, "sleep", lambda seconds: calls.append(("sleep", seconds)))
    monkeypatch.setattr(finalise_module, "publish_run", lambda s, job_id: calls.append(("publish", job_id)))
    settings = settings.model_copy(update={"retry_backoff_seconds": 3.0})
    finalise_module.publish_retry(settings, "ftjob-x", 2)
    assert calls == [("sleep", 6.0), ("publish", "ftjob-x")]  # 3 s doubled for the second attempt
