"""Request dependencies: settings, a DB session, the authenticated caller and its tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from lathe.db.tables import Tenant
from lathe.errors import Unauthorized
from lathe.keys import Caller, verify_key
from lathe.settings import Settings

BEARER = {"WWW-Authenticate": "Bearer"}


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


def get_caller(request: Request, session: Annotated[Session, Depends(get_session)]) -> Caller:
    """The key and tenant behind `Authorization: Bearer <key>`; 401 (OpenAI's body) without a valid one."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing API key: send `Authorization: Bearer <key>`.", headers=BEARER)
    try:
        caller = verify_key(session, token.strip())
    except Unauthorized as exc:
        exc.headers = BEARER
        raise
    # End the read transaction now: an upload may stream for minutes before the route writes.
    session.commit()
    return caller


def get_tenant(caller: Annotated[Caller, Depends(get_caller)]) -> Tenant:
    return caller.tenant


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
CallerDep = Annotated[Caller, Depends(get_caller)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]
