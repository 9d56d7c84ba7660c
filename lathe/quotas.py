"""Per-tenant quotas: unfinished jobs and stored bytes. A service concern, not an HTTP one: the
API's sessions check them; a search's trials count against the same quota, but the search waits
for room rather than fail (lathe.search.orchestrate).

A tenant's own columns override the settings:
- active jobs (`LATHE_MAX_ACTIVE_JOBS`): creating one more unfinished job is a 429 with
  `Retry-After: 30`. Waiting helps (a job finishes), so it is a rate-limit answer that SDKs retry.
- stored bytes (`LATHE_MAX_STORED_BYTES`: uploaded files, model archives counted extracted, plus
  exported models): an upload that would pass it is a 413 `storage_quota_exceeded` naming the quota
  and the usage. Not a 429: waiting never frees storage (deleting files does), and a 429 would
  make the openai SDK retry the whole upload for nothing.

Both are checked where the row is inserted — a `before_flush` hook (`install_quota_checks`) on a
session factory; api.main installs it on the API's — so the check runs in the transaction that
creates the job or file, for every caller that creates one. The check first locks the tenant's
row, which serialises concurrent creates of one tenant on PostgreSQL (row lock) and SQLite (the
write lock), so two requests can't both see room for one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import event, exists, func, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from lathe.db.tables import TERMINAL, File, FilePurpose, Job, Model, Tenant
from lathe.errors import RateLimited, TooLarge
from lathe.settings import Settings

ACTIVE_JOBS_RETRY_AFTER = 30  # seconds; a short job on a small model takes about this long


@dataclass(frozen=True)
class Quota:
    max_active_jobs: int
    max_stored_bytes: int


def _quota(settings: Settings, max_active_jobs: int | None, max_stored_bytes: int | None) -> Quota:
    return Quota(max_active_jobs if max_active_jobs is not None else settings.max_active_jobs,
                 max_stored_bytes if max_stored_bytes is not None else settings.max_stored_bytes)


def lock_tenant(session: Session, *, tenant_id: str, settings: Settings) -> Quota:
    """Lock the tenant's row until the transaction ends and read its quotas.

    A no-op UPDATE rather than SELECT ... FOR UPDATE because it locks on both dialects: PostgreSQL
    holds the row lock, SQLite takes its database write lock (waiting out busy_timeout) as the
    first statement of the transaction, so the counts read after it are current.
    """
    row = session.execute(
        update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name)
        .returning(Tenant.max_active_jobs, Tenant.max_stored_bytes)
        .execution_options(synchronize_session=False)
    ).one()
    return _quota(settings, row.max_active_jobs, row.max_stored_bytes)


def read_quota(session: Session, *, tenant_id: str, settings: Settings) -> Quota:
    row = session.execute(select(Tenant.max_active_jobs, Tenant.max_stored_bytes).where(Tenant.id == tenant_id)).one()
    return _quota(settings, row.max_active_jobs, row.max_stored_bytes)


def active_jobs(session: Session, *, tenant_id: str) -> int:
    """A tenant's unfinished jobs. A search counts as its unfinished trials, or as one while it has
    none (it is queued, or between trials), so a search never takes a place beside its own trials."""
    trial = aliased(Job)
    ended = [str(s) for s in TERMINAL]
    unfinished_trials = exists().where(trial.parent_job == Job.id, trial.status.not_in(ended))
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.not_in(ended), ~unfinished_trials)) or 0


def file_footprint(*, purpose: str, size: int, details: object) -> int:
    """Bytes a file keeps on disk: a model archive is kept extracted, anything else as uploaded."""
    extracted = details.get("extracted_bytes") if isinstance(details, dict) else None
    return extracted if purpose == FilePurpose.MODEL and isinstance(extracted, int) else size


def stored_bytes(session: Session, *, tenant_id: str) -> int:
    """A tenant's files (`file_footprint`) plus its exported models."""
    # Model files' extracted size is read from `details` here, not in SQL: PostgreSQL's `->>` parses
    # the whole JSON document and fails on a \u0000 that a dataset's details may hold.
    datasets = session.scalar(select(func.coalesce(func.sum(File.bytes), 0))
                              .where(File.tenant_id == tenant_id, File.purpose != FilePurpose.MODEL))
    archives = session.execute(select(File.bytes, File.details)
                               .where(File.tenant_id == tenant_id, File.purpose == FilePurpose.MODEL))
    models = session.scalar(select(func.coalesce(func.sum(Model.bytes), 0)).where(Model.tenant_id == tenant_id))
    extracted = sum(file_footprint(purpose=FilePurpose.MODEL, size=size, details=details) for size, details in archives)
    return int(datasets or 0) + extracted + int(models or 0)


