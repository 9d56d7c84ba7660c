"""Worker tests: tasks called directly against a real SQLite and a real PostgreSQL database,
Redis db 13 with a queue name of their own, and a tiny BERT built on the spot."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from lathe.db.tables import Base, File, FilePurpose, Job, JobStatus, Tenant, new_id, now
from lathe.db.session import engine_for, session_scope
from lathe.settings import Settings
from tests.databases import DB_KINDS, scratch_database
from tests.tiny_models import save_tiny_bert, sentiment_rows, write_text_dataset

REDIS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(params=DB_KINDS)
def db_url(request, tmp_path) -> Iterator[str]:
    with scratch_database(request.param, tmp_path, "lathe_worker") as url:
        yield url


@pytest.fixture
def settings(db_url, tmp_path, tiny_bert) -> Iterator[Settings]:
    models_dir = tmp_path / "base-models"
    models_dir.mkdir()
    shutil.copytree(tiny_bert, models_dir / "tiny-bert")
    s = Settings(data_dir=tmp_path / "data", database_url=db_url, redis_url=REDIS_URL,
                 queue=f"lathe-test-{uuid.uuid4().hex[:10]}", models_dir=models_dir, allow_hub_models=False,
                 heartbeat_seconds=0.3, lease_seconds=5, cancel_grace_seconds=20, max_attempts=3)
    yield s
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"*{s.queue}*"))
    if keys:
        client.delete(*keys)
    client.close()


def queued_messages(settings: Settings) -> list[Any]:
    """Task messages waiting in the test's queue (kombu's Redis list is named after the queue)."""
    import json

    client = redis.Redis.from_url(REDIS_URL)
    try:
        return [json.loads(m)["headers"] for m in client.lrange(settings.queue, 0, -1)]
    finally:
        client.close()


def add_file(settings: Settings, tenant_id: str, rows: list[dict] | None = None, *, name: str = "train.csv",
             purpose: str = FilePurpose.FINE_TUNE, folder: Path | None = None) -> str:
    file_id = new_id("file")
    base = settings.files_dir / file_id
    if folder is not None:  # an extracted model upload
        shutil.copytree(folder, base / "model")
        path = base / "model.tar"
        path.write_bytes(b"")
    else:
        path = write_text_dataset(base / name, rows or [])
    with session_scope(settings.sqlalchemy_url) as session:
        session.add(File(id=file_id, tenant_id=tenant_id, purpose=str(purpose), filename=name,
                         bytes=path.stat().st_size, sha256="0" * 64, path=str(path), status="processed"))
    return file_id


def make_job(settings: Settings, *, train_rows: list[dict] | None = None, valid_rows: list[dict] | None = None,
             test_rows: list[dict] | None = None, model: str = "tiny-bert", config: dict | None = None,
             hyperparameters: dict | None = None, status: str = JobStatus.VALIDATING_FILES,
             tenant: str | None = None, suffix: str | None = None, max_attempts: int = 3) -> str:
    """A tenant (if new), its dataset files and a job in `status`; returns the job id."""
    tenant = tenant or f"acme-{uuid.uuid4().hex[:6]}"
    with session_scope(settings.sqlalchemy_url) as session:
        row = session.query(Tenant).filter_by(name=tenant).one_or_none()
        if row is None:
            row = Tenant(id=new_id("tenant"), name=tenant)
            session.add(row)
        tenant_id = row.id
    train = add_file(settings, tenant_id, train_rows if train_rows is not None else sentiment_rows(64))
    valid = add_file(settings, tenant_id, valid_rows, name="valid.csv") if valid_rows is not None else None
    test = add_file(settings, tenant_id, test_rows, name="test.csv") if test_rows is not None else None
    spec = {"model": model, "training_file": train, "validation_file": valid, "test_file": test,
            "hyperparameters": hyperparameters or {"n_epochs": 2, "batch_size": 8},
            "config": {"device": "cpu", "max_length": 16, **(config or {})}, "seed": 1, "suffix": suffix}
    from core.spec import JobSpec

    spec = JobSpec.model_validate(spec).model_dump(mode="json", exclude_unset=True)  # as lathe.jobs stores it
    job_id = new_id("ftjob")
    with session_scope(settings.sqlalchemy_url) as session:
        session.add(Job(id=job_id, tenant_id=tenant_id, status=str(status), spec=spec, model=model,
                        training_file=train, validation_file=valid, test_file=test, seed=1,
                        max_attempts=max_attempts, created_at=now(),
                        queued_at=now() if status == JobStatus.QUEUED else None))
    return job_id


def get_job(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.sqlalchemy_url) as session:
        return session.get(Job, job_id)
