"""A worker's share of the predictions and of the dry runs' token counts (the protocol is
lathe.predictions'): LATHE_PREDICT_CONCURRENCY threads each take one request at a time from
`<LATHE_QUEUE>.predict` (BRPOP), so a request waits in Redis, where any worker with a free thread
takes it, rather than behind a busy one; the worker's prediction process answers it, and the thread
pushes the answer to the request's reply key. For a count of a hub model the thread decides whether
this worker loads it from its local cache alone (lathe.model_source.cache_only: cached here and the
hub not answering, as the worker decides for a training run) and says so in the request's `offline`.

Torch-free, like the rest of the worker process: the prediction process (`python -m
worker.predict_child`), which imports torch and keeps the last-used models loaded, is started on the
first request and kept for the next ones. If it dies (killed, out of memory) the requests it held
are answered with a 500 and the next request starts another. It stays in the worker's process group
(a signal to the group reaches it), exits when the worker lets it go or dies, and is started with
the worker's settings spelled out (worker.supervisor.settings_env), as a training process is.

`lathe worker` starts the pool when Celery's worker is ready and stops it at shutdown
(worker.celery_app); tests run one in-process with a stand-in for the prediction process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import redis

from lathe.model_source import ModelSource, cache_only
from lathe.predictions import answer, kind_of
from lathe.queue import predict_queue
from lathe.settings import Settings
from worker.supervisor import REPO_ROOT, settings_env

log = logging.getLogger(__name__)

# (request, seconds left) -> the answer: {"predictions"} or {"parameters", "runs"} (by the request's
# kind), or {"error": {...}, "status": 400|500}.
Answerer = Callable[[dict[str, Any], float], dict[str, Any]]
# The fields each kind of request must have, and their types.
FIELDS = {"predict": (("model", str), ("inputs", list)),
          "count": (("model", str), ("task", str), ("files", dict), ("specs", list))}


def failure(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "param": None, "code": "internal_error"}, "status": 500}


@dataclass
class _Child:
    proc: subprocess.Popen
    pending: dict[int, Future] = field(default_factory=dict)  # request number -> its answer
    sent: int = 0
    writing: threading.Lock = field(default_factory=threading.Lock)


class PredictProcess:
    """The worker's prediction process: started on first use, started again after it died."""

    def __init__(self, settings: Settings, command: list[str] | None = None):
        self.settings = settings
        self.command = command or [
            sys.executable, "-m", "worker.predict_child", str(os.getpid()),
            str(settings.predict_cache_models), str(max(1, settings.predict_concurrency))]
        self.child: _Child | None = None
        self.lock = threading.Lock()  # the child and its pending answers

    def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The process's answer to `request`.

        Raises:
            TimeoutError: no answer within `timeout` seconds (the request's requester has given up).
        """
        future: Future = Future()
        with self.lock:
            child = self._running()
            child.sent += 1
            number = child.sent
            child.pending[number] = future
        line = {**{k: v for k, v in request.items() if k not in ("reply_to", "deadline")}, "id": number}
        try:
            with child.writing:  # a line at a time; a large one may wait for the process to read it
                child.proc.stdin.write(json.dumps(line).encode() + b"\n")
                child.proc.stdin.flush()
        except (OSError, ValueError):
            with self.lock:
                child.pending.pop(number, None)
            return failure("the prediction process is gone")
        try:
            return future.result(timeout)
        except TimeoutError:
            with self.lock:
                child.pending.pop(number, None)
            raise

    def _running(self) -> _Child:
        if self.child is None or self.child.proc.poll() is not None:
            proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    env=settings_env(self.settings), cwd=str(REPO_ROOT))
            log.info("prediction process %s started", proc.pid)
            self.child = _Child(proc)
            threading.Thread(target=self._read, args=(self.child,), name="predict-reader", daemon=True).start()
        return self.child

    def _read(self, child: _Child) -> None:
        for line in child.proc.stdout:
            try:
                reply = json.loads(line)
            except ValueError:
                log.error("prediction process %s wrote a line that is not JSON: %r", child.proc.pid, line[:200])
                continue
            with self.lock:
                future = child.pending.pop(reply.pop("id", None), None)
            if future is not None:
                future.set_result(reply)
        code = child.proc.wait()
        with self.lock:
            lost, child.pending = list(child.pending.values()), {}
        if lost or code:
            log.warning("prediction process %s exited (%s) with %d requests unanswered", child.proc.pid, code, len(lost))
        for future in lost:
            future.set_result(failure(f"the prediction process exited ({code})"))

    @property
    def pid(self) -> int | None:
        child = self.child
        return child.proc.pid if child is not None and child.proc.poll() is None else None

    def close(self, timeout: float = 10.0) -> None:
        """Let the process go (it exits when its stdin closes); killed if it takes longer than `timeout`."""
        with self.lock:
            child, self.child = self.child, None
        if child is None:
            return
        try:
            child.proc.stdin.close()
        except OSError:
            pass
        try:
            child.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


class PredictPool:
    """The threads taking requests (predictions, counts); `answer_with` stands in for the prediction process."""

    def __init__(self, settings: Settings, answer_with: Answerer | None = None):
        self.settings = settings
        self.process = None if answer_with else PredictProcess(settings)
        self.answer_with: Answerer = answer_with or self.process.ask  # type: ignore[union-attr]
        self.queue = predict_queue(settings)
        self.client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=30)
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> PredictPool:
        for i in range(self.settings.predict_concurrency):
            thread = threading.Thread(target=self._serve, name=f"predict-{i}", daemon=True)
            thread.start()
            self.threads.append(thread)
        log.info("predict pool: %d threads on %s", len(self.threads), self.queue)
        return self

    def _serve(self) -> None:
        broken = False
        while not self.stopping.is_set():
            try:
                item = self.client.brpop([self.queue], timeout=1)
            except redis.RedisError as e:
                if not broken:
                    log.warning("predict pool: Redis unreachable (%s); trying again every second", e)
                broken = True
                self.stopping.wait(1.0)
                continue
            broken = False
            if item is not None:
                self.handle(item[1])

    def handle(self, raw: bytes | str) -> None:
        """Answer one request as it came off the list (unless its requester has stopped waiting)."""
        try:
            request = json.loads(raw)
            left = float(request["deadline"]) - time.time()
            kind = kind_of(request)
            if not all(isinstance(request.get(k), t) for k, t in (("reply_to", str), *FIELDS[kind])):
                raise ValueError("missing fields")
        except (ValueError, TypeError, KeyError, AttributeError):
            log.error("predict pool: dropping a request that is not one: %r", raw[:200])
            return
        if left <= 0:
            log.info("%s %s: dropped, its requester stopped waiting %.1f s ago", kind, request.get("id"), -left)
            return
        started = time.monotonic()
        try:
            if kind == "count":
                request["offline"] = bool(request.get("hub")) and cache_only(self.settings,
                                                                             ModelSource("hub", request["model"]))
            reply = self.answer_with(request, left)
        except TimeoutError:
            log.warning("%s %s: no answer within the %.1f s its requester waits", kind, request.get("id"), left)
            return
        except Exception:  # noqa: BLE001 - the requester gets a 500, not a timeout
            log.exception("%s %s failed", kind, request.get("id"))
            reply = failure(f"the {kind} request failed")
        what = (f"{len(request['inputs'])} inputs" if kind == "predict" else
                f"{len(request['files'])} files, {len(request['specs'])} specs")
        log.info("%s %s on %s: %s, %.0f ms%s", kind, request.get("id"), request["model"], what,
                 1000 * (time.monotonic() - started), " (model loaded)" if reply.get("loaded") else "")
        try:
            answer(self.client, request, reply)
        except redis.RedisError:
            log.exception("%s %s: could not push the answer", kind, request.get("id"))

    def stop(self) -> None:
        """Take no more requests, let those in flight be answered, then let the process go."""
        self.stopping.set()
        for thread in self.threads:
            thread.join()
        if self.process is not None:
            self.process.close()
        self.client.close()


_pool: PredictPool | None = None


def start(settings: Settings) -> None:
    """The worker's pool (none when LATHE_PREDICT_CONCURRENCY is 0)."""
    global _pool
    if _pool is None and settings.predict_concurrency > 0:
        _pool = PredictPool(settings).start()


def stop() -> None:
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.stop()
