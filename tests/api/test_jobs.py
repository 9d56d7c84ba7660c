"""Jobs: create (validation, files, model resolution, publishing, idempotency), list, state changes."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from lathe.db.tables import Job, JobStatus, Model, now
from lathe.db.session import session_scope
from lathe.queue import validate_queue
from tests.api.conftest import upload
from tests.api.test_basics import assert_error

JOBS = "/v1/fine_tuning/jobs"


def create(client, headers, **body):
    return client.post(JOBS, headers=headers, json=body)


def queued_messages(redis_client, settings) -> list[dict]:
    """Messages waiting in the test's queues: LATHE_QUEUE (lathe.run_job) and <queue>.validate."""
    return [json.loads(m) for queue in (settings.queue, validate_queue(settings))
            for m in redis_client.lrange(queue, 0, -1)]


def set_status(settings, job_id: str, status: JobStatus, **values) -> None:
    with session_scope(settings.sqlalchemy_url) as s:
        job = s.get(Job, job_id)
        job.status = status
        for k, v in values.items():
            setattr(job, k, v)


def test_create_job_stores_then_publishes_once(app, client, acme, train_file, settings, redis_client):
    seen = []
    publish = app.state.publish

    def checking_publish(task, job_id):
        with session_scope(settings.sqlalchemy_url) as s:  # committed before the message goes out
            seen.append((task, s.get(Job, job_id).status))
        return publish(task, job_id)

    app.state.publish = checking_publish
    r = create(client, acme, model="bert-base-uncased", training_file=train_file, suffix="mine",
               hyperparameters={"n_epochs": 2}, metadata={"team": "a"},
               config={"max_length": 64, "optimizer": {"weight_decay": 0.0}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job"
    assert job["status"] == "validating_files" and job["training_file"] == train_file
    assert job["hyperparameters"]["n_epochs"] == 2 and job["hyperparameters"]["batch_size"] == "auto"
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": job["hyperparameters"]}}
    assert job["config"]["max_length"] == 64 and job["config"]["optimizer"]["weight_decay"] == 0.0
    assert job["user_provided_suffix"] == "mine" and job["metadata"] == {"team": "a"}
    assert isinstance(job["seed"], int) and job["integrations"] == [] and job["error"] is None
    assert job["attempt"] == 0 and job["metrics"] is None and job["organization_id"].startswith("org-")
    assert seen == [("lathe.validate_job", "validating_files")]
    messages = queued_messages(redis_client, settings)
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == "lathe.validate_job"
    assert job["id"] in messages[0]["headers"]["argsrepr"]
    events = client.get(f"{JOBS}/{job['id']}/events", headers=acme).json()["data"]
    assert [e["message"] for e in events] == ["Created fine-tuning job"]


def test_publish_failure_keeps_the_job(app, client, acme, train_file, settings):
    app.state.publish.settings = settings.model_copy(update={"redis_url": None})  # broker_url raises
    r = create(client, acme, model="bert-base-uncased", training_file=train_file)
    assert r.status_code == 200, r.text
    assert client.get(f"{JOBS}/{r.json()['id']}", headers=acme).json()["status"] == "validating_files"


def test_method_supervised(client, acme, train_file):
    r = create(client, acme, model="bert-base-uncased", training_file=train_file, seed=7,
               method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}})
    assert r.status_code == 200, r.text
    assert r.json()["hyperparameters"]["batch_size"] == 4 and r.json()["seed"] == 7


