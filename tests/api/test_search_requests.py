"""A search request through the API: what is refused before anything is stored (a space key that
is not a field, a value that makes an invalid job, no validation file, a bad warm start), what is
stored and published for a good one, and the actions a search does and does not take."""

from __future__ import annotations

import json

import pytest

from lathe.db.session import session_scope
from lathe.db.tables import Job, JobStatus
from lathe.queue import ADVANCE_TASK
from tests.api.conftest import upload
from tests.api.test_basics import assert_error
from tests.api.test_jobs import JOBS, create, queued_messages, set_status


@pytest.fixture
def files(client, acme) -> dict[str, str]:
    ids = {name: upload(client, acme, name=f"{name}.csv").json()["id"] for name in ("train", "valid")}
    return {"training_file": ids["train"], "validation_file": ids["valid"]}


@pytest.fixture
def two_layer_bert(settings) -> str:
    folder = settings.models_dir / "two-layer-bert"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2, "vocab_size": 100}))
    return "two-layer-bert"


def search_job(client, acme, files, model="bert-base-uncased", **search):
    return create(client, acme, model=model, **files, config={"search": search})


GRID = {"hyperparameters.batch_size": {"type": "categorical", "choices": [8, 16]},
        "hyperparameters.n_epochs": {"type": "int", "low": 1, "high": 2}}


