"""Settings from `LATHE_*` environment variables, read once (`get_settings()` is cached)."""

from __future__ import annotations

import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATHE_", extra="ignore")

    data_dir: Path = Field(Path(".lathe"), description="Database (embedded default), files, models, checkpoints.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir.")
    redis_url: str | None = Field(None, description="Broker URL; default: `lathe serve` starts an embedded Redis.")
    models_dir: Path | None = Field(None, description="A folder of base models (HF folders) selectable by name.")
    queue: str = Field("lathe", description="Celery queue the API publishes to and workers consume.")
    max_upload_bytes: int = Field(8 * 1024**3, description="Largest accepted upload.")
    max_archive_bytes: int = Field(32 * 1024**3, description="Largest total size of an extracted model archive.")
    max_archive_members: int = Field(10_000, description="Most files in a model archive.")
    allow_hub_models: bool = Field(True, description="Whether `model` may name a Hugging Face hub id.")
    hub_model_allowlist: str = Field(
        "", description="Comma-separated shell patterns of hub ids `model` may name (e.g. "
                        "`HuggingFaceTB/*,sentence-transformers/all-MiniLM-L6-v2`); empty: any hub id."
    )
    hub_probe_seconds: float = Field(1.0, ge=0, description=(
        "Before a hub id is accepted (at create, validation and run), how long the hub (HF_ENDPOINT, "
        "default https://huggingface.co) may take to answer before it counts as unreachable and the "
        "job is refused with model_not_found; 0: no probe (assume it is reachable)."))
    hub_probe_cache_seconds: float = Field(60.0, ge=0, description=(
        "How long a process keeps the hub probe's answer (reachable or not) before it probes again."))
    cache_dir: Path | None = Field(None, description=(
        "A worker's cache of prepared inputs, keyed by content: GGUF models dequantized to safetensors, "
        "tokenized texts and decoded images; a later job on the same model or data (a retry, a search "
        "trial) reuses them. Default: data_dir/cache."))
    cache_max_bytes: int = Field(20 * 1024**3, ge=0, description=(
        "Size bound of the input cache; least recently used entries go first; 0 turns the cache off."))
    max_attempts: int = Field(3, ge=1, description="Tries per job before it fails with worker_lost.")
    lease_seconds: int = Field(120, ge=5, description="How long a claim on a job lasts without a heartbeat.")
    heartbeat_seconds: float = Field(10.0, gt=0, description="How often a worker renews its lease.")
    cancel_grace_seconds: float = Field(30.0, ge=0, description="Time a training process gets to checkpoint on cancel.")
    worker_concurrency: int = Field(1, ge=1, description="Jobs one worker trains at once (its training slots).")
    validate_concurrency: int = Field(2, ge=1, description=(
        "Jobs one worker validates at once, on threads of their own (the `<queue>.validate` queue): "
        "file checks never wait for a training slot."))
    retry_backoff_seconds: float = Field(
        5.0, ge=0, description="Wait before retrying a job after an infrastructure failure; doubles with each "
                               "attempt, capped at 5 minutes.")
    sweep_stale_after_seconds: float = Field(
        600.0, gt=0, description="How long a job may wait in queued/validating_files before the sweeper "
                                 "publishes its message again (the broker may have lost it).")
    broker_transport_options: dict[str, Any] = Field(
        default_factory=dict, description="Kombu Redis transport options (JSON), merged over Lathe's defaults "
                                          "(visibility_timeout: 7 days).")
    dev_key_file: Path | None = Field(None, description="Where `lathe serve` writes its dev key; default data_dir/dev-key.")
    rate_limit: str | None = Field("600/minute", description=(
        "Requests per API key in `limits` notation (`600/minute`, `20/second;1000/hour`), counted in "
        "Redis over a moving window; empty or `none` disables."))
    upload_rate_limit: str | None = Field("60/minute", description=(
        "Uploads (POST /v1/files) per API key, on top of rate_limit; empty or `none` disables."))
    max_active_jobs: int = Field(8, ge=1, description=(
        "Unfinished jobs a tenant may have at once (a tenant's own max_active_jobs overrides it)."))
    max_stored_bytes: int = Field(100 * 1024**3, ge=0, description=(
        "Bytes a tenant may keep: uploaded files (model archives as extracted) + exported models "
        "(a tenant's own max_stored_bytes overrides it)."))
    webhook_allow_private: bool = Field(False, description=(
        "Allow webhook URLs on loopback, private, link-local (cloud metadata) and other non-public "
        "addresses, and plain http; off, such targets are refused at create and at every delivery."))
    webhook_timeout_seconds: float = Field(10.0, gt=0, description=(
        "How long a webhook target may take to accept the connection, and then to answer."))
    webhook_max_attempts: int = Field(15, ge=1, description="Attempts of a webhook delivery before it is given up.")
    webhook_retry_base_seconds: float = Field(5.0, gt=0, description=(
        "Wait after a webhook delivery's first failed attempt; doubles with each attempt (up to "
        "webhook_retry_max_seconds), times a random factor in [0.5, 1). The defaults retry for ~5 hours."))
    webhook_retry_max_seconds: float = Field(3600.0, gt=0, description="The longest wait between two attempts.")
    webhook_poll_seconds: float = Field(1.0, gt=0, description=(
        "How often a worker's webhook dispatcher looks for due deliveries (the outbox)."))
    webhook_concurrency: int = Field(4, ge=1, description="Deliveries one worker sends at once.")
    webhook_retention_days: float = Field(30.0, gt=0, description=(
        "How long delivered and given-up webhook events (and their delivery logs) are kept."))
    mlflow_tracking_uri: str | None = Field(None, description=(
        "The MLflow tracking server jobs with an `mlflow` integration log to (e.g. http://mlflow:5000, "
        "served with artifact proxying so that workers upload the model through it); unset: such "
        "jobs are refused with 400."))
    wandb_mode: Literal["offline", "online"] = Field("offline", description=(
        "How jobs with a `wandb` integration log: offline writes run folders under wandb_dir that "
        "`wandb sync` uploads later; online sends them to the W&B server of the worker's WANDB_BASE_URL "
        "and WANDB_API_KEY (a self-hosted W&B), keeping the same folders."))
    wandb_dir: Path | None = Field(None, description="Where W&B run folders are written; default data_dir/wandb.")
    predict_timeout_seconds: float = Field(120.0, gt=0, description=(
        "How long POST /v1/models/{model}/predict waits for a worker's answer: 503 when no worker took "
        "the request by then, 504 when one took it and has not answered (a cold start loads the model). "
        "Also how long a dry run waits for a worker to take its token count."))
    dry_run_timeout_seconds: float = Field(600.0, gt=0, description=(
        "How long a dry run (`\"dry_run\": true` on a create) waits for a worker to count its files' tokens: "
        "503 when no worker took the count within predict_timeout_seconds, 504 when one took it and has "
        "not answered by then."))
    predict_concurrency: int = Field(2, ge=0, description=(
        "Prediction requests and dry runs' token counts one worker answers at once (threads taking them "
        "from `<queue>.predict`, answered by the worker's prediction process); 0: this worker answers none."))
    predict_cache_models: int = Field(2, ge=1, description=(
        "Models a worker's prediction process keeps loaded, least recently used dropped first."))
    worker_gpu_classes: str = Field("", description=(
        "The GPU classes a worker serves, comma-separated (`lathe worker --gpu-class` sets it): it consumes "
        "`<queue>.gpu.<class>` for each and claims only jobs whose resources.gpu is one of them; `default` "
        "stands for jobs without a class (the queue itself). Empty: `default` alone."))

    def hub_model_allowed(self, name: str) -> bool:
        """Whether `name` (already shaped like a hub id) may be fetched from the hub."""
        if not self.allow_hub_models:
            return False
        patterns = [p.strip() for p in self.hub_model_allowlist.split(",") if p.strip()]
        return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'lathe.db'}"

    @property
    def broker_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError("LATHE_REDIS_URL is not set (lathe serve sets it for the embedded Redis)")
        return self.redis_url

    @property
    def files_dir(self) -> Path:
        return self.resolved_data_dir / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.resolved_data_dir / "jobs"

    @property
    def input_cache_dir(self) -> Path:
        return self.cache_dir.expanduser().resolve() if self.cache_dir else self.resolved_data_dir / "cache"

    @property
    def models_store(self) -> Path:
        return self.resolved_data_dir / "models"

    @property
    def wandb_run_dir(self) -> Path:
        return self.wandb_dir.expanduser().resolve() if self.wandb_dir else self.resolved_data_dir / "wandb"


@lru_cache
def get_settings() -> Settings:
    return Settings()
