"""Webhook delivery from the outbox, on SQLite and PostgreSQL, to a real receiver on 127.0.0.1:
the event is written in the status change's transaction (a rollback writes neither); a 500 is
retried with the same webhook-id and a fresh timestamp until a 2xx; attempts run out; redirects are
not followed; a hanging target times out; a target that turned private is refused at delivery; a
lapsed lease is claimed again; the dispatcher thread delivers; the SDK verifies every delivery."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
from openai import OpenAI

from lathe.db.session import session_factory, session_scope
from lathe.db.tables import Job, JobStatus, Tenant, WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent, new_id, now
from lathe.lifecycle import Actor, move
from lathe.settings import Settings
from lathe.webhooks.delivery import attempt, claim_due, lease_seconds, retry_delay
from lathe.webhooks.endpoints import new_secret
from tests.databases import DB_KINDS, scratch_database
from tests.webhook_receiver import Receiver
from worker.webhooks import run_dispatcher

ALL = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]
unwrap = OpenAI(api_key="unused", base_url="http://127.0.0.1:9").webhooks.unwrap


@pytest.fixture(scope="module", params=DB_KINDS)
def url(request, tmp_path_factory) -> Iterator[str]:
    with scratch_database(request.param, tmp_path_factory.mktemp("webhooks"), "lathe_webhooks") as url:
        yield url


@pytest.fixture(autouse=True)
def no_deliveries_left(url) -> None:
    """Each test starts with an empty outbox (the database is the module's)."""
    with session_scope(url) as s:
        s.query(WebhookDelivery).delete()
        s.query(WebhookEvent).delete()


@pytest.fixture
def settings(url, tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, database_url=url, webhook_allow_private=True, webhook_timeout_seconds=1.0,
                    webhook_retry_base_seconds=0.05, webhook_retry_max_seconds=0.2, webhook_max_attempts=4)


def tenant_with_endpoint(url: str, target: str, event_types=ALL, **values) -> tuple[str, WebhookEndpoint]:
    with session_scope(url) as s:
        tenant = Tenant(id=new_id("org"), name=new_id("t"), created_at=now())
        s.add(tenant)
        s.flush()
        endpoint = WebhookEndpoint(id=new_id("we"), tenant_id=tenant.id, name="e", url=target,
                                   event_types=event_types, secret=new_secret(), created_at=now(), updated_at=now(),
                                   **values)
        s.add(endpoint)
        return tenant.id, endpoint


def running_job(url: str, tenant_id: str, **values) -> str:
    with session_scope(url) as s:
        job = Job(id=new_id("ftjob"), tenant_id=tenant_id, spec={}, model="m", training_file="file-x", seed=1,
                  attempt=1, created_at=now(), **values)
        s.add(job)
        s.flush()
        job.status = str(JobStatus.RUNNING)
        return job.id


def finish(url: str, job_id: str, target=JobStatus.SUCCEEDED) -> None:
    with session_scope(url) as s:
        assert move(s, job_id=job_id, source=JobStatus.RUNNING, target=target, by=Actor.RUNNER)


def deliveries_of(url: str, endpoint_id: str) -> list[WebhookDelivery]:
    with session_scope(url) as s:
        return list(s.query(WebhookDelivery).filter_by(endpoint_id=endpoint_id))


def attempts_of(url: str, delivery_id: str) -> list[tuple[int, int | None, str | None]]:
    with session_scope(url) as s:
        return [(a.number, a.status_code, a.error) for a in
                s.query(WebhookAttempt).filter_by(delivery_id=delivery_id).order_by(WebhookAttempt.seq)]


def run_due(settings: Settings, *, until: float = 10.0) -> None:
    """Claim and attempt whatever is due until nothing is pending (or `until` seconds pass)."""
    factory = session_factory(settings.sqlalchemy_url)
    deadline = time.time() + until
    while time.time() < deadline:
        with factory() as s:
            claimed = claim_due(s, limit=10, lease=lease_seconds(settings))
            pending = s.query(WebhookDelivery).filter_by(status="pending").count()
        for delivery_id, lease in claimed:
            attempt(factory, settings, delivery_id, lease)
        if not pending:
            return
        time.sleep(0.02)


def test_the_event_commits_with_the_status_change_or_not_at_all(url):
    tenant_id, endpoint = tenant_with_endpoint(url, "http://127.0.0.1:9/x")
    job_id = running_job(url, tenant_id)
    with pytest.raises(RuntimeError), session_scope(url) as s:
        assert move(s, job_id=job_id, source=JobStatus.RUNNING, target=JobStatus.FAILED, by=Actor.RUNNER)
        raise RuntimeError("crash before the commit")
    assert deliveries_of(url, endpoint.id) == []
    finish(url, job_id, JobStatus.FAILED)
    (delivery,) = deliveries_of(url, endpoint.id)
    with session_scope(url) as s:
        event = s.get(WebhookEvent, delivery.event_id)
        assert (event.type, event.job_id, delivery.status) == ("fine_tuning.job.failed", job_id, "pending")
        assert event.payload == {"id": event.id, "object": "event", "created_at": event.created_at,
                                 "type": "fine_tuning.job.failed", "data": {"id": job_id}}


def test_only_subscribed_ends_of_a_tenants_own_top_level_jobs_make_events(url):
    tenant_id, endpoint = tenant_with_endpoint(url, "http://127.0.0.1:9/x", event_types=["fine_tuning.job.cancelled"])
    _, elsewhere = tenant_with_endpoint(url, "http://127.0.0.1:9/y")
    parent = running_job(url, tenant_id)
    child = running_job(url, tenant_id, parent_job=parent, child_index=0)
    finish(url, child, JobStatus.CANCELLED)  # a trial: its parent reports
    finish(url, parent, JobStatus.SUCCEEDED)  # not subscribed
    assert deliveries_of(url, endpoint.id) == [] and deliveries_of(url, elsewhere.id) == []
    with session_scope(url) as s:
        assert move(s, job_id=running_job(url, tenant_id), source=JobStatus.RUNNING, target=JobStatus.QUEUED,
                    by=Actor.RUNNER)  # not an end
    assert deliveries_of(url, endpoint.id) == []


def test_a_failing_target_is_retried_with_the_same_id_until_it_answers_2xx(url, settings):
    with Receiver([500, 503, 200]) as receiver:
        tenant_id, endpoint = tenant_with_endpoint(url, receiver.url)
        job_id = running_job(url, tenant_id)
        finish(url, job_id)
        run_due(settings)
        requests = receiver.wait(3)
    (delivery,) = deliveries_of(url, endpoint.id)
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 3, 200)
    assert [(n, code) for n, code, _ in attempts_of(url, delivery.id)] == [(1, 500), (2, 503), (3, 200)]
    assert {r.headers["webhook-id"] for r in requests} == {delivery.id}
    assert len({r.body for r in requests}) == 1
    for r in requests:
        event = unwrap(r.body, r.headers, secret=endpoint.secret)
        assert (event.type, event.data.id) == ("fine_tuning.job.succeeded", job_id)
        assert r.headers["content-type"] == "application/json"


