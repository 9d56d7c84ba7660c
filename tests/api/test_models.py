"""Fine-tuned models: list, get, download, delete, predict (through a predict pool running in this
process, with a stand-in for the worker's prediction process)."""

from __future__ import annotations

import io
import tarfile
import time

import pytest

from lathe.db.tables import Job, JobStatus, Model, now
from lathe.db.session import session_scope
from lathe.queue import predict_queue
from tests.api.test_basics import assert_error
from tests.api.test_jobs import create, set_status

MODEL_ID = "ft:bert-base-uncased:acme:demo:ftjob-1"


@pytest.fixture
def model_id(client, acme, train_file, settings, tmp_path):
    job_id = create(client, acme, model="bert-base-uncased", training_file=train_file).json()["id"]
    folder = settings.models_store / "m1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    archive = settings.models_store / "m1.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(folder / "config.json", arcname="config.json")
    with session_scope(settings.sqlalchemy_url) as s:
        job = s.get(Job, job_id)
        job.status, job.fine_tuned_model = JobStatus.SUCCEEDED, MODEL_ID
        s.add(Model(id=MODEL_ID, tenant_id=job.tenant_id, job_id=job_id, task="text-classification",
                    path=str(folder), archive_path=str(archive), bytes=archive.stat().st_size, created_at=now()))
    return MODEL_ID


def test_list_get_content(client, acme, other, model_id, sdk):
    listed = client.get("/v1/models", headers=acme).json()
    assert [m["id"] for m in listed["data"]] == [model_id]
    m = client.get(f"/v1/models/{model_id}", headers=acme).json()
    assert m["object"] == "model" and m["owned_by"].startswith("org-") and isinstance(m["created"], int)
    assert sdk.models.retrieve(model_id).id == model_id
    assert [x.id for x in sdk.models.list()] == [model_id]
    r = client.get(f"/v1/models/{model_id}/content", headers=acme)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert ".tar" in r.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tf:
        assert tf.getnames() == ["config.json"]
    assert client.get("/v1/models", headers=other).json()["data"] == []
    for method, suffix in [("GET", ""), ("GET", "/content"), ("DELETE", ""), ("POST", "/predict")]:
        r = client.request(method, f"/v1/models/{model_id}{suffix}", headers=other, json={"inputs": ["x"]})
        assert_error(r, 404, param="model")


def test_delete_model(client, acme, model_id, settings, train_file):
    job_id = create(client, acme, model=model_id, training_file=train_file).json()["id"]
    assert_error(client.delete(f"/v1/models/{model_id}", headers=acme), 409)
    set_status(settings, job_id, JobStatus.CANCELLED)
    r = client.delete(f"/v1/models/{model_id}", headers=acme)
    assert r.json() == {"id": model_id, "object": "model", "deleted": True}
    assert not (settings.models_store / "m1").exists() and not (settings.models_store / "m1.tar").exists()
    assert_error(client.get(f"/v1/models/{model_id}", headers=acme), 404)


def test_predict(client, acme, other, model_id, predictor, settings, sdk):
    r = client.post(f"/v1/models/{model_id}/predict", headers=acme, json={"inputs": ["good", "bad"], "top_k": 1})
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "list", "data": [[{"label": "pos", "score": 0.9}]] * 2}
    [request] = predictor.calls  # what the worker was handed: the model's folder, not its id
    assert request["model"] == str(settings.models_store / "m1") and request["inputs"] == ["good", "bad"]
    # README's call through the SDK.
    assert sdk.post(f"/models/{model_id}/predict", cast_to=object, body={"inputs": ["x"], "top_k": 2}) == {
        "object": "list", "data": [[{"label": "pos", "score": 0.9}]]}
    assert_error(client.post(f"/v1/models/{model_id}/predict", headers=other, json={"inputs": ["x"]}), 404,
                 param="model")
    assert len(predictor.calls) == 2  # another tenant's model never reaches a worker

    def respond(request):
        if request["inputs"] == ["fail"]:
            return {"error": {"code": "invalid_input", "message": "cannot", "param": "inputs"}, "status": 400}
        if request["inputs"] == ["crash"]:
            raise RuntimeError("the prediction process died")
        return {"error": {"code": "internal_error", "message": "secret detail", "param": None}, "status": 500}

    predictor.respond = respond
    assert_error(client.post(f"/v1/models/{model_id}/predict", headers=acme, json={"inputs": ["fail"]}),
                 400, param="inputs", code="invalid_input")
    for inputs in (["crash"], ["other"]):
        r = client.post(f"/v1/models/{model_id}/predict", headers=acme, json={"inputs": inputs})
        assert_error(r, 500, code="predict_failed")
        assert "secret" not in r.text
    assert_error(client.post(f"/v1/models/{model_id}/predict", headers=acme, json={"inputs": ["x"] * 65}), 422,
                 param="inputs")


def test_predict_without_a_worker_is_503_and_takes_its_request_back(app, client, acme, other, model_id, settings,
                                                                    redis_client):
    app.state.settings = settings.model_copy(update={"predict_timeout_seconds": 0.3})
    assert_error(client.post(f"/v1/models/{model_id}/predict", headers=other, json={"inputs": ["x"]}), 404)
    assert redis_client.llen(predict_queue(settings)) == 0  # another tenant's model: nothing published
    r = client.post(f"/v1/models/{model_id}/predict", headers=acme, json={"inputs": ["x"]})
    assert_error(r, 503, code="predict_unavailable")
    assert redis_client.llen(predict_queue(settings)) == 0  # nothing left for a worker that starts later


def test_predict_timeout(app, client, acme, model_id, predictor, settings):
    predictor.respond = lambda request: time.sleep(1.5) or {"predictions": [[]]}
    app.state.settings = settings.model_copy(update={"predict_timeout_seconds": 0.5})
    r = client.post(f"/v1/models/{model_id}/predict", headers=acme, json={"inputs": ["x"]})
    assert_error(r, 504, code="timeout")
