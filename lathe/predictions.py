"""Predictions through the broker: the request the API hands a worker, and the answer it waits for.

`request_predictions` (the API's side, called once the model has been found for the caller's
tenant) pushes a request as JSON onto the Redis list `<LATHE_QUEUE>.predict`
(lathe.queue.predict_queue): an id, the model's folder, the inputs and options, a deadline and
the key to answer on. Every worker's predict pool (worker.predict_pool) takes requests as its
threads come free (BRPOP), runs each in the worker's prediction process, which keeps the models it
used last loaded, and pushes the answer onto the request's reply key (`answer`), which expires
REPLY_TTL_SECONDS later whether it was read or not. The API waits on that key with BLPOP for up to
LATHE_PREDICT_TIMEOUT_SECONDS.

No Celery message and no result backend: a prediction is a quick check with its requester waiting,
not work to keep. A request is taken at most once; one lost with its worker is answered by the
timeout. When the wait runs out the API takes its request back off the list (LREM): if it was still
there no worker is serving predictions (503 `predict_unavailable`), otherwise a worker took it and
has not answered in time (504 `timeout`). A worker drops a request past its deadline (its requester
stopped waiting without taking it back: an API process killed mid-wait).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from lathe.errors import BadRequest, LatheError
from lathe.queue import predict_queue
from lathe.settings import Settings

log = logging.getLogger("lathe.predictions")

REPLY_TTL_SECONDS = 60


class PredictUnavailable(LatheError):
    status_code = 503
    type = "server_error"
    code = "predict_unavailable"


class PredictTimeout(LatheError):
    status_code = 504
    type = "server_error"
    code = "timeout"


class PredictFailed(LatheError):
    status_code = 500
    type = "server_error"
    code = "predict_failed"


def reply_key(settings: Settings, request_id: str) -> str:
    return f"{predict_queue(settings)}.reply.{request_id}"


def make_request(settings: Settings, *, model_path: str, inputs: list[str], top_k: int = 1,
                 max_new_tokens: int = 64) -> dict[str, Any]:
    """A prediction request as it goes on the list (timed from now)."""
    request_id = secrets.token_hex(16)
    return {"id": request_id, "model": model_path, "inputs": inputs, "top_k": top_k,
            "max_new_tokens": max_new_tokens, "deadline": time.time() + settings.predict_timeout_seconds,
            "reply_to": reply_key(settings, request_id)}


async def request_predictions(settings: Settings, *, model_path: str, inputs: list[str], top_k: int = 1,
                              max_new_tokens: int = 64) -> list[list[dict[str, Any]]]:
    """Have a worker run the inputs through the model at `model_path`; its predictions, one list per input.

    Call only for a model the caller's tenant owns (the worker checks nothing of tenants).

    Raises:
        BadRequest: the inputs do not suit the model, or its folder cannot be loaded.
        PredictUnavailable: no worker took the request in time, or Redis cannot be reached (503).
        PredictTimeout: a worker took it and did not answer in time (504).
        PredictFailed: the worker's prediction failed (500; details in the worker's log).
    """
    request = make_request(settings, model_path=model_path, inputs=inputs, top_k=top_k,
                           max_new_tokens=max_new_tokens)
    payload, queue, timeout = json.dumps(request), predict_queue(settings), settings.predict_timeout_seconds
    # A read must outlast the BLPOP (redis-py's default socket timeout is 5 s).
    client = aioredis.Redis.from_url(settings.broker_url, socket_timeout=timeout + 10, socket_connect_timeout=5)
    try:
        await client.lpush(queue, payload)
        got = await client.blpop([request["reply_to"]], timeout=timeout)
        withdrawn = 0 if got is not None else await client.lrem(queue, 1, payload)
    except redis.RedisError as e:
        log.warning("predict: Redis unreachable: %s", e)
        raise PredictUnavailable("Predictions are unavailable: the broker cannot be reached.") from None
    finally:
        await client.aclose()
    if got is None:
        if withdrawn:
            raise PredictUnavailable(f"No worker took the prediction request within {timeout:g} s: no worker "
                                     "is serving predictions (LATHE_PREDICT_CONCURRENCY).")
        raise PredictTimeout(f"The prediction did not finish within {timeout:g} s.")
    return read_answer(json.loads(got[1]))


def read_answer(reply: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The predictions of a worker's answer, or its error raised (see request_predictions)."""
    if "predictions" in reply:
        return reply["predictions"]
    error = reply.get("error") or {}
    if reply.get("status") == 400 and error.get("message"):
        raise BadRequest(str(error["message"]), param=error.get("param"), code=error.get("code"))
    log.error("predict failed on a worker: %s", error.get("message"))
    raise PredictFailed("The prediction failed on the worker.")


def answer(client: redis.Redis, request: dict[str, Any], reply: dict[str, Any]) -> None:
    """A worker's answer to `request`: {"predictions": ...}, or {"error": {message, param, code},
    "status": 400 (bad inputs or model) | 500}. The key expires whether or not it is read."""
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(request["reply_to"], json.dumps(reply))
        pipe.expire(request["reply_to"], REPLY_TTL_SECONDS)
        pipe.execute()
