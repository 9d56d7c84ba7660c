"""Tenant isolation, as a matrix over EVERY route of the app.

Both tenants own one of everything (a dataset file, a model-archive file, a paused job and a
succeeded one with events, checkpoints and metrics, a fine-tuned model with its folder and .tar on
disk). Tenant B then calls every /v1 route with A's ids in the path, in the `after` cursors and in
the create-job body: each answer must be 404 with OpenAI's error body, and byte-for-byte the answer
for an id that never existed (so nothing, not even the message, tells B that A's object exists).
A positive control then makes the same calls as A and gets 2xx, so the 404s are not an accident of
a malformed request; and A's objects are unchanged afterwards.

`MATRIX` must name every (method, path) the app serves under /v1: a new route fails
`test_matrix_covers_every_route` until it is added here."""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lathe.db.tables import Checkpoint, Job, JobStatus, Metric, Model, new_id, now
from lathe.db.queries import add_event
from lathe.db.session import session_scope
from tests.api.conftest import upload
from tests.api.test_archives import CONFIG, WEIGHTS, make_zip
from tests.api.test_basics import assert_error

JOBS = "/v1/fine_tuning/jobs"
HEX_TAIL = re.compile(r"[0-9a-f]{24}$")
SHARED_KEY = "same-idempotency-key"
OPS_ROUTES = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}
DOC_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


@dataclass
class World:
    """One tenant's objects."""

    headers: dict[str, str]
    train: str  # purpose=fine-tune
    model_file: str  # purpose=model
    job: str  # paused (after validation), with events, checkpoints, metrics
    done_job: str  # succeeded, produced `ft_model`
    ft_model: str  # contains ':' and '/', as real fine-tuned model names can
    event: str
    checkpoint: str
    archive: Path
    webhook: str  # a webhook endpoint

    def ids(self) -> set[str]:
        return {self.train, self.model_file, self.job, self.done_job, self.ft_model, self.event, self.checkpoint,
                self.webhook}


def _populate(client, settings, headers: dict[str, str], name: str) -> World:
    train = upload(client, headers).json()["id"]
    r = upload(client, headers, name="tiny.zip", purpose="model",
               content=make_zip({"tiny/config.json": CONFIG, "tiny/model.safetensors": WEIGHTS}))
    assert r.status_code == 200, r.text
    model_file = r.json()["id"]
    jobs = []
    for key in (SHARED_KEY, None):
        extra = {"Idempotency-Key": key} if key else {}
        r = client.post(JOBS, headers={**headers, **extra},
                        json={"model": "bert-base-uncased", "training_file": train, "metadata": {"team": "shared"}})
        assert r.status_code == 200, r.text
        jobs.append(r.json()["id"])
    job, done_job = jobs
    ft_model = f"ft:org/bert-{name}:{name}:demo:{done_job}"
    folder = settings.models_store / name / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    archive = settings.models_store / name / "model.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(folder / "config.json", arcname="config.json")
    with session_scope(settings.sqlalchemy_url) as s:
        paused = s.get(Job, job)
        paused.status, paused.queued_at = JobStatus.PAUSED, now()
        done = s.get(Job, done_job)
        done.status, done.fine_tuned_model, done.finished_at = JobStatus.SUCCEEDED, ft_model, now()
        event = add_event(s, job_id=job, message=f"secret of {name}", type="metrics", data={"step": 1}).id
        checkpoint = new_id("ftckpt")
        s.add(Checkpoint(id=checkpoint, job_id=job, attempt=0, step=10, path=str(folder), metrics={"loss": 1.0},
                         created_at=now()))
        s.add(Metric(job_id=job, attempt=0, step=10, split="train", values={"loss": 1.0}, created_at=now()))
        s.add(Model(id=ft_model, tenant_id=done.tenant_id, job_id=done_job, task="text-classification",
                    path=str(folder), archive_path=str(archive), bytes=archive.stat().st_size, created_at=now()))
    r = client.post("/v1/webhook_endpoints", headers=headers, json={
        "name": name, "url": "https://93.184.215.14/hooks", "event_types": ["fine_tuning.job.succeeded"]})
    assert r.status_code == 200, r.text
    return World(headers, train, model_file, job, done_job, ft_model, event, checkpoint, archive, r.json()["id"])


