"""A hub id is refused at create, in about a second, when the hub can't deliver it: 400
model_not_found naming `model` and saying how to provide the model instead. The hubs are local
stand-ins (tests/hub_stub.py); conftest's default is one that answers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from lathe.db.tables import Job
from lathe.db.session import session_scope
from tests.api.test_basics import assert_error
from tests.hub_stub import ClosedPort, as_hf_endpoint

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def unreachable(monkeypatch) -> Iterator[ClosedPort]:
    with as_hf_endpoint(monkeypatch, ClosedPort()) as port:
        yield port


def jobs_of(settings) -> list[Job]:
    with session_scope(settings.sqlalchemy_url) as session:
        return session.query(Job).all()


def test_unreachable_hub_is_a_400_in_under_a_second(client, acme, train_file, settings, unreachable):
    start = time.monotonic()
    r = client.post(JOBS, headers=acme, json={"model": "bert-base-uncased", "training_file": train_file})
    took = time.monotonic() - start
    err = assert_error(r, 400, param="model", code="model_not_found")
    assert "can't be reached" in err["message"] and "purpose=model" in err["message"]
    assert "LATHE_MODELS_DIR" in err["message"]
    assert took < 1.0, took
    assert jobs_of(settings) == []  # nothing stored, nothing queued


def test_reachable_hub_is_accepted_after_one_probe(client, acme, train_file, reachable_hub):
    before = len(reachable_hub.requests)
    for _ in range(2):
        r = client.post(JOBS, headers=acme, json={"model": "bert-base-uncased", "training_file": train_file})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "validating_files"
    assert len(reachable_hub.requests) == before + 1  # the second create used the kept answer


def test_hf_hub_offline_is_a_400_without_a_probe(client, acme, train_file, reachable_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(reachable_hub.requests)
    r = client.post(JOBS, headers=acme, json={"model": "bert-base-uncased", "training_file": train_file})
    err = assert_error(r, 400, param="model", code="model_not_found")
    assert "HF_HUB_OFFLINE" in err["message"]
    assert len(reachable_hub.requests) == before
