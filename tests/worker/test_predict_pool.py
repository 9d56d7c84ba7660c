"""A worker's prediction process (worker.predict_child, driven by worker.predict_pool.PredictProcess)
on tiny BERT classifiers built on the spot: its answers are core.predict's to the last digit, a model
is loaded once and kept (least recently used dropped first), two requests for one model load it
once, a bad folder or input is a 400, and a killed process is replaced; a dry run's count request is
answered with core.estimate's counts. And the pool's threads against a real Redis, with a stand-in
for the process (a count of a cached hub model marked offline when the hub is away)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from core.predict import predict
from lathe.errors import BadRequest
from lathe.predictions import (WorkerTimeout, WorkerUnavailable, ask_worker, count_request, prediction_request,
                               request_predictions)
from lathe.queue import predict_queue
from lathe.settings import Settings
from tests.tiny_models import save_tiny_bert
from worker.predict_pool import PredictPool, PredictProcess

REDIS_URL = "redis://127.0.0.1:6379/13"
TEXTS = ["what a great wonderful film", "boring terrible waste", "ok"]


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> list[Path]:
    """Three tiny classifiers that answer differently (their heads' seeds differ)."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("classifiers")
    folders = []
    for i, labels in enumerate((2, 3, 2)):
        folder = save_tiny_bert(root / f"m{i}", num_labels=labels)
        weights = load_file(folder / "model.safetensors")
        torch.manual_seed(100 + i)
        weights["classifier.weight"] = torch.randn_like(weights["classifier.weight"])
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    return folders


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", redis_url=REDIS_URL, queue=f"lathe-predict-{uuid.uuid4().hex[:10]}",
                 predict_cache_models=2, predict_concurrency=2, predict_timeout_seconds=60)
    yield s
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"*{s.queue}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def process(settings) -> PredictProcess:
    p = PredictProcess(settings)
    yield p
    p.close()


def ask(process: PredictProcess, folder: Path, inputs=TEXTS, **options) -> dict:
    return process.ask({"model": str(folder), "inputs": inputs, **options}, 120)


def test_answers_are_core_predicts_and_a_model_loads_once(process, classifiers):
    a, b, c = classifiers
    first, second = ask(process, a, top_k=2), ask(process, a, top_k=2)
    assert first["loaded"] is True and second["loaded"] is False
    expected = predict(a, TEXTS, top_k=2)
    assert first["predictions"] == second["predictions"] == json.loads(json.dumps(expected))
    assert ask(process, b, top_k=3)["predictions"] == json.loads(json.dumps(predict(b, TEXTS, top_k=3)))
    # Least recently used goes first: after a, b, a, the third model drops b and keeps a.
    assert ask(process, a)["loaded"] is False
    assert ask(process, c)["loaded"] is True
    assert ask(process, a)["loaded"] is False
    assert ask(process, b)["loaded"] is True
    assert ask(process, c)["loaded"] is True  # b and a were used after it
    # Bad requests are 400s, and the process stays.
    missing = ask(process, a.parent / "nope")
    assert missing["status"] == 400 and missing["error"]["code"] == "model_not_found"
    bad = ask(process, a, top_k=0)
    assert bad["status"] == 400 and bad["error"]["param"] == "top_k"
    assert ask(process, c)["loaded"] is False


def test_two_requests_for_a_model_load_it_once(process, classifiers):
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(ask(process, classifiers[0]))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["loaded"] for r in replies) == [False, True]
    assert replies[0]["predictions"] == replies[1]["predictions"]