@pytest.fixture
def worlds(client, settings, acme, other, predictor):
    # predictor: a worker's predict pool in this process; its stand-in records every request it is handed.
    settings.webhook_timeout_seconds = 0.5  # the owner's /test of its endpoint (no network here) gives up fast
    return _populate(client, settings, acme, "acme"), _populate(client, settings, other, "other"), predictor


# --- the matrix ----------------------------------------------------------------------------------
# (method, path) -> how to call it as a tenant with a target's ids: a list of requests, each
# (path params, request kwargs), built by a function of (target world, caller world). `None` in a
# value means "the target's id here". A route with path params gets one request per target id.

PATH_IDS = {  # path parameter -> the target's ids it is tried with
    "file_id": lambda w: [w.train, w.model_file],
    "fine_tuning_job_id": lambda w: [w.job, w.done_job],
    "model": lambda w: [w.ft_model],
    "webhook_endpoint_id": lambda w: [w.webhook],
}


def _body_cases(t: World, me: World) -> list[dict[str, Any]]:
    """Create-job bodies where exactly one reference is the target's (the rest are the caller's)."""
    base = {"model": "bert-base-uncased", "training_file": me.train}
    return [
        {**base, "training_file": t.train},
        {**base, "training_file": t.model_file},  # the owner gets 400 (wrong purpose), a stranger 404
        {**base, "validation_file": t.train},
        {**base, "test_file": t.train},
        {**base, "model": t.model_file},
        {**base, "model": t.ft_model},
    ]


MATRIX: dict[tuple[str, str], Any] = {
    ("POST", "/v1/files"): "own-create",  # addresses nothing; see test_created_objects_stay_private
    ("GET", "/v1/files"): lambda t, me: [{"params": {"after": t.train}}, {"params": {"after": t.model_file}}],
    ("GET", "/v1/files/{file_id}"): lambda t, me: [{}],
    ("DELETE", "/v1/files/{file_id}"): lambda t, me: [{}],
    ("GET", "/v1/files/{file_id}/content"): lambda t, me: [{}],
    ("POST", JOBS): lambda t, me: [{"json": b} for b in _body_cases(t, me)],
    ("GET", JOBS): lambda t, me: [{"params": {"after": t.job}}, {"params": {"after": t.done_job}}],
    ("GET", JOBS + "/{fine_tuning_job_id}"): lambda t, me: [{}],
    ("POST", JOBS + "/{fine_tuning_job_id}/cancel"): lambda t, me: [{}],
    ("POST", JOBS + "/{fine_tuning_job_id}/pause"): lambda t, me: [{}],
    ("POST", JOBS + "/{fine_tuning_job_id}/resume"): lambda t, me: [{}],
    ("GET", JOBS + "/{fine_tuning_job_id}/events"): lambda t, me: [
        {}, {"params": {"stream": "true"}}, {"params": {"after": t.event}},
        {"params": {"stream": "true"}, "headers": {"Last-Event-ID": t.event}},
        {"own_path": me.job, "params": {"after": t.event}},  # A's cursor on B's own job
        {"own_path": me.job, "params": {"stream": "true", "after": t.event}},
    ],
    ("GET", JOBS + "/{fine_tuning_job_id}/checkpoints"): lambda t, me: [
        {}, {"params": {"after": t.checkpoint}}, {"own_path": me.job, "params": {"after": t.checkpoint}}],
    ("GET", JOBS + "/{fine_tuning_job_id}/metrics"): lambda t, me: [{}, {"params": {"split": "train"}}],
    ("GET", "/v1/models"): lambda t, me: [],  # no id to pass; see test_lists_never_mix_tenants
    ("GET", "/v1/models/{model:path}"): lambda t, me: [{}],
    ("DELETE", "/v1/models/{model:path}"): lambda t, me: [{}],
    ("GET", "/v1/models/{model:path}/content"): lambda t, me: [{}],
    ("POST", "/v1/models/{model:path}/predict"): lambda t, me: [{"json": {"inputs": ["hello"], "top_k": 1}}],
    ("POST", "/v1/webhook_endpoints"): "own-create",
    ("GET", "/v1/webhook_endpoints"): lambda t, me: [{"params": {"after": t.webhook}}],
    ("GET", "/v1/webhook_endpoints/{webhook_endpoint_id}"): lambda t, me: [{}],
    ("POST", "/v1/webhook_endpoints/{webhook_endpoint_id}"): lambda t, me: [{"json": {"name": "mine now"}}],
    ("DELETE", "/v1/webhook_endpoints/{webhook_endpoint_id}"): lambda t, me: [{}],
    ("POST", "/v1/webhook_endpoints/{webhook_endpoint_id}/rotate_secret"): lambda t, me: [
        {"json": {"keep_old_secret_active_for_24_hours": True}}],
    ("POST", "/v1/webhook_endpoints/{webhook_endpoint_id}/test"): lambda t, me: [
        {"json": {"event_type": "fine_tuning.job.succeeded"}}],
    ("GET", "/v1/webhook_endpoints/{webhook_endpoint_id}/deliveries"): lambda t, me: [{}],
    ("GET", "/v1/webhook_event_types"): lambda t, me: [],  # the same list for everyone
}
LISTS = [("/v1/files", {}), ("/v1/files", {"purpose": "model"}), ("/v1/files", {"purpose": "fine-tune"}),
         ("/v1/files", {"order": "asc"}), (JOBS, {}), (JOBS, {"metadata[team]": "shared"}), ("/v1/models", {}),
         ("/v1/webhook_endpoints", {})]


