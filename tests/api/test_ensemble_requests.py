"""An ensemble request through the API: what is refused before anything is stored (each with an
OpenAI-style error naming the field), what is stored and published for a good one, and the actions
an ensemble does and does not take."""

from __future__ import annotations

import pytest

from lathe.db.session import session_scope
from lathe.db.tables import Job, JobStatus
from tests.api.test_basics import assert_error
from tests.api.test_jobs import create, queued_messages, set_status
from tests.api.test_search_requests import files  # noqa: F401 - a fixture


def ensemble_job(client, acme, files, *, validation=True, **ensemble):  # noqa: F811
    body = dict(files) if validation else {"training_file": files["training_file"]}
    return create(client, acme, model="bert-base-uncased", **body, config={"ensemble": ensemble})


def test_an_ensemble_is_stored_with_its_record_and_publishes_its_validation(client, acme, files, settings,  # noqa: F811
                                                                             redis_client):
    r = ensemble_job(client, acme, files, method="stacking", folds=2,
                     members=[{"config.lora.r": 4}, {"hyperparameters.learning_rate_multiplier": 2}])
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "validating_files" and job["search"] is None
    assert job["ensemble"] == {"method": "stacking", "phase": "members", "members": []}
    assert job["config"]["ensemble"]["folds"] == 2 and job["config"]["ensemble"]["vote"] == "soft"
    [message] = queued_messages(redis_client, settings)
    assert message["headers"]["task"] == "lathe.validate_job"


@pytest.mark.parametrize("ensemble, param, words", [
    ({"method": "boosting", "parallel": 3}, "config.ensemble", "parallel applies to bagging, stacking and soup"),
    ({"method": "bagging", "members": 1}, "config.ensemble", "2 to 16 members"),
    ({"method": "soup", "vote": "hard"}, "config.ensemble", "vote applies to bagging"),
    ({"method": "bagging", "folds": 4}, "config.ensemble", "folds applies to stacking"),
    ({"method": "bagging", "members": [{"config.nope": 1}, {}]}, "config.ensemble.members", "config.nope"),
    ({"method": "bagging", "members": [{"config.train_rows.seed": 1}, {}]}, "config.ensemble.members",
     "set by the ensemble"),
    ({"method": "bagging", "members": [{}, {"config.freeze.first_n_layers": -1}]}, "config.ensemble.members",
     "members[1] is not a valid job"),
    ({"from_search": "ftjob-nope"}, "config.ensemble.from_search", "No such job"),
])
def test_a_bad_ensemble_is_a_400_naming_the_field_and_stores_nothing(client, acme, files, settings, ensemble,  # noqa: F811
                                                                     param, words):
    r = ensemble_job(client, acme, files, **ensemble)
    err = assert_error(r, 404 if "No such" in words else 400, param=param)
    assert words in err["message"], err["message"]
    with session_scope(settings.sqlalchemy_url) as session:
        assert session.query(Job).count() == 0


def test_a_soup_needs_a_validation_file_and_a_causal_lm_only_soups(client, acme, files):  # noqa: F811
    err = assert_error(ensemble_job(client, acme, files, validation=False, method="soup"), 400,
                       param="config.ensemble.method")
    assert "needs a validation file" in err["message"]
    r = create(client, acme, model="bert-base-uncased", task="causal-lm", **files,
               config={"ensemble": {"method": "bagging"}})
    err = assert_error(r, 400, param="config.ensemble.method")
    assert "not causal-lm" in err["message"]


def test_boosting_is_for_single_label_classifiers(client, acme, files):  # noqa: F811
    r = create(client, acme, model="bert-base-uncased", task="token-classification", **files,
               config={"ensemble": {"method": "boosting"}})
    err = assert_error(r, 400, param="config.ensemble.method")
    assert "not token-classification" in err["message"]
    r = ensemble_job(client, acme, files, method="boosting", members=4)
    assert r.status_code == 200, r.text


def test_search_and_ensemble_are_one_or_the_other(client, acme, files):  # noqa: F811
    r = create(client, acme, model="bert-base-uncased", **files,
               config={"search": {}, "ensemble": {"method": "soup"}})
    err = assert_error(r, 400, param="config.ensemble")
    assert "cannot be combined" in err["message"]


def test_an_ensemble_is_cancelled_but_not_paused(client, acme, files, settings):  # noqa: F811
    job_id = ensemble_job(client, acme, files, method="soup").json()["id"]
    set_status(settings, job_id, JobStatus.RUNNING)
    err = assert_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=acme), 409,
                       code="ensemble_not_pausable")
    assert "pause its members" in err["message"]
    r = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=acme)
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
