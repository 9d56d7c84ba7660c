"""schemathesis against the app's own OpenAPI schema, with two tenants' keys.

- Stateless: every operation, generated requests (valid and invalid), sent as tenant A; then the
  same request with every id in it (path, `after` cursor, the create-job body's file and model
  fields) swapped for one of A's real objects, sent once as tenant B and once as A.
- Stateful: schemathesis' state machine chains operations through the links it infers from the
  schema (a created file's id into the job body, a job's id into cancel/pause/events, ...), as A;
  every step is replayed as B.

Every answer must be a non-5xx that conforms to the schema (status code documented, content type,
body, headers), and B never gets a 2xx for a request that names one of A's objects, nor sees one
of A's ids in any 2xx body. Requests run in-process through the ASGI app (SQLite and PostgreSQL,
like the other API tests; Redis db 12 for the job messages).

LATHE_SCHEMATHESIS_EXAMPLES (default 12) sets the examples per operation; the stateful run gets
a matching number of scenarios. The defaults keep the file near a minute on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis.errors import FlakyStrategyDefinition
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ensure_resource_availability,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    use_after_free,
)

from lathe.db.tables import Base, Job, JobStatus, Model, now
from lathe.db.session import engine_for, session_scope
from api.main import create_app
from lathe.settings import Settings
from tests.api.conftest import CSV, bearer, upload
from tests.api.test_archives import CONFIG, WEIGHTS, make_zip
from tests.api.test_fuzz import multipart

REDIS_URL = "redis://127.0.0.1:6379/12"
N = int(os.environ.get("LATHE_SCHEMATHESIS_EXAMPLES", "12"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
# An SSE stream of an unfinished job never ends: schemathesis keeps what arrived before this deadline.
CALL_TIMEOUT = 2.0
ID_FIELDS = ("training_file", "validation_file", "test_file", "model")


@pytest.fixture
def settings(db_url: str, tmp_path: Path):
    """The conftest's settings with this file's own Redis db (12) for the messages jobs publish, and
    no rate limits or job quota: a generated 429 would say nothing about the schema, and a quota
    reached early would stop every later job creation (the limits have their own tests)."""
    queue = f"lathe-schemathesis-{secrets.token_hex(4)}"
    yield Settings(data_dir=tmp_path / "data", database_url=db_url, redis_url=REDIS_URL, queue=queue,
                   models_dir=tmp_path / "models", rate_limit=None, upload_rate_limit=None,
                   max_active_jobs=1_000_000)
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"*{queue}*"))
    if keys:
        client.delete(*keys)
    client.close()


@dataclass
class Owned:
    """Tenant A's real objects, by the kind of id a request can carry."""

    dataset: str
    model_file: str
    job: str
    done_job: str
    ft_model: str

    def ids(self) -> set[str]:
        return {self.dataset, self.model_file, self.job, self.done_job, self.ft_model}


def _populate(client, settings: Settings, headers: dict[str, str]) -> Owned:
    """A's dataset, model file, a paused job, a succeeded job and its fine-tuned model (with a .tar)."""
    dataset = upload(client, headers).json()["id"]
    r = upload(client, headers, name="m.zip", purpose="model",
               content=make_zip({"config.json": CONFIG, "model.safetensors": WEIGHTS}))
    assert r.status_code == 200, r.text
    model_file = r.json()["id"]
    jobs = []
    for _ in range(2):
        r = client.post("/v1/fine_tuning/jobs", headers=headers, json={"model": "bert-base-uncased", "training_file": dataset})
        assert r.status_code == 200, r.text
        jobs.append(r.json()["id"])
    ft_model = f"ft:bert-base-uncased:acme:st:{jobs[1]}"
    folder = settings.models_store / jobs[1] / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    archive = folder.parent / "model.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(folder / "config.json", arcname="config.json")
    with session_scope(settings.sqlalchemy_url) as s:
        s.get(Job, jobs[0]).status = JobStatus.PAUSED
        done = s.get(Job, jobs[1])
        done.status, done.fine_tuned_model, done.finished_at = JobStatus.SUCCEEDED, ft_model, now()
        s.add(Model(id=ft_model, tenant_id=done.tenant_id, job_id=done.id, task="text-classification",
                    path=str(folder), archive_path=str(archive), bytes=archive.stat().st_size, created_at=now()))
    return Owned(dataset, model_file, jobs[0], jobs[1], ft_model)