def test_attempts_run_out_and_redirects_are_not_followed(url, settings):
    with Receiver([302], location="http://127.0.0.1:9/elsewhere") as receiver:
        tenant_id, endpoint = tenant_with_endpoint(url, receiver.url)
        finish(url, running_job(url, tenant_id))
        run_due(settings)
    (delivery,) = deliveries_of(url, endpoint.id)
    assert (delivery.status, delivery.attempts) == ("failed", settings.webhook_max_attempts)
    assert [code for _, code, _ in attempts_of(url, delivery.id)] == [302] * 4
    assert len(receiver.requests) == 4 and {r.path for r in receiver.requests} == {"/hooks"}


def test_a_hanging_target_times_out_and_a_target_turned_private_is_refused_at_delivery(url, settings):
    with Receiver() as receiver:
        receiver.hold_first.set()
        tenant_id, endpoint = tenant_with_endpoint(url, receiver.url)
        finish(url, running_job(url, tenant_id))
        factory = session_factory(url)
        with factory() as s:
            ((delivery_id, lease),) = claim_due(s, limit=10, lease=lease_seconds(settings))
        outcome = attempt(factory, settings, delivery_id, lease)
        assert outcome.status_code is None and "timed out" in outcome.error
        receiver.released.set()
        # Allowed at create (say the setting was on then, or DNS answered a public address), it
        # now resolves to loopback: the delivery checks again and never connects.
        strict = settings.model_copy(update={"webhook_allow_private": False})
        with session_scope(url) as s:
            s.get(WebhookEndpoint, endpoint.id).url = receiver.url.replace("http://", "https://")
        time.sleep(0.3)
        with factory() as s:
            ((again, lease),) = claim_due(s, limit=10, lease=lease_seconds(strict))
        outcome = attempt(factory, strict, again, lease)
        assert outcome.status_code is None and "loopback" in outcome.error
        assert len(receiver.requests) == 1  # the refused attempt never connected
    assert [error.split(" ")[0] for _, _, error in attempts_of(url, delivery_id)] == ["timed", "127.0.0.1"]


def test_a_claim_is_exclusive_until_its_lease_lapses(url, settings):
    with Receiver() as receiver:
        tenant_id, endpoint = tenant_with_endpoint(url, receiver.url)
        finish(url, running_job(url, tenant_id))
        factory = session_factory(url)
        with factory() as s:
            ((delivery_id, dead_lease),) = claim_due(s, limit=10, lease=0.3)
        with factory() as s:
            assert claim_due(s, limit=10, lease=5) == []  # held by the (dead) first dispatcher
        time.sleep(0.4)
        with factory() as s:
            ((same, lease),) = claim_due(s, limit=10, lease=5)
        assert same == delivery_id
        assert attempt(factory, settings, delivery_id, dead_lease) is None  # the stale claim sends nothing
        assert attempt(factory, settings, delivery_id, lease).ok
        assert [r.headers["webhook-id"] for r in receiver.wait(1)] == [delivery_id]


