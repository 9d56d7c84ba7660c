"""Operations: liveness, readiness (database and broker), Prometheus metrics."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lathe.db.session import ping

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def _check_db(request: Request) -> str | None:
    try:
        ping(request.app.state.session_factory)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}"
    return None


def _check_broker(request: Request) -> str | None:
    url = request.app.state.settings.redis_url
    if not url:
        return "no broker configured"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}"
    return None


@router.get("/readyz", responses={503: {"description": "The database or the broker is unreachable."}})
def readyz(request: Request) -> JSONResponse:
    """The database and the broker are reachable."""
    checks = {"database": _check_db(request), "broker": _check_broker(request)}
    ok = all(v is None for v in checks.values())
    body = {"status": "ok" if ok else "unavailable", "checks": {k: v or "ok" for k, v in checks.items()}}
    if not ok:
        down = ", ".join(k for k, v in checks.items() if v)
        body["error"] = {"message": f"not ready: {down} unreachable", "type": "server_error", "param": None,
                         "code": "not_ready"}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
