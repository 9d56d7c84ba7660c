"""One model resolution for create and run: what the API accepts is what the worker trains."""

from __future__ import annotations

import pytest

from lathe.db.session import engine_for, session_scope
from lathe.db.tables import Base, Tenant, new_id, now
from lathe.errors import BadRequest, NotFound
from lathe.model_source import resolve_model
from lathe.settings import Settings


@pytest.fixture
def setup(tmp_path):
    url = f"sqlite:///{tmp_path / 'lathe.db'}"
    Base.metadata.create_all(engine_for(url))
    models = tmp_path / "models"
    for name in ("plain", "org/name"):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text("{}")
    settings = Settings(data_dir=tmp_path / "data", database_url=url, models_dir=models,
                        hub_model_allowlist="HuggingFaceTB/*", hub_probe_seconds=0)  # the probe: test_hub_probe.py
    with session_scope(url) as s:
        tenant = Tenant(id=new_id("org"), name="acme", created_at=now())
        s.add(tenant)
    yield settings, tenant.id
    engine_for(url).dispose()


@pytest.mark.parametrize("name, kind", [("plain", "local"), ("org/name", "local"),
                                        ("HuggingFaceTB/SmolLM2-135M", "hub")])
def test_resolves(setup, name, kind):
    settings, tenant_id = setup
    with session_scope(settings.sqlalchemy_url) as s:
        source = resolve_model(s, settings, tenant_id=tenant_id, name=name)
    assert source.kind == kind and source.init_from is None
    assert source.base == (str(settings.models_dir / name) if kind == "local" else name)


@pytest.mark.parametrize("name, error, code", [
    ("../plain", NotFound, "model_not_found"), ("org/../plain", NotFound, "model_not_found"),
    ("a/b/c", NotFound, "model_not_found"), ("other/model", BadRequest, "model_not_allowed"),
    ("file-123", NotFound, "model_not_found"), ("ft:x:acme::1:ckpt-step-3", NotFound, "model_not_found"),
])
def test_refuses_naming_the_param(setup, name, error, code):
    settings, tenant_id = setup
    with session_scope(settings.sqlalchemy_url) as s, pytest.raises(error) as info:
        resolve_model(s, settings, tenant_id=tenant_id, name=name)
    assert info.value.param == "model" and info.value.code == code
