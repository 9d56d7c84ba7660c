"""Fixtures for the API tests: every test runs against SQLite (a tmp file) and PostgreSQL (a
database made for this session), a real Redis (db 14, a queue name unique to the test), and the
app through Starlette's TestClient, which the openai SDK also accepts as its http_client."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import text

from lathe.keys import create_key
from lathe.model_source import forget_hub_answers
from lathe.db.tables import Base
from lathe.db.session import engine_for, session_scope
from api.main import create_app
from lathe.settings import Settings
from tests.databases import scratch_postgres
from tests.hub_stub import StubHub
from worker.predict_pool import PredictPool

REDIS_URL = "redis://127.0.0.1:6379/14"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with scratch_postgres("lathe_api_test") as url:
        Base.metadata.create_all(engine_for(url))
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'lathe.db'}"
        Base.metadata.create_all(engine_for(url))
        yield url
        engine_for(url).dispose()
        return
    url = request.getfixturevalue("pg_url")
    with engine_for(url).begin() as conn:
        names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    yield url


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def settings(db_url: str, tmp_path: Path, redis_client: redis.Redis) -> Iterator[Settings]:
    queue = f"lathe-api-test-{secrets.token_hex(4)}"
    s = Settings(data_dir=tmp_path / "data", database_url=db_url, redis_url=REDIS_URL, queue=queue,
                 models_dir=tmp_path / "models")
    yield s
    keys = list(redis_client.scan_iter(f"*{queue}*"))  # the queue list and kombu's binding sets
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def app(settings: Settings):
    application = create_app(settings)
    application.state.sse_poll_seconds = 0.05
    return application


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def keys(settings: Settings) -> dict[str, str]:
    with session_scope(settings.sqlalchemy_url) as session:
        return {name: create_key(session, tenant_name=name) for name in ("acme", "other")}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def acme(keys) -> dict[str, str]:
    return bearer(keys["acme"])


@pytest.fixture
def other(keys) -> dict[str, str]:
    return bearer(keys["other"])


@pytest.fixture
def sdk(client: TestClient, keys) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=keys["acme"], http_client=client, max_retries=0)


CSV = "text,label\ngreat movie,pos\nawful film,neg\nloved it,pos\nhated it,neg\n"


def upload(client: TestClient, headers: dict, *, name: str = "train.csv", content: bytes | str = CSV,
           purpose: str = "fine-tune"):
    data = content.encode() if isinstance(content, str) else content
    return client.post("/v1/files", headers=headers, files={"file": (name, data)}, data={"purpose": purpose})


@pytest.fixture
def train_file(client, acme) -> str:
    r = upload(client, acme)
    assert r.status_code == 200, r.text
    return r.json()["id"]


class StandInPredictor:
    """Answers prediction requests as a worker's prediction process would, without a model: every
    input gets `{"label": "pos", "score": 0.9}` (top_k of them at most) unless `respond` is replaced.
    `calls` holds every request it was handed."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.respond: Callable[[dict[str, Any]], dict[str, Any]] = lambda request: {
            "predictions": [[{"label": "pos", "score": 0.9}][: request.get("top_k", 1)] for _ in request["inputs"]]}

    def __call__(self, request: dict[str, Any], _left: float) -> dict[str, Any]:
        self.calls.append(request)
        return self.respond(request)


@pytest.fixture
def predictor(settings: Settings) -> Iterator[StandInPredictor]:
    """A worker's predict pool (worker.predict_pool) running in this process on the test's queue,
    with a stand-in for its prediction process."""
    stand_in = StandInPredictor()
    pool = PredictPool(settings, answer_with=stand_in).start()
    yield stand_in
    pool.stop()


@pytest.fixture
def engine_worker(settings: Settings) -> Iterator[list[dict[str, Any]]]:
    """A worker's predict pool running in this process on the test's queue, its requests answered
    by worker.predict_child.answer, the function the worker's prediction process answers with (here
    in this process, which has torch): a dry run's counts are the engine's. Yields the requests."""
    from core.predict import load
    from worker.predict_child import ModelCache, answer

    cache, seen = ModelCache(1, load), []
    pool = PredictPool(settings, answer_with=lambda request, _left: seen.append(request) or answer(cache, request))
    pool.start()
    yield seen
    pool.stop()


@pytest.fixture(scope="session")
def stub_hub() -> Iterator[StubHub]:
    hub = StubHub()
    yield hub
    hub.close()


@pytest.fixture(autouse=True)
def reachable_hub(stub_hub: StubHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[StubHub]:
    """Hub ids (`bert-base-uncased`) are accepted only when the hub answers the create-time probe:
    every API test gets a local hub that answers (HF_ENDPOINT, inherited by servers they start), an
    empty Hugging Face cache, and no kept answers; never the real hub."""
    monkeypatch.setenv("HF_ENDPOINT", stub_hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    forget_hub_answers()
    yield stub_hub
    forget_hub_answers()
