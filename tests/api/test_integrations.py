"""A job's `integrations`: OpenAI's wandb objects and Lathe's mlflow ones, as the openai SDK sends
them; stored on the job and returned by it; a bad one is a 400 naming the item's field."""

from __future__ import annotations

import pytest

from lathe.db.session import session_scope
from lathe.db.tables import Job
from tests.api.test_basics import assert_error

JOBS = "/v1/fine_tuning/jobs"
WANDB = {"type": "wandb", "wandb": {"project": "sentiment", "name": "first", "entity": "acme", "tags": ["a", "b"]}}
MLFLOW = {"type": "mlflow", "mlflow": {"experiment": "sentiment", "run_name": "first"}}


@pytest.fixture
def with_mlflow(client):
    client.app.state.settings = client.app.state.settings.model_copy(
        update={"mlflow_tracking_uri": "http://mlflow.internal:5000"})


def create(client, headers, train_file, integrations):
    return client.post(JOBS, headers=headers, json={"model": "bert-base-uncased", "training_file": train_file,
                                                    "integrations": integrations})


def test_the_sdk_creates_a_job_with_a_wandb_integration_and_reads_it_back(sdk, train_file, settings):
    job = sdk.fine_tuning.jobs.create(model="bert-base-uncased", training_file=train_file,
                                      integrations=[{"type": "wandb", "wandb": {"project": "sentiment", "tags": ["x"]}}])
    [integration] = sdk.fine_tuning.jobs.retrieve(job.id).integrations
    assert integration.type == "wandb" and integration.wandb.project == "sentiment"
    assert integration.wandb.tags == ["x"] and integration.wandb.name is None and integration.wandb.entity is None
    with session_scope(settings.sqlalchemy_url) as session:
        assert session.get(Job, job.id).integrations == [
            {"type": "wandb", "wandb": {"project": "sentiment", "entity": None, "name": None, "tags": ["x"]}}]


def test_mlflow_is_accepted_where_the_server_has_a_tracking_uri(client, acme, train_file, with_mlflow):
    r = create(client, acme, train_file, [WANDB, MLFLOW])
    assert r.status_code == 200, r.text
    assert r.json()["integrations"] == [WANDB, MLFLOW]
    assert client.get(f"{JOBS}/{r.json()['id']}", headers=acme).json()["integrations"] == [WANDB, MLFLOW]
    listed = client.get(JOBS, headers=acme).json()["data"]
    assert listed[0]["integrations"] == [WANDB, MLFLOW]


def test_mlflow_without_a_tracking_uri_is_refused(client, acme, train_file):
    err = assert_error(create(client, acme, train_file, [WANDB, MLFLOW]), 400, param="integrations[1].type")
    assert err["code"] == "integration_not_configured" and "LATHE_MLFLOW_TRACKING_URI" in err["message"]


@pytest.mark.parametrize("integrations, param", [
    ([{"type": "comet", "comet": {}}], "integrations[0].type"),
    ([{"wandb": {"project": "p"}}], "integrations[0].type"),
    (["wandb"], "integrations[0].type"),
    ({"type": "wandb"}, "integrations"),
    ([{"type": "wandb"}], "integrations[0].wandb"),
    ([{"type": "wandb", "wandb": {}}], "integrations[0].wandb.project"),
    ([{"type": "wandb", "wandb": {"project": "a/b"}}], "integrations[0].wandb.project"),
    ([{"type": "wandb", "wandb": {"project": "p" * 129}}], "integrations[0].wandb.project"),
    ([{"type": "wandb", "wandb": {"project": "p", "tags": ["ok", "t" * 65]}}], "integrations[0].wandb.tags[1]"),
    ([{"type": "wandb", "wandb": {"project": "p", "colour": "red"}}], "integrations[0].wandb.colour"),
    ([{"type": "wandb", "wandb": {"project": "p"}, "mlflow": {"experiment": "e"}}], "integrations[0].mlflow"),
    ([WANDB, WANDB], "integrations[1].type"),
    ([MLFLOW, {"type": "mlflow", "mlflow": {"run_name": "r"}}], "integrations[1].type"),
    ([{"type": "mlflow", "mlflow": {"run_name": "r"}}], "integrations[0].mlflow.experiment"),
    ([{"type": "mlflow", "mlflow": {"experiment": ""}}], "integrations[0].mlflow.experiment"),
])
def test_a_bad_integration_is_a_400_naming_its_field(client, acme, train_file, with_mlflow, integrations, param):
    err = assert_error(create(client, acme, train_file, integrations), 400, param=param)
    assert err["message"].startswith(param) and err["code"] == "invalid_value"


def test_no_integrations_is_an_empty_list(client, acme, train_file):
    for integrations in (None, []):
        r = create(client, acme, train_file, integrations)
        assert r.status_code == 200 and r.json()["integrations"] == []