def test_a_dpo_job_reports_its_method_as_openai_does(client, acme, train_file):
    r = create(client, acme, model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file=train_file,
               method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}},
               config={"dpo": {"loss_type": "ipo"}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["method"]["type"] == "dpo"
    assert job["method"]["dpo"]["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto",
                                                        "learning_rate_multiplier": "auto", "beta": 0.2}
    assert job["config"]["dpo"] == {"loss_type": "ipo"}
    err = assert_error(create(client, acme, model="m", training_file=train_file,
                              method={"type": "reinforcement"}), 400, param="method.type")
    assert err["code"] == "unsupported_method"


@pytest.mark.parametrize("extra, param", [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"learning_rate_multiplier": "fast"}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"epochs": 3}}, "hyperparameters.epochs"),
    ({"config": {"optimizer": {"learning_rate": 5}}}, "config.optimizer.learning_rate"),
    ({"config": {"max_length": 2}}, "config.max_length"),
    ({"config": {"metric_for_best_model": "bleu"}}, "config.metric_for_best_model"),
    ({"method": {"type": "reinforcement", "reinforcement": {}}}, "method.type"),
    ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
    ({"method": {"type": "dpo"}, "task": "text-classification"}, "method"),
    ({"method": {"type": "dpo"}, "task": "causal-lm", "config": {"packing": True}}, "config.packing"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.2}}}},
     "method.supervised.hyperparameters.beta"),
    ({"config": {"dpo": {"loss_type": "ipo"}}}, "config.dpo"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": -1}}}},
     "method.supervised.hyperparameters.batch_size"),
    ({"integrations": [{"type": "comet"}]}, "integrations[0].type"),
    ({"seed": -1}, "seed"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"task": "summarize-everything"}, "task"),
])
def test_bad_request_fields_are_400_with_param(client, acme, train_file, extra, param):
    body = {"model": "bert-base-uncased", "training_file": train_file, **extra}
    err = assert_error(create(client, acme, **body), 400, param=param)
    assert param.split(".")[-1] in err["message"] or err["message"]


def test_malformed_body_is_422(client, acme):
    r = client.post(JOBS, headers={**acme, "Content-Type": "application/json"}, content=b"{not json")
    assert_error(r, 422)


def test_files_must_exist_for_this_tenant(client, acme, other, train_file, settings):
    theirs = upload(client, other).json()["id"]
    assert_error(create(client, acme, model="bert-base-uncased", training_file=theirs), 404, param="training_file")
    assert_error(create(client, acme, model="bert-base-uncased", training_file="file-nope"), 404, param="training_file")
    for param in ("validation_file", "test_file"):
        body = {"model": "bert-base-uncased", "training_file": train_file, param: theirs}
        assert_error(create(client, acme, **body), 404, param=param)
    assert_error(create(client, acme, model=theirs, training_file=train_file), 404, param="model")


def test_model_resolution(client, acme, other, train_file, settings):
    (settings.models_dir / "local-bert").mkdir(parents=True)
    (settings.models_dir / "local-bert" / "config.json").write_text("{}")
    assert create(client, acme, model="local-bert", training_file=train_file).status_code == 200
    assert create(client, acme, model="org/name-1.0", training_file=train_file).status_code == 200
    for bad in ("../etc", "a/b/c", "has space", "ft:bert:x:ftjob-1", "-flag", "a/.hidden"):
        assert_error(create(client, acme, model=bad, training_file=train_file), 404, param="model")
    assert_error(create(client, acme, model=train_file, training_file=train_file), 400, param="model")

    job_id = create(client, other, model="bert-base-uncased", training_file=upload(client, other).json()["id"]).json()["id"]
    with session_scope(settings.sqlalchemy_url) as s:
        tenant_id = s.get(Job, job_id).tenant_id
        folder = settings.models_store / "theirs"
        folder.mkdir(parents=True)
        s.add(Model(id="ft:bert:theirs:1", tenant_id=tenant_id, job_id=job_id, task="text-classification",
                    path=str(folder), archive_path="/nowhere.tar", bytes=0, created_at=now()))
    assert create(client, other, model="ft:bert:theirs:1", training_file=upload(client, other).json()["id"]).status_code == 200
    assert_error(create(client, acme, model="ft:bert:theirs:1", training_file=train_file), 404, param="model")
    shutil.rmtree(folder)  # its files gone: refused at create, as the worker would fail it
    assert_error(create(client, other, model="ft:bert:theirs:1", training_file=upload(client, other).json()["id"]),
                 404, param="model")

    hubless = client.app.state.settings.model_copy(update={"allow_hub_models": False})
    client.app.state.settings = hubless
    assert_error(create(client, acme, model="org/name", training_file=train_file), 404, param="model")
    assert create(client, acme, model="local-bert", training_file=train_file).status_code == 200


