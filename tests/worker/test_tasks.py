"""validate_job and run_job called directly (not through Celery) against real databases."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from lathe.db.tables import Checkpoint, Event, File, Job, JobStatus, Metric, Model
from lathe.lifecycle import Actor, move
from lathe.db.session import session_scope
from tests.tiny_models import sentiment_rows
from tests.worker.conftest import add_file, get_job, make_job, queued_messages
from worker import tasks
from worker.child import attempt_paths
from worker.sink import DbSink, StaleAttempt


def events(settings, job_id: str) -> list[Event]:
    with session_scope(settings.sqlalchemy_url) as session:
        return list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.seq)))


def count(settings, model, job_id: str, **where) -> int:
    with session_scope(settings.sqlalchemy_url) as session:
        q = select(func.count()).select_from(model).where(model.job_id == job_id)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return session.scalar(q)


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def explain(settings, job_id: str) -> str:
    """The job's error and the tail of its attempts' logs, for assertion messages."""
    job = get_job(settings, job_id)
    logs = sorted((settings.jobs_dir / job_id).glob("attempt-*.log"))
    return f"{job.status} {job.error}\n" + "\n".join(p.read_text()[-3000:] for p in logs)


class Runner(threading.Thread):
    """run_job in a thread, as the Celery thread pool runs it."""

    def __init__(self, settings, job_id: str):
        super().__init__(daemon=True)
        self.settings, self.job_id, self.status = settings, job_id, None

    def run(self) -> None:
        self.status = tasks.run_job(self.job_id, settings=self.settings)


# ---------------------------------------------------------------------------------------------
# validate_job


def test_validate_queues_and_publishes(settings):
    job_id = make_job(settings, valid_rows=sentiment_rows(10, seed=1), test_rows=sentiment_rows(10, seed=2))
    assert tasks.validate_job(job_id, settings=settings) == JobStatus.QUEUED
    job = get_job(settings, job_id)
    assert job.status == JobStatus.QUEUED and job.queued_at and job.task == "text-classification"
    assert job.spec["task"] == "text-classification"
    [ev] = events(settings, job_id)
    assert ev.message.startswith("Files validated for text-classification: 64 rows, labels 0 (32), 1 (32); "
                                 "validation 10 rows; test 10 rows")
    assert ev.data["training_file"]["problem_type"] == "single_label"
    assert [h["task"] for h in queued_messages(settings)] == ["lathe.run_job"]
    # A second delivery finds nothing to do and publishes nothing.
    assert tasks.validate_job(job_id, settings=settings) == ""
    assert len(queued_messages(settings)) == 1


@pytest.mark.parametrize("config, param", [
    ({"packing": True}, "config.packing"),  # the task is inferred from the CSV: text-classification
    ({"freeze": {"first_n_layers": 5}}, "config.freeze.first_n_layers"),  # tiny-bert has 2 layers
    ({"loss": {"label_smoothing": 0.1}, "label_column": "score"}, "config.loss.label_smoothing"),  # regression
])
def test_validate_refuses_what_only_data_and_model_tell(settings, config, param):
    rows = [{"text": r["text"], "score": float(i) / 7 + 0.01} for i, r in enumerate(sentiment_rows(40))]
    job_id = make_job(settings, train_rows=rows if "label_column" in config else None, config=config)
    assert tasks.validate_job(job_id, settings=settings) == JobStatus.FAILED
    job = get_job(settings, job_id)
    assert job.error["param"] == param and job.error["code"] == "inapplicable_field", job.error
    assert queued_messages(settings) == []


def test_validate_fails_on_missing_label_column(settings):
    job_id = make_job(settings, config={"label_column": "category"})
    assert tasks.validate_job(job_id, settings=settings) == JobStatus.FAILED
    job = get_job(settings, job_id)
    assert job.status == JobStatus.FAILED and job.finished_at
    assert job.error["code"] == "invalid_training_file"
    assert job.error["param"] == "training_file"
    assert "'category'" in job.error["message"]
    assert [e.level for e in events(settings, job_id)] == ["error"]
    assert queued_messages(settings) == []


def test_validate_checks_the_weight_column(settings):
    job_id = make_job(settings, config={"weight_column": "importance"})
    assert tasks.validate_job(job_id, settings=settings) == JobStatus.FAILED
    error = get_job(settings, job_id).error
    assert error["param"] == "config.weight_column" and "'importance'" in error["message"], error
    rows = [{**r, "importance": 0.5 if i % 2 else 2} for i, r in enumerate(sentiment_rows(20))]
    rows[5]["importance"] = -1
    job_id = make_job(settings, train_rows=rows, config={"weight_column": "importance"})
    assert tasks.validate_job(job_id, settings=settings) == JobStatus.FAILED
    error = get_job(settings, job_id).error
    assert error["param"] == "training_file" and error["message"].startswith("line 7: 'importance' must be a weight")
    rows[5]["importance"] = 0
    job_id = make_job(settings, train_rows=rows, config={"weight_column": "importance"})
    assert tasks.validate_job(job_id, settings=settings) == JobStatus.QUEUED


def test_validate_fails_on_unknown_validation_label(settings):
    valid = sentiment_rows(6) + [{"text": "so so", "label": 7}]
    job_id = make_job(settings, valid_rows=valid)
    assert tasks.validate_job(job_id, settings=settings) == JobStatus.FAILED
    error = get_job(settings, job_id).error
    assert error["code"] == "unknown_label" and error["param"] == "validation_file"
    assert "'7'" in error["message"]


def test_validate_names_the_bad_line(settings):
    rows = sentiment_rows(5) + [{"text": "", "label": 1}]
    job_id = make_job(settings, train_rows=rows)
    tasks.validate_job(job_id, settings=settings)
    error = get_job(settings, job_id).error
    assert error["param"] == "training_file" and "line 7" in error["message"]


# ---------------------------------------------------------------------------------------------
# run_job


def test_run_job_succeeds(settings):
    job_id = make_job(settings, valid_rows=sentiment_rows(16, seed=1), test_rows=sentiment_rows(16, seed=2),
                      suffix="My Suffix", tenant="Acme Corp")
    assert tasks.validate_job(job_id, settings=settings) == JobStatus.QUEUED
    assert tasks.run_job(job_id, settings=settings) == JobStatus.SUCCEEDED, explain(settings, job_id)

    job = get_job(settings, job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempt == 1
    assert job.lease_owner is None and job.lease_until is None and job.error is None
    assert job.started_at and job.finished_at >= job.started_at and job.estimated_finish is None
    assert re.fullmatch(r"ft:tiny-bert:acme-corp:my-suffix:[0-9a-f]{12}", job.fine_tuned_model)
    assert job.trained_tokens > 0
    assert job.hyperparameters["n_epochs"] == 2 and job.hyperparameters["batch_size"] == 8
    assert set(job.metrics) >= {"latest", "best", "test"} and job.metrics["test"]["accuracy"] >= 0

    with session_scope(settings.sqlalchemy_url) as session:
        model = session.get(Model, job.fine_tuned_model)
        assert model.job_id == job_id and model.task == "text-classification"
        assert Path(model.path, "config.json").is_file() and Path(model.archive_path).is_file()
        assert model.bytes == Path(model.archive_path).stat().st_size
        [results] = job.result_files
        file = session.get(File, results)
        assert file.purpose == "fine-tune-results" and file.tenant_id == job.tenant_id
        with open(file.path, newline="") as f:
            table = list(csv.DictReader(f))
    assert table and "step" in table[0] and "train_loss" in table[0] and "valid_loss" in table[0]

    assert count(settings, Checkpoint, job_id) >= 1
    assert count(settings, Metric, job_id, split="train") >= 1
    assert count(settings, Metric, job_id, split="valid") >= 1
    evs = events(settings, job_id)
    messages = [e.message for e in evs]
    assert "Fine-tuning job started" in messages
    assert messages[-1] == "The job has successfully completed"
    assert any(e.type == "metrics" and e.data["split"] == "valid" and "loss" in e.data for e in evs)
    assert attempt_paths(settings.jobs_dir, job_id, 1)["log"].exists()

    # A late duplicate delivery changes nothing.
    assert tasks.run_job(job_id, settings=settings) == ""
    assert get_job(settings, job_id).attempt == 1
    assert len(events(settings, job_id)) == len(evs)


def test_run_job_from_uploaded_model_file(settings, tiny_bert):
    job_id = make_job(settings, model="tiny-bert", status=JobStatus.QUEUED)
    job = get_job(settings, job_id)
    model_file = add_file(settings, job.tenant_id, name="My Tiny BERT.tar", purpose="model", folder=tiny_bert)
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job_id).model = model_file
    assert tasks.run_job(job_id, settings=settings) == JobStatus.SUCCEEDED
    assert get_job(settings, job_id).fine_tuned_model.startswith("ft:my-tiny-bert:")


def test_a_job_can_start_from_an_earlier_jobs_checkpoint(settings):
    first = make_job(settings, status=JobStatus.QUEUED, tenant="iterate", config={"checkpoint_every_steps": 4})
    assert tasks.run_job(first, settings=settings) == JobStatus.SUCCEEDED, explain(settings, first)
    source = get_job(settings, first)
    with session_scope(settings.sqlalchemy_url) as session:
        step = session.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == first))
    name = f"{source.fine_tuned_model}:ckpt-step-{step}"
    second = make_job(settings, status=JobStatus.QUEUED, tenant="iterate", model=name)
    assert tasks.run_job(second, settings=settings) == JobStatus.SUCCEEDED, explain(settings, second)
    messages = [e.message for e in events(settings, second)]
    assert f"Starting from the weights of checkpoint step-{step:08d}." in messages
    assert get_job(settings, second).fine_tuned_model.startswith("ft:tiny-bert:iterate:")
    # Another tenant cannot name it.
    other = make_job(settings, status=JobStatus.QUEUED, tenant="someone-else", model=name)
    assert tasks.run_job(other, settings=settings) == JobStatus.FAILED


def test_run_job_unknown_model_fails_without_training(settings):
    job_id = make_job(settings, model="no-such-model", status=JobStatus.QUEUED)
    assert tasks.run_job(job_id, settings=settings) == JobStatus.FAILED
    job = get_job(settings, job_id)
    assert job.error["code"] == "model_not_found" and job.error["param"] == "model"
    assert not attempt_paths(settings.jobs_dir, job_id, 1)["log"].exists()


def test_user_error_in_the_engine_fails_once(settings):
    # One label only: validation is skipped (queued directly), so the engine itself rejects it.
    job_id = make_job(settings, train_rows=[{"text": "good film", "label": 1}] * 8, status=JobStatus.QUEUED)
    assert tasks.run_job(job_id, settings=settings) == JobStatus.FAILED
    job = get_job(settings, job_id)
    assert job.error["code"] == "invalid_training_file" and job.error["param"] == "training_file"
    assert job.attempt == 1 and queued_messages(settings) == []


def test_duplicate_delivery_while_running_does_nothing(settings):
    job_id = make_job(settings, train_rows=sentiment_rows(400), status=JobStatus.QUEUED,
                      hyperparameters={"n_epochs": 1, "batch_size": 8})
    runner = Runner(settings, job_id)
    runner.start()
    wait_for(lambda: get_job(settings, job_id).status == JobStatus.RUNNING, what="running")
    assert tasks.run_job(job_id, settings=settings) == ""
    runner.join(180)
    assert runner.status == JobStatus.SUCCEEDED
    assert get_job(settings, job_id).attempt == 1


def test_cancel_while_running(settings):
    job_id = make_job(settings, train_rows=sentiment_rows(3000), status=JobStatus.QUEUED,
                      hyperparameters={"n_epochs": 3, "batch_size": 8}, config={"max_length": 64})
    runner = Runner(settings, job_id)
    runner.start()
    wait_for(lambda: get_job(settings, job_id).estimated_finish, what="an estimated finish")
    check_estimated_finish(settings, job_id, max_steps=3 * 3000 // 8, batch_size=8)
    with session_scope(settings.sqlalchemy_url) as session:  # what POST /cancel does
        assert move(session, job_id=job_id, source=JobStatus.RUNNING, target=JobStatus.CANCELLING, by=Actor.USER)
    runner.join(120)
    assert runner.status == JobStatus.CANCELLED
    job = get_job(settings, job_id)
    assert job.status == JobStatus.CANCELLED and job.finished_at and job.fine_tuned_model is None
    assert job.estimated_finish is None
    assert events(settings, job_id)[-1].message == "The job was cancelled"
    result = attempt_paths(settings.jobs_dir, job_id, 1)["result.json"].read_text()
    assert '"cancelled"' in result  # the child stopped on SIGTERM, not SIGKILL
    assert count(settings, Checkpoint, job_id) >= 1  # ... and saved where it stopped


def test_max_runtime_fails_the_job_with_deadline_exceeded(settings):
    job_id = make_job(settings, train_rows=sentiment_rows(3000), status=JobStatus.QUEUED,
                      hyperparameters={"n_epochs": 3, "batch_size": 8},
                      config={"max_length": 64, "max_runtime_seconds": 4})
    assert tasks.run_job(job_id, settings=settings) == JobStatus.FAILED
    job = get_job(settings, job_id)
    assert job.error["code"] == "deadline_exceeded" and job.error["param"] == "config.max_runtime_seconds"
    assert job.attempt == 1 and job.lease_owner is None and job.fine_tuned_model is None
    assert job.finished_at - job.started_at < 4 + 30  # stopped soon after the budget (plus model load)
    assert count(settings, Checkpoint, job_id) >= 1  # the work done so far is kept
    assert '"cancelled"' in attempt_paths(settings.jobs_dir, job_id, 1)["result.json"].read_text()


def test_pause_while_running_checkpoints_and_resume_continues(settings):
    job_id = make_job(settings, train_rows=sentiment_rows(600), status=JobStatus.QUEUED,
                      hyperparameters={"n_epochs": 1, "batch_size": 8}, config={"max_length": 32})
    runner = Runner(settings, job_id)
    runner.start()
    wait_for(lambda: count(settings, Metric, job_id), what="training to report")
    with session_scope(settings.sqlalchemy_url) as session:  # what POST /pause does
        assert move(session, job_id=job_id, source=JobStatus.RUNNING, target=JobStatus.PAUSED, by=Actor.USER)
    runner.join(120)
    assert runner.status == JobStatus.PAUSED
    job = get_job(settings, job_id)
    assert job.status == JobStatus.PAUSED and job.lease_owner is None and job.fine_tuned_model is None
    assert job.estimated_finish is None
    with session_scope(settings.sqlalchemy_url) as session:
        paused_at = session.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job_id))
    assert paused_at and paused_at > 0  # the child checkpointed where it stopped

    with session_scope(settings.sqlalchemy_url) as session:  # what POST /resume does
        assert move(session, job_id=job_id, source=JobStatus.PAUSED, target=JobStatus.QUEUED, by=Actor.USER)
    status = tasks.run_job(job_id, settings=settings)
    assert status == JobStatus.SUCCEEDED, [e.message for e in events(settings, job_id)][-6:]
    job = get_job(settings, job_id)
    assert job.attempt == 2 and job.fine_tuned_model
    assert any(f"from the checkpoint at step {paused_at}" in e.message for e in events(settings, job_id))


def check_estimated_finish(settings, job_id: str, *, max_steps: int, batch_size: int) -> None:
    """The running job's estimated finish is now + the steps left at the rate its train metrics show
    (no validation file: no evaluations). Each train row covers 10 full batches at its samples/s."""
    with session_scope(settings.sqlalchemy_url) as session:
        rows = list(session.scalars(select(Metric).where(Metric.job_id == job_id, Metric.split == "train")))
        job = session.get(Job, job_id)
        finish, status = job.estimated_finish, job.status
    step = max(r.step for r in rows)
    seconds = sum(10 * batch_size / r.values["samples_per_second"] for r in rows)
    expected = (max_steps - step) * seconds / step
    assert status == JobStatus.RUNNING
    # Written with that step's metrics, at most a flush interval (2 s) before this read.
    assert expected * 0.75 - 5 <= finish - time.time() <= expected * 1.25 + 1, (finish - time.time(), expected)


def test_estimated_finish_is_written_while_running_and_cleared_by_every_move(settings):
    ends = {  # how each job leaves `running`, (target, actor) in turn
        "succeeded": [(JobStatus.SUCCEEDED, Actor.RUNNER)],
        "failed": [(JobStatus.FAILED, Actor.SWEEPER)],
        "requeued": [(JobStatus.QUEUED, Actor.RUNNER)],
        "paused": [(JobStatus.PAUSED, Actor.USER)],
        "cancelled": [(JobStatus.CANCELLING, Actor.USER), (JobStatus.CANCELLED, Actor.RUNNER)],
    }
    for name, moves in ends.items():
        job_id = make_job(settings, status=JobStatus.RUNNING)
        sink = DbSink(settings.sqlalchemy_url, job_id, 0)
        sink.progress(30, seconds_left=90 * 0.5)  # 90 steps left at 0.5 s each
        before = time.time()
        sink.metrics(30, {"loss": 0.5}, split="train")
        sink.flush()  # the write that carries the train metrics carries the estimate
        finish = get_job(settings, job_id).estimated_finish
        assert before + 45 - 1 <= finish <= time.time() + 45 + 1, name

        source = JobStatus.RUNNING
        for target, actor in moves:
            with session_scope(settings.sqlalchemy_url) as session:
                assert move(session, job_id=job_id, source=source, target=target, by=actor)
            assert get_job(settings, job_id).estimated_finish is None, (name, target)
            source = target
            if target in (JobStatus.PAUSED, JobStatus.CANCELLING):  # the child still writes, but no estimate
                sink.progress(40, seconds_left=40.0)
                sink.event("still stopping")
                assert get_job(settings, job_id).estimated_finish is None, (name, target)
        sink.close()


def test_killed_child_is_requeued_and_resumes_from_checkpoint(settings):
    # 75 steps: plenty of time to kill it between the first checkpoint and the end.
    job_id = make_job(settings, train_rows=sentiment_rows(600), status=JobStatus.QUEUED,
                      hyperparameters={"n_epochs": 1, "batch_size": 8},
                      config={"max_length": 32, "checkpoint_every_steps": 10})
    runner = Runner(settings, job_id)
    runner.start()
    wait_for(lambda: count(settings, Checkpoint, job_id), what="a checkpoint")
    pid = int(attempt_paths(settings.jobs_dir, job_id, 1)["pid"].read_text())
    os.kill(pid, signal.SIGKILL)  # the OOM killer, say
    runner.join(60)
    assert runner.status == JobStatus.QUEUED
    job = get_job(settings, job_id)
    assert job.status == JobStatus.QUEUED and job.attempt == 1 and job.lease_owner is None
    assert "killed by SIGKILL" in events(settings, job_id)[-1].message
    [msg] = queued_messages(settings)
    assert msg["task"] == "lathe.run_job" and not msg["eta"]  # published once its backoff was waited out

    with session_scope(settings.sqlalchemy_url) as session:
        resumed_at = session.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job_id))
    assert tasks.run_job(job_id, settings=settings) == JobStatus.SUCCEEDED
    job = get_job(settings, job_id)
    assert job.attempt == 2 and job.fine_tuned_model
    messages = [e.message for e in events(settings, job_id)]
    assert f"Fine-tuning job resumed (attempt 2) from the checkpoint at step {resumed_at}" in messages
    assert f"Resumed from checkpoint at step {resumed_at}." in messages
    with session_scope(settings.sqlalchemy_url) as session:
        first = session.scalar(select(func.min(Metric.step)).where(Metric.job_id == job_id, Metric.attempt == 2))
    assert first > resumed_at  # attempt 2 did not start over


def test_stale_attempt_sink_writes_are_refused(settings):
    job_id = make_job(settings, status=JobStatus.RUNNING)
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job_id).attempt = 2
    stale = DbSink(settings.sqlalchemy_url, job_id, 1)
    with pytest.raises(StaleAttempt):
        stale.event("from the past")
    with pytest.raises(StaleAttempt):
        stale.checkpoint(5, Path("/nowhere"), {"loss": 1.0})
    with pytest.raises(StaleAttempt):
        stale.metrics(3, {"loss": 0.5}, split="valid")
    stale.metrics(4, {"loss": 0.5}, split="train")  # buffered ...
    stale.close()  # ... and dropped

    current = DbSink(settings.sqlalchemy_url, job_id, 2)
    current.metrics(1, {"loss": 0.7}, split="train")
    current.metrics(2, {"loss": 0.6, "accuracy": 0.5}, split="valid")
    current.metrics(0, {"loss": 0.7}, split="baseline_test")
    current.checkpoint(2, Path("/ckpt"), {"loss": 0.6})
    current.close()
    assert count(settings, Metric, job_id) == 3 and count(settings, Checkpoint, job_id) == 1
    assert count(settings, Metric, job_id, split="baseline_test") == 1
    assert {e.attempt for e in events(settings, job_id)} == {2}

    with session_scope(settings.sqlalchemy_url) as session:  # finished: nobody writes any more
        move(session, job_id=job_id, source=JobStatus.RUNNING, target=JobStatus.SUCCEEDED, by=Actor.RUNNER)
    with pytest.raises(StaleAttempt):
        current.event("late")


def test_celery_app_is_torch_free():
    code = ("import sys, worker.celery_app as c; "
            "assert {'lathe.run_job', 'lathe.validate_job'} <= set(c.app.tasks); "
            "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, LATHE_REDIS_URL="redis://127.0.0.1:6379/13")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parents[2])


def test_child_started_after_its_supervisor_died_exits_at_once():
    """The child compares its parent with the supervisor pid it was given, from the first check:
    a supervisor killed while the child was still importing must not leave an orphan training."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", "from worker.child import _watch_parent; _watch_parent(1)"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 75 and "supervisor is gone" in proc.stderr
    assert time.monotonic() - started < 30  # the import dominates; no sleep before the first check
