"""GPU classes with real processes (crash_harness's Stack: its own redis-server, `lathe worker`
subprocesses, uvicorn, SQLite): a job for class a100 with only a default worker running is validated
and then waits, queued, with one warn event saying so, while a default job runs; a worker started
with `--gpu-class a100` then runs it to succeeded, with nobody acting."""

from __future__ import annotations

import time

import pytest

from lathe.db.tables import JobStatus
from lathe.gpu_classes import unserved_message
from lathe.queue import run_queue
from tests.e2e.crash_harness import Stack, wait_for
from tests.tiny_models import sentiment_rows, write_text_dataset

pytestmark = pytest.mark.timeout(120)

UNSERVED = unserved_message("a100")


def test_a_job_waits_for_a_worker_of_its_class_and_then_runs_on_it(stack: Stack, tmp_path):
    api = stack.api()
    default = stack.worker("default")  # serves jobs without a class only (it names none)
    path = write_text_dataset(tmp_path / "train.csv", sentiment_rows(32))
    with open(path, "rb") as f:
        train = api.post("/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"}).json()["id"]

    def create(**extra) -> str:
        response = api.post("/fine_tuning/jobs", json={
            "model": "tiny-bert", "training_file": train, "task": "text-classification",
            "hyperparameters": {"n_epochs": 1, "batch_size": 8}, "config": {"device": "cpu", "max_length": 16},
            **extra})
        assert response.status_code == 200, response.text
        return response.json()["id"]

    a100, plain = create(resources={"gpu": "a100"}), create()
    assert stack.wait_status(plain).status == JobStatus.SUCCEEDED, stack.explain(plain)
    wait_for(lambda: UNSERVED in stack.messages(a100), timeout=30, what="the unserved event",
             explain=lambda: stack.explain(a100))
    time.sleep(1.5)  # three more sweeps: nothing more is said, nothing is claimed or published again
    events = api.get(f"/fine_tuning/jobs/{a100}/events", params={"limit": 50}).json()["data"]
    said = [e for e in events if e["message"] == UNSERVED]
    assert [e["level"] for e in said] == ["warn"], events
    job = stack.job(a100)
    assert job.status == JobStatus.QUEUED and job.attempt == 0, stack.explain(a100)
    client = stack.redis.client()
    try:
        assert client.llen(run_queue(stack.settings, "a100")) == 1  # its one message, waiting
    finally:
        client.close()
    assert len(default.received()) == 1  # the default job's message; never the a100 one

    served = stack.worker("a100", args=("--gpu-class", "a100"))
    done = stack.wait_status(a100, timeout=60)
    assert done.status == JobStatus.SUCCEEDED and done.attempt == 1, stack.explain(a100)
    assert len(served.received()) == 1 and len(default.received()) == 1
    assert [e.message for e in stack.events(a100)].count(UNSERVED) == 1
    assert "does not serve" not in default.text()  # no message reached a worker of another class
