"""Work the API hands a worker and waits for: predictions, and a dry run's token counts.

Both need the engine (torch, transformers), which the API process and image do not have, so both go
over one channel to the workers' prediction processes. The API pushes a request as JSON onto the
Redis list `<LATHE_QUEUE>.predict` (lathe.queue.predict_queue): an id, its `kind`, what the kind
needs, a deadline and the key to answer on. Every worker's predict pool (worker.predict_pool) takes
requests as its threads come free (BRPOP), has the worker's prediction process answer them
(worker.predict_child), and pushes the answer onto the request's reply key (`answer`), which expires
REPLY_TTL_SECONDS later whether it was read or not. The API waits on that key with BLPOP.

Two kinds (KINDS):
- "predict" (also a request without `kind`, as the first workers sent them): {"model": an exported
  folder, "inputs", "top_k", "max_new_tokens"} -> {"predictions"}; `request_predictions`, awaited by
  the /predict route.
- "count": {"model": the base model's folder or hub id, "hub": whether it is a hub id, "task",
  "files": {param: path}, "specs": [spec as stored, ...]} -> {"parameters", "runs"} (core.estimate);
  `request_counts`, called by lathe.estimate in FastAPI's threadpool. The worker reads the files and
  the model folder at the paths the API resolved (the shared data folder and LATHE_MODELS_DIR, which
  every worker mounts where the API does, as it does to train).

No Celery message and no result backend: the requester is waiting, nothing is kept. A request is
taken at most once; one lost with its worker is answered by the timeout. If no worker has taken it
within LATHE_PREDICT_TIMEOUT_SECONDS the API takes it back off the list (LREM): it was still there,
so no worker is serving (503, `predict_unavailable` / `dry_run_unavailable`). Otherwise a worker took
it, and the API waits for the rest of the request's own time (LATHE_PREDICT_TIMEOUT_SECONDS for a
prediction, LATHE_DRY_RUN_TIMEOUT_SECONDS for a count): no answer by then is a 504 `timeout`. A worker
drops a request past its deadline (its requester stopped waiting without taking it back: an API
process killed mid-wait).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from lathe.errors import BadRequest, LatheError
from lathe.queue import predict_queue
from lathe.settings import Settings

log = logging.getLogger("lathe.predictions")

REPLY_TTL_SECONDS = 60


@dataclass(frozen=True)
class Kind:
    """How the API speaks of one kind of request in its errors."""

    request: str  # what no worker took
    work: str  # what did not finish, or failed
    unavailable: str  # the 503's code
    failed: str  # the 500's code
    timeout_setting: str
    why: str = ""  # why it needs a worker, when the caller may not know


KINDS = {
    "predict": Kind("the prediction request", "The prediction", "predict_unavailable", "predict_failed",
                    "LATHE_PREDICT_TIMEOUT_SECONDS"),
    "count": Kind("the dry run's token count", "Counting the dry run's tokens", "dry_run_unavailable",
                  "dry_run_failed", "LATHE_DRY_RUN_TIMEOUT_SECONDS",
                  " A dry run counts tokens with the engine, which only the workers have."),
}


class WorkerUnavailable(LatheError):
    status_code = 503
    type = "server_error"
    code = "predict_unavailable"


class WorkerTimeout(LatheError):
    status_code = 504
    type = "server_error"
    code = "timeout"


class WorkerFailed(LatheError):
    status_code = 500
    type = "server_error"
    code = "predict_failed"


def kind_of(request: dict[str, Any]) -> str:
    return request.get("kind") or "predict"


def reply_key(settings: Settings, request_id: str) -> str:
    return f"{predict_queue(settings)}.reply.{request_id}"


def make_request(settings: Settings, kind: str, *, timeout: float, **fields: Any) -> dict[str, Any]:
    """A request of `kind` as it goes on the list, answered within `timeout` seconds from now."""
    request_id = secrets.token_hex(16)
    return {"id": request_id, "kind": kind, **fields, "deadline": time.time() + timeout,
            "reply_to": reply_key(settings, request_id)}


def prediction_request(settings: Settings, *, model_path: str, inputs: list[str], top_k: int = 1,
                       max_new_tokens: int = 64) -> dict[str, Any]:
    return make_request(settings, "predict", timeout=settings.predict_timeout_seconds, model=model_path,
                        inputs=inputs, top_k=top_k, max_new_tokens=max_new_tokens)


def count_request(settings: Settings, *, model: str, hub: bool, task: str, files: dict[str, str],
                  specs: list[dict[str, Any]]) -> dict[str, Any]:
    return make_request(settings, "count", timeout=settings.dry_run_timeout_seconds, model=model, hub=hub,
                        task=task, files=files, specs=specs)


async def request_predictions(settings: Settings, *, model_path: str, inputs: list[str], top_k: int = 1,
                              max_new_tokens: int = 64) -> list[list[dict[str, Any]]]:
    """Have a worker run the inputs through the model at `model_path`; its predictions, one list per input.

    Call only for a model the caller's tenant owns (the worker checks nothing of tenants).

    Raises:
        BadRequest: the inputs do not suit the model, or its folder cannot be loaded.
        WorkerUnavailable: no worker took the request in time, or Redis cannot be reached (503).
        WorkerTimeout: a worker took it and did not answer in time (504).
        WorkerFailed: the worker's prediction failed (500; details in the worker's log).
    """
    request = prediction_request(settings, model_path=model_path, inputs=inputs, top_k=top_k,
                                 max_new_tokens=max_new_tokens)
    return (await ask_worker_async(settings, request))["predictions"]


def request_counts(settings: Settings, *, model: str, hub: bool, task: str, files: dict[str, str],
                   specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Have a worker count the files' examples and tokens for each spec (core.estimate): {"parameters",
    "runs"}. Blocks (up to LATHE_DRY_RUN_TIMEOUT_SECONDS): call it from a thread, not the event loop.

    Raises:
        BadRequest: what the engine refuses while encoding (its message, param and code).
        WorkerUnavailable / WorkerTimeout / WorkerFailed: as `request_predictions`.
    """
    return ask_worker(settings, count_request(settings, model=model, hub=hub, task=task, files=files, specs=specs))


