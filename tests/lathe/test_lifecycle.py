"""The job lifecycle: every (from, to, actor) of the table on SQLite and PostgreSQL, the fences,
the user's actions, and proof that no other module writes a job's status."""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from lathe import lifecycle
from lathe.db.session import session_scope
from lathe.db.tables import Job, JobStatus, Tenant, new_id, now
from lathe.lifecycle import (
    MOVES,
    USER_ACTIONS,
    Actor,
    IllegalMove,
    claim_job,
    move,
    user_move,
)
from tests.databases import DB_KINDS, scratch_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=DB_KINDS)
def url(request, tmp_path_factory) -> Iterator[str]:
    with scratch_database(request.param, tmp_path_factory.mktemp("lifecycle"), "lathe_lifecycle") as url:
        yield url


def new_job(url: str, status: JobStatus, *, attempt: int = 1) -> str:
    """A job row put straight into `status` (tests may; the code under test may not)."""
    with session_scope(url) as s:
        tenant = s.query(Tenant).first()
        if tenant is None:
            tenant = Tenant(id=new_id("org"), name="acme", created_at=now())
            s.add(tenant)
            s.flush()
        job = Job(id=new_id("ftjob"), tenant_id=tenant.id, spec={}, model="m", training_file="file-x", seed=1,
                  attempt=attempt, created_at=now())
        s.add(job)
        s.flush()
        job.status = str(status)
        return job.id


def status_of(url: str, job_id: str) -> str:
    with session_scope(url) as s:
        return s.get(Job, job_id).status


ALL = list(itertools.product(JobStatus, JobStatus, Actor))


def test_every_move_of_the_table_and_none_other(url):
    """Each (source, target, actor): allowed ones change the row, the rest raise before any write."""
    for source, target, actor in ALL:
        job_id = new_job(url, source)
        with session_scope(url) as s:
            if actor in MOVES.get((source, target), ()):
                assert move(s, job_id=job_id, source=source, target=target, by=actor), (source, target, actor)
            else:
                with pytest.raises(IllegalMove):
                    move(s, job_id=job_id, source=source, target=target, by=actor)
        expected = target if actor in MOVES.get((source, target), ()) else source
        assert status_of(url, job_id) == expected, (source, target, actor)


def test_an_allowed_move_is_a_no_op_when_the_job_moved_on(url):
    for (source, target), actors in MOVES.items():
        elsewhere = next(s for s in JobStatus if s != source)
        job_id = new_job(url, elsewhere)
        with session_scope(url) as s:
            assert not move(s, job_id=job_id, source=source, target=target, by=next(iter(actors)))
        assert status_of(url, job_id) == elsewhere


def test_a_stale_attempt_changes_nothing(url):
    job_id = new_job(url, JobStatus.RUNNING, attempt=3)
    with session_scope(url) as s:
        assert not move(s, job_id=job_id, source=JobStatus.RUNNING, target=JobStatus.SUCCEEDED,
                        by=Actor.RUNNER, attempt=2)
        assert move(s, job_id=job_id, source=JobStatus.RUNNING, target=JobStatus.SUCCEEDED,
                    by=Actor.RUNNER, attempt=3)
    assert status_of(url, job_id) == JobStatus.SUCCEEDED


def test_extra_fences_hold(url):
    job_id = new_job(url, JobStatus.RUNNING)
    with session_scope(url) as s:
        s.get(Job, job_id).lease_until = 10**12  # renewed far ahead: not lapsed
    with session_scope(url) as s:
        lapsed = (Job.lease_until.is_not(None), Job.lease_until < 1000.0)
        assert not move(s, job_id=job_id, source=JobStatus.RUNNING, target=JobStatus.QUEUED, by=Actor.SWEEPER,
                        fences=lapsed)
    assert status_of(url, job_id) == JobStatus.RUNNING


def test_claim_bumps_the_attempt_once(url):
    job_id = new_job(url, JobStatus.QUEUED, attempt=1)
    with session_scope(url) as s:
        assert claim_job(s, job_id=job_id, lease_owner="w", lease_until=1e12) == 2
    with session_scope(url) as s:
        assert claim_job(s, job_id=job_id, lease_owner="w2", lease_until=1e12) is None  # a duplicate message
        job = s.get(Job, job_id)
        assert (job.status, job.attempt, job.lease_owner) == (JobStatus.RUNNING, 2, "w") and job.started_at


@pytest.mark.parametrize("action", sorted(USER_ACTIONS))
def test_user_actions_from_every_status(url, action):
    for current in JobStatus:
        job_id = new_job(url, current)
        with session_scope(url) as s:
            job = s.get(Job, job_id)
            job.queued_at = now()
        with session_scope(url) as s:
            job = s.get(Job, job_id)
            if current in USER_ACTIONS[action]:
                assert user_move(s, job, action) == USER_ACTIONS[action][current]
            else:
                with pytest.raises(IllegalMove):
                    user_move(s, job, action)


def test_user_actions_stay_inside_the_table():
    for action, moves in USER_ACTIONS.items():
        for source, target in moves.items():
            assert lifecycle.allowed(source, target, Actor.USER), (action, source, target)
    assert lifecycle.allowed(JobStatus.PAUSED, JobStatus.VALIDATING_FILES, Actor.USER)  # resume before validation


def test_terminal_statuses_are_final():
    assert not [pair for pair in MOVES if pair[0] in lifecycle.TERMINAL]


# --- one writer ----------------------------------------------------------------------------------

SOURCES = [p for pkg in ("api", "worker", "lathe", "core") for p in sorted((ROOT / pkg).rglob("*.py"))]


def status_writes(path: Path) -> list[str]:
    """Places in `path` that write a job's status: `.values(status=...)`, `x.status = ...`,
    `Job(status=...)`, or raw SQL that updates the jobs table."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            keywords = {k.arg for k in node.keywords}
            if name == "values" and "status" in keywords:
                found.append(where)
            if name == "Job" and "status" in keywords:
                found.append(where)
            if name in ("text", "execute", "exec_driver_sql") and any(
                    isinstance(a, ast.Constant) and isinstance(a.value, str) and "update jobs" in a.value.lower()
                    for a in node.args):
                found.append(where)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "status":
                    found.append(where)
    return found


def test_only_the_lifecycle_writes_a_job_status():
    writers = {str(p.relative_to(ROOT)) for p in SOURCES if status_writes(p)}
    assert writers == {"lathe/lifecycle.py"}, [w for p in SOURCES for w in status_writes(p)]


def test_the_scan_sees_each_kind_of_write(tmp_path):
    """The scanner itself: each way of writing a status is found (a scan that finds nothing proves nothing)."""
    sample = ROOT / "tests" / "lathe" / "_status_writes_sample.py"
    sample.write_text("update(Job).values(status='x')\njob.status = 'y'\nJob(id=1, status='z')\n"
                      "conn.execute(text('UPDATE jobs SET status = 1'))\nFile(status='processed')\n")
    try:
        assert len(status_writes(sample)) == 4
    finally:
        sample.unlink()
