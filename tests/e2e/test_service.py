"""The whole service, as users run it: a real uvicorn server and a real `celery worker` process on
Redis (db 13, a queue of its own), driven by the official `openai` SDK."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.tiny_models import save_tiny_bert, sentiment_rows, write_text_dataset

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/13"

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


class Service:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.queue = f"lathe-e2e-{uuid.uuid4().hex[:10]}"
        self.port = _free_port()
        self.env = dict(os.environ, LATHE_DATA_DIR=str(self.data_dir), LATHE_REDIS_URL=REDIS_URL,
                        LATHE_QUEUE=self.queue, LATHE_HEARTBEAT_SECONDS="1", LATHE_ALLOW_HUB_MODELS="false",
                        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        for key in ("LATHE_DATABASE_URL", "LATHE_MODELS_DIR"):
            self.env.pop(key, None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def prepare(self) -> str:
        """Schema (the Alembic migrations, as the server runs them) and an API key, in the tmp DB."""
        from lathe.db.migrate import upgrade
        from lathe.db.session import engine_for, session_scope
        from lathe.keys import create_key

        url = f"sqlite:///{self.data_dir / 'lathe.db'}"
        self.data_dir.mkdir(parents=True)
        upgrade(url)
        with session_scope(url) as session:
            key = create_key(session, tenant_name="e2e")
        engine_for(url).dispose()
        return key

    def start(self, name: str, argv: list[str]) -> None:
        self.logs[name] = self.tmp / f"{name}.log"
        with open(self.logs[name], "wb") as out:
            self.procs[name] = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}):\n{_tail(self.logs[name])}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200 \
                        and "ready" in self.logs["worker"].read_text(errors="replace"):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("service not ready:\n" + "\n".join(f"--- {n}\n{_tail(p)}" for n, p in self.logs.items()))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        # Training children run in sessions of their own: make sure none outlives the test.
        for pid_file in (self.data_dir / "jobs").glob("*/attempt-*.pid"):
            try:
                os.killpg(int(pid_file.read_text()), 9)
            except (ProcessLookupError, ValueError, PermissionError):
                pass
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"*{self.queue}*"))
        if keys:
            client.delete(*keys)
        client.close()

    def dump_logs(self) -> str:
        return "\n".join(f"--- {n}\n{_tail(p)}" for n, p in self.logs.items())


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[tuple[Service, str]]:
    svc = Service(tmp_path_factory.mktemp("e2e"))
    key = svc.prepare()
    svc.start("api", [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app",
                      "--host", "127.0.0.1", "--port", str(svc.port)])
    svc.start("worker", [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", svc.queue,
                         "--concurrency", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle"])
    try:
        svc.wait_ready()
        yield svc, key
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def client(service):
    from openai import OpenAI

    svc, key = service
    return OpenAI(base_url=f"http://127.0.0.1:{svc.port}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def uploads(client, tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("uploads")
    folder = save_tiny_bert(tmp / "tiny-bert")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    ids = {"model": client.files.create(file=("tiny-bert.tar", archive.getvalue()), purpose="model").id}
    for name, rows in (("train", sentiment_rows(64)), ("valid", sentiment_rows(16, seed=1)),
                       ("test", sentiment_rows(16, seed=2))):
        path = write_text_dataset(tmp / f"{name}.csv", rows)
        with open(path, "rb") as f:
            ids[name] = client.files.create(file=f, purpose="fine-tune").id
    return ids


def wait_done(client, service, job_id: str, timeout: float = 150.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} is still {job.status}\n{service[0].dump_logs()}")


def test_fine_tune_download_and_load(client, service, uploads, tmp_path):
    job = client.fine_tuning.jobs.create(
        model=uploads["model"], training_file=uploads["train"], validation_file=uploads["valid"],
        hyperparameters={"n_epochs": 2, "batch_size": 8}, suffix="sentiment", seed=3,
        extra_body={"task": "text-classification", "test_file": uploads["test"],
                    "config": {"device": "cpu", "max_length": 16}},
    )
    assert job.status == "validating_files"
    job = wait_done(client, service, job.id)
    assert job.status == "succeeded", (job.error, service[0].dump_logs())
    assert job.fine_tuned_model.startswith("ft:tiny-bert:e2e:sentiment:")
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.result_files and job.finished_at

    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "The job has successfully completed" in messages
    assert any(m.startswith("Files validated for text-classification: 64 rows") for m in messages)
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and all(c.step_number >= 1 for c in checkpoints)

    svc, key = service
    response = httpx.get(f"http://127.0.0.1:{svc.port}/v1/models/{job.fine_tuned_model}/content",
                         headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code == 200, response.text
    target = tmp_path / "model"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(target, filter="data")
    root = target if (target / "config.json").exists() else next(p.parent for p in target.rglob("config.json"))

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(root)
    tokenizer = AutoTokenizer.from_pretrained(root)
    with torch.no_grad():
        logits = model(**tokenizer(["a great fun film"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)


def test_bad_label_column_fails_with_a_clear_error(client, service, uploads):
    job = client.fine_tuning.jobs.create(
        model=uploads["model"], training_file=uploads["train"],
        extra_body={"task": "text-classification", "config": {"label_column": "sentiment"}},
    )
    job = wait_done(client, service, job.id, timeout=60)
    assert job.status == "failed"
    assert job.error.code == "invalid_training_file"
    assert job.error.param == "training_file"
    assert "'sentiment'" in job.error.message


def test_cancel_a_running_job(client, service, uploads, tmp_path):
    path = write_text_dataset(tmp_path / "big.csv", sentiment_rows(3000, seed=5))
    with open(path, "rb") as f:
        big = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=uploads["model"], training_file=big,
        hyperparameters={"n_epochs": 3, "batch_size": 8},
        extra_body={"task": "text-classification", "config": {"device": "cpu", "max_length": 16}},
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # running, and past its first progress report
        events = client.fine_tuning.jobs.list_events(job.id, limit=20).data
        if any(e.message.startswith("Step ") for e in events):
            break
        time.sleep(0.3)
    else:
        raise AssertionError(service[0].dump_logs())
    assert client.fine_tuning.jobs.cancel(job.id).status in ("cancelling", "cancelled")
    job = wait_done(client, service, job.id, timeout=90)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "The job was cancelled" in messages
    assert list(client.fine_tuning.jobs.checkpoints.list(job.id))  # saved where it stopped


def _upload_folder(client, folder: Path, name: str) -> str:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return client.files.create(file=(name, archive.getvalue()), purpose="model").id


def test_image_and_chat_jobs_with_inferred_tasks(client, service, tmp_path):
    """A zip of image folders and an OpenAI chat JSONL go through upload, validation (task inferred
    from the data), the Celery worker and export like any text job, with toolbox options on."""
    from tests.tiny_causal import chat_rows, save_tiny_llama, write_jsonl
    from tests.tiny_vision import digits, save_tiny_resnet, write_image_zip

    images, labels = digits(16)
    train_zip = write_image_zip(tmp_path / "digits.zip", images[:120], labels[:120])
    resnet = _upload_folder(client, save_tiny_resnet(tmp_path / "resnet"), "tiny-resnet.tar")
    with open(train_zip, "rb") as f:
        zip_file = client.files.create(file=f, purpose="fine-tune")
    assert zip_file.status == "processed"
    image_job = client.fine_tuning.jobs.create(
        model=resnet, training_file=zip_file.id, hyperparameters={"n_epochs": 1, "batch_size": 16},
        extra_body={"config": {"device": "cpu", "image_size": 16, "head": {"type": "mlp", "hidden_sizes": [8]},
                               "augmentation": {"image": {"horizontal_flip": 0.5}}}})

    llama = _upload_folder(client, save_tiny_llama(tmp_path / "llama"), "tiny-llama.tar")
    with open(write_jsonl(tmp_path / "chat.jsonl", chat_rows(48)), "rb") as f:
        chat = client.files.create(file=f, purpose="fine-tune")
    chat_job = client.fine_tuning.jobs.create(
        model=llama, training_file=chat.id, hyperparameters={"n_epochs": 1, "batch_size": 8},
        extra_body={"config": {"device": "cpu", "max_length": 64, "packing": True,
                               "lora": {"r": 4, "alpha": 8}, "scheduler": {"name": "cosine"}}})

    for job, task in ((image_job, "image-classification"), (chat_job, "causal-lm")):
        done = wait_done(client, service, job.id)
        assert done.status == "succeeded", (done.error, service[0].dump_logs())
        assert done.model_extra["task"] == task
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert any(m.startswith(f"Files validated for {task}") for m in messages)
        assert client.models.retrieve(done.fine_tuned_model).model_extra["task"] == task


def test_dpo_through_the_sdk_method_argument(client, service, tmp_path):
    """OpenAI's DPO as its SDK sends it: preference rows checked at upload, `method=` on create from
    a supervised job's model, the job reporting its method and beta, the held-out preference accuracy
    up; a supervised job on the same rows fails in validation saying why."""
    import openai

    from tests.tiny_causal import chat_rows, preference_rows, save_tiny_llama, write_jsonl

    llama = _upload_folder(client, save_tiny_llama(tmp_path / "llama"), "tiny-llama.tar")
    ids = {}
    for name, rows in (("train", preference_rows(64, seed=1)), ("valid", preference_rows(16, seed=3)),
                       ("test", preference_rows(32, seed=2))):
        with open(write_jsonl(tmp_path / f"{name}.jsonl", rows), "rb") as f:
            ids[name] = client.files.create(file=f, purpose="fine-tune").id
    bad = [*preference_rows(2), {"input": {"messages": [{"role": "user", "content": "hi"}]},
                                 "preferred_output": [{"role": "assistant", "content": "a"}]}]
    with pytest.raises(openai.BadRequestError) as e, open(write_jsonl(tmp_path / "bad.jsonl", bad), "rb") as f:
        client.files.create(file=f, purpose="fine-tune")
    assert "line 3" in e.value.message and "non_preferred_output" in e.value.message

    # SFT then DPO: the DPO job starts from the supervised job's model, named as the user got it.
    with open(write_jsonl(tmp_path / "chat.jsonl", chat_rows(32)), "rb") as f:
        chats = client.files.create(file=f, purpose="fine-tune").id
    sft = wait_done(client, service, client.fine_tuning.jobs.create(
        model=llama, training_file=chats, hyperparameters={"n_epochs": 1, "batch_size": 8},
        extra_body={"config": {"device": "cpu", "max_length": 64}}).id)
    assert sft.status == "succeeded", (sft.error, service[0].dump_logs())
    job = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model, training_file=ids["train"], validation_file=ids["valid"], seed=5,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 1.0, "n_epochs": 10, "batch_size": 8}}},
        extra_body={"test_file": ids["test"], "config": {"device": "cpu", "max_length": 64, "lora": {"r": 8},
                                                         "optimizer": {"learning_rate": 2e-2},
                                                         "metric_for_best_model": "rewards/margins"}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 1.0
    supervised = client.fine_tuning.jobs.create(model=llama, training_file=ids["train"],
                                                extra_body={"config": {"device": "cpu"}})
    done = wait_done(client, service, job.id, timeout=240)
    assert done.status == "succeeded", (done.error, service[0].dump_logs())
    assert done.method.dpo.hyperparameters.beta == 1.0 and done.method.dpo.hyperparameters.n_epochs == 10
    metrics = done.model_extra["metrics"]
    before, after = metrics["baseline_test"], metrics["test"]
    assert after["preference_accuracy"] >= before["preference_accuracy"] + 0.2, (before, after)
    assert after["rewards/margins"] > 0 and after["pairs"] == 32
    assert client.models.retrieve(done.fine_tuned_model).model_extra["task"] == "causal-lm"
    assert metrics["best"]["rewards/margins"] >= metrics["latest"]["rewards/margins"]  # the best evaluation kept
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and all("rewards/margins" in (c.metrics.model_extra or {}) for c in checkpoints)

    failed = wait_done(client, service, supervised.id)
    assert failed.status == "failed" and failed.error.param == "training_file"
    assert "method.type dpo" in failed.error.message
