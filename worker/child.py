"""The training process: `python -m worker.child --standby SUPERVISOR_PID`.

Started by the worker (`worker.supervisor`) in its own process group, usually ahead of its job: it
imports torch, transformers and the engine, then blocks reading one assignment line from stdin,
`{"job_id": ..., "attempt": ..., "assigned_at": ...}` (EOF instead: the supervisor let it go; it exits 0). From the
start it watches the supervisor pid it was given and exits when orphaned. Once assigned it sends its
output to the attempt's log and runs that attempt; `python -m worker.child JOB_ID ATTEMPT
[SUPERVISOR_PID]` runs one directly. The only process that imports torch.

It reads the job and the supervisor's plan (`attempt-<n>.plan.json`: resolved base model, checkpoint
to resume from), runs `core.engine.run` with a DB-backed sink, and leaves its outcome in
`attempt-<n>.result.json` (written atomically), which the supervisor reads after it exits:

    {"status": "succeeded", model_dir, archive_path, trained_tokens, hyperparameters, metrics, ...}
    {"status": "cancelled"}                               SIGTERM (cancel/pause): checkpointed, stopped
    {"status": "pruned", trained_tokens, metrics, ...}    a search's pruner stopped the trial
    {"status": "failed", "error": {...}, "user_error": true}    EngineError; exit 0, never retried
    {"status": "failed", "error": {"code": "internal_error", ...}, "user_error": false}
                                                          any other exception; exit 1 (traceback in
                                                          the attempt's log), not retried either
Exit code 75 without a result: this attempt lost the job (fenced DB write refused), or the
supervisor died. The outcome written, the process leaves with os._exit: the interpreter's teardown
of torch (a second or more) is not the job's time. The model folder is exported but not packed:
the worker packs the download archive after it has recorded the job as succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from core.errors import EngineError
from core.spec import JobSpec
from lathe.db.session import session_scope
from lathe.db.tables import File, Job
from lathe.settings import get_settings
from worker.sink import DbSink, StaleAttempt
from worker.tracking import About, Tracking

EXIT_STALE = 75


def attempt_paths(jobs_dir: Path, job_id: str, attempt: int) -> dict[str, Path]:
    base = jobs_dir / job_id
    return {name: base / f"attempt-{attempt}.{name}" for name in ("log", "plan.json", "result.json", "pid")}


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write, fsync, rename, fsync the folder: a reader sees the whole file or none."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _watch_parent(supervisor: int) -> None:
    """The supervisor died (we were re-parented): its lease will lapse and the sweeper will requeue
    the job, so this orphan must stop at once rather than train beside the next attempt.

    `supervisor` is the pid the supervisor passed on the command line, not our parent at the time
    this thread starts: a supervisor killed while this process was still importing (a second or
    more) has already left us re-parented then, and comparing with that parent would never fire.
    """
    while True:
        if os.getppid() != supervisor:
            print("supervisor is gone; exiting", file=sys.stderr, flush=True)
            os._exit(EXIT_STALE)
        time.sleep(1.0)


def _configure_threads(concurrency: int) -> None:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cpus // max(1, concurrency)))


# Imported before the job arrives: what every job needs before its own data and model. Every task
# adapter (with what it reads and scores with: pandas, scikit-learn's metrics, the image and chat
# readers; ~2 s of imports otherwise paid by the job), and the classes transformers resolves by
# name at load time for the common families.
WARM_MODULES = (
    "core.engine",
    "core.adapters.text_classification",
    "core.adapters.token_classification",
    "core.adapters.causal_lm",
    "core.adapters.image_classification",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.bert.modeling_bert",
    "transformers.models.bert.tokenization_bert",
    "transformers.models.llama.modeling_llama",
    "worker.trial",  # a search's trial: Optuna (~0.5 s to import), for its pruner
)


def warm_up(concurrency: int) -> None:
    """Import torch (and set its thread count), transformers and the engine; read the package
    versions every reproducibility record names."""
    import importlib

    from core.export import package_versions

    _configure_threads(concurrency)
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional family missing from this transformers: load it when needed
            pass
    package_versions()


def _result_fields(result: Any) -> dict[str, Any]:
    fields = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(vars(result))
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()}


def _send_output_to(log: Path) -> None:
    """Point stdout and stderr (the file descriptors, so that native code's output follows) at `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def run_attempt(job_id: str, attempt: int, *, timing: dict[str, Any] | None = None,
                stop: threading.Event | None = None) -> int:
    """Run one attempt to its outcome file; the exit code. `timing`: when this process started,
    was ready and was assigned (unix seconds), reported in the job's events. `stop`: set by a
    SIGTERM (checkpoint at the next optimizer step and stop), possibly already."""
    settings = get_settings()
    paths = attempt_paths(settings.jobs_dir, job_id, attempt)
    plan = json.loads(paths["plan.json"].read_text())

    stop = stop or threading.Event()
    signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())

    sink = DbSink(settings.sqlalchemy_url, job_id, attempt)
    tracking = Tracking()  # the job's integrations (worker.tracking), opened once it is read
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            job = session.get(Job, job_id)
            spec = JobSpec.model_validate(job.spec)
            trial = bool(job.parent_job and session.get(Job, job.parent_job).search)  # not an ensemble's member
            files = {
                param: session.get(File, file_id).path if file_id else None
                for param, file_id in (("training_file", spec.training_file),
                                       ("validation_file", spec.validation_file),
                                       ("test_file", spec.test_file))
            }
            about = About.of(job, attempt)
        _configure_threads(settings.worker_concurrency)
        from core.cache import InputCache
        from core.engine import RunPaths, run  # torch: only in this process

        if timing is not None:
            sink.event(_ready_message(timing), data={"timings": timing})
        tracking = Tracking.start(about, spec.model_dump(mode="json"), settings, sink)
        if plan.get("hub_cache_only"):
            import huggingface_hub.constants  # read at each request, by transformers too

            huggingface_hub.constants.HF_HUB_OFFLINE = True
            sink.event(f"The Hugging Face hub does not answer: {plan['model']} is loaded from this worker's "
                       "local cache only.", level="warning")
        run_paths = RunPaths(
            model=plan["model"],
            train_file=Path(files["training_file"]),
            validation_file=Path(files["validation_file"]) if files["validation_file"] else None,
            test_file=Path(files["test_file"]) if files["test_file"] else None,
            work_dir=settings.jobs_dir / job_id,
            resume_from=Path(plan["resume_from"]) if plan.get("resume_from") else None,
            init_from=Path(plan["init_from"]) if plan.get("init_from") else None,
        )
        if plan.get("boost_after"):  # a boosting member: its rows weighted by the errors of the ones before it
            from core.combine import boosting_weights

            alphas, weights = boosting_weights(spec, _members(plan["boost_after"]), run_paths.data_files())
            run_paths = dataclasses.replace(run_paths, row_weights=tuple(weights))
            sink.event(f"Boosting: rows weighted by the {len(alphas)} member(s) before this one (SAMME; their vote "
                       f"weights {', '.join(f'{a:.3f}' for a in alphas)}; heaviest row {max(weights):.2f})",
                       data={"alphas": alphas})
        # No archive: the worker packs it once the job is recorded as succeeded.
        cache = InputCache(settings.input_cache_dir, settings.cache_max_bytes) if settings.cache_max_bytes else None
        callbacks = []
        if trial:  # a search's trial: its pruner may stop it at an evaluation
            from core.callbacks import Pruning
            from worker.trial import TrialPruning

            callbacks.append(Pruning(TrialPruning(sink, settings.sqlalchemy_url, job_id)))
        if spec.config.ensemble:  # the parent of an ensemble: combine its members' models (core.combine)
            from core.combine import combine

            result = combine(spec, _members(plan["members"]), run_paths.data_files(), run_paths.work_dir,
                             tracking.tee(sink))
            result.trained_tokens = sum(m["trained_tokens"] for m in plan["members"])  # the members trained them
        else:
            result = run(spec, run_paths, tracking.tee(sink), should_stop=stop.is_set, archive=False, cache=cache,
                         callbacks=callbacks)
        sink.flush()
        if getattr(result, "cancelled", False):
            outcome: dict[str, Any] = {"status": "cancelled"}
        elif getattr(result, "pruned", False):
            outcome = {"status": "pruned", **_result_fields(result)}
        else:
            outcome = {"status": "succeeded", **_result_fields(result)}
        tracking.end(outcome["status"], result)  # the test report and the model, before the outcome is read
        code = 0
    except StaleAttempt as e:
        print(f"stopping: {e}", file=sys.stderr, flush=True)
        tracking.end("lost")
        return EXIT_STALE
    except EngineError as e:
        outcome = {"status": "failed", "error": e.to_dict(), "user_error": True}
        tracking.end("failed")
        code = 0
    except Exception as e:
        traceback.print_exc()
        # The message names the exception type only: the stack trace stays in the attempt's log.
        outcome = {"status": "failed", "user_error": False,
                   "error": {"code": "internal_error", "param": None,
                             "message": f"Training failed with an internal error ({type(e).__name__}); "
                                        "the server's log for this job has the details."}}
        tracking.end("failed")
        code = 1
    finally:
        sink.close()
    write_json_atomic(paths["result.json"], outcome)
    return code