def _windows(settings: Settings, request: dict[str, Any]) -> tuple[float, float]:
    """(seconds a worker has to take the request, seconds it has in all), both at least 10 ms (a
    BLPOP timeout of 0 waits forever)."""
    total = max(0.01, request["deadline"] - time.time())
    return min(total, max(0.01, settings.predict_timeout_seconds)), total


def ask_worker(settings: Settings, request: dict[str, Any]) -> dict[str, Any]:
    """A worker's answer to `request` (made by `make_request`), waiting in this thread.

    Raises:
        BadRequest, WorkerUnavailable, WorkerTimeout, WorkerFailed: see `read_answer`.
    """
    payload, queue = json.dumps(request), predict_queue(settings)
    taken_within, total = _windows(settings, request)
    # A read must outlast the BLPOP (redis-py's default socket timeout is 5 s).
    client = redis.Redis.from_url(settings.broker_url, socket_timeout=total + 10, socket_connect_timeout=5)
    withdrawn = 0
    try:
        client.lpush(queue, payload)
        got = client.blpop([request["reply_to"]], timeout=taken_within)
        if got is None:
            withdrawn = client.lrem(queue, 1, payload)
            left = request["deadline"] - time.time()
            if not withdrawn and left > 0.01:  # taken: it has the rest of its time
                got = client.blpop([request["reply_to"]], timeout=left)
    except redis.RedisError as e:
        raise _unreachable(request, e) from None
    finally:
        client.close()
    return read_answer(request, got[1] if got else None, taken=not withdrawn, waited=(taken_within, total))


async def ask_worker_async(settings: Settings, request: dict[str, Any]) -> dict[str, Any]:
    """`ask_worker` for the event loop (the wait holds no thread)."""
    payload, queue = json.dumps(request), predict_queue(settings)
    taken_within, total = _windows(settings, request)
    client = aioredis.Redis.from_url(settings.broker_url, socket_timeout=total + 10, socket_connect_timeout=5)
    withdrawn = 0
    try:
        await client.lpush(queue, payload)
        got = await client.blpop([request["reply_to"]], timeout=taken_within)
        if got is None:
            withdrawn = await client.lrem(queue, 1, payload)
            left = request["deadline"] - time.time()
            if not withdrawn and left > 0.01:
                got = await client.blpop([request["reply_to"]], timeout=left)
    except redis.RedisError as e:
        raise _unreachable(request, e) from None
    finally:
        await client.aclose()
    return read_answer(request, got[1] if got else None, taken=not withdrawn, waited=(taken_within, total))


def _unreachable(request: dict[str, Any], error: Exception) -> WorkerUnavailable:
    kind = KINDS[kind_of(request)]
    log.warning("%s: Redis unreachable: %s", kind_of(request), error)
    return WorkerUnavailable(f"{kind.work} needs a worker, and the broker cannot be reached.", code=kind.unavailable)


def read_answer(request: dict[str, Any], raw: bytes | str | None, *, taken: bool = True,
                waited: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """The worker's answer to `request` (None: there was none in time), or its error raised.

    Raises:
        BadRequest: the worker's 400 (the engine's EngineError: its message, param and code).
        WorkerUnavailable: 503, no worker took the request within `waited[0]` seconds.
        WorkerTimeout: 504, a worker took it and had not answered after `waited[1]` seconds.
        WorkerFailed: 500, it failed on the worker (details in the worker's log).
    """
    kind = KINDS[kind_of(request)]
    if raw is None:
        if not taken:
            raise WorkerUnavailable(
                f"No worker took {kind.request} within {waited[0]:g} s: no worker is serving predictions and "
                f"dry runs (each worker answers LATHE_PREDICT_CONCURRENCY of them at once; 0: none).{kind.why}",
                code=kind.unavailable)
        raise WorkerTimeout(f"{kind.work} did not finish within {waited[1]:g} s ({kind.timeout_setting}).")
    reply = json.loads(raw)
    if "error" not in reply:
        return reply
    error = reply.get("error") or {}
    if reply.get("status") == 400 and error.get("message"):
        raise BadRequest(str(error["message"]), param=error.get("param"), code=error.get("code"))
    log.error("%s failed on a worker: %s", kind_of(request), error.get("message"))
    raise WorkerFailed(f"{kind.work} failed on the worker.", code=kind.failed)


def answer(client: redis.Redis, request: dict[str, Any], reply: dict[str, Any]) -> None:
    """A worker's answer to `request`: what its kind returns ({"predictions"}, {"parameters", "runs"}),
    or {"error": {message, param, code}, "status": 400 (what the engine refuses) | 500}. The key
    expires whether or not it is read."""
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(request["reply_to"], json.dumps(reply))
        pipe.expire(request["reply_to"], REPLY_TTL_SECONDS)
        pipe.execute()
