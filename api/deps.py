"""Request dependencies: settings, a DB session, the authenticated tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.auth import authenticate
from api.db.models import Tenant
from api.errors import Unauthorized
from api.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; routes commit what they change, anything else is rolled back."""
    with request.app.state.session_factory() as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise


def get_tenant(request: Request, session: Annotated[Session, Depends(get_session)]) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing API key: send `Authorization: Bearer <key>`.",
                           headers={"WWW-Authenticate": "Bearer"})
    tenant = authenticate(session, token.strip())
    if tenant is None:
        raise Unauthorized("Incorrect API key provided.", headers={"WWW-Authenticate": "Bearer"})
    # End the read transaction now: an upload may stream for minutes before the route writes.
    session.commit()
    return tenant


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]