def _reset(settings: Settings) -> None:
    """Every object of every tenant gone (tenants and keys stay), rows and folders."""
    with engine_for(settings.sqlalchemy_url).begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            if table.name not in ("tenants", "api_keys"):
                conn.execute(table.delete())
    for folder in (settings.files_dir, settings.models_store, settings.jobs_dir):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def owned(client, settings, acme, predictor) -> Owned:
    predictor.respond = lambda request: {"predictions": [[] for _ in request["inputs"]]}  # no model is loaded here
    return _populate(client, settings, acme)


@pytest.fixture
def api_schema(app):
    """The app's schema as schemathesis reads it; requests go to the app in-process. (Examples and
    steps are set per test with Hypothesis settings.)"""
    yield schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis.Config())
    # schemathesis started the app's lifespan and would keep it (and its database pool) for the process.
    asgi.shutdown_lifespans()


def _v1_operations() -> list[tuple[str, str]]:
    """(METHOD, path) of every /v1 operation in the schema (/healthz, /readyz, /metrics are tenant-free)."""
    spec = create_app(Settings(data_dir=Path("/nonexistent"), redis_url=REDIS_URL)).openapi()
    return [(m.upper(), p) for p, item in spec["paths"].items() if p.startswith("/v1/") for m in item]


# --- the schema itself and what schemathesis found -----------------------------------------------

def test_schema_documents_errors_as_openai_bodies(app):
    """Every /v1 operation documents 400, 401, 422 and 429, and every error it documents has OpenAI's
    body; FastAPI's default 422 body (`{"detail": [...]}`), which the API never sends, is gone."""
    spec = app.openapi()
    assert "HTTPValidationError" not in json.dumps(spec)
    error_ref = "#/components/schemas/ErrorResponse"
    for method, path in _v1_operations():
        responses = spec["paths"][path][method.lower()]["responses"]
        assert {"200", "400", "401", "422", "429"} <= set(responses), (method, path)
        for status, response in responses.items():
            if not status.startswith("2"):
                assert response["content"]["application/json"]["schema"]["$ref"] == error_ref, (method, path, status)
    upload_body = spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload_body["required"] == ["file", "purpose"]
    assert upload_body["properties"]["purpose"]["enum"] == ["fine-tune", "model"]


JOBS = "/v1/fine_tuning/jobs"
# A NUL character anywhere a value reaches a query: PostgreSQL refuses it ("text fields cannot contain
# NUL"), which was a 500 on each of these until schemathesis found one (now 400 on PostgreSQL, 404 on SQLite).
NUL_REQUESTS = [
    ("GET", "/v1/files/a%00b", {}), ("DELETE", "/v1/files/a%00b", {}), ("GET", "/v1/files/a%00b/content", {}),
    ("GET", "/v1/files", {"params": {"after": "a\x00"}}), ("GET", "/v1/files", {"params": {"purpose": "a\x00"}}),
    ("GET", JOBS, {"params": {"after": "a\x00"}}), ("GET", JOBS, {"params": {"metadata[a\x00]": "x"}}),
    ("GET", JOBS, {"params": {"metadata[a]": "x\x00"}}), ("GET", JOBS + "/a%00", {}),
    ("POST", JOBS + "/a%00/cancel", {}), ("GET", JOBS + "/{job}/events", {"params": {"after": "a\x00"}}),
    ("GET", JOBS + "/{job}/checkpoints", {"params": {"after": "a\x00"}}),
    ("GET", "/v1/models/a%00", {}), ("GET", "/v1/models/a%00/content", {}), ("DELETE", "/v1/models/a%00", {}),
    ("POST", "/v1/models/a%00/predict", {"json": {"inputs": ["x"]}}),
    ("POST", JOBS, {"json": {"model": "bert-base-uncased", "training_file": "a\x00"}}),
    ("POST", JOBS, {"json": {"model": "bert-base-uncased", "training_file": "{train}", "validation_file": "a\x00"}}),
    ("POST", JOBS, {"json": {"model": "a\x00", "training_file": "{train}"}}),
    ("POST", JOBS, {"json": {"model": "file-a\x00", "training_file": "{train}"}}),
]


