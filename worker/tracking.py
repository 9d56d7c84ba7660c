"""Experiment tracking: a job's `integrations` (lathe.integrations) logged by its training process.

`Tracking.start` opens one run per integration for this attempt, and `tee(sink)` is the sink the
engine then reports to: every call reaches the job's DbSink first, and its metrics then go on to each
run. What a run gets:

- at its start: the job spec with every default filled in, and the job's ids (W&B: the run's config,
  tags `lathe/finetune`, `lathe/<job id>`, `lathe/<parent id>`; MLflow: params under dotted names,
  tags `lathe.*`, and the whole spec as the artifact `lathe_job_spec.json`);
- each metrics report (train every logging interval, each evaluation, the test set before and
  after training) as `<split>/<name>` at its optimizer step (MLflow: batched, sent at each
  evaluation and at least every 10 s);
- at its end: the hyperparameters used ("auto" resolved; W&B config `hyperparameters`, MLflow params
  `hyperparameters_used.*`), the test report (W&B summary `test_report`, MLflow artifact
  `test_report.json`), for MLflow the exported model folder as artifacts under `model/`; the run is
  closed as finished, failed or killed (cancelled, paused, or lost).

One run per attempt (W&B id `<job id>-<attempt>`, grouped by job, a child's by its parent; MLflow tag
`lathe.attempt`): a retried attempt starts again from its checkpoint, and its steps never go back
inside one run. W&B runs are folders under `settings.wandb_run_dir` (offline: `wandb sync` uploads
them). wandb and mlflow are imported only when a job asks for them.

Tracking never fails a job: each call to a run is guarded; the first one that raises (or times out:
an unreachable server) turns into one `warn` event saying what was not logged and why, and that run
logs nothing more for the attempt. The job's own metrics, in Lathe's database, are complete either way.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lathe.db.tables import Job
from lathe.settings import Settings

# The MLflow client retries a refused connection 7 times over minutes by default; a training process
# should learn within seconds that its tracking server is down (the operator can set these).
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
WANDB_FINISH_SECONDS = 120.0  # online mode: finishing waits for the uploads of a server that may be gone
# How a run ends, by the attempt's outcome: anything else (cancelled, paused, lost) is KILLED, exit code 1.
STATUS = {"succeeded": ("FINISHED", 0), "pruned": ("FINISHED", 0), "failed": ("FAILED", 1)}


@dataclass(frozen=True)
class About:
    """What a run is told about the job besides its spec (read from its row in the child)."""

    job_id: str
    attempt: int
    parent_job: str | None
    child_index: int | None
    model: str
    task: str | None
    integrations: tuple[dict[str, Any], ...]

    @classmethod
    def of(cls, job: Job, attempt: int) -> About:
        return cls(job.id, attempt, job.parent_job, job.child_index, job.model, job.task,
                   tuple(job.integrations or ()))

    def run_name(self, given: str | None) -> str:
        """The name given (a child's with its number), else the job id, as OpenAI names W&B runs."""
        if given and self.child_index is not None:
            return f"{given}-{self.child_index}"
        return given or self.job_id

    def fields(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "attempt": self.attempt, "parent_job": self.parent_job,
                "child_index": self.child_index, "model": self.model, "task": self.task}


class Guard:
    """Runs one tracker's calls; the first failure becomes one warn event, and the end of that tracker.

    `what` names what the call would have logged (a callable: worked out once it failed)."""

    def __init__(self, kind: str, label: str, sink: Any):
        self.kind, self.label, self.sink, self.off = kind, label, sink, False

    def __call__(self, what: str | Callable[[], str], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        if self.off:
            return False
        try:
            fn(*args, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001 - tracking never fails the job
            self.off = True
            what = what() if callable(what) else what
            print(f"tracking: {self.label}: {what} was not logged", file=sys.stderr, flush=True)
            traceback.print_exc()
            reason = _reason(exc)
            self.sink.event(f"{self.label}: {what} could not be logged ({reason}); nothing more is logged "
                            "there for this attempt. The job goes on, its metrics kept by Lathe as always.",
                            level="warn", data={"integration": self.kind, "not_logged": what, "error": reason})
            return False


def _reason(exc: BaseException) -> str:
    """The root cause in a line (`ConnectionRefusedError: [Errno 111] Connection refused`), with the
    type the client raised when it differs: a client's own message repeats every layer below it."""
    root = exc
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    text = f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0][:240]}"
    return text if root is exc else f"{text}, in {type(exc).__name__}"


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if hasattr(value, "item") and not isinstance(value, (bool, int, float)):
            value = value.item()  # numpy / torch scalars
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def _bounded(fn: Callable[[], Any], seconds: float, what: str) -> None:
    """`fn()` on a thread of its own, given up (TimeoutError) after `seconds`."""
    box: dict[str, BaseException] = {}

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"tracking-{what}")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish in {seconds:.0f} s")
    if "error" in box:
        raise box["error"]


