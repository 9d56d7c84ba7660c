"""A job's life: its statuses, the table of allowed moves and who may make each, and the one
function that writes a job's status (a test checks that no other module does).

Every move is a compare-and-set in SQL: `UPDATE jobs SET status = :target ... WHERE id = :id AND
status IN (:sources) [AND attempt = :attempt] [AND <extra fences>]`. It returns whether this call
made the change, so two writers racing (a user's cancel and a worker's finalise, two sweepers, a
stale attempt and its successor) can never both win.

Two kinds of "no":
- a move the table does not allow for that actor raises `IllegalMove` before touching the
  database: a bug in a worker, a 409 for the API (`user_move` names the action);
- an allowed move whose fences no longer hold (the job moved on, the attempt is stale, the lease
  was renewed) returns False: a no-op for a stale worker.

The table is `MOVES` below; `USER_ACTIONS` says where a user's cancel, pause and resume take a
job from each status.

Jobs of jobs: a search's parent is moved by the orchestrator (lathe.search.orchestrate), which
runs no training itself: queued -> running when it starts its first trials, running -> succeeded
or failed when they are done, cancelling -> cancelled once every trial has stopped. A trial is an
ordinary job; the runner moves a pruned one running -> cancelled (its state on the leaderboard says
pruned), and the orchestrator fails a trial whose proposed body is not a valid job before it is
ever queued.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from lathe.db.tables import TERMINAL, Job, JobStatus, now
from lathe.webhooks import outbox

__all__ = ["INITIAL", "MOVES", "RELEASE_LEASE", "TERMINAL", "USER_ACTIONS", "Actor", "IllegalMove", "JobStatus",
           "allowed", "claim_job", "move", "release_lease", "user_move", "user_target"]

S = JobStatus

# The status a job is created in (the column's default).
INITIAL = S.VALIDATING_FILES

# Values that end an attempt's claim on a job (set with the move that ends it).
RELEASE_LEASE: dict[str, Any] = {"lease_owner": None, "lease_until": None}


class Actor(StrEnum):
    USER = "user"
    VALIDATOR = "validator"
    RUNNER = "runner"
    SWEEPER = "sweeper"
    ORCHESTRATOR = "orchestrator"


U, V, R, SW, O = Actor.USER, Actor.VALIDATOR, Actor.RUNNER, Actor.SWEEPER, Actor.ORCHESTRATOR

MOVES: dict[tuple[JobStatus, JobStatus], frozenset[Actor]] = {
    (S.VALIDATING_FILES, S.QUEUED): frozenset({V}),
    (S.VALIDATING_FILES, S.FAILED): frozenset({V, O}),
    (S.VALIDATING_FILES, S.PAUSED): frozenset({U}),
    (S.VALIDATING_FILES, S.CANCELLED): frozenset({U}),
    (S.QUEUED, S.RUNNING): frozenset({R, O}),  # the claim: attempt + 1, a fresh lease; a search's first trials
    (S.QUEUED, S.PAUSED): frozenset({U}),
    (S.QUEUED, S.CANCELLED): frozenset({U}),
    (S.RUNNING, S.QUEUED): frozenset({R, SW, O}),  # retried after an infrastructure failure; an ensemble to combine
    (S.RUNNING, S.CANCELLING): frozenset({U}),
    (S.RUNNING, S.PAUSED): frozenset({U}),  # the worker sees it, checkpoints and stops
    (S.RUNNING, S.SUCCEEDED): frozenset({R, O}),
    (S.RUNNING, S.FAILED): frozenset({R, SW, O}),
    (S.RUNNING, S.CANCELLED): frozenset({R}),  # a trial its search's pruner stopped
    (S.CANCELLING, S.CANCELLED): frozenset({R, SW, O}),
    (S.PAUSED, S.VALIDATING_FILES): frozenset({U}),  # resumed before its files were validated
    (S.PAUSED, S.QUEUED): frozenset({U}),  # resumed
    (S.PAUSED, S.SUCCEEDED): frozenset({R}),  # it finished before it saw the pause: keep the result
    (S.PAUSED, S.CANCELLED): frozenset({U}),
}

# What a user's action does from each status (the API's cancel / pause / resume).
USER_ACTIONS: dict[str, dict[JobStatus, JobStatus]] = {
    "cancel": {S.VALIDATING_FILES: S.CANCELLED, S.QUEUED: S.CANCELLED, S.PAUSED: S.CANCELLED,
               S.RUNNING: S.CANCELLING},
    "pause": {S.VALIDATING_FILES: S.PAUSED, S.QUEUED: S.PAUSED, S.RUNNING: S.PAUSED},
    "resume": {S.PAUSED: S.QUEUED},  # or validating_files, for a job paused before validation
}


class IllegalMove(Exception):
    """A move the table does not allow (for that actor, from that status)."""

    def __init__(self, message: str, *, source: JobStatus | None = None, target: JobStatus | None = None):
        super().__init__(message)
        self.source = source
        self.target = target


def allowed(source: JobStatus, target: JobStatus, by: Actor) -> bool:
    return by in MOVES.get((JobStatus(source), JobStatus(target)), frozenset())


def move(
    session: Session,
    *,
    job_id: str,
    source: JobStatus | Iterable[JobStatus],
    target: JobStatus,
    by: Actor,
    attempt: int | None = None,
    fences: Iterable[ColumnElement[bool]] = (),
    **values: Any,
) -> bool:
    """Move a job from one of `source` to `target`, if it is still there. The caller commits.

    Args:
        session: the transaction the move is part of (events and rows written with it commit or
            roll back together).
        job_id: the job.
        source: the status (or statuses) the caller believes the job is in.
        target: the new status.
        by: who moves it; every (source, target) must allow this actor.
        attempt: when given, the move happens only while the job is still on this attempt (a
            stale supervisor changes nothing).
        fences: further SQL conditions the row must meet (e.g. the sweeper's "lease still lapsed").
        values: other columns set in the same UPDATE (SQL expressions allowed); estimated_finish
            is set to null unless given.

    Returns:
        Whether this call made the change.

    Raises:
        IllegalMove: a (source, target) pair the table does not allow for `by`.
    """
    fences = [*fences, *([Job.attempt == attempt] if attempt is not None else [])]
    return _write(session, job_id, source, target, by, fences, values)


def _write(session: Session, job_id: str, source: JobStatus | Iterable[JobStatus], target: JobStatus, by: Actor,
           fences: Iterable[ColumnElement[bool]], values: dict[str, Any]) -> bool:
    """The one UPDATE that writes a job's status. It clears `estimated_finish`: a running job's
    estimate is its training process's (worker.sink), and any move ends that run or starts a new one.
    A move to an end writes its webhook event to the outbox in the same transaction."""
    sources = [JobStatus(source)] if isinstance(source, (str, JobStatus)) else [JobStatus(s) for s in source]
    for s in sources:
        if not allowed(s, target, by):
            raise IllegalMove(f"A job can't go from {s} to {target} (by {by}).", source=s, target=JobStatus(target))
    if "status" in values:
        raise TypeError("the status is `target`, not a value")
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_([str(s) for s in sources]), *fences)
        .values(status=str(target), **{"estimated_finish": None, **values})
        .execution_options(synchronize_session=False)
    )
    changed = session.execute(stmt).rowcount == 1
    if changed and JobStatus(target) in TERMINAL:
        outbox.record(session, job_id=job_id, status=JobStatus(target))  # commits with the move, or not at all
    return changed


def claim_job(session: Session, *, job_id: str, lease_owner: str, lease_until: float,
              fences: Iterable[ColumnElement[bool]] = ()) -> int | None:
    """queued -> running for a new attempt (attempt + 1) under a fresh lease, by the runner.

    Args:
        fences: what else the row must meet (the worker's: a GPU class it serves).

    Returns:
        The new attempt number, or None when the job was not queued (a duplicate or late message) or
        failed a fence.
    """
    claimed = _write(session, job_id, S.QUEUED, S.RUNNING, Actor.RUNNER, fences, {
        "attempt": Job.attempt + 1, "lease_owner": lease_owner, "lease_until": lease_until,
        "started_at": func.coalesce(Job.started_at, now()), "error": None})
    return session.scalar(select(Job.attempt).where(Job.id == job_id)) if claimed else None


def release_lease(session: Session, *, job_id: str, attempt: int, fences: Iterable[ColumnElement[bool]] = ()) -> bool:
    """End `attempt`'s claim on a job without moving it (a paused job whose worker stopped)."""
    stmt = (update(Job).where(Job.id == job_id, Job.attempt == attempt, *fences).values(**RELEASE_LEASE)
            .execution_options(synchronize_session=False))
    return session.execute(stmt).rowcount == 1


def user_target(action: str, current: JobStatus, *, validated: bool = True) -> JobStatus:
    """Where a user's `action` takes a job that is `current`.

    Raises:
        IllegalMove: the action does not apply to a job in that status.
    """
    target = USER_ACTIONS[action].get(JobStatus(current))
    if target is None:
        raise IllegalMove(f"A {current} job can't be {_PAST[action]}.", source=JobStatus(current))
    if action == "resume" and not validated:
        target = S.VALIDATING_FILES
    return target


def user_move(session: Session, job: Job, action: str, **values: Any) -> JobStatus | None:
    """A user's cancel / pause / resume of `job` (as last read): the new status, or None when a
    concurrent change got there first (the caller answers 409 and the user retries).

    Raises:
        IllegalMove: the action does not apply to the job's status.
    """
    current = JobStatus(job.status)
    target = user_target(action, current, validated=job.queued_at is not None)
    if not move(session, job_id=job.id, source=current, target=target, by=Actor.USER, **values):
        return None
    return target


_PAST = {"cancel": "cancelled", "pause": "paused", "resume": "resumed"}
