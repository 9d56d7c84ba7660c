"""The `lathe` command: the composition root that wires api/, worker/ and core/ into processes.

    lathe serve [--host] [--port]   the whole stack on one machine (embedded SQLite + Redis)
    lathe api [--host] [--port]     the API alone (runs migrations first)
    lathe worker                    a Celery worker alone (+ the lease sweeper)
    lathe migrate                   upgrade the database schema
    lathe keys create --tenant T    print a new API key (last line)
    lathe keys list / revoke ID
"""

from __future__ import annotations

import threading
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from api.settings import get_settings

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

    from api.db.migrate import upgrade

    upgrade(get_settings().sqlalchemy_url)
    uvicorn.run("api.main:create_app", factory=True, host=host, port=port, workers=workers,
                proxy_headers=True, log_level="info")


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(help="Jobs run at once (default LATHE_WORKER_CONCURRENCY).")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    sweep_interval: Annotated[float, typer.Option(help="Seconds between lease sweeps; 0 disables.")] = 15.0,
) -> None:
    """Run a Celery worker that claims jobs and supervises training processes."""
    from worker.celery_app import app as celery_app
    from worker.sweeper import run_sweeper

    settings = get_settings()
    if sweep_interval > 0:
        threading.Thread(target=run_sweeper, args=(settings, sweep_interval), name="sweeper", daemon=True).start()
    # Threads, not prefork: each task only supervises a training subprocess, and no DB
    # connection pool is ever shared across a fork.
    celery_app.worker_main([
        "worker", "-Q", settings.queue, "--pool", "threads",
        "--concurrency", str(concurrency or settings.worker_concurrency),
        "--loglevel", loglevel, "--without-gossip", "--without-mingle",
    ])


@app.command()
def migrate() -> None:
    """Upgrade the database to the newest schema."""
    from api.db.migrate import upgrade

    upgrade(get_settings().sqlalchemy_url)
    console.print("database is at the newest schema")


@keys.command("create")
def keys_create(tenant: Annotated[str, typer.Option(help="Tenant the key acts for (created if new).")]) -> None:
    """Create an API key; it is shown once, as the last line."""
    from api.auth import create_key
    from api.db.migrate import upgrade
    from api.db.session import session_scope

    settings = get_settings()
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key = create_key(session, tenant_name=tenant)
    console.print(f"API key for tenant {tenant!r} (stored hashed; shown only now):", highlight=False)
    print(key)


@keys.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None) -> None:
    """List keys by their public prefix."""
    from sqlalchemy import select

    from api.db.models import ApiKey, Tenant
    from api.db.session import session_scope

    table = Table("key prefix", "tenant", "created", "state")
    with session_scope(get_settings().sqlalchemy_url) as session:
        query = select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.created_at)
        if tenant:
            query = query.where(Tenant.name == tenant)
        for key, ten in session.execute(query):
            state = "revoked" if key.revoked_at else "active"
            table.add_row(f"lathe_{key.id}_…", ten.name, str(key.created_at), state)
    console.print(table)


@keys.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (lathe_<id>_...) or the whole key.")]) -> None:
    """Revoke a key at once."""
    from sqlalchemy import update

    from api.db.models import ApiKey, now
    from api.db.session import session_scope

    kid = key_id.split("_")[1] if key_id.startswith("lathe_") else key_id
    with session_scope(get_settings().sqlalchemy_url) as session:
        done = session.execute(update(ApiKey).where(ApiKey.id == kid, ApiKey.revoked_at.is_(None))
                               .values(revoked_at=now())).rowcount
    if not done:
        console.print(f"no active key {kid!r}")
        raise typer.Exit(1)
    console.print(f"revoked {kid}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
