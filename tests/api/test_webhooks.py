"""Webhook endpoints through the openai SDK's own `client.webhooks` (create, list, retrieve,
update, delete, rotate_secret, test, event_types), against a real receiver on 127.0.0.1 that the
SDK's `unwrap` verifies; the target checks; tenant isolation."""

from __future__ import annotations

import json

import openai
import pytest

from tests.webhook_receiver import Receiver

SUCCEEDED = "fine_tuning.job.succeeded"
ALL = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]


@pytest.fixture
def private_ok(settings):
    """Targets on 127.0.0.1 allowed (the receiver's), as LATHE_WEBHOOK_ALLOW_PRIVATE=true does."""
    settings.webhook_allow_private = True
    settings.webhook_timeout_seconds = 2.0
    return settings


def test_endpoints_through_the_sdk(private_ok, sdk, client, other):
    created = sdk.webhooks.create(name="ci", url="http://127.0.0.1:9/hooks", event_types=[SUCCEEDED])
    assert created.object == "webhook_endpoint" and created.signing_secret.startswith("whsec_")
    assert created.signing_secret_hint.endswith(created.signing_secret[-4:])
    got = sdk.webhooks.retrieve(created.id)
    assert got.name == "ci" and got.event_types == [SUCCEEDED] and "signing_secret" not in got.model_dump()
    assert got.created_at == got.updated_at == created.created_at

    second = sdk.webhooks.create(name="two", url="http://127.0.0.1:9/b", event_types=ALL)
    page = sdk.webhooks.list(limit=1)  # newest first; two made in the same second go by id
    assert len(page.data) == 1 and page.has_more
    rest = sdk.webhooks.list(limit=1, after=page.data[0].id)
    assert {page.data[0].id, *(e.id for e in rest.data)} == {created.id, second.id} and not rest.has_more
    assert {e.id for e in sdk.webhooks.list(limit=1)} == {created.id, second.id}  # auto-paging follows `after`

    unchanged = sdk.webhooks.update(created.id, name="ci")
    assert unchanged.updated_at == got.updated_at  # an unchanged update does not advance it
    updated = sdk.webhooks.update(created.id, event_types=ALL, url="http://127.0.0.1:9/new")
    assert updated.event_types == ALL and updated.url.endswith("/new") and updated.name == "ci"

    assert sdk.webhooks.event_types.list().data == ALL

    # Another tenant sees none of it.
    assert client.get(f"/v1/webhook_endpoints/{created.id}", headers=other).status_code == 404
    assert client.get("/v1/webhook_endpoints", headers=other).json()["data"] == []
    assert client.delete(f"/v1/webhook_endpoints/{created.id}", headers=other).status_code == 404

    deleted = sdk.webhooks.delete(created.id)
    assert deleted.deleted and deleted.id == created.id and deleted.object == "webhook_endpoint.deleted"
    with pytest.raises(openai.NotFoundError):
        sdk.webhooks.retrieve(created.id)


@pytest.mark.parametrize(("url", "why"), [
    ("http://93.184.215.14/hooks", "must be https"),
    ("https://127.0.0.1/hooks", "loopback"),
    ("https://localhost:8443/hooks", "loopback"),
    ("https://[::1]/hooks", "loopback"),
    ("https://169.254.169.254/latest/meta-data", "link-local"),  # cloud metadata
    ("https://10.1.2.3/hooks", "private"),
    ("https://192.168.0.10/hooks", "private"),
    ("https://[::ffff:10.0.0.1]/hooks", "private"),  # IPv4 inside IPv6
    ("https://100.100.100.200/hooks", "non-public"),  # shared address space (a cloud's metadata)
    ("https://2130706433/hooks", "loopback"),  # 127.0.0.1 as one number
    ("https://no-such-host.invalid/hooks", "does not resolve"),
    ("ftp://93.184.215.14/", "must be https"),
    ("https:///nohost", "needs a host"),
])
def test_targets_that_are_not_public_https_are_refused(client, acme, url, why):
    r = client.post("/v1/webhook_endpoints", headers=acme, json={"name": "x", "url": url, "event_types": ALL})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "url" and why in error["message"], error
    assert client.get("/v1/webhook_endpoints", headers=acme).json()["data"] == []


