"""/predict and a dry run with real processes (tests/e2e/crash_harness.py): the HTTP API (uvicorn)
and a `lathe worker` on a redis-server of the test's own. Each request goes through Redis to the
worker, whose prediction process loads the model once and answers as core.predict does, and counts
a dry run's tokens as core.estimate does; neither the API nor the worker process has torch loaded,
only the prediction process."""

from __future__ import annotations

import json
import re
import time

import psutil
import pytest

from core.estimate import count_inputs
from core.predict import predict
from core.spec import JobSpec, Task
from lathe.db.session import session_scope
from lathe.db.tables import JobStatus, Model, now
from lathe.keys import authenticate
from tests.e2e.crash_harness import Stack, wait_for
from tests.tiny_models import save_tiny_bert
from tests.worker.conftest import make_job

pytestmark = pytest.mark.timeout(300)

MODEL = "ft:tiny-bert:e2e:predict:ftjob-1"
TEXTS = ["what a great wonderful film", "boring terrible waste"]


def _torch_loaded(proc: psutil.Process) -> bool:
    return any("libtorch" in m.path for m in proc.memory_maps())


def test_predict_and_dry_runs_run_on_a_worker_which_keeps_the_model_loaded(stack: Stack):
    api = stack.api()
    worker = stack.worker("a")
    folder = save_tiny_bert(stack.settings.models_store / "tiny-classifier", num_labels=2)
    key = api.headers["Authorization"].removeprefix("Bearer ")
    with session_scope(stack.settings.sqlalchemy_url) as session:
        tenant = authenticate(session, key)
        tenant_id, tenant_name = tenant.id, tenant.name
    job_id = make_job(stack.settings, tenant=tenant_name, status=JobStatus.SUCCEEDED)  # a finished job's model
    with session_scope(stack.settings.sqlalchemy_url) as session:
        session.add(Model(id=MODEL, tenant_id=tenant_id, job_id=job_id, task="text-classification", path=str(folder),
                          archive_path="", bytes=0, created_at=now()))

    timings, answers = [], []
    for _ in range(3):
        started = time.monotonic()
        r = api.post(f"/models/{MODEL}/predict", json={"inputs": TEXTS, "top_k": 2}, timeout=120)
        timings.append(time.monotonic() - started)
        assert r.status_code == 200, r.text + "\n" + stack.explain()
        answers.append(r.json()["data"])
    expected = json.loads(json.dumps(predict(folder, TEXTS, top_k=2)))
    assert answers == [expected] * 3
    assert max(timings[1:]) < timings[0]  # the first started the prediction process and loaded the model

    # One load for three requests, in the worker's log (its prediction process writes there).
    lines = wait_for(lambda: re.findall(r"predict \S+: 2 inputs, (loaded|cached)", worker.text()) or None,
                     timeout=10, what="the prediction process's log lines", explain=lambda: worker.text()[-3000:])
    assert lines == ["loaded", "cached", "cached"], worker.text()[-3000:]

    # A dry run: its files' tokens counted by the same prediction process, the API only asking.
    csv = "text,label\n" + "".join(f"{t} {i},{i % 2}\n" for i, t in enumerate(TEXTS * 5))
    train = api.post("/files", files={"file": ("train.csv", csv.encode())}, data={"purpose": "fine-tune"}).json()["id"]
    r = api.post("/fine_tuning/jobs", json={"model": "tiny-bert", "training_file": train, "dry_run": True}, timeout=120)
    assert r.status_code == 200, r.text + "\n" + stack.explain()
    (stack.tmp / "train.csv").write_text(csv)
    spec = JobSpec.model_validate({"model": "tiny-bert", "training_file": train, "task": "text-classification"})
    [counted] = count_inputs(str(stack.settings.models_dir / "tiny-bert"), Task.TEXT_CLASSIFICATION,
                             {"training_file": stack.tmp / "train.csv"}, [spec])
    assert r.json()["training_file"] == {"id": train, "rows": 10, **counted["training_file"]}
    wait_for(lambda: re.search(r"count \S+tiny-bert: 1 files, 1 specs, counted", worker.text()), timeout=10,
             what="the count in the worker's log", explain=lambda: worker.text()[-3000:])

    # torch lives in the prediction process only: the API answered a dry run without it.
    process = psutil.Process(worker.proc.pid)
    [child] = [p for p in process.children() if "worker.predict_child" in " ".join(p.cmdline())]
    assert _torch_loaded(child) and not _torch_loaded(process)
    api_process = psutil.Process(stack.servers[0].pid)
    assert not _torch_loaded(api_process)
