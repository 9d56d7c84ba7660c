"""Upload memory: stream a large dataset to POST /v1/files and watch the API process's memory.

    .venv/bin/python bench/upload_memory.py                  # 1 GiB, ~1 minute on 2 cores
    .venv/bin/python bench/upload_memory.py --size-mib 256 --chunked

Starts the API as users run it (uvicorn, a scratch data folder and SQLite, an API key made like
`lathe keys create`), then uploads a valid JSONL dataset (`{"text", "label"}` rows of 1 KiB)
generated on the fly: the client never holds more than one 1 MiB block. The server streams the
body to disk and then checks every row (the 400/200 decision) before answering.

Prints the streaming throughput (MiB/s from the first byte sent to the last), the time to the
answer (streaming + the row check), and the API process's resident memory: before the upload
(after a small warm-up upload of the same kind), its peak while the upload streams and is checked
(sampled every 20 ms), and the growth between them. Target: growth < 64 MiB for 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lathe.keys import create_key  # noqa: E402
from lathe.db.migrate import upgrade  # noqa: E402
from lathe.db.session import engine_for, session_scope  # noqa: E402

MiB = 1024 * 1024
ROW_BYTES = 1024
TARGET_GROWTH_MIB = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _block() -> bytes:
    """1 MiB of JSONL: 1,024 rows of exactly 1 KiB each."""
    row = json.dumps({"text": "", "label": "pos"}).encode()
    pad = ROW_BYTES - len(row) - 1  # the newline
    line = json.dumps({"text": "lorem ipsum " * (pad // 12) + "x" * (pad % 12), "label": "pos"}).encode() + b"\n"
    assert len(line) == ROW_BYTES, len(line)
    return line * (MiB // ROW_BYTES)


class Upload:
    """A multipart body (`purpose`, then `file` with `size_mib` MiB of rows), produced block by block."""

    def __init__(self, size_mib: int):
        self.boundary = "lathe-bench-" + secrets.token_hex(8)
        self.head = (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                     f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
                     "Content-Type: application/jsonl\r\n\r\n").encode()
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.size_mib = size_mib
        self.length = len(self.head) + size_mib * MiB + len(self.tail)
        self.started = self.finished = 0.0

    def __iter__(self) -> Iterator[bytes]:
        block = _block()
        self.started = time.perf_counter()
        yield self.head
        for _ in range(self.size_mib):
            yield block
        yield self.tail
        self.finished = time.perf_counter()


class RssSampler(threading.Thread):
    """The peak resident memory of a process, sampled every `interval` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.samples += 1
            time.sleep(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def _start_api(data_dir: Path, port: int, max_upload: int) -> tuple[subprocess.Popen, str]:
    """Migrate a fresh SQLite database, make a key, start uvicorn; returns the process and the key."""
    url = f"sqlite:///{data_dir / 'lathe.db'}"
    upgrade(url)
    with session_scope(url) as session:
        key = create_key(session, tenant_name="bench")
    engine_for(url).dispose()
    env = {**os.environ, "LATHE_DATA_DIR": str(data_dir), "LATHE_DATABASE_URL": url,
           "LATHE_REDIS_URL": "redis://127.0.0.1:6379/12", "LATHE_MAX_UPLOAD_BYTES": str(max_upload),
           "LATHE_RATE_LIMIT": "none", "LATHE_UPLOAD_RATE_LIMIT": "none"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"uvicorn exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc, key
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("uvicorn did not start in 60 s")


def _post(base: str, key: str, upload: Upload, *, chunked: bool) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}",
               "Content-Type": f"multipart/form-data; boundary={upload.boundary}"}
    if not chunked:
        headers["Content-Length"] = str(upload.length)
    return httpx.post(f"{base}/v1/files", headers=headers, content=iter(upload), timeout=600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="dataset size in MiB (default 1024)")
    ap.add_argument("--chunked", action="store_true", help="send without Content-Length (Transfer-Encoding: chunked)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lathe-upload-bench-") as tmp:
        port = _free_port()
        proc, key = _start_api(Path(tmp) / "data", port, max_upload=(args.size_mib + 64) * MiB)
        base = f"http://127.0.0.1:{port}"
        try:
            warm = _post(base, key, Upload(4), chunked=args.chunked)  # imports and first-request allocations
            assert warm.status_code == 200, warm.text
            api = psutil.Process(proc.pid)
            before = api.memory_info().rss
            sampler = RssSampler(proc.pid)
            sampler.start()
            upload = Upload(args.size_mib)
            client_before = psutil.Process().memory_info().rss
            r = _post(base, key, upload, chunked=args.chunked)
            answered = time.perf_counter()
            peak = sampler.stop()
            client_after = psutil.Process().memory_info().rss
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        if r.status_code != 200:
            raise SystemExit(f"upload failed: {r.status_code} {r.text[:500]}")
        body = r.json()
        assert body["bytes"] == args.size_mib * MiB and body["details"]["rows"] == args.size_mib * MiB // ROW_BYTES

    stream_s = upload.finished - upload.started
    growth = (peak - before) / MiB
    print(f"upload: {args.size_mib} MiB of JSONL ({body['details']['rows']:,} rows), "
          f"{'chunked' if args.chunked else 'with Content-Length'}, to {body['id']}")
    print(f"  streaming:        {stream_s:.1f} s = {args.size_mib / stream_s:.0f} MiB/s")
    print(f"  time to answer:   {answered - upload.started:.1f} s (streaming + checking every row)")
    print(f"  API RSS:          {before / MiB:.0f} MiB before, {peak / MiB:.0f} MiB peak "
          f"({sampler.samples} samples every 20 ms)")
    print(f"  API RSS growth:   {growth:.1f} MiB (target < {TARGET_GROWTH_MIB} MiB): "
          f"{'OK' if growth < TARGET_GROWTH_MIB else 'OVER TARGET'}")
    print(f"  client RSS growth: {(client_after - client_before) / MiB:.1f} MiB")
    if growth >= TARGET_GROWTH_MIB:
        sys.exit(1)


if __name__ == "__main__":
    main()
