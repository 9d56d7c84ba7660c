"""Request and response schemas: OpenAI's objects, plus Lathe's extensions, and the functions that
render ORM rows into them."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from lathe.db.tables import Checkpoint, Event, File, Job, Metric, Model
from lathe.gpu_classes import Resources
from lathe.integrations import Integration

T = TypeVar("T")


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


# --- errors --------------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for a person to read.")
    type: str = Field(description="invalid_request_error | authentication_error | rate_limit_error | server_error")
    param: str | None = Field(description="The field, header or path parameter at fault (dotted for nested fields).")
    code: str | None = Field(description="A stable machine-readable reason, e.g. file_not_found, file_too_large.")


class ErrorResponse(BaseModel):
    """OpenAI's error body, the body of every 4xx and 5xx answer."""

    error: ErrorDetail


ERROR_DESCRIPTIONS = {
    400: ("Bad input: a field's value (named in `param`), a malformed upload or dataset (the line in `message`), "
          "or a value no object can have (e.g. a NUL character in an id)."),
    401: "No API key, or a wrong, revoked or expired one.",
    404: "No such object for this tenant (another tenant's object answers the same).",
    409: "Not allowed in the object's current state, or an Idempotency-Key reused with another request.",
    413: "The upload exceeds the size limit, or would exceed the tenant's storage quota.",
    422: "Malformed payload or query parameter (e.g. not a JSON object, a limit out of range).",
    429: "Rate limit or tenant quota reached; `Retry-After` says when to try again.",
    500: "The server failed (nothing of the failure's detail is shown).",
    503: "The service is unavailable: e.g. no worker takes predictions or dry runs' counts, or the broker is down.",
    504: "The operation did not finish in time.",
}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`."}},
    429: {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait before retrying."}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting the given error statuses with OpenAI's error body.

    Declaring 422 here also replaces FastAPI's default `HTTPValidationError`, which is not the
    shape the API answers with (api.errors renders every failure as `{"error": {...}}`).

    Args:
        statuses: HTTP status codes the operation can answer with, besides its success.

    Returns:
        A mapping for a route's or a router's `responses=`.
    """
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status],
                     **({"headers": _ERROR_HEADERS[status]} if status in _ERROR_HEADERS else {})}
            for status in statuses}


# Every /v1 route: the key is checked, parameters are validated (400 for a value the database refuses,
# e.g. a NUL character in an id), per-key rate limits and tenant quotas apply.
V1_ERRORS = error_responses(400, 401, 422, 429)


# --- files ---------------------------------------------------------------------------------------

class FileObject(BaseModel):
    """An uploaded file (OpenAI's file object)."""

    id: str = Field(description="The file's id (`file-...`).")
    object: Literal["file"] = "file"
    bytes: int = Field(description="Size in bytes as uploaded.")
    created_at: int = Field(description="Unix seconds.")
    filename: str = Field(description="The client's file name (metadata only).")
    purpose: str = Field(description="fine-tune | model | fine-tune-results.")
    status: str = Field("processed", description="Always processed: an upload is checked in full before it is answered.")
    status_details: str | None = Field(None, description="Unused (OpenAI's field).")
    details: dict[str, Any] | None = Field(None, description="Lathe: what the upload check found (format, rows, columns).")


def file_object(f: File) -> FileObject:
    return FileObject(id=f.id, bytes=f.bytes, created_at=f.created_at, filename=f.filename, purpose=f.purpose,
                      status=f.status, details=f.details)


# --- jobs ----------------------------------------------------------------------------------------

class JobError(BaseModel):
    code: str | None = Field(None, description="A stable reason, e.g. invalid_training_file, model_not_found, worker_lost, deadline_exceeded.")
    message: str = Field(description="What went wrong, for a person to read (a line number where there is one).")
    param: str | None = Field(None, description="The field at fault, dotted (e.g. training_file, config.freeze.first_n_layers).")


class FineTuningJob(BaseModel):
    """OpenAI's fine-tuning job object plus `task`, `test_file`, `config`, `attempt` and `metrics`."""

    id: str = Field(description="The job's id (`ftjob-...`).")
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str = Field(description="The base model as requested.")
    created_at: int = Field(description="Unix seconds.")
    finished_at: int | None = Field(description="Unix seconds when it succeeded, failed or was cancelled.")
    fine_tuned_model: str | None = Field(description="The model's name once succeeded (`ft:{base}:{org}:{suffix}:{id}`).")
    organization_id: str = Field(description="The tenant that owns the job.")
    result_files: list[str] = Field(description="File ids of the results: a step_metrics.csv (one row per step) once succeeded.")
    status: str = Field(description="validating_files | queued | running | cancelling | paused | succeeded | failed | cancelled")
    validation_file: str | None = Field(description="Validation file id, evaluated during training.")
    training_file: str = Field(description="Training file id.")
    hyperparameters: dict[str, Any] = Field(description="n_epochs, batch_size, learning_rate_multiplier: \"auto\" until resolved, then the values used.")
    trained_tokens: int | None = Field(description="Tokens trained on (non-padding), once succeeded.")
    error: JobError | None = Field(description="Why the job failed, else null.")
    seed: int = Field(description="The random seed (chosen at random when not given).")
    estimated_finish: int | None = Field(
        description="Unix seconds when a running job is expected to finish: the time of its latest progress "
                    "report plus the optimizer steps left times the seconds per step measured in this run (its "
                    "evaluations included), renewed as training reports progress (every 10 steps). Null until the "
                    "first report and whenever the job is not running.")
    integrations: list[Integration] = Field([], description=(
        "The experiment trackers the job logs to, as requested (a search's trial, an ensemble's member: "
        "its parent's): OpenAI's wandb objects and Lathe's mlflow ones."))
    metadata: dict[str, str] | None = Field(description="The request's metadata.")
    method: dict[str, Any] = Field(description="OpenAI's method object: {type: supervised|dpo, <type>: {hyperparameters}} "
                                               "(a DPO job's hyperparameters with beta).")
    user_provided_suffix: str | None = Field(description="The request's suffix.")
    task: str | None = Field(description="What is trained (inferred from the data when not given).")
    test_file: str | None = Field(description="Lathe: held-out file evaluated once at the end.")
    config: dict[str, Any] = Field(description="Lathe: the training toolbox, with defaults filled in.")
    attempt: int = Field(description="Lathe: how many times a worker has started the job (retries after lost workers count).")
    metrics: dict[str, Any] | None = Field(description="Latest, best and test metrics.")
    parent_job: str | None = Field(None, description="Lathe: the search (ensemble) this job is a trial (member) of, else null.")
    search: dict[str, Any] | None = Field(None, description=(
        "Lathe: on a search (config.search), its objective, best_trial and leaderboard `trials` (trial, job, "
        "params, value, state: running|complete|pruned|cancelled|failed, steps, seconds), best first; else null."))
    ensemble: dict[str, Any] | None = Field(None, description=(
        "Lathe: on an ensemble (config.ensemble), its method, phase (members: training them; combine: combining) "
        "and `members` (member, fold, job, status); its figures, each member's beside the ensemble's, are in "
        "metrics.members and the model's eval_report.json; else null."))
    resources: Resources | None = Field(None, description=(
        "Lathe: the GPU class the job runs on and its GPU count, as requested (a search's trial, an ensemble's "
        "member: its parent's); null: the default queue."))


def job_object(job: Job) -> FineTuningJob:
    spec = job.job_spec()
    hp = job.hyperparameters or spec.hyperparameters.model_dump(mode="json", exclude={"beta"} if spec.method != "dpo" else None)
    return FineTuningJob(
        id=job.id, model=job.model, created_at=job.created_at, finished_at=job.finished_at,
        fine_tuned_model=job.fine_tuned_model, organization_id=job.tenant_id,
        result_files=list(job.result_files or []), status=job.status, validation_file=job.validation_file,
        training_file=job.training_file, hyperparameters=hp, trained_tokens=job.trained_tokens,
        error=JobError(**job.error) if job.error else None, seed=job.seed, estimated_finish=job.estimated_finish,
        integrations=job.integrations or [],
        metadata=job.job_metadata, method={"type": spec.method, spec.method: {"hyperparameters": hp}},
        user_provided_suffix=spec.suffix, task=job.task or spec.task, test_file=job.test_file,
        config=spec.config.model_dump(mode="json"), attempt=job.attempt, metrics=job.metrics,
        parent_job=job.parent_job, search=search_object(job.search) if job.search else None,
        ensemble={k: job.ensemble[k] for k in ("method", "phase", "from_search", "members") if k in job.ensemble}
        if job.ensemble else None,
        resources=Resources(gpu=job.gpu_class, gpus=job.gpus or 1) if job.gpu_class else None,
    )


SEARCH_FIELDS = ("objective", "trials_planned", "best_trial", "trials")


def search_object(record: dict[str, Any]) -> dict[str, Any]:
    """The public part of a search's record (lathe.search.orchestrate.board), not its study notes."""
    return {key: record.get(key) for key in SEARCH_FIELDS}


# --- dry runs (lathe.estimate) -----------------------------------------------------------------

class EstimateFile(BaseModel):
    id: str = Field(description="The file's id.")
    rows: int = Field(description="Rows (or images) in the file.")
    examples: int = Field(description="What training iterates: rows kept after truncation (causal-lm drops rows "
                                      "with no target token left), packed rows with config.packing, DPO pairs.")
    tokens: int = Field(description="Tokens one pass over the file trains on (non-padding, after max_length "
                                    "truncation, counted by the base model's tokenizer); 0 for images.")


class EstimateRange(BaseModel):
    min: float
    mean: float
    max: float


class EstimateBasis(BaseModel):
    kind: Literal["measured", "formula", "unknown"] = Field(description=(
        "measured: the speed of your finished jobs on the same base model (else one of its size class) on this "
        "server; formula: FLOPs at a documented rate (README, 'Estimate before you run'); unknown: no duration."))
    description: str = Field(description="What the duration is based on, in words.")
    flops_per_second: float | None = Field(None, description="The training speed assumed.")
    startup_seconds: float | None = Field(None, description="Per run: start-up, first step, export.")
    jobs: int | None = Field(None, description="measured: how many finished jobs it is the median of.")


class EstimateRun(BaseModel):
    """One ensemble member's training run."""

    member: int
    fold: int | None
    examples: int = Field(description="Training examples of this member (its bootstrap draw, folds, ...).")
    hyperparameters: dict[str, float | int]
    learning_rate: float
    steps_per_epoch: int
    optimizer_steps: int
    evaluations: int
    trained_tokens: int
    flops: float | None
    estimated_duration_seconds: int | None


class EstimateCombine(BaseModel):
    models: int = Field(description="Models the ensemble's last step runs and combines.")
    flops: float | None
    estimated_duration_seconds: int | None


class EstimateChildren(BaseModel):
    kind: Literal["trials", "members"]
    count: int = Field(description="Trials the search runs, or the ensemble's member jobs (x folds for stacking).")
    parallel: int = Field(description="Children run at once at most (as free workers allow).")
    per_child: dict[str, EstimateRange | None] = Field(description=(
        "optimizer_steps, trained_tokens and estimated_duration_seconds of one child: min, mean, max (a search: "
        "over draws from its space)."))
    varied: list[str] | None = Field(description="A search: the fields its space varies.")
    members: list[EstimateRun] | None = Field(description="An ensemble: each member job, as it will be created.")
    combine: EstimateCombine | None = Field(description="An ensemble: its last step, measuring and combining its models.")


class JobEstimate(BaseModel):
    """A dry run's answer (`"dry_run": true` on a create): nothing was stored or queued. For a search or an
    ensemble the step, token, FLOP and duration figures are the whole parent's (every child, one after
    another on one training slot, and an ensemble's combine step); `children` has one child's."""

    object: Literal["fine_tuning.job.estimate"] = "fine_tuning.job.estimate"
    model: str
    task: str = Field(description="The task (inferred from the data when the request left it out).")
    method: str
    seed: int = Field(description="The seed the estimate used (an ensemble's draws depend on it: create with it).")
    training_file: EstimateFile
    validation_file: EstimateFile | None
    test_file: EstimateFile | None
    parameters: dict[str, int] | None = Field(description=(
        "The base model's parameters: total, and compute (the weights a token is multiplied by: no lookup "
        "tables, a causal LM's tied output layer counted)."))
    hyperparameters: dict[str, float | int] = Field(description=(
        "What \"auto\" resolves to for these files (a search or an ensemble: for the request as given; its "
        "children's are in `children`)."))
    learning_rate: float
    steps_per_epoch: int
    optimizer_steps: int | None = Field(description="Optimizer steps (at most: early stopping may stop sooner).")
    evaluations: int | None = Field(description="Validation passes.")
    trained_tokens: int | None = Field(description="Tokens trained on, as a finished job's trained_tokens counts them.")
    flops: float | None
    estimated_duration_seconds: int | None = Field(description="From the job's start to its end (see basis).")
    basis: EstimateBasis
    children: EstimateChildren | None
    warnings: list[str] = Field(description="What could make the run differ from the estimate.")


class JobEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str = Field(description="The event's id (`ftevent-...`).")
    created_at: int = Field(description="Unix seconds.")
    level: str = Field(description="info | warn | error.")
    message: str = Field(description="What happened.")
    data: dict[str, Any] | None = Field(description="Structured details (metrics events: step, split and the values).")
    type: str = Field(description="message | metrics.")


def event_object(ev: Event) -> JobEvent:
    return JobEvent(id=ev.id, created_at=ev.created_at, level=ev.level, message=ev.message, data=ev.data, type=ev.type)


class JobCheckpoint(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str = Field(description="The checkpoint's id (`ftckpt-...`).")
    created_at: int = Field(description="Unix seconds.")
    fine_tuned_model_checkpoint: str = Field(description="A name `model` accepts to start a new job from these weights.")
    step_number: int = Field(description="The optimizer step it was saved at.")
    metrics: dict[str, Any] = Field(description="Validation metrics at that step (and the step).")
    fine_tuning_job_id: str = Field(description="The job it belongs to.")


def checkpoint_object(ck: Checkpoint, job: Job) -> JobCheckpoint:
    name = f"{job.fine_tuned_model or job.id}:ckpt-step-{ck.step}"
    return JobCheckpoint(id=ck.id, created_at=ck.created_at, fine_tuned_model_checkpoint=name,
                         step_number=ck.step, metrics={"step": ck.step, **(ck.metrics or {})}, fine_tuning_job_id=job.id)


class MetricPoint(BaseModel):
    step: int = Field(description="Optimizer step.")
    split: str = Field(description="train | valid | test | baseline_test.")
    values: dict[str, Any] = Field(description="Metric name to value.")
    created_at: int = Field(description="Unix seconds.")
    attempt: int = Field(description="The attempt that recorded it.")


def metric_point(m: Metric) -> MetricPoint:
    return MetricPoint(step=m.step, split=m.split, values=m.values, created_at=m.created_at, attempt=m.attempt)


class MetricSeries(BaseModel):
    object: Literal["list"] = "list"
    data: list[MetricPoint]


# --- models --------------------------------------------------------------------------------------

class ModelObject(BaseModel):
    id: str = Field(description="The fine-tuned model's name.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds.")
    owned_by: str = Field(description="The tenant that owns it.")
    task: str | None = Field(None, description="Lathe: what it was trained for.")
    job_id: str | None = Field(None, description="Lathe: the job that made it.")
    bytes: int | None = Field(None, description="Lathe: size of the downloadable archive.")


def model_object(m: Model) -> ModelObject:
    return ModelObject(id=m.id, created=m.created_at, owned_by=m.tenant_id, task=m.task, job_id=m.job_id, bytes=m.bytes)


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[str] = Field(..., min_length=1, max_length=64,
                              description="Up to 64 texts (base64-encoded images for image-classification models).")
    top_k: int = Field(1, ge=1, le=100, description="Classification: labels returned per input, best first.")
    max_new_tokens: int = Field(64, ge=1, le=512, description="causal-lm: tokens generated per input (greedy).")


class Prediction(BaseModel):
    """One prediction; which fields are set depends on the model's task."""

    label: str | None = Field(None, description="Class (classification) or entity type (token-classification).")
    score: float | None = Field(None, description="Probability of the label.")
    value: float | None = Field(None, description="Regression: the predicted number.")
    word: str | None = Field(None, description="token-classification: the entity's text.")
    start: int | None = Field(None, description="token-classification: character offset where the entity starts.")
    end: int | None = Field(None, description="token-classification: character offset where it ends.")
    generated_text: str | None = Field(None, description="causal-lm: the continuation of the prompt.")


class PredictResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[list[Prediction]]
