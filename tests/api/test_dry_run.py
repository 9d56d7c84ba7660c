"""`"dry_run": true` on a create: the request and its files checked as a create and validation check
them, an estimate answered (examples and tokens counted with the base model's tokenizer by a worker,
"auto" resolved, steps, tokens, a duration), and nothing stored, published or consumed; searches and
ensembles estimated whole; a measured basis once a comparable job of the tenant has finished. The
counting is a request on the workers' channel (lathe.predictions), answered here by `engine_worker`:
a predict pool in this process answering with the prediction process's own function; with no worker
serving, a dry run is a 503."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.ensemble import train_rows
from lathe.db.session import session_scope
from lathe.db.tables import File, Job, JobStatus, new_id, now
from lathe.queue import predict_queue
from lathe.throughput import FORMULA_FLOPS_PER_SECOND, STARTUP_SECONDS
from api.main import create_app
from tests.api.conftest import upload
from tests.api.test_basics import assert_error
from tests.api.test_jobs import JOBS, create, queued_messages
from tests.tiny_causal import chat_rows, save_tiny_llama, write_jsonl
from tests.tiny_models import save_tiny_bert, sentiment_rows

ROWS = sentiment_rows(40, seed=3)
VALID = sentiment_rows(12, seed=4)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("dry-run") / "tiny-bert")


@pytest.fixture
def model(settings, tiny_bert_dir) -> str:
    """A server model (LATHE_MODELS_DIR) named tiny-bert."""
    shutil.copytree(tiny_bert_dir, settings.models_dir / "tiny-bert")
    return "tiny-bert"


def csv_text(rows) -> str:
    return "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)


@pytest.fixture
def files(client, acme) -> dict[str, str]:
    train = upload(client, acme, name="train.csv", content=csv_text(ROWS)).json()["id"]
    valid = upload(client, acme, name="valid.csv", content=csv_text(VALID)).json()["id"]
    return {"training_file": train, "validation_file": valid}


def token_counts(model_dir: Path, rows, max_length: int = 128) -> list[int]:
    """Each row's tokens as the base model's own tokenizer counts them (special tokens included)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [len(tokenizer(r["text"], truncation=True, max_length=max_length)["input_ids"]) for r in rows]


def dry_run(client, headers, **body):
    return client.post(JOBS, headers=headers, json={**body, "dry_run": True})


