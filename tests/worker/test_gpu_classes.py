"""GPU classes on the worker side, against real databases and Redis: every publisher routes a job's
run message to its class's queue, a worker claims only the classes it serves, the sweeper says once
that nobody serves a class (and does not pile up copies of its message), and a search's trials and
an ensemble's members inherit their parent's class."""

from __future__ import annotations

import time

import pytest
import redis

from lathe import jobs
from lathe.db.session import session_scope
from lathe.db.tables import Job, JobStatus
from lathe.gpu_classes import announce, served_key, unserved, unserved_message
from lathe.parents import advance
from lathe.queue import publish_run, run_queue
from tests.tiny_models import sentiment_rows
from tests.worker.conftest import REDIS_URL, add_file, get_job, make_job, queued_messages
from tests.worker.test_search_steps import SPACE, messages, tenant_of
from worker import tasks
from worker.sweeper import sweep

UNSERVED = unserved_message("a100")


def set_job(settings, job_id: str, **values) -> None:
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        for key, value in values.items():
            setattr(job, key, value)


def class_queue(settings, gpu_class: str = "a100"):
    """The settings whose `queue` is the class's run queue (what `queued_messages` reads)."""
    return settings.model_copy(update={"queue": run_queue(settings, gpu_class)})


def jobs_in(settings) -> list[str]:
    return [m["argsrepr"] for m in queued_messages(settings)]


def serving(settings, classes: str):
    return settings.model_copy(update={"worker_gpu_classes": classes})


def test_validation_publishes_a_class_job_to_its_class_queue_and_a_default_job_to_the_queue(settings):
    a100 = make_job(settings)
    set_job(settings, a100, gpu_class="a100", gpus=1)
    plain = make_job(settings)
    assert tasks.validate_job(a100, settings=settings) == JobStatus.QUEUED
    assert tasks.validate_job(plain, settings=settings) == JobStatus.QUEUED
    assert jobs_in(class_queue(settings)) == [repr([a100])]
    assert jobs_in(settings) == [repr([plain])]
    # The other publishers (a retry, the sweeper, a resume, a parent's step) call the same function.
    assert publish_run(settings, a100)
    assert jobs_in(class_queue(settings)) == [repr([a100])] * 2


def test_a_worker_claims_only_the_classes_it_serves(settings):
    a100 = make_job(settings, status=JobStatus.QUEUED)
    set_job(settings, a100, gpu_class="a100", gpus=1)
    plain = make_job(settings, status=JobStatus.QUEUED)

    assert tasks.claim(settings, a100) is None  # a default worker: the message was on the wrong queue
    assert get_job(settings, a100).status == JobStatus.QUEUED and get_job(settings, a100).attempt == 0
    assert tasks.claim(serving(settings, "a100"), plain) is None  # serves a100 alone
    assert tasks.claim(serving(settings, "h100,a100"), a100) == 1
    assert tasks.claim(serving(settings, "a100,default"), plain) == 1
    assert get_job(settings, a100).status == get_job(settings, plain).status == JobStatus.RUNNING


def test_run_job_leaves_a_job_of_another_class_queued(settings):
    job_id = make_job(settings, status=JobStatus.QUEUED)
    set_job(settings, job_id, gpu_class="h100", gpus=1)
    assert tasks.run_job(job_id, settings=serving(settings, "a100")) == ""
    job = get_job(settings, job_id)
    assert job.status == JobStatus.QUEUED and job.attempt == 0 and job.lease_owner is None


def test_heartbeats_expire_after_the_lease(settings):
    short = settings.model_copy(update={"lease_seconds": 7})
    announce(short, ["a100"], worker="host:1")
    assert unserved(short, ["a100", "h100"]) == {"h100"}
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert 0 < client.ttl(served_key(short, "a100")) <= 7
    finally:
        client.close()


def test_the_sweeper_says_once_that_nobody_serves_the_class_and_the_job_waits(settings):
    job_id = make_job(settings, status=JobStatus.QUEUED)
    set_job(settings, job_id, gpu_class="a100", gpus=1, queued_at=int(time.time()) - 3600)
    plain = make_job(settings, status=JobStatus.QUEUED)

    first = sweep(settings, stale_after=600)
    assert first["unserved"] == [job_id]
    # Its message waits in the class's queue: no copy is published beside it while nobody consumes it.
    assert first["republished"] == [] and jobs_in(class_queue(settings)) == []
    assert sweep(settings, stale_after=600)["unserved"] == []
    events = [m for m in messages(settings, job_id) if m == UNSERVED]
    assert events == [UNSERVED]
    job = get_job(settings, job_id)
    assert job.status == JobStatus.QUEUED and job.attempt == 0
    assert UNSERVED not in messages(settings, plain)

    # A worker serving a100 appears: the stale job is published again, to the class's queue, and
    # nothing more is said.
    announce(settings, ["a100"])
    again = sweep(settings, stale_after=600)
    assert again["republished"] == [job_id] and again["unserved"] == []
    assert jobs_in(class_queue(settings)) == [repr([job_id])]
    assert [m for m in messages(settings, job_id) if m == UNSERVED] == [UNSERVED]


def test_a_served_class_gets_no_event(settings):
    job_id = make_job(settings, status=JobStatus.QUEUED)
    set_job(settings, job_id, gpu_class="a100", gpus=1)
    announce(settings, ["a100"])
    assert sweep(settings)["unserved"] == []
    assert UNSERVED not in messages(settings, job_id)


@pytest.mark.parametrize("kind", ["search", "ensemble"])
def test_children_inherit_the_parents_class_and_are_routed_by_it(settings, kind):
    tenant_id = tenant_of(settings, make_job(settings))
    train = add_file(settings, tenant_id, sentiment_rows(32))
    valid = add_file(settings, tenant_id, sentiment_rows(8, seed=1), name="valid.csv")
    config = {"search": {"space": SPACE, "trials": 2, "parallel": 2}} if kind == "search" else \
        {"ensemble": {"method": "bagging", "members": 2}}
    payload = {"model": "tiny-bert", "training_file": train, "validation_file": valid, "seed": 5,
               "hyperparameters": {"n_epochs": 1}, "config": {"max_length": 16, "device": "cpu", **config},
               "resources": {"gpu": "a100", "gpus": 1}}
    with session_scope(settings.sqlalchemy_url) as session:
        parent, _ = jobs.create_job(session, settings, tenant_id=tenant_id, payload=payload)
    assert (parent.gpu_class, parent.gpus) == ("a100", 1)
    assert tasks.validate_job(parent.id, settings=settings) == JobStatus.QUEUED
    assert advance(settings, parent.id).startswith("started")
    with session_scope(settings.sqlalchemy_url) as session:
        children = list(session.query(Job).filter(Job.parent_job == parent.id).order_by(Job.child_index))
    assert len(children) == 2 and all((c.gpu_class, c.gpus) == ("a100", 1) for c in children)
    assert tasks.validate_job(children[0].id, settings=settings) == JobStatus.QUEUED
    assert jobs_in(class_queue(settings)) == [repr([children[0].id])]
    assert jobs_in(settings) == []
