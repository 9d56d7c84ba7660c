"""Hyperparameter searches with real processes (tests/e2e/crash_harness.py): the HTTP API, `lathe
worker` subprocesses on a redis-server of the test's own, SQLite, and a tiny BERT trained in real
training processes. A grid runs each point once, on two workers at once, and picks the best; a
median pruner stops a trial that is bad at its first evaluation; cancelling the search reaches its
running and queued trials; a worker killed mid-search loses and duplicates no trial.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from core.spec.search import SearchConfig
from lathe.db.tables import JobStatus
from lathe.search.study import Study
from tests.e2e.crash_harness import Stack, wait_for
from tests.tiny_models import sentiment_rows, write_text_dataset

pytestmark = pytest.mark.timeout(300)

# The tiny BERT's base learning rate is 1e-4 (auto, for an encoder that small): x30 it learns in a
# few dozen steps, x0.0005 it learns nothing.
LEARNS, STALLS = 30.0, 0.0005


def upload(api: httpx.Client, tmp: Path, name: str, rows: list[dict]) -> str:
    path = write_text_dataset(tmp / f"{name}.csv", rows)
    with open(path, "rb") as f:
        r = api.post("/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def start_search(api: httpx.Client, tmp: Path, *, search: dict, train_rows: int = 96, seed: int = 3,
                 hyperparameters: dict | None = None, config: dict | None = None) -> str:
    body = {"model": "tiny-bert", "seed": seed, "task": "text-classification",
            "training_file": upload(api, tmp, "train", sentiment_rows(train_rows)),
            "validation_file": upload(api, tmp, "valid", sentiment_rows(24, seed=1)),
            "hyperparameters": {"batch_size": 8, "n_epochs": 1, **(hyperparameters or {})},
            "config": {"device": "cpu", "max_length": 16, **(config or {}), "search": search}}
    r = api.post("/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def trials(api: httpx.Client, parent: str) -> list[dict]:
    r = api.get("/fine_tuning/jobs", params={"parent_job": parent, "limit": 100})
    assert r.status_code == 200, r.text
    return sorted(r.json()["data"], key=lambda j: j["created_at"])


def parent_messages(api: httpx.Client, parent: str) -> list[str]:
    data = api.get(f"/fine_tuning/jobs/{parent}/events", params={"limit": 200}).json()["data"]
    return [e["message"] for e in reversed(data)]


def explain(stack: Stack, parent: str):
    def text() -> str:
        job = stack.job(parent)
        children = [f"  trial {c['trial']}: {c['status']} {c['state']} {c['value']}"
                    for c in (job.search or {}).get("trials", [])]
        return "\n".join([stack.explain(parent), *children])
    return text


def test_a_grid_runs_each_point_once_on_two_workers_at_once_and_picks_the_best(stack, tmp_path):
    api = stack.api()
    stack.worker("a")
    stack.worker("b")  # one training slot each: two trials at once means both workers train
    grid = {"hyperparameters.learning_rate_multiplier": {"type": "categorical", "choices": [2.0, LEARNS]},
            "hyperparameters.n_epochs": {"type": "int", "low": 1, "high": 2}}
    parent = start_search(api, tmp_path, search={"trials": 10, "parallel": 2, "sampler": "grid", "pruner": "none",
                                                 "objective": {"metric": "loss"}, "space": grid})
    most_at_once = 0
    deadline = time.monotonic() + 240
    while stack.job(parent).status not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        most_at_once = max(most_at_once, sum(t["status"] == "running" for t in trials(api, parent)))
        time.sleep(0.1)
    job = api.get(f"/fine_tuning/jobs/{parent}").json()
    assert job["status"] == "succeeded", explain(stack, parent)()

    runs = trials(api, parent)
    points = {(t["hyperparameters"]["learning_rate_multiplier"], t["hyperparameters"]["n_epochs"]) for t in runs}
    assert len(runs) == 4 and points == {(2.0, 1), (2.0, 2), (LEARNS, 1), (LEARNS, 2)}  # the grid, once each
    assert all(t["parent_job"] == parent and t["status"] == "succeeded" for t in runs)
    assert most_at_once == 2, "two trials should have trained at once, one on each worker"
    assert all("lathe.run_job" in w.text() for w in stack.workers)

    board = job["search"]
    values = [row["value"] for row in board["trials"]]
    assert values == sorted(values) and all(row["state"] == "complete" for row in board["trials"])
    best = board["best_trial"]
    assert best == board["trials"][0] and best["value"] == min(values)
    assert job["fine_tuned_model"] == next(t["fine_tuned_model"] for t in runs if t["id"] == best["job"])
    assert job["metrics"]["best"]["loss"] == pytest.approx(best["value"])
    assert best["params"]["hyperparameters.learning_rate_multiplier"] == LEARNS  # it learns; x2 barely moves
    assert all(row["steps"] == 12 * row["params"]["hyperparameters.n_epochs"] for row in board["trials"])
    messages = parent_messages(api, parent)
    assert sum(m.startswith("Trial ") and " started: " in m for m in messages) == 4
    assert sum(" finished: loss=" in m for m in messages) == 4
    assert messages[-1] == "The job has successfully completed"
    # The best trial's model is the search's, downloadable under the parent's name.
    assert api.get(f"/models/{job['fine_tuned_model']}").status_code == 200


def test_a_median_pruner_stops_a_trial_that_is_bad_at_its_first_evaluation(stack, tmp_path):
    api = stack.api()
    stack.worker("a")
    search = {"trials": 2, "parallel": 1, "sampler": "grid", "objective": {"metric": "loss"},
              "pruner": {"type": "median", "n_startup_trials": 1},
              "space": {"hyperparameters.learning_rate_multiplier": {"type": "categorical", "choices": [LEARNS, STALLS]}}}
    # A seed whose grid order is (learns, stalls): the stalling trial comes second, and is compared
    # with the first at its first evaluation (the end of its first epoch of 60 steps: by then the
    # learning one is well below the stalling one's 0.693).
    config = SearchConfig.model_validate(search)
    seed = next(s for s in range(100) if Study("x", maximize=False, space=config.space, sampler=config.sampler,
                                               pruner=config.pruner, seed=s, records=[]).propose(0)[0] ==
                {"hyperparameters.learning_rate_multiplier": LEARNS})
    parent = start_search(api, tmp_path, search=search, seed=seed, train_rows=480, hyperparameters={"n_epochs": 2})
    job = stack.wait_status(parent, timeout=240)
    assert job.status == JobStatus.SUCCEEDED, explain(stack, parent)()
    good, bad = trials(api, parent)
    assert good["status"] == "succeeded" and good["hyperparameters"]["learning_rate_multiplier"] == LEARNS
    assert bad["status"] == "cancelled" and bad["fine_tuned_model"] is None and bad["error"] is None
    info = stack.job(bad["id"]).child_info
    assert info["state"] == "pruned" and info["pruned_at"]["evaluation"] == 1
    assert info["pruned_at"]["value"] > stack.job(good["id"]).child_info["intermediate"]["1"]
    assert info["pruned_at"]["step"] == 60  # of 120
    assert [m.split(": ")[0] for m in stack.messages(bad["id"]) if m.startswith("Pruned by")] == [
        "Pruned by the search's median pruner at evaluation 1 (step 60)"]
    rows = {row["job"]: row for row in job.search["trials"]}
    assert rows[bad["id"]]["state"] == "pruned" and rows[bad["id"]]["steps"] == 60
    assert job.search["best_trial"]["job"] == good["id"] and job.fine_tuned_model == good["fine_tuned_model"]
    assert any(" pruned at evaluation 1 (step 60)" in m for m in parent_messages(api, parent))


def test_cancelling_a_search_cancels_its_running_and_queued_trials(stack, tmp_path):
    api = stack.api()
    stack.worker("a")  # one slot: of two trials, one trains and one waits in the queue
    parent = start_search(api, tmp_path, train_rows=640, hyperparameters={"n_epochs": 3},
                          search={"trials": 6, "parallel": 2, "sampler": "random",
                                  "space": {"config.optimizer.weight_decay": {"type": "float", "low": 0, "high": 0.1}}})

    def one_training_one_queued() -> bool:
        statuses = sorted(t["status"] for t in trials(api, parent))
        return statuses == ["queued", "running"] and any(
            m.startswith("Step ") for m in stack.messages(next(t["id"] for t in trials(api, parent)
                                                               if t["status"] == "running")))

    wait_for(one_training_one_queued, timeout=120, what="a trial training and one queued", explain=explain(stack, parent))
    r = api.post(f"/fine_tuning/jobs/{parent}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    job = stack.wait_status(parent, timeout=60)
    assert job.status == JobStatus.CANCELLED, explain(stack, parent)()
    runs = trials(api, parent)
    assert len(runs) == 2 and all(t["status"] == "cancelled" for t in runs)  # none started after the cancel
    assert {row["state"] for row in job.search["trials"]} == {"cancelled"}
    assert parent_messages(api, parent)[-1] == "The job was cancelled"


def test_a_worker_killed_mid_search_loses_and_duplicates_no_trial(stack, tmp_path):
    api = stack.api()
    doomed = stack.worker("doomed", worker_concurrency=2)
    parent = start_search(api, tmp_path, train_rows=320, hyperparameters={"n_epochs": 2},
                          search={"trials": 4, "parallel": 2, "sampler": "tpe", "pruner": "none",
                                  "space": {"config.optimizer.weight_decay": {"type": "float", "low": 0, "high": 0.1}}})

    def both_training() -> bool:
        running = [t for t in trials(api, parent) if t["status"] == "running"]
        return len(running) == 2 and all(any(m.startswith("Step ") for m in stack.messages(t["id"])) for t in running)

    wait_for(both_training, timeout=120, what="two trials training", explain=explain(stack, parent))
    doomed.kill()  # the worker, its sweeper, its light-task pool and the trials' supervisors: SIGKILL
    stack.worker("survivor", worker_concurrency=2)
    job = stack.wait_status(parent, timeout=240)
    assert job.status == JobStatus.SUCCEEDED, explain(stack, parent)()
    runs = trials(api, parent)
    assert sorted(stack.job(t["id"]).child_index for t in runs) == [0, 1, 2, 3]
    assert all(t["status"] == "succeeded" for t in runs)
    assert sum(stack.job(t["id"]).attempt > 1 for t in runs) >= 1  # the killed trials ran again, resumed
    messages = parent_messages(api, parent)
    for n in range(4):
        assert sum(m.startswith(f"Trial {n} started: ") for m in messages) == 1
        assert sum(m.startswith(f"Trial {n} (") and " finished: " in m for m in messages) == 1
    assert job.search["best_trial"]["job"] in {t["id"] for t in runs}