def _members(entries: list[dict[str, Any]]) -> list[Any]:
    """core.combine.Member of each member the plan names (lathe.ensemble.members_of)."""
    from core.combine import Member

    return [Member(m["index"], m["job"], Path(m["model_dir"]), JobSpec.model_validate(m["spec"])) for m in entries]


def _ready_message(timing: dict[str, Any]) -> str:
    if timing["ready_at"] <= timing["assigned_at"]:
        return (f"Training process ready: started {timing['assigned_at'] - timing['started_at']:.1f} s "
                "before this job")
    return (f"Training process ready {timing['ready_at'] - timing['assigned_at']:.1f} s after this job "
            "reached it")


def standby(supervisor: int) -> int:
    """Get ready, wait for one assignment on stdin, run it.

    A SIGTERM before the assignment is read, with one waiting (a cancel or a deadline reaching a
    process still importing), stops that attempt at its first optimizer step, with a checkpoint,
    as it would have later; with nothing waiting (nobody gave this process a job) it just exits.
    """
    started_at = time.time()
    stop = threading.Event()

    def on_sigterm(_sig: int, _frame: Any) -> None:
        stop.set()
        if not select.select([sys.stdin], [], [], 0)[0]:
            os._exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    threading.Thread(target=_watch_parent, args=(supervisor,), daemon=True).start()
    warm_up(get_settings().worker_concurrency)
    ready_at = time.time()
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # let go (closed stdin), or the supervisor died (the watcher exits 75 too)
    received_at = time.time()
    assignment = json.loads(line)
    job_id, attempt = str(assignment["job_id"]), int(assignment["attempt"])
    _send_output_to(attempt_paths(get_settings().jobs_dir, job_id, attempt)["log"])
    return run_attempt(job_id, attempt, stop=stop, timing={
        "started_at": started_at, "ready_at": ready_at, "received_at": received_at, "pid": os.getpid(),
        "assigned_at": float(assignment.get("assigned_at") or received_at)})  # when the supervisor sent it


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "--standby":
        return standby(int(argv[2]))
    if len(argv) not in (3, 4):
        print("usage: python -m worker.child --standby SUPERVISOR_PID\n"
              "       python -m worker.child JOB_ID ATTEMPT [SUPERVISOR_PID]", file=sys.stderr)
        return 2
    threading.Thread(target=_watch_parent, args=(int(argv[3]) if len(argv) == 4 else os.getppid(),),
                     daemon=True).start()
    return run_attempt(argv[1], int(argv[2]))


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the outcome is on disk: skip the interpreter's teardown of torch