class WandbRun:
    """A Weights & Biases run, offline (a folder for `wandb sync`) or online (WANDB_BASE_URL)."""

    def __init__(self, options: dict[str, Any], about: About, spec: dict[str, Any], settings: Settings):
        import wandb

        folder = settings.wandb_run_dir
        folder.mkdir(parents=True, exist_ok=True)
        own = ["lathe/finetune", f"lathe/{about.job_id}", f"lathe/{about.model}"[:64]]
        if about.parent_job:
            own.append(f"lathe/{about.parent_job}")
        self.mode = settings.wandb_mode
        self.run = wandb.init(
            project=options["project"], entity=options.get("entity"), name=about.run_name(options.get("name")),
            tags=list(dict.fromkeys([*options.get("tags", []), *own])), group=about.parent_job or about.job_id,
            id=f"{about.job_id}-{about.attempt}",
            dir=str(folder), config={**spec, "lathe": about.fields()}, reinit="create_new",
            # Not the worker's console, code or git checkout: the run is the job's, not Lathe's.
            settings=wandb.Settings(mode=self.mode, console="off", silent=True, init_timeout=60, disable_code=True,
                                    disable_git=True, disable_job_creation=True,
                                    finish_timeout=WANDB_FINISH_SECONDS, finish_timeout_raises=True),
        )
        self.folder = Path(self.run.settings.sync_dir)

    def started(self) -> tuple[str, dict[str, Any]]:
        where = (f"offline, folder {self.folder} (upload it with `wandb sync {self.folder}`)"
                 if self.mode == "offline" else f"{self.run.url} (a copy in {self.folder})")
        return (f"Logging to W&B project {self.run.project!r}, run {self.run.id}: {where}.",
                {"integration": "wandb", "run_id": self.run.id, "folder": str(self.folder), "mode": self.mode})

    def metrics(self, step: int, values: dict[str, float], split: str) -> None:
        self.run.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def unsent(self, step: int, split: str) -> str:
        return f"the {split} metrics of step {step}"

    def end(self, guard: Guard, status: str, result: Any) -> None:
        if result is not None and getattr(result, "hyperparameters", None):
            guard("the hyperparameters used", self.run.config.update,
                  {"hyperparameters": _jsonable(result.hyperparameters)}, allow_val_change=True)
        report = (getattr(result, "metrics", None) or {}).get("test")
        summary = {"lathe_outcome": status, **({"test_report": _jsonable(report)} if report else {})}
        guard("the test report" if report else "the outcome", self.run.summary.update, summary)
        code = STATUS.get(status, ("KILLED", 1))[1]
        guard(f"the run's end ({status})", _bounded, lambda: self._close(code), WANDB_FINISH_SECONDS + 30,
              "W&B's finish")

    def _close(self, code: int) -> None:
        import wandb

        self.run.finish(exit_code=code)
        try:  # finish returns before W&B's service has written the run out; its teardown waits for that
            wandb.teardown()
        except SystemExit as exc:  # the service's own exit code, raised as sys.exit
            raise RuntimeError(f"W&B's service exited with code {exc.code}") from None