def test_found_by_schemathesis(client, acme, train_file):
    """Requests that were 500s until schemathesis found them: now a 4xx with OpenAI's body."""
    body = {"model": "bert-base-uncased", "training_file": train_file}
    for _ in range(2):  # the second empty key used to hit the unique index on (tenant, key)
        r = client.post("/v1/fine_tuning/jobs", headers={**acme, "Idempotency-Key": ""}, json=body)
        assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    job = client.post("/v1/fine_tuning/jobs", headers=acme, json=body).json()["id"]
    for step, status in ((2**31 - 1, 200), (2**31, 422), (2**63, 422)):  # past PostgreSQL's INTEGER / SQLite's int64
        r = client.get(f"/v1/fine_tuning/jobs/{job}/metrics", headers=acme, params={"after_step": step})
        assert r.status_code == status, (step, r.text)
    for method, url, kwargs in NUL_REQUESTS:
        kwargs = json.loads(json.dumps(kwargs).replace("{train}", train_file))
        r = client.request(method, url.replace("{job}", job), headers=acme, **kwargs)
        # A list filtered on a value no row has is empty (SQLite); anything else is a refusal.
        allowed = (200, 400, 404) if method == "GET" and url in ("/v1/files", JOBS) else (400, 404)
        assert r.status_code in allowed, (method, url, kwargs, r.status_code, r.text)
        if r.status_code == 200:
            assert r.json()["data"] == [], (method, url, kwargs)
        else:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# --- helpers -------------------------------------------------------------------------------------

def _no_endless_stream(case) -> None:
    """`stream=true` on a job that never finishes (no worker here) would only be cut by the timeout."""
    if case.query and str(case.query.get("stream", "")).lower() in ("1", "true", "on", "yes", "t", "y"):
        case.query = {**case.query, "stream": "false"}


def _assert_b_learns_nothing(response, a_ids: set[str], what: str) -> None:
    assert response.status_code < 500, f"{what} as B -> {response.status_code} {response.text[:500]}"
    if 200 <= response.status_code < 300:
        leaked = {i for i in a_ids if i in response.text}
        assert not leaked, f"{what} as B -> {response.status_code} shows A's {leaked}"


def _with_a_ids(case, a: Owned) -> list[tuple[Any, str]]:
    """Copies of `case` where each id it carries names one of A's objects (one per kind of object)."""
    params = dict(case.path_parameters or {})
    out = []
    swaps: list[dict[str, Any]] = []
    if "file_id" in params:
        swaps += [{"path": {"file_id": a.dataset}}, {"path": {"file_id": a.model_file}}]
    if "fine_tuning_job_id" in params:
        swaps += [{"path": {"fine_tuning_job_id": a.job}}, {"path": {"fine_tuning_job_id": a.done_job}}]
    if "model" in params:
        swaps += [{"path": {"model": a.ft_model}}]
    if case.query and "after" in case.query:
        cursor = {"/v1/files": a.dataset, "/v1/fine_tuning/jobs": a.job}.get(case.path, a.job)
        swaps += [{"query": {"after": cursor}}]
    if isinstance(case.body, dict) and case.path == "/v1/fine_tuning/jobs" and case.method.upper() == "POST":
        swaps += [{"body": {"training_file": a.dataset}}, {"body": {"model": a.model_file}},
                  {"body": {"model": a.ft_model}}, {"body": {"validation_file": a.dataset}}]
    for swap in swaps:
        copy = case.operation.Case(
            path_parameters={**params, **swap.get("path", {})},
            query={**(case.query or {}), **swap.get("query", {})} if case.query is not None or "query" in swap else None,
            headers=case.headers, cookies=case.cookies,
            body={**case.body, **swap["body"]} if "body" in swap else case.body,
            media_type=case.media_type,
        )
        out.append((copy, f"{case.method.upper()} {case.path} {swap}"))
    return out


