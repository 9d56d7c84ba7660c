"""The engine's `MetricsSink`, writing Event/Metric/Checkpoint rows for one attempt of a job.

Every write is fenced: it happens in a transaction that first touches the job row with
`UPDATE jobs ... WHERE id = :id AND attempt = :attempt AND status IN (running, cancelling, paused)`.
That no-op update takes the row's write lock (PostgreSQL row lock, SQLite's database lock), so a
concurrent requeue or finalise either happens before (and the write is refused) or after (and the
rows were written while the attempt still owned the job). A refused write raises `StaleAttempt`:
the training child of a lost attempt must stop, not keep writing beside its successor.

Train metrics arrive every optimizer step, so they are buffered and written in batches.

The same fencing UPDATE keeps the job's `estimated_finish` (OpenAI's field: unix seconds, null
unless running): the engine's latest `progress` report (now + its seconds left) rides on the next
write, and is written only while the job is `running` (a paused or cancelling job's stays null;
lathe.lifecycle clears it on every status move).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import case, update
from sqlalchemy.orm import Session

from lathe.db.queries import add_event
from lathe.db.session import session_factory
from lathe.db.tables import Checkpoint, Job, JobStatus, Metric, new_id, now

log = logging.getLogger(__name__)

LIVE = (JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.PAUSED)


class StaleAttempt(RuntimeError):
    """This attempt no longer owns the job (requeued, taken over, or finished)."""


class DbSink:
    """A MetricsSink bound to (job_id, attempt).

    Args:
        url: the SQLAlchemy URL.
        job_id: the job.
        attempt: the attempt this process runs; writes are refused once the job moves on.
        max_rows: flush buffered metric rows when this many are waiting ...
        max_delay: ... or when the oldest waited this long (seconds).
    """

    def __init__(self, url: str, job_id: str, attempt: int, *, max_rows: int = 50, max_delay: float = 2.0):
        self._sessions = session_factory(url)
        self.job_id = job_id
        self.attempt = attempt
        self.max_rows = max_rows
        self.max_delay = max_delay
        self._pending: list[Metric] = []
        self._pending_since = 0.0
        self._estimated_finish: int | None = None  # unix seconds, from the latest progress report

    # -- MetricsSink ---------------------------------------------------------------------------

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.write(lambda s: add_event(s, job_id=self.job_id, attempt=self.attempt, message=message,
                                        level=level, data=_jsonable(data)))

    def metrics(self, step: int, values: dict[str, float], *, split: str) -> None:
        values = _jsonable(values) or {}
        split = split
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(Metric(job_id=self.job_id, attempt=self.attempt, step=int(step), split=split,
                                    values=values, created_at=now()))
        if split == "train":
            if len(self._pending) >= self.max_rows or time.monotonic() - self._pending_since >= self.max_delay:
                self.flush()
            return
        # An evaluation: the metric rows and a "metrics" event (OpenAI's type) in one transaction.
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        self.write(lambda s: add_event(s, job_id=self.job_id, attempt=self.attempt, type="metrics",
                                        message=f"Step {step}: {split} {shown}",
                                        data={"step": int(step), "split": split, **values}))

    def progress(self, step: int, *, seconds_left: float) -> None:
        """Written with the next write (progress comes just before a step's train metrics)."""
        self._estimated_finish = round(time.time() + seconds_left)

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        def add(s: Session) -> None:
            s.add(Checkpoint(id=new_id("ftckpt"), job_id=self.job_id, attempt=self.attempt, step=int(step),
                             path=str(path), metrics=_jsonable(metrics) or {}, created_at=now()))
            add_event(s, job_id=self.job_id, attempt=self.attempt, message=f"Checkpoint saved at step {step}",
                      data={"step": int(step), "path": str(path)})

        self.write(add)

    # -- plumbing ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write buffered metric rows now."""
        if self._pending:
            self.write(lambda s: None)

    def close(self) -> None:
        """Flush what is buffered; a stale attempt's leftovers are dropped quietly."""
        try:
            self.flush()
        except StaleAttempt:
            self._pending.clear()

    def write(self, add) -> None:  # noqa: ANN001 - a callable(session)
        """Run `add(session)` and write the buffered metric rows, in one transaction fenced on this
        attempt still owning the job (the job row is locked first, and given the latest estimated finish).

        Raises:
            StaleAttempt: the attempt no longer owns the job; nothing was written.
        """
        rows, self._pending = self._pending, []
        values: dict[str, Any] = {"attempt": Job.attempt}
        if self._estimated_finish is not None:
            values["estimated_finish"] = case((Job.status == str(JobStatus.RUNNING), self._estimated_finish),
                                              else_=None)
        with self._sessions() as session:
            try:
                owned = session.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.attempt == self.attempt,
                           Job.status.in_([str(s) for s in LIVE]))
                    .values(**values)
                    .execution_options(synchronize_session=False)
                ).rowcount == 1
                if not owned:
                    session.rollback()
                    raise StaleAttempt(f"job {self.job_id}: attempt {self.attempt} no longer owns the job")
                session.add_all(rows)
                add(session)
                session.commit()
            except StaleAttempt:
                raise
            except BaseException:
                session.rollback()
                self._pending = rows + self._pending  # keep them for the next try
                raise


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _jsonable(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """Plain JSON values (numpy/torch scalars become floats/ints, NaN/inf become None)."""
    if data is None:
        return None
    out: dict[str, Any] = {}
    for key, value in data.items():
        out[str(key)] = _value(value)
    return out


def _value(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return _jsonable(value)
    if isinstance(value, (list, tuple)):
        return [_value(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalar
        try:
            return _value(value.item())
        except (ValueError, TypeError):
            pass
    return str(value)
