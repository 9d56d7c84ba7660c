"""API keys `lathe_<id>_<secret>`: the id is stored in clear to find the row, the secret only as its
sha256, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import ApiKey, Tenant, new_id, now

PREFIX = "lathe"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def get_or_create_tenant(session: Session, *, tenant_name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id("org"), name=tenant_name, created_at=now())
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, *, tenant_name: str, expires_at: int | None = None) -> str:
    """Make a key for `tenant_name` (creating the tenant if missing); the plaintext is returned
    once and never stored. The caller commits."""
    tenant = get_or_create_tenant(session, tenant_name=tenant_name)
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    session.add(ApiKey(id=key_id, tenant_id=tenant.id, secret_hash=_hash(secret), created_at=now(),
                       expires_at=expires_at))
    session.flush()
    return f"{PREFIX}_{key_id}_{secret}"


def authenticate(session: Session, raw_key: str) -> Tenant | None:
    """The tenant a key belongs to, or None for a malformed, unknown, revoked or expired key."""
    prefix, _, rest = raw_key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != PREFIX or not key_id or not secret or len(key_id) > 40:
        return None
    key = session.get(ApiKey, key_id)
    # Compare even when the id is unknown, so timing says nothing about which ids exist.
    expected = key.secret_hash if key is not None else _hash("")
    if not hmac.compare_digest(expected, _hash(secret)) or key is None:
        return None
    if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now()):
        return None
    return session.get(Tenant, key.tenant_id)


def revoke_key(session: Session, *, key_id: str) -> bool:
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = now()
    return True
