"""What a worker serves (LATHE_WORKER_GPU_CLASSES, `lathe worker --gpu-class`) and the queues that
come of it; the run queue of a job's class."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lathe.gpu_classes import Served, served
from lathe.queue import run_queue
from lathe.settings import Settings, get_settings


def settings(classes: str = "") -> Settings:
    return Settings(queue="q", redis_url="redis://127.0.0.1:6379/15", worker_gpu_classes=classes)


def test_run_queue_is_the_queue_or_the_class_queue():
    assert run_queue(settings(), None) == "q"
    assert run_queue(settings(), "a100") == "q.gpu.a100"


@pytest.mark.parametrize(("classes", "want", "queues"), [
    ("", Served((), True), ["q"]),
    ("default", Served((), True), ["q"]),
    ("a100", Served(("a100",), False), ["q.gpu.a100"]),
    (" a100, h100 ,a100", Served(("a100", "h100"), False), ["q.gpu.a100", "q.gpu.h100"]),
    ("a100,default", Served(("a100",), True), ["q.gpu.a100", "q"]),
])
def test_served_classes_and_their_queues(classes, want, queues):
    s = settings(classes)
    assert served(s) == want
    assert served(s).queues(s) == queues
    assert served(s).serves("a100") is ("a100" in want.classes)
    assert served(s).serves(None) is want.default


@pytest.mark.parametrize("classes", ["A100", "a100,gpu.x", "-a", "x" * 33])
def test_bad_class_names_are_refused(classes):
    with pytest.raises(ValueError, match="not GPU class names"):
        served(settings(classes))


@pytest.fixture
def cli_worker(monkeypatch):
    """`lathe worker` with Celery's worker_main caught: the argv it would start the worker with."""
    monkeypatch.setenv("LATHE_REDIS_URL", "redis://127.0.0.1:6379/15")
    monkeypatch.setenv("LATHE_QUEUE", "q")
    monkeypatch.setenv("LATHE_WORKER_GPU_CLASSES", "")  # restored after: the option writes it
    get_settings.cache_clear()
    from lathe.cli import app
    from worker.celery_app import app as celery_app

    started: list[list[str]] = []
    monkeypatch.setattr(celery_app, "worker_main", started.append)

    def run(*args: str):
        result = CliRunner().invoke(app, ["worker", "--sweep-interval", "0", "--no-webhooks", *args])
        return result, started

    yield run
    get_settings.cache_clear()


def test_the_gpu_class_option_sets_the_queues_and_the_setting(cli_worker):
    result, started = cli_worker("--gpu-class", "a100", "--gpu-class", "default")
    assert result.exit_code == 0, result.output
    argv = started[0]
    assert argv[argv.index("-Q") + 1] == "q.gpu.a100,q"
    assert served(get_settings()) == Served(("a100",), True)  # what the claim and the heartbeats read


def test_a_bad_gpu_class_stops_the_worker_before_it_starts(cli_worker):
    result, started = cli_worker("--gpu-class", "A100")
    said = " ".join(result.output.replace("│", " ").split())  # as rich wraps it in a box
    assert result.exit_code == 2 and "not GPU class names: A100" in said
    assert started == []