def test_idempotency_key(client, acme, other, train_file, settings, redis_client):
    body = {"model": "bert-base-uncased", "training_file": train_file, "metadata": {"k": "v"}}
    first = client.post(JOBS, headers={**acme, "Idempotency-Key": "abc"}, json=body)
    again = client.post(JOBS, headers={**acme, "Idempotency-Key": "abc"}, json=body)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert len(queued_messages(redis_client, settings)) == 1
    # the worker rewrites the spec when it validates; a retry still finds the same job
    with session_scope(settings.sqlalchemy_url) as s:
        job = s.get(Job, first.json()["id"])
        job.spec = {**job.spec, "task": "text-classification"}
    replay = client.post(JOBS, headers={**acme, "Idempotency-Key": "abc"}, json=body)
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    changed = client.post(JOBS, headers={**acme, "Idempotency-Key": "abc"}, json={**body, "suffix": "x"})
    assert_error(changed, 409, code="idempotency_key_reused")
    # keys are per tenant
    theirs = client.post(JOBS, headers={**other, "Idempotency-Key": "abc"},
                         json={**body, "training_file": upload(client, other).json()["id"]})
    assert theirs.status_code == 200 and theirs.json()["id"] != first.json()["id"]


def test_list_jobs_pagination_and_metadata_filter(client, acme, other, train_file):
    ids = [create(client, acme, model="bert-base-uncased", training_file=train_file,
                  metadata={"n": str(i % 2)}).json()["id"] for i in range(5)]
    seen, after = [], None
    while True:
        page = client.get(JOBS, headers=acme, params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    odd = client.get(JOBS, headers=acme, params={"metadata[n]": "1"}).json()["data"]
    assert sorted(j["id"] for j in odd) == sorted(ids[1::2])
    assert client.get(JOBS, headers=other).json()["data"] == []
    for path in ("", "/cancel", "/pause", "/resume", "/events", "/checkpoints", "/metrics"):
        method = "POST" if path in ("/cancel", "/pause", "/resume") else "GET"
        assert_error(client.request(method, f"{JOBS}/{ids[0]}{path}", headers=other), 404)


def test_cancel_transitions(client, acme, train_file, settings):
    def new_job():
        return create(client, acme, model="bert-base-uncased", training_file=train_file).json()["id"]

    for status in (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.PAUSED):
        job_id = new_job()
        set_status(settings, job_id, status)
        r = client.post(f"{JOBS}/{job_id}/cancel", headers=acme)
        assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    job_id = new_job()
    set_status(settings, job_id, JobStatus.RUNNING)
    assert client.post(f"{JOBS}/{job_id}/cancel", headers=acme).json()["status"] == "cancelling"
    assert client.post(f"{JOBS}/{job_id}/cancel", headers=acme).json()["status"] == "cancelling"
    for status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        set_status(settings, job_id, status)
        assert_error(client.post(f"{JOBS}/{job_id}/cancel", headers=acme), 409)


def test_pause_and_resume(client, acme, train_file, settings, redis_client):
    job_id = create(client, acme, model="bert-base-uncased", training_file=train_file).json()["id"]
    assert client.post(f"{JOBS}/{job_id}/pause", headers=acme).json()["status"] == "paused"
    assert client.post(f"{JOBS}/{job_id}/pause", headers=acme).json()["status"] == "paused"  # idempotent
    r = client.post(f"{JOBS}/{job_id}/resume", headers=acme)
    assert r.json()["status"] == "validating_files"  # paused before validation: validate again
    set_status(settings, job_id, JobStatus.QUEUED, queued_at=now())
    client.post(f"{JOBS}/{job_id}/pause", headers=acme)
    assert client.post(f"{JOBS}/{job_id}/resume", headers=acme).json()["status"] == "queued"
    tasks = [m["headers"]["task"] for m in queued_messages(redis_client, settings)]
    assert sorted(tasks) == ["lathe.run_job", "lathe.validate_job", "lathe.validate_job"]
    assert_error(client.post(f"{JOBS}/{job_id}/resume", headers=acme), 409)
    # a running job: paused at once in SQL; its worker holds the lease until the checkpoint is saved
    set_status(settings, job_id, JobStatus.RUNNING, lease_owner="host:1:abc")
    assert client.post(f"{JOBS}/{job_id}/pause", headers=acme).json()["status"] == "paused"
    r = client.post(f"{JOBS}/{job_id}/resume", headers=acme)
    assert_error(r, 409, code="job_stopping")
    assert r.headers["retry-after"] == "5"
    set_status(settings, job_id, JobStatus.PAUSED, lease_owner=None)  # what the worker's finalise does
    assert client.post(f"{JOBS}/{job_id}/resume", headers=acme).json()["status"] == "queued"


def test_sdk_jobs(sdk, client, train_file, settings):
    job = sdk.fine_tuning.jobs.create(model="bert-base-uncased", training_file=train_file,
                                      hyperparameters={"n_epochs": 1}, suffix="sdk",
                                      extra_body={"task": "text-classification", "config": {"max_length": 32}})
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 1
    assert job.model_extra["config"]["max_length"] == 32 if job.model_extra else True
    assert sdk.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert [j.id for j in sdk.fine_tuning.jobs.list()] == [job.id]
    events = sdk.fine_tuning.jobs.list_events(job.id)
    assert [e.message for e in events] == ["Created fine-tuning job"]
    paused = sdk.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    assert sdk.fine_tuning.jobs.resume(job.id).status == "validating_files"
    assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert list(sdk.fine_tuning.jobs.checkpoints.list(job.id)) == []
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model="bert-base-uncased", training_file=train_file,
                                    hyperparameters={"n_epochs": 0})
    assert exc.value.body["param"] == "hyperparameters.n_epochs"


