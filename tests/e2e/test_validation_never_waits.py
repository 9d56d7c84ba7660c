"""Validation never waits for training, with real processes: a `lathe worker` with one training slot
(LATHE_WORKER_CONCURRENCY=1) busy with a long job still checks new jobs' files within seconds, on its
validation pool fed by `<queue>.validate`; and a hub id the hub can't deliver fails the job at once.

The processes are crash_harness's: a redis-server of the test's own, SQLite, `python -m lathe.cli
worker` in a session of its own, a tiny BERT trained in a real `worker.child`.
"""

from __future__ import annotations

import time

import pytest

from lathe.db.tables import JobStatus
from lathe.queue import VALIDATE_TASK, Publisher, publish_validate, validate_queue
from tests.e2e.crash_harness import Stack, wait_for
from tests.hub_stub import ClosedPort, as_hf_endpoint
from tests.tiny_models import sentiment_rows
from tests.worker.conftest import make_job

pytestmark = pytest.mark.timeout(180)


def busy_slot(stack: Stack) -> str:
    """A job far longer than the test (100 epochs of 250 steps), trained on the worker's only slot;
    returns once its training process runs."""
    job_id = make_job(stack.settings, train_rows=sentiment_rows(2000), status=JobStatus.QUEUED,
                      hyperparameters={"n_epochs": 100, "batch_size": 8}, config={"max_length": 16})
    stack.publish(job_id)
    stack.wait_status(job_id, [JobStatus.RUNNING], timeout=60)
    wait_for(lambda: stack.child_pid(job_id, 1), timeout=30, what="the long job's training process",
             explain=lambda: stack.explain(job_id))
    return job_id


def timed_status(stack: Stack, job_id: str, status: JobStatus, *, timeout: float) -> float:
    start = time.monotonic()
    stack.wait_status(job_id, [status], timeout=timeout)
    return time.monotonic() - start


def test_files_are_checked_while_the_only_training_slot_is_busy(stack):
    stack.worker("a")  # one training slot (the stack's worker_concurrency), two validation threads
    long_job = busy_slot(stack)

    bad = make_job(stack.settings)
    good = make_job(stack.settings, train_rows=sentiment_rows(64))
    (stack.settings.files_dir / stack.job(bad).training_file / "train.csv").write_text("text,label\n")  # no rows

    start = time.monotonic()
    Publisher(stack.settings)(VALIDATE_TASK, bad)  # what the API's create does after its commit
    publish_validate(stack.settings, good)  # what the sweeper and resume do
    failed = stack.wait_status(bad, [JobStatus.FAILED], timeout=15)
    took_bad = time.monotonic() - start
    queued = stack.wait_status(good, [JobStatus.QUEUED], timeout=15)
    took_good = time.monotonic() - start
    print(f"with the only training slot busy: malformed file failed in {took_bad:.2f}s, "
          f"good file queued in {took_good:.2f}s")

    assert failed.error["param"] == "training_file" and "no data rows" in failed.error["message"]
    assert queued.error is None and queued.task == "text-classification"
    assert took_bad < 10 and took_good < 10
    # The slot was busy throughout, and stays so: the good job waits for it in LATHE_QUEUE.
    assert stack.job(long_job).status == JobStatus.RUNNING
    assert stack.job(good).status == JobStatus.QUEUED
    client = stack.redis.client()
    try:
        assert client.llen(validate_queue(stack.settings)) == 0
        assert client.llen(stack.settings.queue) == 1  # the good job's lathe.run_job
    finally:
        client.close()


def test_a_hub_id_the_hub_cant_deliver_fails_in_validation_at_once(stack, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with as_hf_endpoint(monkeypatch, ClosedPort()):  # the worker inherits it
        stack.worker("a", allow_hub_models=True)
        job_id = make_job(stack.settings, model="HuggingFaceTB/SmolLM2-135M")
        publish_validate(stack.settings, job_id)
        took = timed_status(stack, job_id, JobStatus.FAILED, timeout=15)
    job = stack.job(job_id)
    print(f"hub id with no hub reachable: failed in validation {took:.2f}s after the publish")
    assert job.error["code"] == "model_not_found" and job.error["param"] == "model"
    assert "can't be reached" in job.error["message"]
    assert took < 10
