"""Webhooks through real processes, as a new user meets them: the endpoint is made with the openai
SDK's `client.webhooks` against the HTTP API (uvicorn), jobs run on a `lathe worker`, and a real
receiver on 127.0.0.1 verifies every delivery with the SDK's `unwrap`. The receiver fails at
first (retried with the same webhook-id), and a worker killed with SIGKILL in the middle of a
delivery leaves it to the next worker, which sends it again with the same id."""

from __future__ import annotations

import time

import openai
import pytest
from openai import OpenAI

from lathe.db.session import session_scope
from lathe.db.tables import WebhookDelivery
from tests.e2e.crash_harness import Stack, wait_for
from tests.tiny_models import sentiment_rows, write_text_dataset
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.timeout(240)

WEBHOOKS = {"webhook_allow_private": True, "webhook_timeout_seconds": 1.0, "webhook_poll_seconds": 0.2,
            "webhook_retry_base_seconds": 0.3, "webhook_retry_max_seconds": 1.0}
EVENTS = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]


def sdk_for(stack: Stack) -> tuple[OpenAI, str]:
    """The HTTP API (with webhook targets on 127.0.0.1 allowed) and an SDK client on it; a training file."""
    stack.settings = stack.settings.model_copy(update=WEBHOOKS)
    api = stack.api()
    client = OpenAI(base_url=str(api.base_url), api_key=api.headers["authorization"].split()[1], max_retries=0)
    path = write_text_dataset(stack.tmp / "train.csv", sentiment_rows(48))
    with open(path, "rb") as f:
        train = client.files.create(file=f, purpose="fine-tune").id
    return client, train


def create_job(client: OpenAI, train: str) -> str:
    return client.fine_tuning.jobs.create(
        model="tiny-bert", training_file=train, hyperparameters={"n_epochs": 1, "batch_size": 8},
        extra_body={"task": "text-classification", "config": {"device": "cpu", "max_length": 16}}).id


def cancel(client: OpenAI, job_id: str) -> None:
    """Cancel as a client should: a 409 "changed state meanwhile" (validation moved it) is retried."""
    for _ in range(20):
        try:
            client.fine_tuning.jobs.cancel(job_id)
            return
        except openai.ConflictError:
            time.sleep(0.2)
    raise AssertionError(f"could not cancel {job_id}")


def delivery_rows(stack: Stack) -> list[WebhookDelivery]:
    with session_scope(stack.settings.sqlalchemy_url) as s:
        return list(s.query(WebhookDelivery).order_by(WebhookDelivery.created_at))


def test_a_receiver_that_fails_at_first_gets_every_event_verified_and_naming_its_job(stack):
    client, train = sdk_for(stack)
    with Receiver([500, 500, 200]) as receiver:
        endpoint = client.webhooks.create(name="ci", url=receiver.url, event_types=EVENTS)
        stack.worker("w")
        succeeded = create_job(client, train)
        stack.wait_status(succeeded)
        receiver.wait(3, timeout=60)  # two 500s, then the 200
        cancelled = create_job(client, train)
        cancel(client, cancelled)
        requests = receiver.wait(4, timeout=60)
    events = [client.webhooks.unwrap(r.body, r.headers, secret=endpoint.signing_secret) for r in requests]
    assert [(e.type, e.data.id) for e in events[:3]] == [("fine_tuning.job.succeeded", succeeded)] * 3
    assert (events[3].type, events[3].data.id) == ("fine_tuning.job.cancelled", cancelled)
    assert len({r.headers["webhook-id"] for r in requests[:3]}) == 1  # one delivery, three attempts
    assert client.fine_tuning.jobs.retrieve(succeeded).status == "succeeded"
    log = client.get(f"/webhook_endpoints/{endpoint.id}/deliveries", cast_to=object)["data"]
    assert {d["job_id"]: (d["status"], [a["status_code"] for a in d["attempt_log"]]) for d in log} == {
        succeeded: ("delivered", [500, 500, 200]), cancelled: ("delivered", [200])}


def test_a_worker_killed_mid_delivery_leaves_it_to_the_next_with_the_same_id(stack):
    client, train = sdk_for(stack)
    with Receiver() as receiver:
        receiver.hold_first.set()  # the first attempt hangs: the worker dies while it is in flight
        endpoint = client.webhooks.create(name="ci", url=receiver.url, event_types=EVENTS)
        first = stack.worker("a")
        job_id = create_job(client, train)
        cancel(client, job_id)  # the status change and its event, committed by the API
        (held,) = receiver.wait(1, timeout=30)
        first.kill()  # SIGKILL: the attempt is never recorded
        (delivery,) = delivery_rows(stack)
        assert (delivery.status, delivery.attempts) == ("pending", 0)
        stack.worker("b")
        second = receiver.wait(2, timeout=60)[1]
    assert held.headers["webhook-id"] == second.headers["webhook-id"] == delivery.id
    for request in (held, second):
        event = client.webhooks.unwrap(request.body, request.headers, secret=endpoint.signing_secret)
        assert (event.type, event.data.id) == ("fine_tuning.job.cancelled", job_id)
    wait_for(lambda: delivery_rows(stack)[0].status == "delivered", timeout=10, what="the delivery recorded")