def test_idempotency_race(client, acme, train_file, settings, redis_client):
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": "bert-base-uncased", "training_file": train_file}

    def post(_):
        return client.post(JOBS, headers={**acme, "Idempotency-Key": "race"}, json=body)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(post, range(6)))
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(queued_messages(redis_client, settings)) == 1


def test_hub_models_can_be_restricted_to_an_allow_list(client, acme, train_file, settings):
    settings.hub_model_allowlist = "HuggingFaceTB/*, sentence-transformers/all-MiniLM-L6-v2"
    try:
        err = assert_error(create(client, acme, model="bert-base-uncased", training_file=train_file), 400,
                           param="model", code="model_not_allowed")
        assert "allow-list" in err["message"]
        for allowed in ("HuggingFaceTB/SmolLM2-135M", "sentence-transformers/all-MiniLM-L6-v2"):
            assert create(client, acme, model=allowed, training_file=train_file).status_code == 200
    finally:
        settings.hub_model_allowlist = ""


@pytest.mark.parametrize("extra, param", [
    ({"task": "text-classification", "config": {"packing": True}}, "config.packing"),
    ({"task": "causal-lm", "config": {"augmentation": {"text": {"deletion": 0.1}}}}, "config.augmentation.text"),
    ({"task": "causal-lm", "config": {"head": {"type": "linear"}}}, "config.head.type"),
    ({"task": "text-classification", "config": {"image_size": 64}}, "config.image_size"),
    ({"config": {"scheduler": {"name": "linear", "num_cycles": 3}}}, "config.scheduler.num_cycles"),
    ({"config": {"optimizer": {"name": "adamw", "momentum": 0.5}}}, "config.optimizer.momentum"),
    ({"config": {"eval_every_steps": 10}}, "config.eval_every_steps"),  # no validation file
    ({"config": {"early_stopping": {"patience": 2}}}, "config.early_stopping"),
    ({"config": {"head": {"dropout": 0.3}}}, "config.head.dropout"),  # the default head
    ({"config": {"freeze": {"patterns": ["(unclosed"]}}}, "config.freeze.patterns"),
])
def test_inapplicable_fields_are_refused_at_create(client, acme, train_file, extra, param):
    body = {"model": "bert-base-uncased", "training_file": train_file, **extra}
    err = assert_error(create(client, acme, **body), 400, param=param)
    assert err["code"] in ("inapplicable_field", "invalid_value"), err


def test_a_freeze_deeper_than_the_model_is_refused_at_create(client, acme, train_file, settings):
    folder = settings.models_dir / "two-layer-bert"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2,
                                                    "vocab_size": 100}))
    ok = create(client, acme, model="two-layer-bert", training_file=train_file, config={"freeze": {"first_n_layers": 2}})
    assert ok.status_code == 200, ok.text
    err = assert_error(create(client, acme, model="two-layer-bert", training_file=train_file,
                              config={"freeze": {"first_n_layers": 3}}), 400, param="config.freeze.first_n_layers")
    assert "2" in err["message"]


def test_defaults_are_never_refused(client, acme, train_file):
    """The stored job shows the whole config with defaults, yet nothing the request didn't set counts."""
    r = create(client, acme, model="bert-base-uncased", training_file=train_file, task="causal-lm")
    assert r.status_code == 200, r.text
    assert r.json()["config"]["head"]["type"] == "default" and r.json()["config"]["packing"] is False
