"""API key expiry and the `lathe keys` commands (create with an expiry, list, expire, revoke).

Expired keys answer 401 `expired_api_key` (only once the secret matched); wrong, unknown and
revoked keys answer 401 `invalid_api_key`. Redis db 11 (tests/api/test_quotas.py shares it).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from lathe.keys import create_key, expire_key, revoke_key, verify_key
from lathe.db.tables import ApiKey, now
from lathe.db.session import session_scope
from lathe.errors import Unauthorized
from api.main import create_app
from lathe.settings import Settings, get_settings
from lathe import cli
from tests.api.conftest import bearer

REDIS_URL = "redis://127.0.0.1:6379/11"


@pytest.fixture
def settings(db_url: str, tmp_path: Path):
    """The conftest's settings with this file's Redis db (11), for the queue and the rate limiter."""
    queue = f"lathe-keys-test-{secrets.token_hex(4)}"
    yield Settings(data_dir=tmp_path / "data", database_url=db_url, redis_url=REDIS_URL, queue=queue,
                   models_dir=tmp_path / "models")
    client = redis.Redis.from_url(REDIS_URL)
    stale = [*client.scan_iter(f"*{queue}*"), *client.scan_iter("lathe:ratelimit:*")]
    if stale:
        client.delete(*stale)
    client.close()


def make_key(settings: Settings, tenant: str = "acme", **kwargs) -> str:
    with session_scope(settings.sqlalchemy_url) as s:
        return create_key(s, tenant_name=tenant, **kwargs)


def assert_401(r, code: str) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("authentication_error", code), err
    assert err["message"]


def test_expired_key_is_401_and_a_live_one_is_200(client, settings):
    expired = make_key(settings, expires_at=now() - 1)
    later = make_key(settings, expires_at=now() + 3600)
    assert_401(client.get("/v1/files", headers=bearer(expired)), "expired_api_key")
    assert client.get("/v1/files", headers=bearer(later)).status_code == 200
    # The wrong secret for an expired key's id says nothing about the key.
    key_id = expired.split("_")[1]
    assert_401(client.get("/v1/files", headers=bearer(f"lathe_{key_id}_{'x' * 43}")), "invalid_api_key")


def test_expiring_a_key_cuts_it_off_at_once(client, settings):
    key = make_key(settings)
    assert client.get("/v1/fine_tuning/jobs", headers=bearer(key)).status_code == 200
    with session_scope(settings.sqlalchemy_url) as s:
        assert expire_key(s, key_id=key.split("_")[1], at=now())
        assert not expire_key(s, key_id="nope", at=now())
    assert_401(client.get("/v1/fine_tuning/jobs", headers=bearer(key)), "expired_api_key")


def test_revoked_beats_expired_and_verify_key_names_the_caller(settings):
    with session_scope(settings.sqlalchemy_url) as s:
        key = create_key(s, tenant_name="acme", expires_at=now() + 60)
        caller = verify_key(s, key)
        assert caller.key_id == key.split("_")[1] and caller.tenant.name == "acme"
        assert revoke_key(s, key_id=caller.key_id)
        assert expire_key(s, key_id=caller.key_id, at=now() - 10)
        with pytest.raises(Unauthorized) as info:
            verify_key(s, key)
    assert info.value.code == "invalid_api_key"


# --- the CLI -------------------------------------------------------------------------------------

@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch) -> Settings:
    """`lathe` pointed at a fresh SQLite database (the commands read cached settings)."""
    monkeypatch.setenv("LATHE_DATA_DIR", str(tmp_path / "cli"))
    monkeypatch.delenv("LATHE_DATABASE_URL", raising=False)
    monkeypatch.setenv("LATHE_REDIS_URL", REDIS_URL)
    monkeypatch.setattr(cli.console, "width", 200)  # one table row per key
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def run(*args: str) -> str:
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def row_of(listing: str, key_id: str) -> str:
    rows = [line for line in listing.splitlines() if f"lathe_{key_id}" in line]
    assert len(rows) == 1, listing
    return rows[0]


def test_cli_create_with_expiry_list_expire_revoke(cli_env):
    before = now()
    key = run("keys", "create", "--tenant", "acme", "--expires-in", "30d").strip().splitlines()[-1]
    plain = run("keys", "create", "--tenant", "acme").strip().splitlines()[-1]
    key_id, secret = key.split("_", 2)[1:]
    with session_scope(cli_env.sqlalchemy_url) as s:
        expires_at = s.get(ApiKey, key_id).expires_at
        assert s.get(ApiKey, plain.split("_")[1]).expires_at is None
    assert before + 30 * 86400 <= expires_at <= now() + 30 * 86400

    listing = run("keys", "list")
    assert secret not in listing and plain.split("_", 2)[2] not in listing
    row = row_of(listing, key_id)
    assert "acme" in row and "active" in row
    assert datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%d %H:%M") in row

    app = create_app(cli_env)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/v1/files", headers=bearer(key)).status_code == 200
        assert "expires" in run("keys", "expire", key)  # the whole key works as well as its id
        assert_401(client.get("/v1/files", headers=bearer(key)), "expired_api_key")
        run("keys", "revoke", plain.split("_")[1])
        assert_401(client.get("/v1/files", headers=bearer(plain)), "invalid_api_key")

    listing = run("keys", "list", "--tenant", "acme")
    assert "expired" in row_of(listing, key_id)
    assert "revoked" in row_of(listing, plain.split("_")[1])


def test_cli_expires_at_and_bad_input(cli_env):
    key = run("keys", "create", "--tenant", "acme", "--expires-at", "2099-01-02T03:04:00Z").strip().splitlines()[-1]
    with session_scope(cli_env.sqlalchemy_url) as s:
        assert s.get(ApiKey, key.split("_")[1]).expires_at == 4071006240  # 2099-01-02T03:04:00Z
    run("keys", "expire", key.split("_")[1], "--at", "2099-06-01")  # pushed back; no zone means UTC
    with session_scope(cli_env.sqlalchemy_url) as s:
        assert s.get(ApiKey, key.split("_")[1]).expires_at == 4083955200  # 2099-06-01T00:00:00Z
    runner = CliRunner()
    for args in (["--expires-in", "3x"], ["--expires-in", "0d"], ["--expires-at", "2001-01-01"],
                 ["--expires-at", "tomorrow"], ["--expires-in", "1d", "--expires-at", "2099-01-01"]):
        result = runner.invoke(cli.app, ["keys", "create", "--tenant", "acme", *args])
        assert result.exit_code == 2, (args, result.output)
    assert runner.invoke(cli.app, ["keys", "expire", "nope"]).exit_code == 1