def _size(n: int) -> str:
    """`1,234 bytes`, with a binary-unit reading for sizes past a KiB: `5,368,709,120 bytes (5.0 GiB)`."""
    if n < 1024:
        return f"{n:,} bytes"
    value, unit = float(n), "bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{n:,} bytes ({value:.1f} {unit})"


def storage_exceeded(*, used: int, adding: int, quota: int) -> TooLarge:
    return TooLarge(
        f"Storage quota exceeded: this upload ({_size(adding)}) would bring your stored files and models "
        f"over your quota of {_size(quota)}; {_size(used)} used now. Delete files or models you no longer need.",
        param="file", code="storage_quota_exceeded")


def enforce_job_quota(session: Session, *, tenant_id: str, settings: Settings, adding: int = 1) -> None:
    """Lock the tenant and refuse `adding` more unfinished jobs past its quota. Call it in the
    transaction that inserts them.

    Raises:
        RateLimited: 429 `active_jobs_limit_exceeded` with `Retry-After: 30`.
    """
    quota = lock_tenant(session, tenant_id=tenant_id, settings=settings)
    active = active_jobs(session, tenant_id=tenant_id)
    if active + adding > quota.max_active_jobs:
        raise RateLimited(
            f"Too many active fine-tuning jobs: you have {active} unfinished, and your quota is "
            f"{quota.max_active_jobs} at once. Wait for one to finish, or cancel one, then retry.",
            code="active_jobs_limit_exceeded", headers={"Retry-After": str(ACTIVE_JOBS_RETRY_AFTER)})


def enforce_storage_quota(session: Session, *, tenant_id: str, settings: Settings, adding: int) -> None:
    """Lock the tenant and refuse `adding` more stored bytes past its quota. Call it in the
    transaction that inserts the file.

    Raises:
        TooLarge: 413 `storage_quota_exceeded`, naming the quota and the usage.
    """
    quota = lock_tenant(session, tenant_id=tenant_id, settings=settings)
    used = stored_bytes(session, tenant_id=tenant_id)
    if used + adding > quota.max_stored_bytes:
        raise storage_exceeded(used=used, adding=adding, quota=quota.max_stored_bytes)


def install_quota_checks(factory: sessionmaker[Session], settings: Settings) -> None:
    """Check the quotas before any session from `factory` inserts jobs or files (see the module
    docstring for why at flush). A refusal propagates out of `flush()`/`commit()`; the caller's
    session is then rolled back, and the caller removes what it wrote to disk."""

    @event.listens_for(factory, "before_flush")
    def _check_new_rows(session: Session, _context, _instances) -> None:
        jobs: dict[str, int] = defaultdict(int)
        stored: dict[str, int] = defaultdict(int)
        for obj in session.new:
            if isinstance(obj, Job):
                jobs[obj.tenant_id] += 1
            elif isinstance(obj, File):
                stored[obj.tenant_id] += file_footprint(purpose=obj.purpose, size=obj.bytes, details=obj.details)
        with session.no_autoflush:
            for tenant_id, n in jobs.items():
                enforce_job_quota(session, tenant_id=tenant_id, settings=settings, adding=n)
            for tenant_id, n in stored.items():
                enforce_storage_quota(session, tenant_id=tenant_id, settings=settings, adding=n)