# --- stateless -----------------------------------------------------------------------------------

def _strategy(operation):
    """Valid requests, and invalid ones where the operation has something to get wrong (query, body)."""
    strategy = operation.as_strategy(GenerationMode.POSITIVE)
    if any(p.location != "path" for p in operation.iter_parameters()) or operation.body:
        strategy = strategy | operation.as_strategy(GenerationMode.NEGATIVE)
    return strategy


@pytest.mark.parametrize("method, path", _v1_operations())
def test_stateless(api_schema, keys, owned, method, path):
    """Generated requests as A; then with A's real ids, as B (never a 2xx) and as A (never a 5xx)."""
    operation = api_schema[path][method]
    a_headers, b_headers = bearer(keys["acme"]), bearer(keys["other"])

    @hsettings(max_examples=N, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=_strategy(operation))
    def run(case):
        _no_endless_stream(case)
        case.call_and_validate(headers=a_headers, checks=CHECKS, timeout=CALL_TIMEOUT)
        for copy, what in _with_a_ids(case, owned):
            r = copy.call(headers=b_headers, timeout=CALL_TIMEOUT)
            assert not 200 <= r.status_code < 300, f"{what} as B -> {r.status_code} {r.text[:500]}"
            _assert_b_learns_nothing(r, owned.ids(), what)
            copy.validate_response(r, checks=CHECKS, headers=b_headers)
            if method != "DELETE":  # A deleting its own objects would empty the later probes
                copy.call_and_validate(headers=a_headers, checks=CHECKS, timeout=CALL_TIMEOUT)
        if not case.path_parameters:
            r = case.call(headers=b_headers, timeout=CALL_TIMEOUT)
            _assert_b_learns_nothing(r, owned.ids(), f"{method} {path}")

    run()


# --- stateful ------------------------------------------------------------------------------------

def _valid_upload(case) -> None:
    """A generated upload with a real purpose gets a real file (a CSV, or a model zip), so that the
    links from its id (a job's training_file or model, GET/DELETE the file) lead somewhere."""
    if (case.method.upper(), case.path) != ("POST", "/v1/files") or not isinstance(case.body, dict):
        return
    purpose = case.body.get("purpose")
    if purpose == "fine-tune":
        name, content = b"train.csv", CSV.encode()
    elif purpose == "model":
        name, content = b"m.zip", make_zip({"config.json": CONFIG, "model.safetensors": WEIGHTS})
    else:
        return
    body, ctype = multipart(name, content, purpose)
    case.body = body
    case.headers = {**(case.headers or {}), "Content-Type": ctype}


def _trainable(case, known: set[str]) -> None:
    """A job body whose training_file came through a link gets a base model that resolves (a hub
    id), unless the link gave it one: a random `model` would stop every chain at 404 model_not_found,
    and the chains past job creation (cancel, pause, resume, events) would never run."""
    body = case.body
    if (case.method.upper(), case.path) != ("POST", "/v1/fine_tuning/jobs") or not isinstance(body, dict):
        return
    if body.get("training_file") in known and body.get("model") not in known:
        case.body = {**body, "model": "bert-base-uncased"}


def _names_any(case, ids: set[str]) -> bool:
    """Whether the request carries one of `ids` (in the path, the query or a JSON body)."""
    parts = [case.path_parameters, case.query]
    if not isinstance(case.body, bytes):
        parts.append(case.body)
    text = json.dumps(parts, default=str)
    return any(i in text for i in ids)