def _routes(app) -> set[tuple[str, str]]:
    """Every (method, path) the app serves, routers included (FastAPI may nest them lazily)."""
    out: set[tuple[str, str]] = set()

    def walk(routes) -> None:
        for route in routes:
            if hasattr(route, "effective_route_contexts"):
                for ctx in route.effective_route_contexts():
                    methods = getattr(ctx.original_route, "methods", None) or {"*"}
                    out.update((m, ctx.path) for m in methods)
            elif hasattr(route, "routes") and not hasattr(route, "methods"):
                walk(route.routes)
            else:
                out.update((m, route.path) for m in (getattr(route, "methods", None) or {"*"}))

    walk(app.routes)
    # The OpenAPI schema is a second, public view of the same routes: nothing may hide from the walk.
    for path, item in app.openapi()["paths"].items():
        out.update((m.upper(), path) for m in item)
    return {(m, p) for m, p in out if m not in ("HEAD", "OPTIONS")}


def _normalise(path: str) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", path)


def test_matrix_covers_every_route(app):
    served = {(m, _normalise(p)) for m, p in _routes(app)}
    v1 = {r for r in served if r[1].startswith("/v1")}
    matrix = {(m, _normalise(p)) for m, p in MATRIX}
    assert v1 - matrix == set(), "routes missing from the isolation matrix"
    assert matrix - v1 == set(), "stale routes in the isolation matrix"
    others = {r for r in served - v1 if r[1] not in DOC_ROUTES}
    assert others == OPS_ROUTES, "a non-/v1 route must be tenant-free (or move under /v1 and into MATRIX)"


def _requests(t: World, me: World) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, url, kwargs) for every matrix entry, aimed at `t`'s objects by the caller `me`."""
    out = []
    for (method, template), make in MATRIX.items():
        if not callable(make):
            continue
        names = re.findall(r"\{(\w+)(?::\w+)?\}", template)
        for kwargs in make(t, me):
            kwargs = dict(kwargs)
            own = kwargs.pop("own_path", None)
            if not names:
                out.append((method, template, kwargs))
                continue
            assert len(names) == 1, template
            values = [own] if own else PATH_IDS[names[0]](t)
            for value in values:
                out.append((method, re.sub(r"\{\w+(:\w+)?\}", value, template), kwargs))
    return out


