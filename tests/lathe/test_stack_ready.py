"""`lathe.stack.wait_until_ready`: what the demo and the benches wait on before they drive a server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lathe.stack import free_port, wait_until_ready


def test_returns_once_the_url_answers(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_ready(proc, f"http://127.0.0.1:{port}/", timeout=30, what="http.server")
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_says_when_the_server_exited_first():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(SystemExit, match="the server exited with 3"):
        wait_until_ready(proc, f"http://127.0.0.1:{free_port()}/", timeout=30)


def test_gives_up_after_the_timeout():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(SystemExit, match="did not become ready in 1 s"):
            wait_until_ready(proc, f"http://127.0.0.1:{free_port()}/", timeout=1)
    finally:
        proc.kill()
        proc.wait()
