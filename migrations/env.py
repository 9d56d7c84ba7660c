"""Alembic environment: the schema is lathe.db.tables' metadata; the URL is the caller's
(`lathe.db.migrate.upgrade(url)`) or the settings' (`alembic upgrade head` from a shell)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from lathe.db.tables import Base
from lathe.db.session import make_engine
from lathe.settings import get_settings

config = context.config
url = config.attributes.get("url") or get_settings().sqlalchemy_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(url) if url.startswith("sqlite") else make_engine(url).execution_options()
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(connection) -> None:  # noqa: ANN001
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
