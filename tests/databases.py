"""Scratch databases for tests: a PostgreSQL database of their own on 127.0.0.1 (dropped after),
skipped with a clear reason where no server answers."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from lathe.db.session import engine_for

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextmanager
def scratch_postgres(prefix: str) -> Iterator[str]:
    """A new, empty database named `<prefix>_<random>`; yields its URL and drops it afterwards."""
    name = f"{prefix}_{secrets.token_hex(5)}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        admin.dispose()
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is not available: {exc}")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        yield url
    finally:
        engine_for(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# Parametrize a fixture with these to run its tests on both databases.
DB_KINDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextmanager
def scratch_database(kind: str, folder: Path, prefix: str) -> Iterator[str]:
    """An empty database with Lathe's tables: SQLite in `folder`, or a scratch PostgreSQL database."""
    from lathe.db.tables import Base

    if kind == "sqlite":
        url = f"sqlite:///{folder / 'lathe.db'}"
        Base.metadata.create_all(engine_for(url))
        try:
            yield url
        finally:
            engine_for(url).dispose()
        return
    with scratch_postgres(prefix) as url:
        Base.metadata.create_all(engine_for(url))
        yield url
