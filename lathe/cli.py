"""The `lathe` command: the composition root that wires api/, worker/ and core/ into processes.

    lathe serve [--host] [--port]   the whole stack on one machine (embedded SQLite + Redis)
    lathe api [--host] [--port]     the API alone (runs migrations first)
    lathe worker [--gpu-class C]    a Celery worker alone: training slots, a validation pool, the predict
                                    pool, the lease sweeper, the webhook dispatcher; --gpu-class: the GPU
                                    classes whose jobs it trains
    lathe migrate                   upgrade the database schema
    lathe keys create --tenant T [--expires-in 30d | --expires-at ISO]   print a new API key (last line)
    lathe keys list / revoke ID / expire ID [--at ISO|now]
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from pydantic import TypeAdapter, ValidationError
from rich import box
from rich.console import Console
from rich.table import Column, Table

from lathe.settings import get_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Lathe: fine-tuning as a job API.")
keys = typer.Typer(no_args_is_help=True, help="Manage API keys.")
app.add_typer(keys, name="keys")
console = Console()

Host = Annotated[str, typer.Option(help="Interface to listen on.")]
Port = Annotated[int, typer.Option(help="TCP port of the API.")]


@app.command()
def serve(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Run API + worker + embedded Redis (unless LATHE_REDIS_URL) + SQLite (unless LATHE_DATABASE_URL)."""
    from lathe.stack import serve as run_stack

    run_stack(get_settings(), host=host, port=port)


@app.command()
def api(host: Host = "127.0.0.1", port: Port = 8000,
        workers: Annotated[int, typer.Option(help="Uvicorn worker processes.")] = 1) -> None:
    """Run the HTTP API alone (migrates the database first)."""
    import uvicorn

    from lathe.db.migrate import upgrade

    upgrade(get_settings().sqlalchemy_url)
    uvicorn.run("api.main:create_app", factory=True, host=host, port=port, workers=workers,
                proxy_headers=True, log_level="info")


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(
        help="Jobs trained at once (default LATHE_WORKER_CONCURRENCY); validation has its own "
             "LATHE_VALIDATE_CONCURRENCY threads.")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    sweep_interval: Annotated[float, typer.Option(help="Seconds between lease sweeps; 0 disables.")] = 15.0,
    webhooks: Annotated[bool, typer.Option(help="Deliver webhook events from the outbox (LATHE_WEBHOOK_*).")] = True,
    gpu_class: Annotated[list[str] | None, typer.Option(
        "--gpu-class", help="A GPU class whose jobs (resources.gpu) this worker trains, from <LATHE_QUEUE>.gpu.<class>; "
                            "repeat it for more. `default` also takes jobs without a class, which a worker named "
                            "no class takes alone. Sets LATHE_WORKER_GPU_CLASSES.")] = None,
) -> None:
    """Run a Celery worker that validates jobs' files, claims jobs and supervises training processes.

    One process, two pools: Celery's threads (--concurrency) take `lathe.run_job` from LATHE_QUEUE
    (with --gpu-class, from those classes' queues: lathe.gpu_classes), and the validation pool
    (worker.celery_app.ValidationPool, LATHE_VALIDATE_CONCURRENCY threads) takes `lathe.validate_job`
    from `<LATHE_QUEUE>.validate`, so a busy training slot never holds a file check up; both start and
    end with the process, as do the LATHE_PREDICT_CONCURRENCY threads answering /predict
    (worker.predict_pool) from a prediction process started on the first request."""
    from lathe.gpu_classes import served

    if gpu_class:  # the setting is what the claim and the heartbeats read
        os.environ["LATHE_WORKER_GPU_CLASSES"] = ",".join(gpu_class)
        get_settings.cache_clear()
    settings = get_settings()
    try:
        queues = served(settings).queues(settings)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--gpu-class / LATHE_WORKER_GPU_CLASSES") from None

    from worker.celery_app import app as celery_app
    from worker.sweeper import run_sweeper
    from worker.webhooks import run_dispatcher

    if sweep_interval > 0:
        threading.Thread(target=run_sweeper, args=(settings, sweep_interval), name="sweeper", daemon=True).start()
    if webhooks:
        threading.Thread(target=run_dispatcher, args=(settings,), name="webhooks", daemon=True).start()
    # Threads, not prefork: each task only supervises a training subprocess, and no DB
    # connection pool is ever shared across a fork.
    celery_app.worker_main([
        "worker", "-Q", ",".join(queues), "--pool", "threads",
        "--concurrency", str(concurrency or settings.worker_concurrency),
        "--loglevel", loglevel, "--without-gossip", "--without-mingle",
    ])


@app.command()
def migrate() -> None:
    """Upgrade the database to the newest schema."""
    from lathe.db.migrate import upgrade

    upgrade(get_settings().sqlalchemy_url)
    console.print("database is at the newest schema")


