"""A hub id fails fast when the hub can't deliver it: `resolve_model` (create, validation and run)
probes HF_ENDPOINT for at most LATHE_HUB_PROBE_SECONDS, keeps the answer, honours HF_HUB_OFFLINE
and accepts a model already in the local cache. The hubs here are local stand-ins."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from lathe.db.session import engine_for, session_scope
from lathe.db.tables import Base, JobStatus, Tenant, new_id, now
from lathe.errors import BadRequest
from lathe.model_source import forget_hub_answers, hub_reachable, resolve_model
from lathe.settings import Settings
from tests.hub_stub import ClosedPort, SilentHub, StubHub, as_hf_endpoint

MODEL = "HuggingFaceTB/SmolLM2-135M"


@pytest.fixture(autouse=True)
def hub_env(monkeypatch, tmp_path) -> Iterator[None]:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # empty: nothing is cached
    forget_hub_answers()
    yield
    forget_hub_answers()


@pytest.fixture
def stub(monkeypatch) -> Iterator[StubHub]:
    with as_hf_endpoint(monkeypatch, StubHub()) as hub:
        yield hub


@pytest.fixture
def closed(monkeypatch) -> Iterator[ClosedPort]:
    with as_hf_endpoint(monkeypatch, ClosedPort()) as port:
        yield port


@pytest.fixture
def setup(tmp_path) -> Iterator[tuple[Settings, str]]:
    url = f"sqlite:///{tmp_path / 'lathe.db'}"
    Base.metadata.create_all(engine_for(url))
    settings = Settings(data_dir=tmp_path / "data", database_url=url, models_dir=tmp_path / "models")
    with session_scope(url) as s:
        tenant = Tenant(id=new_id("org"), name="acme", created_at=now())
        s.add(tenant)
    yield settings, tenant.id
    engine_for(url).dispose()


def resolve(settings: Settings, tenant_id: str, name: str = MODEL):
    with session_scope(settings.sqlalchemy_url) as s:
        return resolve_model(s, settings, tenant_id=tenant_id, name=name)


def refused(settings: Settings, tenant_id: str) -> tuple[BadRequest, float]:
    start = time.monotonic()
    with pytest.raises(BadRequest) as info:
        resolve(settings, tenant_id)
    return info.value, time.monotonic() - start


def test_unreachable_hub_refuses_in_well_under_a_second(setup, closed):
    settings, tenant_id = setup
    error, took = refused(settings, tenant_id)
    assert error.status_code == 400 and error.code == "model_not_found" and error.param == "model"
    assert "can't be reached" in error.message and closed.url in error.message
    assert "purpose=model" in error.message and "LATHE_MODELS_DIR" in error.message
    assert took < 1.0, took


def test_a_hub_that_never_answers_is_given_up_on_after_the_probe_timeout(setup, monkeypatch):
    settings, tenant_id = setup
    settings = settings.model_copy(update={"hub_probe_seconds": 0.3})
    with as_hf_endpoint(monkeypatch, SilentHub()):
        error, took = refused(settings, tenant_id)
    assert error.code == "model_not_found"
    assert 0.3 <= took < 0.8, took


def test_reachable_hub_accepts_after_one_probe_of_its_endpoint(setup, stub):
    settings, tenant_id = setup
    source = resolve(settings, tenant_id)
    assert (source.kind, source.base) == ("hub", MODEL)
    assert stub.requests == [("HEAD", "/")]


def test_the_answer_is_kept_and_not_probed_again(setup, stub):
    settings, tenant_id = setup
    for _ in range(3):
        assert resolve(settings, tenant_id).kind == "hub"
    assert len(stub.requests) == 1
    # Kept for hub_probe_cache_seconds: with 0 every resolution probes again.
    fresh = settings.model_copy(update={"hub_probe_cache_seconds": 0})
    resolve(fresh, tenant_id)
    resolve(fresh, tenant_id)
    assert len(stub.requests) == 3


def test_an_unreachable_answer_is_kept_too(setup, closed, monkeypatch):
    settings, tenant_id = setup
    assert hub_reachable(settings) is False
    calls = []
    monkeypatch.setattr("lathe.model_source._probe", lambda *a: calls.append(a) or True)
    error, took = refused(settings, tenant_id)
    assert error.code == "model_not_found" and calls == [] and took < 0.1
    forget_hub_answers()
    assert resolve(settings, tenant_id).kind == "hub" and len(calls) == 1


def test_hf_hub_offline_refuses_without_a_probe(setup, stub, monkeypatch):
    settings, tenant_id = setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    error, took = refused(settings, tenant_id)
    assert error.code == "model_not_found" and error.param == "model" and "HF_HUB_OFFLINE" in error.message
    assert stub.requests == [] and took < 0.1


def test_a_model_in_the_local_cache_needs_no_hub(setup, closed, monkeypatch, tmp_path):
    settings, tenant_id = setup
    folder = tmp_path / "hf-cache" / "models--HuggingFaceTB--SmolLM2-135M"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    refused(settings, tenant_id)  # a ref without the snapshot's config.json is not a cached model
    (folder / "snapshots" / "0123abcd" / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve(settings, tenant_id).kind == "hub"


def test_probe_disabled_by_zero_accepts_without_a_request(setup, stub):
    settings, tenant_id = setup
    settings = settings.model_copy(update={"hub_probe_seconds": 0})
    assert resolve(settings, tenant_id).kind == "hub" and stub.requests == []


def test_local_models_never_touch_the_hub(setup, closed):
    settings, tenant_id = setup
    (settings.models_dir / "org" / "name").mkdir(parents=True)
    (settings.models_dir / "org" / "name" / "config.json").write_text("{}")
    assert resolve(settings, tenant_id, "org/name").kind == "local"


# --- the worker resolves with the same probe: the job fails at once, no training child started ----


@pytest.fixture
def worker_settings(tmp_path, setup) -> Settings:
    settings, _ = setup
    return settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})  # never reached: nothing is published


def test_validation_fails_a_hub_job_when_the_hub_is_unreachable(worker_settings, closed):
    from tests.worker.conftest import get_job, make_job
    from worker.tasks import validate_job

    job_id = make_job(worker_settings, model=MODEL)
    start = time.monotonic()
    assert validate_job(job_id, settings=worker_settings) == JobStatus.FAILED
    assert time.monotonic() - start < 2.0
    job = get_job(worker_settings, job_id)
    assert job.error["code"] == "model_not_found" and job.error["param"] == "model"
    assert "can't be reached" in job.error["message"]


def test_run_fails_a_hub_job_before_any_training_child(worker_settings, closed):
    from tests.worker.conftest import get_job, make_job
    from worker.tasks import run_job

    job_id = make_job(worker_settings, model=MODEL, status=JobStatus.QUEUED)
    start = time.monotonic()
    assert run_job(job_id, settings=worker_settings) == JobStatus.FAILED
    assert time.monotonic() - start < 2.0
    job = get_job(worker_settings, job_id)
    assert job.error["code"] == "model_not_found" and job.attempt == 1
    assert not list((worker_settings.jobs_dir / job_id).glob("attempt-*.log"))  # no child was started


def test_a_cached_hub_model_loads_offline_only_when_the_hub_is_away(setup, tmp_path, monkeypatch):
    from lathe.model_source import ModelSource, cache_only

    settings, _ = setup
    source = ModelSource("hub", MODEL)
    assert not cache_only(settings, source)  # not cached: the hub must deliver it (check_hub decides)
    folder = tmp_path / "hf-cache" / "models--HuggingFaceTB--SmolLM2-135M"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    (folder / "snapshots" / "0123abcd" / "config.json").write_text("{}")
    with as_hf_endpoint(monkeypatch, StubHub()):
        assert not cache_only(settings, source)  # the hub answers: a normal load (it may have a newer revision)
    forget_hub_answers()
    with as_hf_endpoint(monkeypatch, ClosedPort()):
        assert cache_only(settings, source)
    assert not cache_only(settings, ModelSource("local", str(tmp_path)))