def test_a_count_request_is_answered_with_core_estimates_counts(process, classifiers, tmp_path):
    """A dry run's count (lathe.predictions' "count" kind), answered by the same process as the
    predictions: core.estimate's own figures; what the engine refuses is a 400, and the process stays."""
    from core.estimate import count_inputs, model_parameters
    from core.spec import JobSpec, Task

    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"{t} {i},{i % 2}\n" for i, t in enumerate(TEXTS * 4)))
    spec = {"model": "m", "training_file": "f", "task": "text-classification"}
    specs = [spec, {**spec, "seed": 3, "config": {"train_rows": {"method": "subsample", "fraction": 0.5}}}]
    request = {"kind": "count", "model": str(classifiers[0]), "task": "text-classification",
               "files": {"training_file": str(train)}, "specs": specs, "offline": False}
    reply = process.ask(request, 120)
    expected = count_inputs(str(classifiers[0]), Task.TEXT_CLASSIFICATION, {"training_file": train},
                            [JobSpec.model_validate(s) for s in specs])
    assert reply["runs"] == expected
    assert [run["training_file"]["examples"] for run in reply["runs"]] == [12, 6]
    assert reply["parameters"] == model_parameters(str(classifiers[0]), Task.TEXT_CLASSIFICATION)
    missing = process.ask({**request, "model": str(tmp_path / "nope")}, 120)
    assert missing["status"] == 400 and missing["error"]["code"] == "model_not_found"
    assert ask(process, classifiers[0])["predictions"]


def test_a_killed_process_is_replaced(process, classifiers):
    assert ask(process, classifiers[0])["loaded"] is True
    pid = process.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process.pid == pid and time.monotonic() < deadline:
        time.sleep(0.05)
    again = ask(process, classifiers[0])
    assert process.pid not in (None, pid)
    assert again["loaded"] is True and again["predictions"]


def test_the_process_exits_with_its_worker(settings, classifiers, tmp_path):
    """The process watches its parent: a worker killed with SIGKILL leaves no prediction process."""
    import subprocess
    import sys

    script = ("import sys; from lathe.settings import Settings; from worker.predict_pool import PredictProcess; "
              f"p = PredictProcess(Settings(redis_url={REDIS_URL!r}, data_dir={str(tmp_path)!r})); "
              f"p.ask({{'model': {str(classifiers[0])!r}, 'inputs': ['x']}}, 120); print(p.pid, flush=True); "
              "import time; time.sleep(60)")
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    child = int(worker.stdout.readline())
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --- the pool's threads, with a stand-in for the process ------------------------------------------

def test_pool_answers_through_redis_and_maps_errors(settings):
    seen = []

    def stand_in(request: dict, left: float) -> dict:
        seen.append(request["model"])
        if request["inputs"] == ["bad"]:
            return {"error": {"message": "no", "param": "inputs", "code": "invalid_input"}, "status": 400}
        if request["inputs"] == ["crash"]:
            raise RuntimeError("boom")
        return {"predictions": [[{"label": request["model"]}] for _ in request["inputs"]]}

    pool = PredictPool(settings, answer_with=stand_in).start()
    try:
        def call(inputs):
            return asyncio.run(request_predictions(settings, model_path="/m", inputs=inputs))

        assert call(["a", "b"]) == [[{"label": "/m"}]] * 2
        with pytest.raises(BadRequest) as e:
            call(["bad"])
        assert e.value.param == "inputs" and e.value.code == "invalid_input"
        with pytest.raises(Exception) as e:
            call(["crash"])
        assert getattr(e.value, "status_code", None) == 500
    finally:
        pool.stop()
    assert seen == ["/m"] * 3


def test_no_pool_is_a_503_and_the_request_is_taken_back(settings):
    quick = settings.model_copy(update={"predict_timeout_seconds": 0.3})
    with pytest.raises(WorkerUnavailable) as e:
        asyncio.run(request_predictions(quick, model_path="/m", inputs=["x"]))
    assert e.value.code == "predict_unavailable"
    assert redis.Redis.from_url(REDIS_URL).llen(predict_queue(settings)) == 0


def test_a_taken_request_unanswered_in_time_is_a_504(settings):
    quick = settings.model_copy(update={"predict_timeout_seconds": 0.5})
    pool = PredictPool(quick, answer_with=lambda request, left: time.sleep(left + 0.5) or {"predictions": []}).start()
    try:
        with pytest.raises(WorkerTimeout):
            asyncio.run(request_predictions(quick, model_path="/m", inputs=["x"]))
    finally:
        pool.stop()


