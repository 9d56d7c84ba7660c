"""`resources` on a job create: typed and bounded (a bad one is a 400 naming the field), stored and
returned on the job object; a resumed job's run message goes to its class's queue."""

from __future__ import annotations

import hashlib
import json

import pytest

from lathe.db.session import session_scope
from lathe.db.tables import Job, JobStatus, now
from lathe.jobs import JobCreate, fingerprint
from lathe.queue import run_queue
from tests.api.test_basics import assert_error
from tests.api.test_jobs import JOBS, create, set_status


def test_resources_are_stored_and_returned(sdk, client, acme, train_file, settings):
    job = sdk.fine_tuning.jobs.create(model="bert-base-uncased", training_file=train_file,
                                      extra_body={"resources": {"gpu": "a100"}})
    assert job.model_extra["resources"] == {"gpu": "a100", "gpus": 1}
    got = client.get(f"{JOBS}/{job.id}", headers=acme).json()
    assert got["resources"] == {"gpu": "a100", "gpus": 1}
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.get(Job, job.id)
        assert (row.gpu_class, row.gpus) == ("a100", 1)
    plain = create(client, acme, model="bert-base-uncased", training_file=train_file).json()
    assert plain["resources"] is None


@pytest.mark.parametrize(("resources", "param", "words"), [
    ({"gpu": "a100", "gpus": 2}, "resources.gpus", "multi-GPU training is not supported"),
    ({"gpu": "a100", "gpus": 0}, "resources.gpus", "greater than or equal to 1"),
    ({"gpu": "A100"}, "resources.gpu", "pattern"),
    ({"gpu": "a" * 33}, "resources.gpu", "pattern"),
    ({"gpu": "a100/../x"}, "resources.gpu", "pattern"),
    ({"gpu": "default"}, "resources.gpu", "leave `resources` out"),
    ({"gpus": 1}, "resources.gpu", "required"),
    ({"gpu": "a100", "memory": "80G"}, "resources.memory", "not permitted"),
])
def test_bad_resources_are_400_naming_the_field(client, acme, train_file, settings, resources, param, words):
    r = create(client, acme, model="bert-base-uncased", training_file=train_file, resources=resources)
    err = assert_error(r, 400, param=param)
    assert words in err["message"]
    with session_scope(settings.sqlalchemy_url) as session:
        assert session.query(Job).count() == 0


def test_a_dry_run_refuses_more_than_one_gpu_too(client, acme, train_file):
    r = create(client, acme, model="bert-base-uncased", training_file=train_file, dry_run=True,
               resources={"gpu": "a100", "gpus": 4})
    assert_error(r, 400, param="resources.gpus", code="unsupported_value")


def test_a_request_without_resources_is_fingerprinted_as_before_they_existed():
    """An Idempotency-Key replayed across the upgrade still finds its job (lathe.jobs._replay)."""
    body = JobCreate.model_validate({"model": "m", "training_file": "file-1"})
    sent = {k: v for k, v in body.model_dump(mode="json").items() if k not in ("resources", "dry_run")}
    assert fingerprint(body) == hashlib.sha256(json.dumps(sent, sort_keys=True).encode()).hexdigest()
    with_class = JobCreate.model_validate({"model": "m", "training_file": "file-1", "resources": {"gpu": "a100"}})
    assert fingerprint(with_class) != fingerprint(body)


def test_a_resumed_job_is_published_to_its_class_queue(client, acme, train_file, settings, redis_client):
    job_id = create(client, acme, model="bert-base-uncased", training_file=train_file,
                    resources={"gpu": "h100"}).json()["id"]
    set_status(settings, job_id, JobStatus.PAUSED, queued_at=now())  # paused after validation
    assert client.post(f"{JOBS}/{job_id}/resume", headers=acme).json()["status"] == "queued"
    messages = [json.loads(m)["headers"] for m in redis_client.lrange(run_queue(settings, "h100"), 0, -1)]
    assert [(m["task"], m["argsrepr"]) for m in messages] == [("lathe.run_job", repr([job_id]))]
    assert redis_client.llen(settings.queue) == 0
