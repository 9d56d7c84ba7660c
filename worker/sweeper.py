"""Recovering jobs whose worker or message was lost. `lathe worker`/`lathe serve` run
`run_sweeper` in a thread; any number of sweepers may run at once (every change is a
compare-and-set, and a duplicate message finds nothing to claim).

- `running`/`cancelling`/`paused` with an expired lease: the supervisor died (a heartbeat renews
  the lease while it lives). Running goes back to `queued` (the attempt stays; the next claim bumps
  it and resumes from the last checkpoint) and is re-published, or fails with `worker_lost` once
  `attempt >= max_attempts`; cancelling becomes `cancelled`; paused just loses its lease.
- a search or an ensemble (`queued`/`running`/`cancelling`): one step of it (lathe.parents.advance),
  which records children a sweep ended, starts those due, and makes up for a step lost with its
  worker. A parent between its children is never re-published to run (an ensemble combining is).
- `queued`/`validating_files` for longer than `stale_after` seconds (LATHE_SWEEP_STALE_AFTER_SECONDS):
  the message may have been lost (a broker restart without persistence, a FLUSHALL); publish it
  again. On these states `lease_until` means "not re-published before": it spaces re-publishing
  out, so a long queue is not flooded. A job whose GPU class no worker serves is not re-published
  (its message waits in the class's queue; a worker that comes takes it, or the first sweep after
  it comes publishes again); it gets one warn event saying so instead (lathe.gpu_classes).
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from sqlalchemy import or_, select, update

from lathe.db.queries import add_event
from lathe.db.session import session_scope
from lathe.db.tables import Job, JobStatus, now
from lathe.gpu_classes import note_unserved, unserved, waits_for_a_worker
from lathe.lifecycle import RELEASE_LEASE, Actor, move, release_lease
from lathe.queue import publish_run, publish_validate
from lathe.parents import advance
from lathe.settings import Settings

log = logging.getLogger(__name__)



def sweep(settings: Settings, *, stale_after: float | None = None) -> dict[str, list[str]]:
    """One pass; returns the job ids acted on, by what was done.

    Args:
        settings: where the database and the broker are.
        stale_after: seconds a queued/validating job may wait before its message is published
            again; default `settings.sweep_stale_after_seconds` (10 minutes).
    """
    stale_after = settings.sweep_stale_after_seconds if stale_after is None else stale_after
    t = time.time()
    done: dict[str, list[str]] = {"requeued": [], "failed": [], "cancelled": [], "released": [], "republished": [],
                                  "advanced": [], "unserved": []}
    publish: list[tuple[str, str]] = []
    with session_scope(settings.sqlalchemy_url) as session:
        expired = session.execute(
            select(Job.id, Job.status, Job.attempt, Job.max_attempts)
            .where(Job.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.PAUSED]),
                   Job.lease_until.is_not(None), Job.lease_until < t)
        ).all()
    for job_id, status, attempt, max_attempts in expired:
        with session_scope(settings.sqlalchemy_url) as session:
            # Fenced on the status, the attempt *and* the lapsed lease: a heartbeat that just renewed wins.
            lapsed = (Job.lease_until.is_not(None), Job.lease_until < t)

            def cas(to_state: JobStatus, **values) -> bool:  # noqa: ANN003
                return move(session, job_id=job_id, source=status, target=to_state, by=Actor.SWEEPER,
                            attempt=attempt, fences=lapsed, **values, **RELEASE_LEASE)

            if status == JobStatus.CANCELLING:
                if cas(JobStatus.CANCELLED, finished_at=now()):
                    add_event(session, job_id=job_id, attempt=attempt, message="The job was cancelled")
                    done["cancelled"].append(job_id)
            elif status == JobStatus.PAUSED:
                if release_lease(session, job_id=job_id, attempt=attempt, fences=(*lapsed, Job.status == status)):
                    done["released"].append(job_id)
            elif attempt >= (max_attempts or settings.max_attempts):
                error = {"code": "worker_lost", "param": None,
                         "message": f"The worker running the job stopped responding on each of {attempt} attempts."}
                if cas(JobStatus.FAILED, error=error, finished_at=now()):
                    add_event(session, job_id=job_id, attempt=attempt, level="error", data={"error": error},
                              message=f"The job failed: {error['message']}")
                    done["failed"].append(job_id)
            elif cas(JobStatus.QUEUED, queued_at=now()):
                add_event(session, job_id=job_id, attempt=attempt, level="warn",
                          message=f"The worker running attempt {attempt} stopped responding; the job is queued again")
                done["requeued"].append(job_id)
                publish.append(("run", job_id))

    with session_scope(settings.sqlalchemy_url) as session:
        waiting = session.execute(
            select(Job.id, Job.status, Job.search, Job.ensemble, Job.gpu_class).where(
                or_(Job.status == JobStatus.QUEUED, Job.status == JobStatus.VALIDATING_FILES),
                or_(Job.queued_at < t - stale_after,
                    Job.queued_at.is_(None) & (Job.created_at < t - stale_after)),
                or_(Job.lease_until.is_(None), Job.lease_until < t))
        ).all()
        nobody = _unserved(settings, {row.gpu_class for row in waiting if row.gpu_class})
        for job_id, status, search, ensemble, gpu_class in waiting:
            if status == JobStatus.QUEUED and not waits_for_a_worker(status, search, ensemble):
                continue  # a parent between its children: its steps (below) move it, no worker runs it
            if status == JobStatus.QUEUED and gpu_class in nobody:
                continue  # no consumer: another copy would only pile up beside the first
            marked = session.execute(
                update(Job).where(Job.id == job_id, Job.status == status,
                                  or_(Job.lease_until.is_(None), Job.lease_until < t))
                .values(lease_until=t + stale_after).execution_options(synchronize_session=False)
            ).rowcount == 1
            if marked:
                publish.append(("run" if status == JobStatus.QUEUED else "validate", job_id))
                done["republished"].append(job_id)

    for kind, job_id in publish:  # after the commits
        (publish_run if kind == "run" else publish_validate)(settings, job_id)
    done["unserved"] = note_unserved(settings)
    # Searches and ensembles: a step each (one lost with its worker, children a sweep ended, room
    # under a quota).
    with session_scope(settings.sqlalchemy_url) as session:
        parents = session.scalars(select(Job.id).where(
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING]),
            or_(Job.search.is_not(None), Job.ensemble.is_not(None)), Job.parent_job.is_(None))).all()
    for job_id in parents:
        if advance(settings, job_id):
            done["advanced"].append(job_id)
    if any(done.values()):
        log.info("sweep: %s", {k: v for k, v in done.items() if v})
    return done


def _unserved(settings: Settings, classes: set[str]) -> set[str]:
    try:
        return unserved(settings, classes)
    except redis.RedisError:  # as before classes existed: publish again
        log.warning("could not tell which GPU classes are served", exc_info=True)
        return set()


def run_sweeper(settings: Settings, interval: float = 15.0, *, stop: threading.Event | None = None) -> None:
    """Sweep every `interval` seconds until `stop` is set (forever without one); errors are logged."""
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            sweep(settings)
        except Exception:
            log.exception("sweep failed")
        stop.wait(interval)