def test_pool_drops_a_request_whose_requester_stopped_waiting(settings):
    calls = []
    client = redis.Redis.from_url(REDIS_URL)
    stale = prediction_request(settings.model_copy(update={"predict_timeout_seconds": 0.01}), model_path="/m",
                               inputs=["x"])
    time.sleep(0.05)
    client.lpush(predict_queue(settings), json.dumps(stale), "not json")
    pool = PredictPool(settings, answer_with=lambda request, left: calls.append(request) or {"predictions": []}).start()
    try:
        deadline = time.monotonic() + 5
        while client.llen(predict_queue(settings)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        pool.stop()
    assert calls == [] and client.llen(stale["reply_to"]) == 0


def test_pool_answers_counts_and_requests_sent_before_kinds(settings, tmp_path, monkeypatch):
    """A count request goes to the same answerer, `offline` set by the worker: a hub model in this
    worker's cache while the hub does not answer (as it decides for a training run); a prediction
    request without a `kind` (as the first APIs sent them) is still a prediction."""
    from lathe.model_source import forget_hub_answers
    from tests.hub_stub import ClosedPort, StubHub, as_hf_endpoint

    cached = tmp_path / "hf-cache" / "models--org--cached"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("0123abcd")
    (cached / "snapshots" / "0123abcd").mkdir(parents=True)
    (cached / "snapshots" / "0123abcd" / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []

    def stand_in(request: dict, left: float) -> dict:
        seen.append(request)
        return {"runs": [], "parameters": None} if request.get("kind") == "count" else {"predictions": [[]]}

    def count(model: str, hub: bool) -> dict:
        return ask_worker(settings, count_request(settings, model=model, hub=hub, task="text-classification",
                                                  files={}, specs=[]))

    pool = PredictPool(settings, answer_with=stand_in).start()
    forget_hub_answers()
    try:
        with as_hf_endpoint(monkeypatch, ClosedPort()):
            for model, hub in (("org/cached", True), ("org/elsewhere", True), (str(tmp_path), False)):
                assert count(model, hub) == {"runs": [], "parameters": None}
        forget_hub_answers()
        with as_hf_endpoint(monkeypatch, StubHub()):
            count("org/cached", True)  # the hub answers: a normal load (it may have a newer revision)
        old = prediction_request(settings, model_path="/m", inputs=["x"])
        del old["kind"]
        client = redis.Redis.from_url(REDIS_URL)
        client.lpush(predict_queue(settings), json.dumps(old))
        assert json.loads(client.blpop([old["reply_to"]], timeout=10)[1]) == {"predictions": [[]]}
        client.close()
    finally:
        pool.stop()
        forget_hub_answers()
    assert [r.get("offline") for r in seen] == [True, False, False, False, None]


def test_a_taken_count_has_the_dry_run_timeout_not_the_predict_one(settings):
    """A worker must take a request within LATHE_PREDICT_TIMEOUT_SECONDS; once taken, a count has the
    rest of LATHE_DRY_RUN_TIMEOUT_SECONDS (tokenizing a large file takes longer than a prediction)."""
    quick = settings.model_copy(update={"predict_timeout_seconds": 0.3, "dry_run_timeout_seconds": 3})

    def slow(request: dict, left: float) -> dict:  # counts for as many seconds as its "model" says
        time.sleep(min(left + 0.5, float(request["model"])))
        return {"runs": [], "parameters": None}

    def count(seconds: float) -> dict:
        return ask_worker(quick, count_request(quick, model=str(seconds), hub=False, task="text-classification",
                                               files={}, specs=[]))

    pool = PredictPool(quick, answer_with=slow).start()
    try:
        started = time.monotonic()
        assert count(1.0) == {"runs": [], "parameters": None}  # past the 0.3 s a worker has to take it
        with pytest.raises(WorkerTimeout) as e:
            count(10)
        assert "LATHE_DRY_RUN_TIMEOUT_SECONDS" in e.value.message and time.monotonic() - started < 8
    finally:
        pool.stop()