def test_a_public_https_target_is_accepted_and_an_update_is_checked_too(client, acme):
    r = client.post("/v1/webhook_endpoints", headers=acme,
                    json={"name": "x", "url": "https://93.184.215.14/hooks", "event_types": [SUCCEEDED]})
    assert r.status_code == 200, r.text
    endpoint = r.json()
    r = client.post(f"/v1/webhook_endpoints/{endpoint['id']}", headers=acme, json={"url": "https://10.0.0.1/x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "url"
    assert client.get(f"/v1/webhook_endpoints/{endpoint['id']}", headers=acme).json()["url"] == endpoint["url"]


def test_event_types_this_server_never_sends_are_refused(client, acme):
    r = client.post("/v1/webhook_endpoints", headers=acme,
                    json={"name": "x", "url": "https://93.184.215.14/", "event_types": [SUCCEEDED, "batch.completed"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "event_types[1]", r.text
    r = client.post("/v1/webhook_endpoints", headers=acme, json={"name": "x", "url": "https://93.184.215.14/",
                                                                  "event_types": []})
    assert r.status_code in (400, 422) and r.json()["error"]["param"] == "event_types", r.text


def test_test_sends_a_signed_sample_the_sdk_unwraps(private_ok, sdk):
    with Receiver([204, 500]) as receiver:
        endpoint = sdk.webhooks.create(name="r", url=receiver.url, event_types=ALL)
        result = sdk.webhooks.test(endpoint.id, event_type="fine_tuning.job.failed")
        assert (result.object, result.status_code, result.success, result.webhook_endpoint_id) == \
            ("webhook_endpoint.test", 204, True, endpoint.id)
        (request,) = receiver.wait(1)
        event = sdk.webhooks.unwrap(request.body, request.headers, secret=endpoint.signing_secret)
        assert event.type == "fine_tuning.job.failed" and event.data.id.startswith("ftjob-")
        tampered = request.body.replace(b'"fine_tuning.job.failed"', b'"fine_tuning.job.succeeded"')
        with pytest.raises(openai.InvalidWebhookSignatureError):
            sdk.webhooks.unwrap(tampered, request.headers, secret=endpoint.signing_secret)
        # The endpoint's answer is reported as it was, success or not.
        assert sdk.webhooks.test(endpoint.id, event_type=SUCCEEDED).status_code == 500
        assert sdk.webhooks.retrieve(endpoint.id).updated_at == endpoint.updated_at  # tests don't advance it


def test_test_of_an_endpoint_that_does_not_answer_is_a_400(private_ok, sdk):
    endpoint = sdk.webhooks.create(name="r", url="http://127.0.0.1:9/hooks", event_types=ALL)  # discard port
    with pytest.raises(openai.BadRequestError) as info:
        sdk.webhooks.test(endpoint.id, event_type=SUCCEEDED)
    assert info.value.body["code"] == "webhook_unreachable"


def test_rotate_secret_with_and_without_the_24_hour_overlap(private_ok, sdk):
    with Receiver() as receiver:
        endpoint = sdk.webhooks.create(name="r", url=receiver.url, event_types=ALL)
        first = endpoint.signing_secret
        kept = sdk.webhooks.rotate_secret(endpoint.id, keep_old_secret_active_for_24_hours=True)
        assert kept.signing_secret != first and kept.updated_at >= endpoint.updated_at
        sdk.webhooks.test(endpoint.id, event_type=SUCCEEDED)
        (request,) = receiver.wait(1)
        assert len(request.headers["webhook-signature"].split()) == 2
        for secret in (first, kept.signing_secret):  # either secret verifies during the overlap
            sdk.webhooks.unwrap(request.body, request.headers, secret=secret)

        dropped = sdk.webhooks.rotate_secret(endpoint.id)  # keep_old_secret_active_for_24_hours=False
        sdk.webhooks.test(endpoint.id, event_type=SUCCEEDED)
        request = receiver.wait(2)[1]
        assert len(request.headers["webhook-signature"].split()) == 1
        sdk.webhooks.unwrap(request.body, request.headers, secret=dropped.signing_secret)
        for secret in (first, kept.signing_secret):
            with pytest.raises(openai.InvalidWebhookSignatureError):
                sdk.webhooks.unwrap(request.body, request.headers, secret=secret)
    assert json.loads(request.body)["object"] == "event"


def test_unknown_endpoints_and_malformed_bodies(client, acme):
    assert client.get("/v1/webhook_endpoints/we-nope", headers=acme).status_code == 404
    assert client.post("/v1/webhook_endpoints/we-nope/rotate_secret", headers=acme).status_code == 404
    r = client.post("/v1/webhook_endpoints", headers=acme, json={"name": "x", "url": "https://93.184.215.14/",
                                                                  "event_types": ALL, "secret": "mine"})
    assert r.status_code in (400, 422) and r.json()["error"]["param"] == "secret"
    assert client.get("/v1/webhook_endpoints").status_code == 401
