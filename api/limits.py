"""Per-key rate limits, and the upload precheck against the tenant's storage quota.

Rate limits (`LATHE_RATE_LIMIT`, and `LATHE_UPLOAD_RATE_LIMIT` on top of it for uploads) count
requests per API key id (never the secret) over a moving window in the queue's Redis, with the
`limits` library. Past a limit: 429 `rate_limit_exceeded` with `Retry-After` (seconds until the
oldest counted request leaves the window), as OpenAI answers. When that Redis can't be reached
the API keeps serving without limits (fails open) and logs a warning: a limiter outage must not
become an API outage. Every request that authenticates is counted (api.deps.get_caller calls
`check_request` right after the key check); /healthz, /readyz and /metrics take no key and are
never limited.

The per-tenant quotas themselves (active jobs, stored bytes) are lathe.quotas', checked where the
rows are inserted; main.py installs that check on the API's sessions. Here is only what HTTP adds:
`check_upload_room` refuses an upload whose Content-Length can't fit before its body streams.
"""

from __future__ import annotations

import logging
import math
import time

from fastapi import Request
from limits import RateLimitItem, parse_many
from limits.errors import StorageError
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisError

from api.deps import CallerDep, SessionDep, SettingsDep
from lathe.errors import RateLimited
from lathe.quotas import read_quota, storage_exceeded, stored_bytes
from lathe.settings import Settings

log = logging.getLogger("lathe.api")

# (method, route template) pairs that count against the upload limit and the storage precheck.
UPLOAD_ROUTES = frozenset({("POST", "/v1/files")})
UPLOAD_ENVELOPE = 1024 * 1024  # multipart headers and form fields around the file (as api.uploads)
OFF = ("", "none", "off", "0")


# --- rate limits ---------------------------------------------------------------------------------

def parse_limits(text: str | None) -> list[RateLimitItem]:
    """`"600/minute"` or `"20/second;1000/hour"` as `limits` items; [] for empty/none/off.

    Raises:
        ValueError: the text is not in `limits` notation (so a typo stops the server at start).
    """
    if text is None or text.strip().lower() in OFF:
        return []
    return parse_many(text)


def is_upload(request: Request) -> bool:
    route = request.scope.get("route")
    return (request.method, getattr(route, "path", None)) in UPLOAD_ROUTES


class KeyRateLimiter:
    """Moving-window request limits per API key, counted in Redis.

    Fails open: when Redis does not answer (connection refused, a 0.5 s timeout) the request is
    served unlimited, a warning is logged, and Redis is left alone for `backoff_seconds`, so an
    outage costs neither errors nor a timeout per request.
    """

    def __init__(self, redis_url: str | None, *, general: list[RateLimitItem], uploads: list[RateLimitItem],
                 backoff_seconds: float = 5.0):
        self.general, self.uploads, self.backoff_seconds = general, uploads, backoff_seconds
        self._storage: RedisStorage | None = None
        self._limiter: MovingWindowRateLimiter | None = None
        if redis_url and (general or uploads):
            # Connects lazily: building the app never waits for Redis.
            self._storage = RedisStorage(redis_url, key_prefix="lathe:ratelimit", socket_connect_timeout=0.5,
                                         socket_timeout=0.5)
            self._limiter = MovingWindowRateLimiter(self._storage)
        self._skip_until = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRateLimiter:
        return cls(settings.redis_url, general=parse_limits(settings.rate_limit),
                   uploads=parse_limits(settings.upload_rate_limit))

    def close(self) -> None:
        if self._storage is not None:
            self._storage.get_connection().close()

    def check(self, key_id: str, *, upload: bool) -> None:
        """Count one request of key `key_id`.

        Raises:
            RateLimited: a limit is used up; `Retry-After` says when the next request fits.
        """
        if self._limiter is None or time.monotonic() < self._skip_until:
            return
        items = [("upload", item) for item in self.uploads] if upload else []
        items += [("api", item) for item in self.general]
        try:
            for scope, item in items:
                if not self._limiter.hit(item, scope, key_id):
                    raise self._exceeded(item, scope, key_id, upload=scope == "upload")
        except (RedisError, StorageError, OSError) as exc:
            self._skip_until = time.monotonic() + self.backoff_seconds
            log.warning("rate limits not enforced for %.0f s: Redis unreachable (%s: %s)",
                        self.backoff_seconds, type(exc).__name__, exc)

    def check_request(self, request: Request, key_id: str) -> None:
        """Count an authenticated request against key `key_id`'s limits (and the upload limit for an
        upload). api.deps.get_caller calls it once the key is verified, in the same trip to the
        threadpool, so a bad key is a 401, never a 429.

        Raises:
            RateLimited: as `check`.
        """
        self.check(key_id, upload=is_upload(request))

    def _exceeded(self, item: RateLimitItem, scope: str, key_id: str, *, upload: bool) -> RateLimited:
        reset_at = self._limiter.get_window_stats(item, scope, key_id).reset_time  # type: ignore[union-attr]
        wait = max(1, math.ceil(reset_at - time.time()))
        what = "uploads" if upload else "requests"
        unit = f"{item.multiples} {item.GRANULARITY.name}" if item.multiples > 1 else item.GRANULARITY.name
        return RateLimited(
            f"Rate limit reached for API key lathe_{key_id}: {item.amount} {what} per {unit}. "
            f"Please try again in {wait}s.",
            headers={"Retry-After": str(wait), "x-ratelimit-limit-requests": str(item.amount),
                     "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": f"{wait}s"},
        )


# --- the upload precheck ------------------------------------------------------------------------

def check_upload_room(request: Request, caller: CallerDep, session: SessionDep, settings: SettingsDep) -> None:
    """Dependency for uploads: refuse at once (413) a body whose Content-Length can't fit in the
    tenant's storage, before a byte is streamed. Chunked bodies, and model archives that grow when
    extracted, are caught by the check at insert."""
    length = request.headers.get("content-length", "")
    if not is_upload(request) or not length.isdigit():
        return
    tenant_id = caller.tenant.id
    quota = read_quota(session, tenant_id=tenant_id, settings=settings)
    used = stored_bytes(session, tenant_id=tenant_id)
    # Committed here, not in lathe: ending the read transaction is for HTTP's sake (no transaction
    # stays open while the body streams), as api.deps.get_caller does.
    session.commit()
    least = max(int(length) - UPLOAD_ENVELOPE, 0)  # the file inside is at least this large
    if used + least > quota.max_stored_bytes:
        raise storage_exceeded(used=used, adding=int(length), quota=quota.max_stored_bytes)