def test_the_dispatcher_thread_delivers_and_an_endpoint_deleted_meanwhile_gets_nothing(url, settings):
    with Receiver() as receiver:
        tenant_id, endpoint = tenant_with_endpoint(url, receiver.url)
        other_tenant, gone = tenant_with_endpoint(url, receiver.url)
        gone_job = running_job(url, other_tenant)
        job_id = running_job(url, tenant_id)
        finish(url, gone_job)
        with session_scope(url) as s:
            s.delete(s.get(WebhookEndpoint, gone.id))
        finish(url, job_id)
        stop = threading.Event()
        thread = threading.Thread(target=run_dispatcher, args=(settings.model_copy(update={"webhook_poll_seconds": 0.05}),),
                                  kwargs={"stop": stop}, daemon=True)
        thread.start()
        try:
            (request,) = receiver.wait(1)
            time.sleep(0.3)
        finally:
            stop.set()
            thread.join(10)
    assert json.loads(request.body)["data"]["id"] == job_id and len(receiver.requests) == 1
    assert deliveries_of(url, gone.id) == []
    (delivery,) = deliveries_of(url, endpoint.id)
    assert delivery.status == "delivered" and delivery.delivered_at


def test_retry_delays_grow_exponentially_with_jitter_up_to_the_cap(url):
    s = Settings(webhook_retry_base_seconds=5, webhook_retry_max_seconds=3600)
    import random

    rng = random.Random(0)
    delays = [retry_delay(n, s, rng) for n in range(1, 15)]
    ceilings = [min(3600, 5 * 2 ** (n - 1)) for n in range(1, 15)]
    assert all(c / 2 <= d < c for d, c in zip(delays, ceilings)), list(zip(delays, ceilings))
    s = Settings()  # the defaults: 15 attempts, 14 waits, between 2.7 and 5.4 hours in all
    ceilings = [min(s.webhook_retry_max_seconds, s.webhook_retry_base_seconds * 2 ** (n - 1))
                for n in range(1, s.webhook_max_attempts)]
    assert 2.5 * 3600 < sum(ceilings) * 0.5 and sum(ceilings) < 6 * 3600


def test_old_events_no_longer_being_delivered_are_pruned_with_their_logs(url, settings):
    from lathe.webhooks.delivery import prune

    with Receiver() as receiver:
        tenant_id, endpoint = tenant_with_endpoint(url, receiver.url)
        finish(url, running_job(url, tenant_id))
        run_due(settings)
        with session_scope(url) as s:  # a second one, still pending
            assert move(s, job_id=running_job(url, tenant_id), source=JobStatus.RUNNING,
                        target=JobStatus.FAILED, by=Actor.RUNNER)
    (done,) = [d for d in deliveries_of(url, endpoint.id) if d.status == "delivered"]
    with session_factory(url)() as s:
        assert prune(s, older_than=time.time() - 60) == 0  # both are recent
        assert prune(s, older_than=time.time() + 60) == 1  # the pending one stays
    assert [d.status for d in deliveries_of(url, endpoint.id)] == ["pending"]
    assert attempts_of(url, done.id) == []


def test_the_delivery_log_pages_newest_first(url):
    from lathe.errors import NotFound
    from lathe.webhooks.endpoints import deliveries

    tenant_id, endpoint = tenant_with_endpoint(url, "http://127.0.0.1:9/x")
    jobs = [running_job(url, tenant_id) for _ in range(3)]
    for job_id in jobs:
        finish(url, job_id)
    with session_scope(url) as s:
        everything = deliveries(s, tenant_id=tenant_id, endpoint_id=endpoint.id, after=None, limit=10)
        first = deliveries(s, tenant_id=tenant_id, endpoint_id=endpoint.id, after=None, limit=2)
        rest = deliveries(s, tenant_id=tenant_id, endpoint_id=endpoint.id, after=first[-1]["id"], limit=2)
        assert [d["id"] for d in first + rest] == [d["id"] for d in everything] and len(everything) == 3
        assert {d["job_id"] for d in everything} == set(jobs)
        assert all(d["status"] == "pending" and d["attempt_log"] == [] for d in everything)
        other_tenant, other = tenant_with_endpoint(url, "http://127.0.0.1:9/y")
        with pytest.raises(NotFound):  # a cursor from another endpoint
            deliveries(s, tenant_id=other_tenant, endpoint_id=other.id, after=first[0]["id"], limit=2)
        with pytest.raises(NotFound):  # another tenant's endpoint
            deliveries(s, tenant_id=other_tenant, endpoint_id=endpoint.id, after=None, limit=2)
