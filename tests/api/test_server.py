"""One real uvicorn process (`uvicorn api.main:app`, settings from LATHE_* env), driven over HTTP by
the openai SDK: the lazily built module-level app, real chunked streaming of an upload."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
import redis
from openai import OpenAI

from lathe.keys import create_key
from lathe.db.tables import Base
from lathe.db.session import engine_for, session_scope

REDIS_URL = "redis://127.0.0.1:6379/14"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'lathe.db'}"
    Base.metadata.create_all(engine_for(url))
    with session_scope(url) as s:
        key = create_key(s, tenant_name="acme")
    engine_for(url).dispose()
    queue = f"lathe-api-test-{secrets.token_hex(4)}"
    port = free_port()
    env = {**os.environ, "LATHE_DATA_DIR": str(tmp_path / "data"), "LATHE_DATABASE_URL": url,
           "LATHE_REDIS_URL": REDIS_URL, "LATHE_QUEUE": queue, "LATHE_MAX_UPLOAD_BYTES": str(8 * 1024 * 1024)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port), "--log-level",
                             "warning"], env=env, cwd=Path(__file__).resolve().parents[2])
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx2.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx2.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("uvicorn did not start")
        yield base, key, queue, tmp_path
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(f"*{queue}*"))
        if keys:
            r.delete(*keys)
        r.close()


def test_sdk_over_real_http(server):
    base, key, queue, tmp_path = server
    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    big = tmp_path / "train.csv"
    with open(big, "w") as fh:
        fh.write("text,label\n")
        for i in range(120_000):
            fh.write(f"example number {i} with some words,{'pos' if i % 2 else 'neg'}\n")
    size = big.stat().st_size
    assert size > 4 * 1024 * 1024
    with open(big, "rb") as fh:
        f = client.files.create(file=fh, purpose="fine-tune")
    assert f.bytes == size
    assert (tmp_path / "data" / "files" / f.id / "data.csv").stat().st_size == size
    job = client.fine_tuning.jobs.create(model="bert-base-uncased", training_file=f.id)
    assert job.status == "validating_files"
    assert redis.Redis.from_url(REDIS_URL).llen(f"{queue}.validate") == 1  # lathe.validate_job's own queue
    assert httpx2.get(f"{base}/readyz").status_code == 200

    over = tmp_path / "over.csv"
    over.write_bytes(b"text,label\n" + b"x,y\n" * (3 * 1024 * 1024))  # 12 MiB > 8 MiB cap
    r = httpx2.post(f"{base}/v1/files", headers={"Authorization": f"Bearer {key}"},
                    files={"file": ("over.csv", over.open("rb"))}, data={"purpose": "fine-tune"})
    assert r.status_code == 413
    assert [p.name for p in (tmp_path / "data" / "files").iterdir()] == [f.id]
