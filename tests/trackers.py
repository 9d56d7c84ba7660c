"""Real experiment trackers for tests: an `mlflow server` on loopback (SQLite backend, artifacts
proxied into a tmp folder), and a reader of the runs W&B writes in offline mode."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from lathe.stack import free_port


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 and a free port; yields its URL, stops it (its process group) after."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / "mlflow-server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start in 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:  # a throwaway server: nothing of it is kept
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def wandb_records(run_file: Path) -> list[Any]:
    """The protobuf records of a `run-<id>.wandb` file: W&B's log format (LevelDB's: 32 KiB blocks of
    chunks with a 7-byte header, after a 7-byte file header), which wandb no longer reads in Python."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk  # full, first | middle, last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def wandb_run(folder: Path) -> dict[str, Any]:
    """What an offline W&B run folder holds: its run record, config, history rows and final summary."""
    [run_file] = folder.glob("run-*.wandb")
    out: dict[str, Any] = {"run": None, "config": {}, "history": [], "summary": {}, "exit": None}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            out["exit"] = record.exit.exit_code
    return out
