"""The Alembic migrations build exactly the schema of lathe.db.tables, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from lathe.db.migrate import upgrade
from lathe.db.tables import Base
from tests.databases import scratch_postgres



@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    with scratch_postgres("lathe_mig") as url:
        yield url


def test_upgrade_matches_models_and_is_idempotent(db_url):
    upgrade(db_url)
    upgrade(db_url)  # a restart runs it again
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
    engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"
    assert version
