"""Experiment tracking through the whole service: a job created over HTTP with a wandb and an mlflow
integration, trained by a `lathe worker`'s training process, logs to a real `mlflow server` on
loopback and to a W&B offline run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from lathe.db.tables import JobStatus
from tests.e2e.test_search import upload
from tests.tiny_models import sentiment_rows
from tests.trackers import wandb_run

pytestmark = pytest.mark.timeout(300)


def test_a_job_logs_its_run_to_mlflow_and_wandb(stack, tmp_path, mlflow_url, monkeypatch):
    from mlflow import MlflowClient

    for name in ("WANDB_MODE", "WANDB_BASE_URL", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # the worker's children inherit it
    stack.settings = stack.settings.model_copy(update={"mlflow_tracking_uri": mlflow_url,
                                                       "wandb_dir": tmp_path / "runs"})
    api = stack.api()
    stack.worker("a")
    body = {"model": "tiny-bert", "seed": 3, "task": "text-classification",
            "training_file": upload(api, tmp_path, "train", sentiment_rows(48)),
            "validation_file": upload(api, tmp_path, "valid", sentiment_rows(16, seed=1)),
            "test_file": upload(api, tmp_path, "test", sentiment_rows(16, seed=2)),
            "hyperparameters": {"batch_size": 8, "n_epochs": 1}, "config": {"device": "cpu", "max_length": 16},
            "integrations": [{"type": "mlflow", "mlflow": {"experiment": "e2e"}},
                             {"type": "wandb", "wandb": {"project": "e2e", "name": "tiny"}}]}
    r = api.post("/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    assert stack.wait_status(job_id, timeout=180).status == JobStatus.SUCCEEDED, stack.explain(job_id)

    events = stack.events(job_id)
    assert not [e.message for e in events if e.level != "info"]
    started = {e.data["integration"]: e.data for e in events if e.data and "run_id" in e.data}
    train = stack.metrics(job_id, split="train")

    client = MlflowClient(mlflow_url)
    run = client.get_run(started["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == job_id and run.data.tags["lathe.job_id"] == job_id
    assert client.get_experiment(run.info.experiment_id).name == "e2e"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(m.step, pytest.approx(m.values["loss"])) for m in train]
    assert run.data.params["hyperparameters.batch_size"] == "8" and "test/accuracy" in run.data.metrics
    assert {"test_report.json", "model"} <= {f.path for f in client.list_artifacts(run.info.run_id)}
    assert "model/config.json" in {f.path for f in client.list_artifacts(run.info.run_id, "model")}

    folder = Path(started["wandb"]["folder"])
    assert folder.parent == tmp_path / "runs" / "wandb"
    logged = wandb_run(folder)
    assert logged["run"].display_name == "tiny" and logged["exit"] == 0
    assert [row["_step"] for row in logged["history"] if "train/loss" in row] == [m.step for m in train]
