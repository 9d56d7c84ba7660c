"""The training process: `python -m worker.child JOB_ID ATTEMPT`.

Started by `worker.tasks.run_job` in its own process group; the only process that imports torch.
It reads the job and the supervisor's plan (`attempt-<n>.plan.json`: resolved base model, checkpoint
to resume from), runs `core.engine.run` with a DB-backed sink, and leaves its outcome in
`attempt-<n>.result.json` (written atomically), which the supervisor reads after it exits:

    {"status": "succeeded", model_dir, archive_path, trained_tokens, hyperparameters, metrics, ...}
    {"status": "cancelled"}                               SIGTERM (cancel/pause): checkpointed, stopped
    {"status": "failed", "error": {...}, "user_error": true}    EngineError; exit 0, never retried
    {"status": "failed", "error": {"code": "internal_error", ...}, "user_error": false}
                                                          any other exception; exit 1 (traceback in
                                                          the attempt's log), not retried either
Exit code 75 without a result: this attempt lost the job (fenced DB write refused).
"""

from __future__ import annotations

import dataclasses
import json
import os
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


def _result_fields(result: Any) -> dict[str, Any]:
    fields = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(vars(result))
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()}


def run_attempt(job_id: str, attempt: int, supervisor: int | None = None) -> int:
    settings = get_settings()
    paths = attempt_paths(settings.jobs_dir, job_id, attempt)
    plan = json.loads(paths["plan.json"].read_text())

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())
    threading.Thread(target=_watch_parent, args=(supervisor or os.getppid(),), daemon=True).start()

    sink = DbSink(settings.sqlalchemy_url, job_id, attempt)
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            job = session.get(Job, job_id)
            spec = JobSpec.model_validate(job.spec)
            files = {
                param: session.get(File, file_id).path if file_id else None
                for param, file_id in (("training_file", spec.training_file),
                                       ("validation_file", spec.validation_file),
                                       ("test_file", spec.test_file))
            }
        _configure_threads(settings.worker_concurrency)
        from core.engine import RunPaths, run  # torch: only in this process

        run_paths = RunPaths(
            model=plan["model"],
            train_file=Path(files["training_file"]),
            validation_file=Path(files["validation_file"]) if files["validation_file"] else None,
            test_file=Path(files["test_file"]) if files["test_file"] else None,
            work_dir=settings.jobs_dir / job_id,
            resume_from=Path(plan["resume_from"]) if plan.get("resume_from") else None,
            init_from=Path(plan["init_from"]) if plan.get("init_from") else None,
        )
        result = run(spec, run_paths, sink, should_stop=stop.is_set)
        sink.flush()
        if getattr(result, "cancelled", False):
            outcome: dict[str, Any] = {"status": "cancelled"}
        else:
            outcome = {"status": "succeeded", **_result_fields(result)}
        code = 0
    except StaleAttempt as e:
        print(f"stopping: {e}", file=sys.stderr, flush=True)
        return EXIT_STALE
    except EngineError as e:
        outcome = {"status": "failed", "error": e.to_dict(), "user_error": True}
        code = 0
    except Exception as e:
        traceback.print_exc()
        # The message names the exception type only: the stack trace stays in the attempt's log.
        outcome = {"status": "failed", "user_error": False,
                   "error": {"code": "internal_error", "param": None,
                             "message": f"Training failed with an internal error ({type(e).__name__}); "
                                        "the server's log for this job has the details."}}
        code = 1
    finally:
        sink.close()
    write_json_atomic(paths["result.json"], outcome)
    return code


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print("usage: python -m worker.child JOB_ID ATTEMPT [SUPERVISOR_PID]", file=sys.stderr)
        return 2
    return run_attempt(argv[1], int(argv[2]), int(argv[3]) if len(argv) == 4 else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