def sqlite_only(db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("the worker's counting reads no database; the postgres runs of the other tests cover the reads")


def test_a_dry_run_counts_resolves_and_matches_the_job_training_then_runs(
        client, acme, model, files, settings, tiny_bert_dir, tmp_path, db_url, engine_worker):
    sqlite_only(db_url)
    r = dry_run(client, acme, model=model, **files, seed=11)
    assert r.status_code == 200, r.text
    est = r.json()
    # Counted by a worker, from the model folder and the stored files at the paths the API resolved.
    [request] = engine_worker
    assert request["kind"] == "count" and request["model"] == str(settings.models_dir / model)
    assert request["hub"] is False and request["offline"] is False
    with session_scope(settings.sqlalchemy_url) as s:
        assert request["files"] == {p: s.get(File, files[p]).path for p in files}
    tokens = token_counts(tiny_bert_dir, ROWS)
    assert est["object"] == "fine_tuning.job.estimate" and est["task"] == "text-classification"
    assert est["training_file"] == {"id": files["training_file"], "rows": 40, "examples": 40, "tokens": sum(tokens)}
    assert est["validation_file"]["tokens"] == sum(token_counts(tiny_bert_dir, VALID)) and est["test_file"] is None
    # auto on 40 rows: batch 8, 5 steps an epoch, epochs until 300 steps capped at 16.
    assert est["hyperparameters"] == {"n_epochs": 16, "batch_size": 8, "learning_rate_multiplier": 1.0}
    assert est["optimizer_steps"] == 80 and est["trained_tokens"] == 16 * sum(tokens) and est["evaluations"] == 16
    assert est["parameters"]["total"] > est["parameters"]["compute"] > 0  # the word table is no compute
    assert est["flops"] > 6 * est["parameters"]["compute"] * est["trained_tokens"]  # training, then evaluations
    assert est["basis"]["kind"] == "formula"  # no job of the tenant has finished
    assert est["estimated_duration_seconds"] == round(STARTUP_SECONDS + est["flops"] / FORMULA_FLOPS_PER_SECOND)

    # The same job, created for real, validated by the worker's task and trained by the engine.
    from core.engine import RunPaths, run
    from core.sink import ListSink
    from worker.tasks import validate_job

    job_id = create(client, acme, model=model, **files, seed=11).json()["id"]
    assert validate_job(job_id, settings=settings) == JobStatus.QUEUED
    with session_scope(settings.sqlalchemy_url) as s:
        spec = s.get(Job, job_id).job_spec()  # as validation resolved it (its task inferred)
        train, valid = (Path(s.get(File, files[p]).path) for p in ("training_file", "validation_file"))
    sink = ListSink()
    result = run(spec, RunPaths(str(settings.models_dir / model), train, valid, None, tmp_path / "work"), sink,
                 archive=False)
    assert result.trained_tokens == est["trained_tokens"]
    assert result.hyperparameters == est["hyperparameters"]
    assert max(step for step, split, _ in sink.rows if split == "train") == est["optimizer_steps"]
    assert sum(1 for _, split, _ in sink.rows if split == "valid") == est["evaluations"]


BAD_JSONL = ('{"text": "a good one", "label": "x"}\n{"text": "bad", "label": "y"}\n{"text": "fun"}\n'
             '{"text": "no", "label": "x"}\n')


def test_a_bad_file_is_the_400_validation_would_fail_the_job_with(client, acme, model, settings):
    train = upload(client, acme, name="train.jsonl", content=BAD_JSONL).json()["id"]
    err = assert_error(dry_run(client, acme, model=model, training_file=train), 400, param="training_file",
                       code="invalid_training_file")
    assert "line 3" in err["message"]
    # The same request, created for real and validated by the worker, fails the same way.
    from worker.tasks import validate_job

    job_id = create(client, acme, model=model, training_file=train).json()["id"]
    assert validate_job(job_id, settings=settings) == JobStatus.FAILED
    with session_scope(settings.sqlalchemy_url) as s:
        assert s.get(Job, job_id).error == {k: err[k] for k in ("code", "message", "param")}
    # ... and what a create refuses before it stores anything, a dry run refuses alike.
    good = upload(client, acme, content=csv_text(ROWS)).json()["id"]
    for body in ({"training_file": "file-nope"}, {"training_file": good, "hyperparameters": {"n_epochs": 0}},
                 {"training_file": good, "task": "text-classification", "config": {"packing": True}},
                 {"training_file": good, "model": "file-nope"}, {"training_file": good, "integrations": [{}]}):
        body = {"model": model, **body}
        real, dry = create(client, acme, **body), dry_run(client, acme, **body)
        assert real.status_code in (400, 404) and (dry.status_code, dry.json()) == (real.status_code, real.json())


def test_a_dry_run_stores_publishes_and_consumes_nothing(client, sdk, acme, model, files, settings, redis_client,
                                                        engine_worker):
    estimate = sdk.fine_tuning.jobs.create(model=model, training_file=files["training_file"],
                                           extra_headers={"Idempotency-Key": "k1"}, extra_body={"dry_run": True})
    # The SDK types the answer as a job; the estimate's fields are its attributes.
    assert estimate.object == "fine_tuning.job.estimate" and estimate.optimizer_steps > 0
    assert estimate.training_file["examples"] == 40
    assert client.get(JOBS, headers=acme).json()["data"] == []
    assert queued_messages(redis_client, settings) == []
    with session_scope(settings.sqlalchemy_url) as s:
        assert s.query(Job).count() == 0
    # The Idempotency-Key was not consumed: a real create with it makes a new job.
    real = client.post(JOBS, headers={**acme, "Idempotency-Key": "k1"},
                       json={"model": model, "training_file": files["training_file"]})
    assert real.status_code == 200 and real.json()["status"] == "validating_files"
    assert len(queued_messages(redis_client, settings)) == 1


def test_a_search_is_estimated_as_all_its_trials(client, acme, model, files, tiny_bert_dir, db_url, engine_worker):
    sqlite_only(db_url)
    space = {"hyperparameters.n_epochs": {"type": "categorical", "choices": [1, 2]},
             "hyperparameters.batch_size": {"type": "categorical", "choices": [8, 16]}}
    r = dry_run(client, acme, model=model, **files, config={"search": {"trials": 6, "sampler": "grid", "space": space}})
    assert r.status_code == 200, r.text
    est = r.json()
    tokens = sum(token_counts(tiny_bert_dir, ROWS))
    grid = [(epochs, batch) for epochs in (1, 2) for batch in (8, 16)]
    steps = [epochs * math.ceil(40 / batch) for epochs, batch in grid]  # 5, 3, 10, 6
    children = est["children"]
    assert children["kind"] == "trials" and children["count"] == 4  # the grid has 4 points, fewer than 6 trials
    assert children["per_child"]["optimizer_steps"] == {"min": 3, "mean": sum(steps) / 4, "max": 10}
    assert est["optimizer_steps"] == sum(steps) and est["trained_tokens"] == 6 * tokens
    per_trial = children["per_child"]["estimated_duration_seconds"]
    assert est["estimated_duration_seconds"] == pytest.approx(4 * per_trial["mean"], abs=1)
    assert est["estimated_duration_seconds"] >= 4 * STARTUP_SECONDS


def test_an_ensemble_is_estimated_as_its_members_and_combine(client, acme, model, files, tiny_bert_dir, db_url,
                                                             engine_worker):
    sqlite_only(db_url)
    r = dry_run(client, acme, model=model, **files, seed=5,
                config={"metric_for_best_model": "f1_macro", "ensemble": {"method": "bagging", "members": 3}})
    assert r.status_code == 200, r.text
    est = r.json()
    tokens = token_counts(tiny_bert_dir, ROWS)
    members = est["children"]["members"]
    assert est["children"]["kind"] == "members" and [m["member"] for m in members] == [0, 1, 2]
    for m in members:  # each member trains on its own bootstrap draw of the rows, as its job will
        drawn = train_rows("bootstrap", 40, seed=5, stream=m["member"])
        assert m["examples"] == 40
        assert m["trained_tokens"] == m["hyperparameters"]["n_epochs"] * sum(tokens[i] for i in drawn)
    assert len({m["trained_tokens"] for m in members}) > 1  # the draws differ
    assert est["trained_tokens"] == sum(m["trained_tokens"] for m in members)
    assert est["optimizer_steps"] == sum(m["optimizer_steps"] for m in members)
    combine = est["children"]["combine"]
    assert combine["models"] == 3 and combine["estimated_duration_seconds"] >= STARTUP_SECONDS
    assert est["estimated_duration_seconds"] == pytest.approx(
        sum(m["estimated_duration_seconds"] for m in members) + combine["estimated_duration_seconds"], abs=2)


def finished_job(settings, tenant: str, *, model: str, tokens: int, seconds: float, **values) -> None:
    from lathe.db.tables import Tenant

    with session_scope(settings.sqlalchemy_url) as s:
        tenant_id = s.query(Tenant).filter_by(name=tenant).one().id
        start = now() - 3600
        s.add(Job(id=new_id("ftjob"), tenant_id=tenant_id, status=values.pop("status", JobStatus.SUCCEEDED),
                  spec={"model": model, "training_file": "file-x", "task": "text-classification"}, model=model,
                  task="text-classification", training_file="file-x", result_files=[], seed=1,
                  attempt=values.pop("attempt", 1), trained_tokens=tokens, created_at=start, started_at=start,
                  finished_at=start + round(STARTUP_SECONDS + seconds), **values))


def test_the_duration_is_measured_once_a_comparable_job_has_finished(client, acme, model, files, settings,
                                                                    engine_worker):
    finished_job(settings, "acme", model=model, tokens=50_000, seconds=100)  # 500 tokens/s after start-up
    # Not comparable: another tenant's, a failed one, a retried one, a search's, another model of unknown size.
    finished_job(settings, "other", model=model, tokens=50_000, seconds=1)
    finished_job(settings, "acme", model=model, tokens=50_000, seconds=1, status=JobStatus.FAILED)
    finished_job(settings, "acme", model=model, tokens=50_000, seconds=1, attempt=2)
    finished_job(settings, "acme", model=model, tokens=50_000, seconds=1, search={"trials": []})
    finished_job(settings, "acme", model="another-model", tokens=50_000, seconds=1)
    r = dry_run(client, acme, model=model, training_file=files["training_file"])
    assert r.status_code == 200, r.text
    est = r.json()
    assert est["basis"]["kind"] == "measured" and est["basis"]["jobs"] == 1
    assert est["estimated_duration_seconds"] == round(STARTUP_SECONDS + est["trained_tokens"] / 500)


def test_what_the_engine_refuses_while_counting_is_the_workers_400(client, acme, settings, engine_worker, tmp_path):
    """Rows that max_length leaves without an answer token pass validation and fail the encoding on
    the worker: its EngineError comes back as the 400 training would fail the job with."""
    save_tiny_llama(settings.models_dir / "tiny-llama")
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8, seed=1)).read_text()
    train = upload(client, acme, name="chat.jsonl", content=chat).json()["id"]
    assert_error(dry_run(client, acme, model="tiny-llama", training_file=train, config={"max_length": 8}), 400,
                 param="config.max_length")
    assert [request["kind"] for request in engine_worker] == ["count"]
    assert dry_run(client, acme, model="tiny-llama", training_file=train).status_code == 200


def test_with_no_worker_serving_a_dry_run_is_a_503_and_its_request_is_taken_back(acme, model, files, settings,
                                                                                 redis_client):
    quick = settings.model_copy(update={"predict_timeout_seconds": 0.5})
    with TestClient(create_app(quick), raise_server_exceptions=False) as client:
        started = time.monotonic()
        r = dry_run(client, acme, model=model, **files)
    err = assert_error(r, 503, code="dry_run_unavailable")
    assert "No worker took the dry run's token count within 0.5 s" in err["message"]
    assert "LATHE_PREDICT_CONCURRENCY" in err["message"]
    assert time.monotonic() - started < 10
    assert redis_client.llen(predict_queue(settings)) == 0  # not left for a worker that comes later
