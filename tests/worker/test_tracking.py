"""Experiment tracking (worker.tracking): W&B in offline mode (its run folder read back), a real
`mlflow server` on loopback, one that refuses connections, and a tracker that breaks mid-run; the
training process logging a real job; a search's trials inheriting their parent's integrations."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from core.sink import ListSink
from core.spec import JobSpec
from lathe import jobs
from lathe.db.session import session_scope
from lathe.db.tables import Event, Job, JobStatus, Metric
from lathe.parents import advance
from lathe.settings import Settings
from lathe.stack import free_port
from tests.tiny_models import sentiment_rows
from tests.trackers import wandb_run
from tests.worker.conftest import add_file, get_job, make_job
from worker import tasks
from worker.tracking import About, Tracking

SPEC = JobSpec.model_validate({"model": "tiny-bert", "training_file": "file-1", "seed": 3,
                               "config": {"optimizer": {"weight_decay": 0.05}}}).model_dump(mode="json")
WANDB = {"type": "wandb", "wandb": {"project": "lathe-tests", "name": "tiny", "tags": ["ci"], "entity": None}}


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch, tmp_path):
    """W&B's own folders (config, cache) in the test's tmp, and no W&B settings from the environment."""
    for name in ("WANDB_MODE", "WANDB_BASE_URL", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}.items():
        monkeypatch.setenv(name, value)  # as worker.tracking sets them, undone after the test


@pytest.fixture
def plain(tmp_path) -> Settings:
    """Settings for the tests that use no database."""
    return Settings(data_dir=tmp_path / "data")


def about(*integrations, job_id="ftjob-abc", attempt=1, parent=None, index=None) -> About:
    return About(job_id, attempt, parent, index, "tiny-bert", "text-classification", tuple(integrations))


def script(sink, *, model_dir: Path | None = None):
    """What the engine reports in a short run: the test set before, train metrics, an evaluation,
    the test set after; then the result it returns."""
    sink.metrics(0, {"accuracy": 0.5}, split="baseline_test")
    for step in (1, 2, 3, 4):
        sink.metrics(step, {"loss": 1.0 / step, "learning_rate": 1e-4, "epoch": step / 4}, split="train")
    sink.metrics(4, {"loss": 0.3, "accuracy": 0.75}, split="valid")
    report = {"accuracy": 0.8, "f1_macro": 0.79, "per_class": {"pos": {"precision": 1.0, "recall": 0.6, "f1": 0.75}},
              "confusion_matrix": [[3, 0], [2, 3]]}
    sink.metrics(4, {"accuracy": 0.8, "f1_macro": 0.79, "f1[pos]": 0.75}, split="test")
    return SimpleNamespace(model_dir=model_dir, hyperparameters={"n_epochs": 1, "batch_size": 8},
                           metrics={"test": report, "best": {"loss": 0.3}})


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "output" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    return folder


def test_wandb_offline_writes_a_run_folder_with_config_metrics_and_the_test_report(plain):
    settings = plain
    sink = ListSink()
    tracking = Tracking.start(about(WANDB, parent="ftjob-parent", index=2), SPEC, settings, sink)
    result = script(tracking.tee(sink))
    tracking.end("succeeded", result)

    [(level, started, data)] = sink.events
    assert level == "info" and "wandb sync" in started and data["mode"] == "offline"
    folder = Path(data["folder"])
    assert folder.parent == settings.wandb_run_dir / "wandb" and folder.name.startswith("offline-run-")
    run = wandb_run(folder)
    assert run["run"].project == "lathe-tests" and run["run"].display_name == "tiny-2"  # a child: name-<number>
    assert run["run"].run_id == "ftjob-abc-1" and run["run"].run_group == "ftjob-parent"
    assert {"ci", "lathe/finetune", "lathe/ftjob-abc", "lathe/ftjob-parent"} <= set(run["run"].tags)
    assert run["config"]["config"]["optimizer"]["weight_decay"] == 0.05
    assert run["config"]["hyperparameters"] == {"n_epochs": 1, "batch_size": 8}  # "auto" replaced by what was used
    assert run["config"]["lathe"]["job_id"] == "ftjob-abc" and run["config"]["lathe"]["parent_job"] == "ftjob-parent"
    losses = {row["_step"]: row["train/loss"] for row in run["history"] if "train/loss" in row}
    assert losses == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3), 4: 0.25}
    assert any(row.get("baseline_test/accuracy") == 0.5 and row["_step"] == 0 for row in run["history"])
    assert any(row.get("valid/accuracy") == 0.75 and row["_step"] == 4 for row in run["history"])
    assert run["summary"]["test/f1[pos]"] == 0.75
    assert run["summary"]["test_report"]["confusion_matrix"] == [[3, 0], [2, 3]]
    assert run["summary"]["lathe_outcome"] == "succeeded" and run["exit"] == 0


def test_mlflow_logs_params_metrics_the_test_report_and_the_model(plain, mlflow_url, tmp_path):
    from mlflow import MlflowClient

    settings = plain.model_copy(update={"mlflow_tracking_uri": mlflow_url})
    sink = ListSink()
    integration = {"type": "mlflow", "mlflow": {"experiment": "lathe-tests", "run_name": None}}
    tracking = Tracking.start(about(integration), SPEC, settings, sink)
    result = script(tracking.tee(sink), model_dir=model_folder(tmp_path))
    tracking.end("succeeded", result)

    assert [level for level, _, _ in sink.events] == ["info"], sink.events
    run_id = sink.events[0][2]["run_id"]
    client = MlflowClient(mlflow_url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "ftjob-abc"
    assert client.get_experiment(run.info.experiment_id).name == "lathe-tests"
    params = run.data.params
    assert params["config.optimizer.weight_decay"] == "0.05" and params["hyperparameters.n_epochs"] == "auto"
    assert params["hyperparameters_used.n_epochs"] == "1" and params["seed"] == "3"
    assert run.data.tags["lathe.job_id"] == "ftjob-abc" and run.data.tags["lathe.outcome"] == "succeeded"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "valid/accuracy")] == [(4, 0.75)]
    assert run.data.metrics["test/f1/pos"] == 0.75 and run.data.metrics["baseline_test/accuracy"] == 0.5

    top = {f.path for f in client.list_artifacts(run_id)}
    assert {"test_report.json", "lathe_job_spec.json", "model"} <= top
    assert {f.path for f in client.list_artifacts(run_id, "model")} == {"model/config.json", "model/model.safetensors"}
    report = json.loads(Path(client.download_artifacts(run_id, "test_report.json", str(tmp_path))).read_text())
    assert report["per_class"]["pos"]["recall"] == 0.6


def test_a_tracker_that_breaks_mid_run_says_once_what_was_not_logged_and_stops(plain, mlflow_url):
    from mlflow import MlflowClient

    settings = plain.model_copy(update={"mlflow_tracking_uri": mlflow_url})
    sink = ListSink()
    integration = {"type": "mlflow", "mlflow": {"experiment": "lathe-tests", "run_name": "breaks"}}
    tracking = Tracking.start(about(integration, job_id="ftjob-breaks"), SPEC, settings, sink)
    tee = tracking.tee(sink)
    tee.metrics(0, {"accuracy": 0.5}, split="baseline_test")  # an evaluation: sent at once
    [(_, run)] = tracking.runs
    run.client = MlflowClient(f"http://127.0.0.1:{free_port()}")  # the server is gone from here on
    for step in (1, 2, 3, 4):  # train rows wait for a batch ...
        tee.metrics(step, {"loss": 1.0 / step}, split="train")
    tee.metrics(4, {"accuracy": 0.75}, split="valid")  # ... that the evaluation tries to send
    tee.metrics(4, {"accuracy": 0.8}, split="test")
    tracking.end("succeeded", SimpleNamespace(model_dir=None, hyperparameters={"n_epochs": 1}, metrics={}))

    warnings = [(message, data) for level, message, data in sink.events if level == "warn"]
    assert len(warnings) == 1, sink.events
    message, data = warnings[0]
    assert data["integration"] == "mlflow" and data["not_logged"] == "the metrics of step 1 to 4"
    assert message.startswith(f"MLflow experiment 'lathe-tests' at {mlflow_url}: the metrics of step 1 to 4 could "
                              "not be logged (ConnectionRefusedError: ")
    assert data["error"].endswith(", in MlflowException")
    assert "nothing more is logged there for this attempt" in message
    run_now = MlflowClient(mlflow_url).get_run(run.run_id)
    assert run_now.info.status == "RUNNING" and "hyperparameters_used.n_epochs" not in run_now.data.params
    assert [m.step for m in MlflowClient(mlflow_url).get_metric_history(run.run_id, "baseline_test/accuracy")] == [0]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_refused_tracking_uri_leaves_the_job_succeeded_with_one_warn_event_and_wandb_logs(settings):
    """A real job in a real training process: MLflow refuses connections, W&B (offline) logs."""
    settings = settings.model_copy(update={"mlflow_tracking_uri": f"http://127.0.0.1:{free_port()}"})
    job_id = make_job(settings, valid_rows=sentiment_rows(16, seed=1), test_rows=sentiment_rows(16, seed=2))
    with session_scope(settings.sqlalchemy_url) as session:
        session.get(Job, job_id).integrations = [
            {"type": "mlflow", "mlflow": {"experiment": "down", "run_name": None}}, WANDB]
    assert tasks.validate_job(job_id, settings=settings) == JobStatus.QUEUED
    assert tasks.run_job(job_id, settings=settings) == JobStatus.SUCCEEDED

    with session_scope(settings.sqlalchemy_url) as session:
        events = list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.seq)))
        train = {m.step: m.values["loss"] for m in session.scalars(
            select(Metric).where(Metric.job_id == job_id, Metric.split == "train"))}
    warns = [e for e in events if e.level == "warn"]
    assert len(warns) == 1 and warns[0].data["integration"] == "mlflow", [e.message for e in events]
    assert warns[0].data["not_logged"] == "the run" and "ConnectionRefusedError" in warns[0].data["error"]
    assert warns[0].message.startswith(f"MLflow experiment 'down' at {settings.mlflow_tracking_uri}: the run could not")
    [started] = [e for e in events if e.data and e.data.get("integration") == "wandb"]
    run = wandb_run(Path(started.data["folder"]))
    assert run["run"].run_id == f"{job_id}-1" and run["exit"] == 0
    logged = {row["_step"]: row["train/loss"] for row in run["history"] if "train/loss" in row}
    assert logged == pytest.approx(train) and train  # every train row the job recorded
    assert run["config"]["hyperparameters"] == get_job(settings, job_id).hyperparameters
    assert "accuracy" in run["summary"]["test_report"]


def test_a_searchs_trials_inherit_its_integrations(settings):
    settings = settings.model_copy(update={"mlflow_tracking_uri": "http://mlflow.invalid"})
    tenant_id = get_job(settings, make_job(settings)).tenant_id
    integrations = [WANDB, {"type": "mlflow", "mlflow": {"experiment": "e", "run_name": "r"}}]
    payload = {"model": "tiny-bert", "seed": 5, "integrations": integrations, "hyperparameters": {"n_epochs": 1},
               "training_file": add_file(settings, tenant_id, sentiment_rows(32)),
               "validation_file": add_file(settings, tenant_id, sentiment_rows(8, seed=1), name="valid.csv"),
               "config": {"max_length": 16, "search": {"trials": 2, "parallel": 2, "sampler": "random", "space": {
                   "config.optimizer.weight_decay": {"type": "float", "low": 0.0, "high": 0.1}}}}}
    with session_scope(settings.sqlalchemy_url) as session:
        parent = jobs.create_job(session, settings, tenant_id=tenant_id, payload=payload)[0].id
    assert tasks.validate_job(parent, settings=settings) == JobStatus.QUEUED
    assert advance(settings, parent) == "started 2"
    with session_scope(settings.sqlalchemy_url) as session:
        children = list(session.scalars(select(Job).where(Job.parent_job == parent)))
        assert session.get(Job, parent).integrations == integrations
    assert len(children) == 2 and all(child.integrations == integrations for child in children)