def _swap(obj: Any, old: set[str], fake: dict[str, str]) -> Any:
    """`obj` with every id of `old` (also inside strings) replaced by its never-existing twin."""
    if isinstance(obj, str):
        for o in sorted(old, key=len, reverse=True):
            obj = obj.replace(o, fake[o])
        return obj
    if isinstance(obj, dict):
        return {_swap(k, old, fake): _swap(v, old, fake) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_swap(v, old, fake) for v in obj]
    return obj


def _fake(value: str) -> str:
    """An id of the same shape that no tenant has."""
    assert HEX_TAIL.search(value), value
    return HEX_TAIL.sub(new_id("x")[-24:], value)


def test_stranger_gets_404_everywhere(client, settings, worlds):
    a, b, predictor = worlds
    a_ids = a.ids()
    fakes = {i: _fake(i) for i in a_ids}
    requests = _requests(a, b)
    assert len(requests) >= 30
    for method, url, kwargs in requests:
        kwargs = {**kwargs, "headers": {**b.headers, **kwargs.get("headers", {})}}
        r = client.request(method, url, **kwargs)
        what = f"{method} {url} {kwargs.get('params') or kwargs.get('json') or ''}"
        assert r.status_code == 404, f"{what} -> {r.status_code} {r.text}"
        err = assert_error(r, 404)
        assert err["type"] == "invalid_request_error", what
        # The same request with ids that never existed answers exactly the same.
        ghost = client.request(_swap(method, a_ids, fakes), _swap(url, a_ids, fakes), **_swap(kwargs, a_ids, fakes))
        assert ghost.status_code == 404, what
        assert _swap(r.json(), a_ids, fakes) == ghost.json(), what
        assert "secret of acme" not in r.text
    assert not predictor.calls, "B's predict call reached a worker"
    _assert_untouched(client, settings, a)


def _assert_untouched(client, settings, w: World) -> None:
    h = w.headers
    assert client.get(f"/v1/files/{w.train}", headers=h).status_code == 200
    assert client.get(f"/v1/files/{w.model_file}", headers=h).status_code == 200
    assert (settings.files_dir / w.model_file / "model" / "config.json").is_file()
    assert client.get(f"{JOBS}/{w.job}", headers=h).json()["status"] == "paused"
    assert client.get(f"{JOBS}/{w.done_job}", headers=h).json()["status"] == "succeeded"
    assert client.get(f"/v1/models/{w.ft_model}", headers=h).status_code == 200
    assert w.archive.is_file()
    hook = client.get(f"/v1/webhook_endpoints/{w.webhook}", headers=h).json()
    assert hook["name"] in ("acme", "other") and hook["updated_at"] == hook["created_at"]  # not renamed, not rotated
    assert [e["id"] for e in client.get(f"{JOBS}/{w.job}/events", headers=h).json()["data"]][0] == w.event


# The owner's calls, in an order where each is legal (destructive ones last).
def _owner_order(req: tuple[str, str, dict]) -> tuple[int, int]:
    method, url, _ = req
    steps = ["/resume", "/pause", "/cancel", "/predict"]
    for i, step in enumerate(steps):
        if url.endswith(step):
            return (1, i)
    return {"GET": (0, 0), "POST": (1, -1), "DELETE": (2, 0 if "/models/" in url else 1)}[method]


