"""The FastAPI app. `create_app(settings)` builds one; `api.main:app` builds one from the
environment on first access (so importing this module reads nothing). Migrations are the CLI's
job, run before uvicorn starts: the app never changes the schema."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from api.deps import get_caller
from api.errors import install_handlers
from api.limits import KeyRateLimiter, check_upload_room
from api.routes import files, health, job_data, jobs, models, webhooks
from api.telemetry import MetricsMiddleware, make_registry
from lathe.jobs import JobCreate
from lathe.queue import Publisher
from lathe.quotas import install_quota_checks
from lathe.settings import Settings, get_settings

DESCRIPTION = """Self-hosted fine-tuning jobs behind OpenAI's fine-tuning API.

Point the official SDK at it: `OpenAI(base_url="http://HOST:PORT/v1", api_key=KEY)`. Lathe's
extensions (`task`, `test_file`, `config`) go in `extra_body=`. Every error body is
`{"error": {"message", "type", "param", "code"}}`."""

BODY_MODELS = {"JobCreate": JobCreate}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema, with routes that read a raw body documented by their pydantic model."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    # API keys are bearer tokens (OpenAI's scheme); every /v1 operation needs one.
    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, path_item in schema.get("paths", {}).items():
        for op in path_item.values():
            if isinstance(op, dict) and path.startswith("/v1/"):
                op["security"] = [{"bearer": []}]
    for path_item in schema.get("paths", {}).values():
        for op in path_item.values():
            name = op.pop("x-lathe-body", None) if isinstance(op, dict) else None
            if name is None:
                continue
            model_schema = BODY_MODELS[name].model_json_schema(ref_template="#/components/schemas/{model}")
            for def_name, definition in model_schema.pop("$defs", {}).items():
                components.setdefault(def_name, definition)
            components[name] = model_schema
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None) -> FastAPI:
    from lathe.db.session import session_factory

    settings = settings or get_settings()
    factory = session_factory(settings.sqlalchemy_url)
    install_quota_checks(factory, settings)
    publisher = Publisher(settings)
    rate_limiter = KeyRateLimiter.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        publisher.close()
        rate_limiter.close()

    app = FastAPI(title="Lathe", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.session_factory = factory
    app.state.publish = publisher
    app.state.publisher = publisher
    app.state.rate_limiter = rate_limiter
    app.state.sse_poll_seconds = 1.0
    registry, requests, latency = make_registry(factory)
    app.state.metrics_registry = registry

    install_handlers(app)
    # Every /v1 request needs a key, and so counts against that key's rate limit (api.deps.get_caller,
    # run once per request however many dependencies ask for it); /healthz, /readyz and /metrics
    # take no key and are never limited.
    for module in (files, jobs, job_data, models, webhooks):
        extra = [Depends(check_upload_room)] if module is files else []
        app.include_router(module.router, dependencies=[Depends(get_caller), *extra])
    app.include_router(health.router)
    app.add_middleware(MetricsMiddleware, requests=requests, latency=latency)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # `uvicorn api.main:app` works, but the app (and the settings it reads) is built on first access.
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)