class MlflowRun:
    """An MLflow run on the server's tracking server (`settings.mlflow_tracking_uri`)."""

    FLUSH_ROWS, FLUSH_SECONDS = 200, 10.0

    def __init__(self, options: dict[str, Any], about: About, spec: dict[str, Any], settings: Settings):
        for name, value in MLFLOW_HTTP.items():
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self._Metric, self._Param = Metric, Param
        self.uri = _without_password(settings.mlflow_tracking_uri or "")
        self.client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        self.experiment_id = self._experiment(options["experiment"])
        tags = {f"lathe.{k}": str(v) for k, v in about.fields().items() if v is not None}
        run = self.client.create_run(self.experiment_id, run_name=about.run_name(options.get("run_name")), tags=tags)
        self.run_id, self.name = run.info.run_id, run.info.run_name
        self.pending: list[Any] = []
        self.pending_since = 0.0
        self._params(_flat(spec))
        self.client.log_dict(self.run_id, spec, "lathe_job_spec.json")

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another job created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _params(self, values: dict[str, Any]) -> None:
        params = [self._Param(_key(k), (v if isinstance(v, str) else json.dumps(v))[:6000]) for k, v in values.items()]
        for i in range(0, len(params), 100):  # the REST API takes 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def started(self) -> tuple[str, dict[str, Any]]:
        return (f"Logging to MLflow at {self.uri}: experiment {self.experiment_id}, run {self.run_id} ({self.name}).",
                {"integration": "mlflow", "run_id": self.run_id, "experiment_id": self.experiment_id})

    def metrics(self, step: int, values: dict[str, float], split: str) -> None:
        stamp = int(time.time() * 1000)
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending += [self._Metric(_key(f"{split}/{k}"), v, stamp, int(step)) for k, v in values.items()]
        if split != "train" or len(self.pending) >= self.FLUSH_ROWS or \
                time.monotonic() - self.pending_since >= self.FLUSH_SECONDS:
            self.flush()

    def unsent(self, step: int | None = None, split: str | None = None) -> str:
        """The metrics waiting to be sent (those of `step` among them once they failed to go)."""
        steps = sorted({m.step for m in self.pending})
        if not steps:
            return f"the {split} metrics of step {step}" if split else "the metrics"
        return f"the metrics of step {steps[0]}" + (f" to {steps[-1]}" if len(steps) > 1 else "")

    def flush(self) -> None:
        rows = self.pending
        for i in range(0, len(rows), 1000):  # 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])
        self.pending = []

    def end(self, guard: Guard, status: str, result: Any) -> None:
        if self.pending:
            guard(self.unsent(), self.flush)
        if result is not None and getattr(result, "hyperparameters", None):
            guard("the hyperparameters used", self._params,
                  {f"hyperparameters_used.{k}": v for k, v in _flat(_jsonable(result.hyperparameters)).items()})
        report = (getattr(result, "metrics", None) or {}).get("test")
        if report:
            guard("the test report", self.client.log_dict, self.run_id, _jsonable(report), "test_report.json")
        model_dir = getattr(result, "model_dir", None)
        if model_dir and Path(model_dir).is_dir():
            guard(f"the model ({model_dir})", self.client.log_artifacts, self.run_id, str(model_dir), "model")
        guard(f"the run's end ({status})", self._terminate, status)

    def _terminate(self, status: str) -> None:
        self.client.set_tag(self.run_id, "lathe.outcome", status)
        self.client.set_terminated(self.run_id, STATUS.get(status, ("KILLED",))[0])


def _key(name: str) -> str:
    """A name MLflow accepts: `f1[pos]` becomes `f1/pos`, other characters and path tricks `_`."""
    name = re.sub(r"[^\w./\- :]", "_", name.replace("[", "/").replace("]", ""))
    return "/".join(p if p not in ("", ".", "..") else "_" for p in name.split("/"))[:250]


def _without_password(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


RUNS: dict[str, tuple[Callable[[dict[str, Any], Settings], str], type]] = {
    "wandb": (lambda options, settings: f"W&B project {options['project']!r}", WandbRun),
    "mlflow": (lambda options, settings: f"MLflow experiment {options['experiment']!r} at "
                                         f"{_without_password(settings.mlflow_tracking_uri or '')}", MlflowRun),
}


class Tracking:
    """The tracker runs of one attempt (none: `tee` hands back the sink itself)."""

    def __init__(self, runs: list[tuple[Guard, Any]] | None = None):
        self.runs = runs or []
        self.ended = False

    @classmethod
    def start(cls, about: About, spec: dict[str, Any], settings: Settings, sink: Any) -> Tracking:
        """Open a run per integration; one that can't be opened is a warn event, not an error."""
        runs = []
        for item in about.integrations:
            label, kind = RUNS[item["type"]]
            options = item[item["type"]]
            guard = Guard(item["type"], label(options, settings), sink)
            opened: list[Any] = []
            if guard("the run", lambda: opened.append(kind(options, about, spec, settings))):
                message, data = opened[0].started()
                sink.event(message, data=data)
                runs.append((guard, opened[0]))
        return cls(runs)

    def tee(self, sink: Any) -> Any:
        return TeeSink(sink, self) if self.runs else sink

    def metrics(self, step: int, values: dict[str, Any], split: str) -> None:
        numbers = _numbers(values)
        for guard, run in self.runs:
            guard(lambda run=run: run.unsent(step, split), run.metrics, step, numbers, split)

    def end(self, status: str, result: Any = None) -> None:
        """Close every run: succeeded (with the result: hyperparameters, test report, model), failed,
        or anything else (cancelled, pruned, lost) as killed."""
        if self.ended:
            return
        self.ended = True
        for guard, run in self.runs:
            if guard.off:
                continue
            try:
                run.end(guard, status, result)
            except Exception:  # noqa: BLE001 - the warn event itself could not be written (a lost attempt)
                traceback.print_exc()


class TeeSink:
    """The engine's sink: the job's DbSink, then the tracker runs (metrics only)."""

    def __init__(self, sink: Any, tracking: Tracking):
        self.sink, self.tracking = sink, tracking

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.sink.event(message, level=level, data=data)

    def metrics(self, step: int, values: dict[str, float], *, split: str) -> None:
        self.sink.metrics(step, values, split=split)
        self.tracking.metrics(step, values, split)

    def progress(self, step: int, *, seconds_left: float) -> None:
        self.sink.progress(step, seconds_left=seconds_left)

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self.sink.checkpoint(step, path, metrics)

    def flush(self) -> None:
        self.sink.flush()