def test_owner_gets_2xx_for_the_same_requests(client, worlds):
    """The positive control: the matrix's requests are well-formed and hit real objects."""
    a, _b, predictor = worlds
    for method, url, kwargs in sorted(_requests(a, a), key=_owner_order):
        if "after" in kwargs.get("params", {}) or "Last-Event-ID" in kwargs.get("headers", {}):
            continue  # a cursor on its own object just pages; covered by the route's own tests
        if kwargs.get("params", {}).get("stream") and a.done_job not in url:
            continue  # the stream of an unfinished job never ends; the finished job's stream is tried
        kwargs = {**kwargs, "headers": {**a.headers, **kwargs.get("headers", {})}}
        r = client.request(method, url, **kwargs)
        what = f"{method} {url} {kwargs.get('json') or ''}"
        if url.endswith(f"/files/{a.model_file}/content"):
            assert_error(r, 400, code="content_unavailable")  # extracted, not downloadable
        elif method == "POST" and url == JOBS and kwargs["json"]["training_file"] == a.model_file:
            assert_error(r, 400, param="training_file")  # the owner learns the purpose, a stranger nothing
        elif a.done_job in url and url.endswith(("/cancel", "/pause", "/resume")):
            assert_error(r, 409)  # the owner learns the state, a stranger nothing
        elif url.endswith(f"/webhook_endpoints/{a.webhook}/test"):
            assert_error(r, 400, code="webhook_unreachable")  # sent (no network here); a stranger's never is
        else:
            assert 200 <= r.status_code < 300, f"{what} -> {r.status_code} {r.text}"
        if method == "POST" and url == JOBS and r.status_code == 200:
            # A new job would pin the files and model it uses; cancel it so the deletes below can run.
            assert client.post(f"{JOBS}/{r.json()['id']}/cancel", headers=a.headers).status_code == 200
    assert [call["model"] for call in predictor.calls] == [str(a.archive.with_suffix(""))]  # A's folder


def test_lists_never_mix_tenants(client, worlds):
    a, b, _ = worlds
    own = {id(a): a.ids(), id(b): b.ids()}
    for me, them in ((a, b), (b, a)):
        seen: set[str] = set()
        for path, params in LISTS:
            r = client.get(path, headers=me.headers, params=params)
            assert r.status_code == 200, r.text
            ids = {o["id"] for o in r.json()["data"]}
            assert ids.isdisjoint(own[id(them)]), (path, params)
            org = client.get(f"{JOBS}/{me.job}", headers=me.headers).json()["organization_id"]
            owners = {o.get("owned_by") or o.get("organization_id") for o in r.json()["data"]} - {None}
            assert owners <= {org}, (path, params)
            seen |= ids
        assert {me.train, me.model_file, me.job, me.done_job, me.ft_model} <= seen
        for sub in ("events", "checkpoints"):
            data = client.get(f"{JOBS}/{me.job}/{sub}", headers=me.headers).json()["data"]
            assert {o["id"] for o in data}.isdisjoint(own[id(them)])
            assert {me.event if sub == "events" else me.checkpoint} <= {o["id"] for o in data}


def test_created_objects_stay_private(client, worlds):
    """POST /v1/files and POST /v1/fine_tuning/jobs make the caller's own objects, never visible to
    the other tenant; the same Idempotency-Key in two tenants names two different jobs."""
    a, b, _ = worlds
    new_file = upload(client, b.headers, name="again.csv").json()["id"]
    assert_error(client.get(f"/v1/files/{new_file}", headers=a.headers), 404)
    r = client.post(JOBS, headers={**b.headers, "Idempotency-Key": SHARED_KEY},
                    json={"model": "bert-base-uncased", "training_file": b.train, "metadata": {"team": "shared"}})
    assert r.status_code == 200 and r.json()["id"] == b.job  # B's own job for the key, not A's
    r = client.post(JOBS, headers={**b.headers, "Idempotency-Key": "b-only"},
                    json={"model": "bert-base-uncased", "training_file": b.train})
    assert r.status_code == 200
    assert_error(client.get(f"{JOBS}/{r.json()['id']}", headers=a.headers), 404)
    assert r.json()["id"] not in {j["id"] for j in client.get(JOBS, headers=a.headers).json()["data"]}
    assert new_file not in {f["id"] for f in client.get("/v1/files", headers=a.headers).json()["data"]}
