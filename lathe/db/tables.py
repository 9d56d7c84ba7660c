"""SQLAlchemy models: the database is the source of truth for every job."""

from __future__ import annotations

import secrets
import time
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.spec import JobSpec


def now() -> int:
    """Unix seconds, the unit of every OpenAI `created_at`."""
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class FilePurpose(StrEnum):
    FINE_TUNE = "fine-tune"
    MODEL = "model"
    RESULTS = "fine-tune-results"


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    # Per-tenant quotas; NULL means the server's setting (LATHE_MAX_ACTIVE_JOBS / LATHE_MAX_STORED_BYTES).
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the public part of the key
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(512))  # the client's name: metadata only, never a path
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # server-chosen, under settings.files_dir
    status: Mapped[str] = mapped_column(String(16), default="processed")
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # format, rows, columns, labels
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    __table_args__ = (Index("ix_files_tenant_created", "tenant_id", "created_at"),)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # Written by lathe.lifecycle alone; a new job starts in validating_files.
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.VALIDATING_FILES)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # JobSpec.model_dump(mode="json", exclude_unset=True)
    model: Mapped[str] = mapped_column(String(512))
    task: Mapped[str | None] = mapped_column(String(40))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    test_file: Mapped[str | None] = mapped_column(String(40))
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256))
    hyperparameters: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # resolved "auto" values
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {code, message, param}
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"latest": {...}, "best": {...}, "test": {...}}
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    seed: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[float | None] = mapped_column()
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    queued_at: Mapped[int | None] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)
    # Jobs of jobs: a search's trial (an ensemble's member) names its parent and its number there
    # (unique: a child is never created twice); `child_info` is what the parent assigned and learnt
    # of it (lathe.search, lathe.ensemble), and `search` / `ensemble` the parent's own record (its
    # leaderboard; its members and phase).
    parent_job: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    child_index: Mapped[int | None] = mapped_column(Integer)
    child_info: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    search: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    ensemble: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # OpenAI's `integrations` as the request gave them (experiment trackers the training process
    # logs to); an empty list when none.
    integrations: Mapped[list[Any] | None] = mapped_column(JSON)
    # Lathe's `resources` (lathe.gpu_classes): the GPU class whose workers alone run the job (its
    # run messages go to that class's queue) and its GPU count; both null for a job without them.
    gpu_class: Mapped[str | None] = mapped_column(String(32))
    gpus: Mapped[int | None] = mapped_column(Integer)
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_status", "status"),
        Index("uq_jobs_idempotency", "tenant_id", "idempotency_key", unique=True),
        Index("uq_jobs_parent_child", "parent_job", "child_index", unique=True),
    )

    @property
    def is_parent(self) -> bool:
        """A search or an ensemble: its children do the training (its own run, if any, combines)."""
        return bool(self.search or self.ensemble)

    def job_spec(self) -> JobSpec:
        """The stored spec, typed (it holds the fields the request set; defaults fill the rest)."""
        return JobSpec.model_validate(self.spec)


class Event(Base):
    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")  # "message" | "metrics"
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    __table_args__ = (Index("ix_events_job_seq", "job_id", "seq"),)


class Metric(Base):
    __tablename__ = "metrics"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(16))  # train | valid | test | baseline_test
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    __table_args__ = (Index("ix_metrics_job_step", "job_id", "step"),)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(256), primary_key=True)  # the job's fine_tuned_model
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    task: Mapped[str] = mapped_column(String(40))
    path: Mapped[str] = mapped_column(Text)  # the exported HF folder
    archive_path: Mapped[str] = mapped_column(Text)  # a .tar of that folder, served by /content
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class WebhookEndpoint(Base):
    """A tenant's webhook endpoint (OpenAI's `webhook_endpoint`): where job events are delivered,
    signed with `secret` (and `previous_secret` until it expires, after a rotation with overlap)."""

    __tablename__ = "webhook_endpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(256))
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[Any]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(128))
    previous_secret: Mapped[str | None] = mapped_column(String(128))
    previous_secret_expires_at: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    updated_at: Mapped[int] = mapped_column(BigInteger, default=now)
    __table_args__ = (Index("ix_webhook_endpoints_tenant_created", "tenant_id", "created_at"),)


class WebhookEvent(Base):
    """The outbox: an event (`fine_tuning.job.succeeded`, ...) written in the transaction of the
    status change it reports; `payload` is the JSON body every delivery of it sends."""

    __tablename__ = "webhook_events"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class WebhookDelivery(Base):
    """One event to one endpoint: `id` is the `webhook-id` header, the same on every attempt.
    `status` pending -> delivered (a 2xx) or failed (attempts exhausted); a dispatcher claims a due
    pending row by setting `lease_until` (compare-and-set), so one attempt runs at a time."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"))
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column()
    lease_until: Mapped[float | None] = mapped_column()
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_attempt_at: Mapped[int | None] = mapped_column(BigInteger)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
    )


class WebhookAttempt(Base):
    """The delivery log: one row per HTTP attempt (status code or error, duration)."""

    __tablename__ = "webhook_attempts"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
