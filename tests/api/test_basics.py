"""Auth, error bodies, health, metrics, OpenAPI, and the import boundary."""

from __future__ import annotations

import subprocess
import sys

from lathe.keys import authenticate, create_key, revoke_key
from lathe.db.session import session_scope
from tests.api.conftest import bearer


def test_api_does_not_import_torch():
    code = "import sys, api.main; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def assert_error(r, status: int, *, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_missing_and_wrong_keys_are_401(client, keys):
    assert_error(client.get("/v1/fine_tuning/jobs"), 401, code="invalid_api_key")
    assert_error(client.get("/v1/files", headers={"Authorization": "Basic abc"}), 401)
    assert_error(client.get("/v1/files", headers=bearer("lathe_nope_nope")), 401)
    good = keys["acme"]
    assert_error(client.get("/v1/files", headers=bearer(good[:-1] + ("A" if good[-1] != "A" else "B"))), 401)
    assert client.get("/v1/files", headers=bearer(good)).status_code == 200


def test_revoked_and_expired_keys(settings):
    with session_scope(settings.sqlalchemy_url) as s:
        key = create_key(s, tenant_name="t1")
        expired = create_key(s, tenant_name="t1", expires_at=1)
        assert authenticate(s, key).name == "t1"
        assert authenticate(s, expired) is None
        assert revoke_key(s, key_id=key.split("_")[1])
        assert authenticate(s, key) is None
        assert authenticate(s, "garbage") is None


def test_validation_error_is_422_with_param(client, acme):
    err = assert_error(client.get("/v1/fine_tuning/jobs?limit=abc", headers=acme), 422)
    assert err["param"] == "limit"


def test_unknown_route_is_openai_404(client, acme):
    assert_error(client.get("/v1/nothing", headers=acme), 404)


def test_server_error_hides_the_trace(app, client, acme):
    @app.get("/boom")
    def boom():
        raise RuntimeError("secret detail")

    r = client.get("/boom")
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "internal server error", "type": "server_error",
                                  "param": None, "code": None}}
    assert "secret" not in r.text and "Traceback" not in r.text


def test_health_ready_metrics(client, acme):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    client.get("/v1/files", headers=acme)
    text = client.get("/metrics").text
    assert 'lathe_http_requests_total{method="GET",route="/v1/files",status="200"}' in text
    assert 'lathe_jobs{status="queued"} 0.0' in text


def test_readyz_503_when_broker_down(settings, client):
    client.app.state.settings = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["broker"] != "ok"


def test_openapi_documents_the_toolbox(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/fine_tuning/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobCreate"}
    comps = schema["components"]["schemas"]
    assert "max_grad_norm" in comps["TrainingConfig"]["properties"]
    assert schema["paths"]["/v1/files"]["post"]["description"].startswith("Upload a file")
