"""Events (paged and streamed), checkpoints and metrics of a job."""

from __future__ import annotations

import json
import threading
import time

from sqlalchemy import create_engine
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session

from lathe.db.tables import Checkpoint, Job, JobStatus, Metric, new_id
from lathe.db.queries import add_event
from lathe.db.session import session_scope
from lathe.job_data import stream_batch
from tests.api.test_basics import assert_error
from tests.api.test_jobs import JOBS, create, set_status


def make_job(client, acme, train_file) -> str:
    r = create(client, acme, model="bert-base-uncased", training_file=train_file)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def add_events(settings, job_id: str, n: int) -> None:
    with session_scope(settings.sqlalchemy_url) as s:
        for i in range(n):
            add_event(s, job_id=job_id, message=f"step {i}", type="metrics", data={"step": i})
            s.flush()


def test_events_pagination(client, acme, train_file, settings):
    job_id = make_job(client, acme, train_file)
    add_events(settings, job_id, 5)
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = client.get(f"{JOBS}/{job_id}/events", headers=acme, params=params).json()
        seen += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert [e["message"] for e in seen] == ["step 4", "step 3", "step 2", "step 1", "step 0", "Created fine-tuning job"]
    ev = seen[0]
    assert ev["object"] == "fine_tuning.job.event" and ev["type"] == "metrics" and ev["data"] == {"step": 4}
    assert ev["level"] == "info" and ev["id"].startswith("ftevent-") and isinstance(ev["created_at"], int)
    assert_error(client.get(f"{JOBS}/{job_id}/events?after=ftevent-nope", headers=acme), 404, param="after")


def read_sse(client, acme, job_id, **params) -> list[dict]:
    out = []
    with client.stream("GET", f"{JOBS}/{job_id}/events", headers=acme, params={"stream": "true", **params}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                out.append(json.loads(line[5:].strip()))
    return out


def test_sse_stream_of_a_finished_job_ends(client, acme, train_file, settings):
    job_id = make_job(client, acme, train_file)
    add_events(settings, job_id, 3)
    set_status(settings, job_id, JobStatus.SUCCEEDED)
    events = read_sse(client, acme, job_id)
    assert [e["message"] for e in events] == ["Created fine-tuning job", "step 0", "step 1", "step 2"]
    assert [e["message"] for e in read_sse(client, acme, job_id, after=events[1]["id"])] == ["step 1", "step 2"]


def test_sse_stream_follows_until_terminal(client, acme, train_file, settings):
    job_id = make_job(client, acme, train_file)
    set_status(settings, job_id, JobStatus.RUNNING)

    def worker():
        time.sleep(0.3)
        add_events(settings, job_id, 2)
        time.sleep(0.3)
        with session_scope(settings.sqlalchemy_url) as s:
            add_event(s, job_id=job_id, message="The job has successfully completed")
            s.get(Job, job_id).status = JobStatus.SUCCEEDED

    t = threading.Thread(target=worker)
    t.start()
    started = time.monotonic()
    events = read_sse(client, acme, job_id)
    t.join()
    assert time.monotonic() - started < 10
    assert [e["message"] for e in events] == ["Created fine-tuning job", "step 0", "step 1",
                                              "The job has successfully completed"]


def test_a_stream_never_ends_before_the_events_committed_with_the_final_status(client, acme, train_file, settings):
    # The worker's last events and terminal status commit together; here that commit lands between
    # the two statements of a stream's poll, the window where a poll could see the status but not
    # the events (as it once did in CI). A poll that reports `finished` must hold the last event.
    job_id = make_job(client, acme, train_file)
    set_status(settings, job_id, JobStatus.RUNNING)
    engine = create_engine(settings.sqlalchemy_url)
    statements = []

    def finish_between_statements(conn, cursor, statement, *args):  # noqa: ANN001
        statements.append(statement)
        if len(statements) == 2:
            with session_scope(settings.sqlalchemy_url) as s:
                add_event(s, job_id=job_id, message="The job has successfully completed")
                s.get(Job, job_id).status = JobStatus.SUCCEEDED

    sa_event.listen(engine, "before_cursor_execute", finish_between_statements)
    try:
        with Session(engine) as session:
            events, finished = stream_batch(session, tenant_id=tenant_of(settings, job_id), job_id=job_id,
                                            after_seq=0)
    finally:
        engine.dispose()
    assert len(statements) == 2
    assert not finished or events[-1].message == "The job has successfully completed"


def tenant_of(settings, job_id: str) -> str:
    with session_scope(settings.sqlalchemy_url) as s:
        return s.get(Job, job_id).tenant_id


def test_checkpoints_and_metrics(client, acme, sdk, train_file, settings):
    job_id = make_job(client, acme, train_file)
    with session_scope(settings.sqlalchemy_url) as s:
        job = s.get(Job, job_id)
        job.attempt = 2
        job.fine_tuned_model = "ft:bert-base-uncased:acme::abc"
        job.metrics = {"latest": {"valid_loss": 0.5}, "best": {"valid_loss": 0.4, "step": 20}}
        for step in (10, 20, 30):
            s.add(Checkpoint(id=new_id("ftckpt"), job_id=job_id, attempt=2, step=step, path=f"/x/{step}",
                             metrics={"train_loss": 1.0 / step, "valid_loss": 0.5}, created_at=1000 + step))
        for attempt, step, split in [(1, 5, "train"), (2, 10, "train"), (2, 10, "valid"), (2, 20, "train")]:
            s.add(Metric(job_id=job_id, attempt=attempt, step=step, split=split, values={"loss": step / 100},
                         created_at=1000))
    page = client.get(f"{JOBS}/{job_id}/checkpoints?limit=2", headers=acme).json()
    assert [c["step_number"] for c in page["data"]] == [30, 20] and page["has_more"] is True
    ck = page["data"][0]
    assert ck["object"] == "fine_tuning.job.checkpoint" and ck["fine_tuning_job_id"] == job_id
    assert ck["fine_tuned_model_checkpoint"] == "ft:bert-base-uncased:acme::abc:ckpt-step-30"
    assert ck["metrics"]["step"] == 30 and ck["metrics"]["valid_loss"] == 0.5
    rest = client.get(f"{JOBS}/{job_id}/checkpoints", headers=acme, params={"after": page["last_id"]}).json()
    assert [c["step_number"] for c in rest["data"]] == [10]
    assert [c.step_number for c in sdk.fine_tuning.jobs.checkpoints.list(job_id)] == [30, 20, 10]

    series = client.get(f"{JOBS}/{job_id}/metrics", headers=acme).json()
    assert series["object"] == "list"
    assert [(p["step"], p["split"], p["attempt"]) for p in series["data"]] == [(10, "train", 2), (10, "valid", 2), (20, "train", 2)]
    valid = client.get(f"{JOBS}/{job_id}/metrics?split=valid", headers=acme).json()["data"]
    assert [p["values"] for p in valid] == [{"loss": 0.1}]
    job = client.get(f"{JOBS}/{job_id}", headers=acme).json()
    assert job["metrics"]["best"]["step"] == 20 and job["attempt"] == 2