def test_a_search_is_stored_with_its_record_and_publishes_its_validation(client, acme, files, settings, redis_client):
    r = search_job(client, acme, files, trials=4, sampler="grid", space=GRID, objective={"metric": "f1_macro"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "validating_files" and job["parent_job"] is None
    assert job["search"] == {"objective": {"metric": "f1_macro", "mode": "max"}, "trials_planned": None,
                             "best_trial": None, "trials": []}
    assert job["config"]["search"]["sampler"] == {"type": "grid", "n_startup_trials": None}
    assert job["config"]["search"]["pruner"]["type"] == "median"  # the default
    [message] = queued_messages(redis_client, settings)
    assert message["headers"]["task"] == "lathe.validate_job"


@pytest.mark.parametrize("key, why", [
    ("hyperparameters.nope", "not a field"),
    ("config.text_column", "not a numeric, boolean or enumerated field"),
    ("config.search.trials", "the search itself"),
    ("model", "not a field of hyperparameters or config"),
    ("config.lora", "not a numeric"),
    ("config.optimizer.weight_decay.x", "has no fields"),
])
def test_a_space_key_that_cannot_be_searched_is_a_400_naming_it(client, acme, files, key, why):
    err = assert_error(search_job(client, acme, files, space={key: {"type": "float", "low": 0, "high": 1}}),
                       400, param=f"config.search.space.{key}")
    assert why in err["message"] and err["code"] == "invalid_search_space"


def test_a_space_that_can_make_an_invalid_job_is_a_400_naming_the_key(client, acme, files, two_layer_bert):
    # Out of the field's own bounds (weight_decay <= 1) ...
    err = assert_error(search_job(client, acme, files, space={
        "config.optimizer.weight_decay": {"type": "float", "low": 0, "high": 2}}), 400,
        param="config.search.space.config.optimizer.weight_decay")
    assert "weight_decay=2.0" in err["message"]
    # ... deeper than the model (a check on the job, not the field) ...
    err = assert_error(search_job(client, acme, files, model=two_layer_bert, space={
        "config.freeze.first_n_layers": {"type": "int", "low": 0, "high": 4}}), 400,
        param="config.search.space.config.freeze.first_n_layers")
    assert "2" in err["message"]
    # ... and a value of the wrong type for the field.
    assert_error(search_job(client, acme, files, space={
        "hyperparameters.batch_size": {"type": "categorical", "choices": [8, "big"]}}), 400,
        param="config.search.space.hyperparameters.batch_size")
    # Within bounds it is accepted.
    ok = search_job(client, acme, files, model=two_layer_bert, space={
        "config.freeze.first_n_layers": {"type": "int", "low": 0, "high": 2}})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("search, param", [
    ({"space": {"hyperparameters.n_epochs": {"type": "int", "low": 3, "high": 1}}}, "config.search.space"),
    ({"space": {"hyperparameters.n_epochs": {"type": "int", "low": 1.5, "high": 3}}}, "config.search.space"),
    ({"space": {"hyperparameters.learning_rate_multiplier": {"type": "float", "low": 0, "high": 3, "log": True}}},
     "config.search.space"),
    ({"space": {"hyperparameters.batch_size": {"type": "categorical"}}}, "config.search.space"),
    ({"sampler": "annealing"}, "config.search.sampler"),
    ({"sampler": {"type": "random", "n_startup_trials": 3}}, "config.search.sampler"),
    ({"pruner": {"type": "hyperband", "percentile": 30}}, "config.search.pruner"),
    ({"objective": {"metric": "bleu"}}, "config.search.objective.metric"),
    ({"trials": 0}, "config.search.trials"),
])
def test_malformed_search_settings_are_400(client, acme, files, search, param):
    err = assert_error(search_job(client, acme, files, **search), 400)
    assert err["param"].startswith(param), err


def test_a_search_needs_a_validation_file(client, acme, files):
    err = assert_error(create(client, acme, model="bert-base-uncased", training_file=files["training_file"],
                              config={"search": {}}), 400, param="config.search")
    assert "validation file" in err["message"]


def test_the_objective_and_metric_for_best_model_must_agree(client, acme, files):
    r = create(client, acme, model="bert-base-uncased", **files,
               config={"metric_for_best_model": "accuracy", "search": {"objective": {"metric": "f1_macro"}}})
    assert_error(r, 400, param="config.search.objective.metric")


def test_the_grid_sampler_needs_steps_on_float_ranges(client, acme, files):
    err = assert_error(search_job(client, acme, files, sampler="grid", space={
        "config.optimizer.weight_decay": {"type": "float", "low": 0, "high": 0.1}}), 400,
        param="config.search.space.config.optimizer.weight_decay")
    assert "step" in err["message"]


def test_warm_start_from_must_be_an_earlier_search_of_the_tenant_with_the_same_objective(
        client, acme, other, files, settings):
    plain = create(client, acme, model="bert-base-uncased", **files).json()["id"]
    assert_error(search_job(client, acme, files, warm_start_from="ftjob-nope"), 404,
                 param="config.search.warm_start_from")
    assert_error(search_job(client, acme, files, warm_start_from=plain), 400, param="config.search.warm_start_from")
    earlier = search_job(client, acme, files, objective={"metric": "accuracy"}).json()["id"]
    err = assert_error(search_job(client, acme, files, warm_start_from=earlier), 400,
                       param="config.search.warm_start_from")
    assert "accuracy" in err["message"]
    err = assert_error(search_job(client, acme, files, objective={"metric": "accuracy"}, warm_start_from=earlier),
                       400, param="config.search.warm_start_from")
    assert "no finished trial" in err["message"]
    # Another tenant's search is not found.
    other_files = {k: upload(client, other, name=f"{k}.csv").json()["id"] for k in ("training_file", "validation_file")}
    assert_error(search_job(client, other, other_files, objective={"metric": "accuracy"}, warm_start_from=earlier),
                 404, param="config.search.warm_start_from")


def test_a_search_is_cancelled_not_paused(client, acme, files, settings, redis_client):
    job = search_job(client, acme, files, space=GRID, sampler="grid").json()
    set_status(settings, job["id"], JobStatus.RUNNING)
    err = assert_error(client.post(f"{JOBS}/{job['id']}/pause", headers=acme), 409)
    assert err["code"] == "search_not_pausable"
    redis_client.delete(*[k for k in redis_client.scan_iter(f"*{settings.queue}*")])
    r = client.post(f"{JOBS}/{job['id']}/cancel", headers=acme)
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    assert [m["headers"]["task"] for m in queued_messages(redis_client, settings)] == [ADVANCE_TASK]


def test_list_by_parent_job(client, acme, other, files, settings):
    parent = search_job(client, acme, files).json()["id"]
    plain = create(client, acme, model="bert-base-uncased", **files).json()["id"]
    with session_scope(settings.sqlalchemy_url) as s:
        row = s.get(Job, plain)
        row.parent_job, row.child_index = parent, 0
    r = client.get(JOBS, headers=acme, params={"parent_job": parent})
    assert r.status_code == 200 and [j["id"] for j in r.json()["data"]] == [plain]
    assert r.json()["data"][0]["parent_job"] == parent
    assert {j["id"] for j in client.get(JOBS, headers=acme).json()["data"]} == {parent, plain}
    assert_error(client.get(JOBS, headers=other, params={"parent_job": parent}), 404, param="parent_job")
