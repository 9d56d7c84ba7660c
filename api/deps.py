"""Request dependencies: settings, a DB session, the authenticated caller and its tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from lathe.db.tables import Tenant
from lathe.errors import Unauthorized
from lathe.keys import Caller, verify_key
from lathe.settings import Settings

BEARER = {"WWW-Authenticate": "Bearer"}


# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in its
# threadpool, and each trip there costs more than what these do.

async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request; routes commit what they change, anything else is rolled back.

    Made in the event loop (a Session does no I/O until it is first used); closing it rolls back
    what was not committed, which is I/O, in the threadpool, only while it still holds a transaction.
    """
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


def get_caller(request: Request, session: Annotated[Session, Depends(get_session)]) -> Caller:
    """The key and tenant behind `Authorization: Bearer <key>`; 401 (OpenAI's body) without a valid one,
    then 429 when the key has used up its rate limit (api.limits)."""
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
    # Counted here, in this same trip to the threadpool, rather than by a dependency of its own.
    request.app.state.rate_limiter.check_request(request, caller.key_id)
    return caller


async def get_tenant(caller: Annotated[Caller, Depends(get_caller)]) -> Tenant:
    return caller.tenant


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
CallerDep = Annotated[Caller, Depends(get_caller)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]