def test_stateful(api_schema, client, settings, keys, owned):
    """Chains of operations along the schema's links as A, each step replayed as B just before A
    makes it: B never gets a 2xx for a request naming A's objects (so B's DELETE or cancel of A's
    object can't have happened when A's own call then succeeds), no 2xx shows either tenant the
    other's ids, and A's answers pass the schema checks plus schemathesis' stateful ones (a created
    object is found, a deleted one is gone). Each scenario starts from the same state (A's objects
    made anew)."""
    a_headers, b_headers = bearer(keys["acme"]), bearer(keys["other"])
    a_ids: set[str] = set()
    b_ids: set[str] = set()
    stats = {"scenarios": 0, "steps": 0, "a_2xx": 0, "a_created": 0, "b_refused": 0}
    failures: list[BaseException] = []
    checks = [*CHECKS, use_after_free, ensure_resource_availability]

    def recorded(method):
        """Keep every failure: Hypothesis' replay of a scenario against a live service may differ
        and end in a Flaky error, which must not hide what failed."""
        def wrapper(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                failures.append(exc)
                raise
        return wrapper

    class TwoTenants(api_schema.as_state_machine()):
        def setup(self):
            _reset(settings)
            a_ids.clear()
            b_ids.clear()
            a_ids.update(_populate(client, settings, a_headers).ids())
            stats["scenarios"] += 1

        @recorded
        def before_call(self, case):
            _no_endless_stream(case)
            _valid_upload(case)
            _trainable(case, a_ids)
            what = f"{case.method.upper()} {case.formatted_path} {case.query or ''}"
            named = _names_any(case, a_ids)
            r = case.call(headers=b_headers, timeout=CALL_TIMEOUT)
            assert r.status_code < 500, f"{what} as B -> {r.status_code} {r.text[:500]}"
            case.validate_response(r, checks=CHECKS, headers=b_headers)
            if named:
                assert not 200 <= r.status_code < 300, f"{what} names A's object; as B -> {r.status_code} {r.text[:500]}"
                stats["b_refused"] += 1
            elif 200 <= r.status_code < 300:
                _assert_b_learns_nothing(r, a_ids, what)
                if case.method.upper() == "POST" and case.path in ("/v1/files", "/v1/fine_tuning/jobs"):
                    b_ids.add(r.json()["id"])

        def get_call_kwargs(self, case):
            return {"headers": a_headers, "timeout": CALL_TIMEOUT}

        @recorded
        def after_call(self, response, case):
            super().after_call(response, case)
            stats["steps"] += 1
            if 200 <= response.status_code < 300:
                stats["a_2xx"] += 1
                leaked = {i for i in b_ids if i in response.text}
                assert not leaked, f"{case.method.upper()} {case.formatted_path} as A shows B's {leaked}"
                if case.method.upper() == "POST" and case.path in ("/v1/files", "/v1/fine_tuning/jobs"):
                    a_ids.add(response.json()["id"])
                    stats["a_created"] += 1

        @recorded
        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=checks, headers=a_headers, transport_kwargs=kwargs,
                                   recorder=self.recorder)

    # No shrinking: replaying a scenario against real state is not exact; the first failure is reported
    # with the request that failed (schemathesis' message has a curl line).
    run_settings = hsettings(max_examples=N, stateful_step_count=8, deadline=None, database=None,
                             phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    for _ in range(3):
        try:
            TwoTenants.run(settings=run_settings)
            break
        except FlakyStrategyDefinition:
            # Which links a step can follow depends on the service's answers, which Hypothesis can't
            # replay exactly; schemathesis' own runner restarts the suite too.
            if failures:
                break
    if failures:
        raise failures[0]
    # The chains reached real objects: A made some, and B was refused A's objects.
    assert stats["scenarios"] >= N and stats["a_created"] > 0 and stats["b_refused"] > 0, stats
