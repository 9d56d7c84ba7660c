"""GET /v1/fine_tuning/jobs/{id}, the route clients poll: it takes the short path (async dependencies,
one trip to the threadpool, a parsed spec kept per job), and none of that weakens it. A revoked or
expired key stops on the next poll, another tenant's job stays a 404, every poll counts against the
key's rate limit, the rendered config follows the stored spec, and no connection is left open."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from lathe.db.session import engine_for, session_scope
from lathe.db.tables import Job, now
from lathe.keys import create_key, expire_key, revoke_key
from tests.api.conftest import bearer, upload
from tests.api.test_basics import assert_error

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def job_id(client, acme, train_file) -> str:
    r = client.post(JOBS, headers=acme, json={"model": "bert-base-uncased", "training_file": train_file,
                                              "config": {"max_length": 64}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_a_revoked_or_expired_key_stops_on_the_next_poll(client, settings, acme, job_id):
    with session_scope(settings.sqlalchemy_url) as s:
        tenant_id = s.get(Job, job_id).tenant_id
        revoked, expired = (create_key(s, tenant_name="acme") for _ in range(2))
    for key in (revoked, expired):
        r = client.get(f"{JOBS}/{job_id}", headers=bearer(key))
        assert r.status_code == 200 and r.json()["organization_id"] == tenant_id
    with session_scope(settings.sqlalchemy_url) as s:
        assert revoke_key(s, key_id=revoked.split("_")[1])
        assert expire_key(s, key_id=expired.split("_")[1], at=now())
    assert_error(client.get(f"{JOBS}/{job_id}", headers=bearer(revoked)), 401, code="invalid_api_key")
    assert_error(client.get(f"{JOBS}/{job_id}", headers=bearer(expired)), 401, code="expired_api_key")
    assert client.get(f"{JOBS}/{job_id}", headers=acme).status_code == 200


def test_another_tenants_job_is_a_404_and_an_unknown_key_a_401(client, acme, other, job_id):
    assert client.get(f"{JOBS}/{job_id}", headers=acme).status_code == 200
    assert_error(client.get(f"{JOBS}/{job_id}", headers=other), 404, param="fine_tuning_job_id")
    key_id = acme["Authorization"].split("_")[1]
    assert_error(client.get(f"{JOBS}/{job_id}", headers=bearer(f"lathe_{key_id}_{'x' * 43}")), 401,
                 code="invalid_api_key")


def test_the_config_follows_the_stored_spec(client, settings, acme, job_id):
    first = client.get(f"{JOBS}/{job_id}", headers=acme).json()
    assert first["config"]["max_length"] == 64 and first["config"]["scheduler"]["name"] == "linear"
    assert client.get(f"{JOBS}/{job_id}", headers=acme).json() == first  # a second poll, the same job
    with session_scope(settings.sqlalchemy_url) as s:
        job = s.get(Job, job_id)
        job.spec = {**job.spec, "config": {"max_length": 32, "scheduler": {"name": "cosine"}}}
    changed = client.get(f"{JOBS}/{job_id}", headers=acme).json()["config"]
    assert (changed["max_length"], changed["scheduler"]["name"]) == (32, "cosine")


def test_polls_leave_no_connection_checked_out(client, settings, acme, other, job_id):
    pool = engine_for(settings.sqlalchemy_url).pool
    for headers in (acme, other, bearer("lathe_nope_nope"), {}):
        for _ in range(3):
            client.get(f"{JOBS}/{job_id}", headers=headers)
    assert pool.checkedout() == 0


def test_every_poll_counts_against_the_keys_rate_limit(settings):
    limited = settings.model_copy(update={"rate_limit": "3/minute"})
    with session_scope(limited.sqlalchemy_url) as s:
        key, other_key = (bearer(create_key(s, tenant_name=name)) for name in ("acme", "other"))
    with TestClient(create_app(limited), raise_server_exceptions=False) as client:
        r = client.post(JOBS, headers=key, json={"model": "bert-base-uncased",
                                                  "training_file": upload(client, key).json()["id"]})
        assert r.status_code == 200, r.text  # the upload and the create were requests 1 and 2
        assert client.get(f"{JOBS}/{r.json()['id']}", headers=key).status_code == 200
        limit = client.get(f"{JOBS}/{r.json()['id']}", headers=key)
        assert_error(limit, 429, code="rate_limit_exceeded")
        assert int(limit.headers["retry-after"]) >= 1
        assert client.get(f"{JOBS}/{r.json()['id']}", headers=other_key).status_code == 404  # its own count