def _parse_when(text: str) -> int:
    """`now` or an ISO 8601 time (`2027-01-31`, `2027-01-31T12:00:00+02:00`; no zone means UTC) as unix seconds."""
    if text.strip().lower() == "now":
        return int(time.time())
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time (e.g. 2027-01-31T12:00:00Z) or 'now'") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp())


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _parse_duration(text: str) -> int:
    """`30d`, `12h`, `90m`, `45s`, `2w`, or ISO 8601 (`P30D`, `PT12H`) as seconds."""
    text = text.strip()
    number, unit = text[:-1], text[-1:].lower()
    if number.isdigit() and unit in _UNITS:
        seconds = int(number) * _UNITS[unit]
    else:
        try:
            seconds = int(TypeAdapter(timedelta).validate_python(text).total_seconds())
        except ValidationError:
            raise typer.BadParameter(f"{text!r} is not a duration like 30d, 12h, 90m or P30D") from None
    if seconds <= 0:
        raise typer.BadParameter("the duration must be positive")
    return seconds


def _show_time(seconds: int | None) -> str:
    return "-" if seconds is None else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


@keys.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for (created if new).")],
    expires_in: Annotated[str | None, typer.Option(help="Key stops working after this long: 30d, 12h, 90m, P30D.")] = None,
    expires_at: Annotated[str | None, typer.Option(help="Key stops working at this ISO 8601 time (UTC if no zone).")] = None,
) -> None:
    """Create an API key; it is shown once, as the last line."""
    from lathe.db.migrate import upgrade
    from lathe.db.session import session_scope
    from lathe.keys import create_key

    if expires_in and expires_at:
        raise typer.BadParameter("give --expires-in or --expires-at, not both")
    expiry = int(time.time()) + _parse_duration(expires_in) if expires_in else None
    if expires_at:
        expiry = _parse_when(expires_at)
        if expiry <= int(time.time()):
            raise typer.BadParameter(f"{expires_at} is not in the future", param_hint="--expires-at")
    settings = get_settings()
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key = create_key(session, tenant_name=tenant, expires_at=expiry)
    until = f", expires {_show_time(expiry)} UTC" if expiry else ""
    console.print(f"API key for tenant {tenant!r}{until} (stored hashed; shown only now):", highlight=False)
    print(key)


@keys.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None) -> None:
    """List keys by their public prefix (never the secret), with when they were made, expire and were revoked."""
    from sqlalchemy import select

    from lathe.db.session import session_scope
    from lathe.db.tables import ApiKey, Tenant

    # The prefix is what `revoke`/`expire` take: never wrapped or cut; narrow terminals wrap the dates.
    dates = [Column(f"{name} (UTC)", min_width=10, overflow="fold") for name in ("created", "expires", "revoked")]
    table = Table(Column("key prefix", no_wrap=True), Column("tenant", overflow="fold"), Column("state", no_wrap=True),
                  *dates, box=box.SIMPLE, pad_edge=False)
    current = int(time.time())
    with session_scope(get_settings().sqlalchemy_url) as session:
        query = select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.created_at)
        if tenant:
            query = query.where(Tenant.name == tenant)
        for key, ten in session.execute(query):
            expired = key.expires_at is not None and key.expires_at <= current
            state = "revoked" if key.revoked_at else "expired" if expired else "active"
            table.add_row(f"lathe_{key.id}", ten.name, state, _show_time(key.created_at), _show_time(key.expires_at),
                          _show_time(key.revoked_at))
    console.print(table)


@keys.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (lathe_<id>_...) or the whole key.")]) -> None:
    """Revoke a key at once."""
    from lathe.db.session import session_scope
    from lathe.keys import key_id_of, revoke_key

    kid = key_id_of(key_id)
    with session_scope(get_settings().sqlalchemy_url) as session:
        done = revoke_key(session, key_id=kid)
    if not done:
        console.print(f"no active key {kid!r}")
        raise typer.Exit(1)
    console.print(f"revoked {kid}")


@keys.command("expire")
def keys_expire(
    key_id: Annotated[str, typer.Argument(help="The key's id (lathe_<id>_...) or the whole key.")],
    at: Annotated[str, typer.Option(help="When the key stops working: 'now' or an ISO 8601 time (UTC if no zone).")] = "now",
) -> None:
    """Set when a key expires: now (the default) or at a given time, earlier or later than before."""
    from lathe.db.session import session_scope
    from lathe.keys import expire_key, key_id_of

    kid, when = key_id_of(key_id), _parse_when(at)
    with session_scope(get_settings().sqlalchemy_url) as session:
        done = expire_key(session, key_id=kid, at=when)
    if not done:
        console.print(f"no key {kid!r}")
        raise typer.Exit(1)
    console.print(f"key {kid} expires {_show_time(when)} UTC", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
