"""API keys `lathe_<id>_<secret>`: the id is stored in clear to find the row, the secret only as its
sha256, compared in constant time. A key may be revoked (at once, for good) or carry an expiry."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from lathe.db.tables import ApiKey, Tenant, new_id, now
from lathe.errors import Unauthorized

PREFIX = "lathe"
WRONG_KEY = "Incorrect API key provided."


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's public id (what rate limits count on) and its tenant."""

    key_id: str
    tenant: Tenant


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


NO_KEY_HASH = _hash("")  # what an unknown id's secret is compared against


def key_id_of(text: str) -> str:
    """The public id in a whole key (`lathe_<id>_<secret>`), or `text` itself when it is an id."""
    prefix, _, rest = text.partition("_")
    return rest.partition("_")[0] if prefix == PREFIX and rest else text


def get_or_create_tenant(session: Session, *, tenant_name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id("org"), name=tenant_name, created_at=now())
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, *, tenant_name: str, expires_at: int | None = None) -> str:
    """Make a key for `tenant_name` (creating the tenant if missing).

    Args:
        tenant_name: the tenant the key acts for.
        expires_at: unix seconds from which the key is refused; None for a key that never expires.

    Returns:
        The whole key; it is not stored and can't be shown again. The caller commits.
    """
    tenant = get_or_create_tenant(session, tenant_name=tenant_name)
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    session.add(ApiKey(id=key_id, tenant_id=tenant.id, secret_hash=_hash(secret), created_at=now(),
                       expires_at=expires_at))
    session.flush()
    return f"{PREFIX}_{key_id}_{secret}"


def verify_key(session: Session, raw_key: str) -> Caller:
    """The caller a bearer key stands for.

    Raises:
        Unauthorized: `invalid_api_key` for a malformed, unknown, wrong or revoked key (one answer, so
            it tells nothing about which ids exist); `expired_api_key` for a key past its expiry, said
            only once the secret has matched.
    """
    prefix, _, rest = raw_key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != PREFIX or not key_id or not secret or len(key_id) > 40:
        raise Unauthorized(WRONG_KEY)
    # Read on every request, never cached, so a revoked or expired key stops at once. One query for
    # the key and its tenant (a key whose tenant went away is no key: the inner join drops it).
    row = session.execute(select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id)
                          .where(ApiKey.id == key_id)).first()
    key, tenant = (row[0], row[1]) if row is not None else (None, None)
    # Compare even when the id is unknown, so timing says nothing about which ids exist.
    expected = key.secret_hash if key is not None else NO_KEY_HASH
    if not hmac.compare_digest(expected, _hash(secret)) or key is None or key.revoked_at is not None:
        raise Unauthorized(WRONG_KEY)
    if key.expires_at is not None and key.expires_at <= now():
        raise Unauthorized("This API key has expired; create a new one with `lathe keys create`.",
                           code="expired_api_key")
    return Caller(key_id=key.id, tenant=tenant)


def authenticate(session: Session, raw_key: str) -> Tenant | None:
    """The tenant a key belongs to, or None for a malformed, unknown, revoked or expired key."""
    try:
        return verify_key(session, raw_key).tenant
    except Unauthorized:
        return None


def revoke_key(session: Session, *, key_id: str) -> bool:
    """Revoke a key at once. Returns False when there is no such key or it was revoked already."""
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = now()
    return True


def expire_key(session: Session, *, key_id: str, at: int) -> bool:
    """Set when a key stops working (unix seconds; now or earlier ends it at once, a later time
    brings its end forward or pushes it back). Returns False when there is no such key."""
    key = session.get(ApiKey, key_id)
    if key is None:
        return False
    key.expires_at = at
    return True
