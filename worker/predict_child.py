"""A worker's prediction process: `python -m worker.predict_child PARENT_PID CACHE_MODELS THREADS`,
started and kept by worker.predict_pool (the one part of the worker's requests that imports torch).

Reads requests from stdin, a JSON object a line, of two kinds (lathe.predictions):
- a prediction ({"id", "kind": "predict" or absent, "model": an exported folder, "inputs", "top_k",
  "max_new_tokens"}), answered {"id", "predictions", "loaded": whether this request loaded the
  model, "seconds"};
- a dry run's count ({"id", "kind": "count", "model": the base model's folder or hub id, "task",
  "files": {param: path}, "specs", "offline": a hub model from the local cache alone}), answered
  {"id", "parameters", "runs", "seconds"} by core.estimate's `count_inputs` and `model_parameters`,
  called here (the files are read at the paths the API resolved: the shared data folder);
or {"id", "error": {message, param, code}, "status": 400 for what the engine refuses (bad inputs, an
unloadable model, a file training would refuse), else 500}, each a line on the stdout it was started
with. Its sys.stdout goes to stderr (the worker's log), so nothing a library prints can break a
line. Up to THREADS requests run at once; nothing here touches the process's environment (a count's
`offline` goes to the loaders as local_files_only).

Models stay loaded in a least-recently-used cache of CACHE_MODELS (`ModelCache`), loaded and run
by core.predict's own `load` and `Predictor.predict`, which `python -m core.predict` runs too: the
answers are the same to the last digit. Each runs under torch.inference_mode and under its model's
lock: one request at a time per model (a pipeline is not thread-safe), and two requests for a model
not yet loaded load it once. The process exits when its stdin closes or its parent is gone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    predictor: Any = None


class ModelCache:
    """Up to `capacity` loaded models, by folder, the least recently used dropped first."""

    def __init__(self, capacity: int, load: Callable[[Path], Any]):
        self.capacity, self.load = max(1, capacity), load
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.lock = threading.Lock()
        self.loads = 0

    @contextmanager
    def use(self, folder: Path) -> Iterator[tuple[Any, bool]]:
        """(the folder's loaded model, whether this call loaded it), used under the model's lock."""
        key = _key(folder)
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = _Entry()
            self.entries.move_to_end(key)
            while len(self.entries) > self.capacity:
                # A request still using a dropped model keeps its reference until it is done.
                self.entries.popitem(last=False)
        with entry.lock:
            loaded = entry.predictor is None
            if loaded:
                try:
                    entry.predictor = self.load(folder)
                except BaseException:
                    with self.lock:
                        if self.entries.get(key) is entry:
                            del self.entries[key]
                    raise
                with self.lock:
                    self.loads += 1
            yield entry.predictor, loaded


def _key(folder: Path) -> tuple:
    """A folder replaced by another of the same name (a model deleted, another exported there) is
    another entry."""
    try:
        st = os.stat(folder)
    except OSError:
        return (str(folder),)
    return (str(folder), st.st_ino, st.st_mtime_ns)


def answer(cache: ModelCache, request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request of either kind (see the module's docstring); never raises."""
    from core.errors import EngineError

    started = time.perf_counter()
    try:
        reply = count(request) if request.get("kind") == "count" else predict(cache, request)
    except EngineError as e:  # bad inputs, a folder that is missing or not a loadable model, a refused file
        return {"id": request.get("id"), "error": e.to_dict(), "status": 400}
    except Exception as e:  # noqa: BLE001 - the worker answers 500; the trace goes to its log
        traceback.print_exc()
        return {"id": request.get("id"), "error": {"message": str(e), "param": None, "code": "internal_error"},
                "status": 500}
    return {"id": request.get("id"), **reply, "seconds": round(time.perf_counter() - started, 4)}


def predict(cache: ModelCache, request: dict[str, Any]) -> dict[str, Any]:
    import torch

    with cache.use(Path(request["model"])) as (predictor, loaded), torch.inference_mode():
        predictions = predictor.predict(request["inputs"], top_k=request.get("top_k", 1),
                                        max_new_tokens=request.get("max_new_tokens", 64))
    return {"predictions": predictions, "loaded": loaded}


def count(request: dict[str, Any]) -> dict[str, Any]:
    """A dry run's counts: {"parameters", "runs": one per spec} (lathe.estimate reads them).

    Raises:
        EngineError: what training would refuse while encoding (a 400 for the API).
    """
    from core.estimate import FILE_PARAMS, count_inputs, model_parameters
    from core.spec import JobSpec, Task

    task = Task(request["task"])
    specs = [JobSpec.model_validate(s) for s in request["specs"]]  # as stored: validated again, as a worker does
    files = {p: Path(request["files"][p]) if request["files"].get(p) else None for p in FILE_PARAMS}
    offline = bool(request.get("offline"))
    runs = count_inputs(request["model"], task, files, specs, local_files_only=offline)
    return {"parameters": model_parameters(request["model"], task, local_files_only=offline), "runs": runs}


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    print("the worker is gone; exiting", file=sys.stderr, flush=True)
    os._exit(0)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m worker.predict_child PARENT_PID CACHE_MODELS THREADS", file=sys.stderr)
        return 2
    parent, capacity, threads = (int(a) for a in argv[1:])
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    # A Ctrl-C at the worker's terminal reaches its whole group; the worker lets this process go.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()

    import transformers  # noqa: F401 - imported before the first request, not during it

    from core.predict import load
    from transformers import AutoModelForSequenceClassification, pipeline  # noqa: F401 - the same

    cache = ModelCache(capacity, load)
    write = threading.Lock()

    def handle(line: str) -> None:
        try:
            request = json.loads(line)
        except ValueError:
            return
        reply = answer(cache, request)
        ms = reply.get("seconds", 0) * 1000
        if request.get("kind") == "count":
            state = "failed" if "error" in reply else "counted"
            print(f"count {request.get('model')}: {len(request.get('files') or {})} files, "
                  f"{len(request.get('specs') or [])} specs, {state}, {ms:.0f} ms", file=sys.stderr, flush=True)
        else:
            state = "loaded" if reply.get("loaded") else "cached" if "predictions" in reply else "failed"
            print(f"predict {request.get('model')}: {len(request.get('inputs') or [])} inputs, {state}, "
                  f"{ms:.0f} ms; {cache.loads} loads so far", file=sys.stderr, flush=True)
        with write:
            answers.write(json.dumps(reply) + "\n")
            answers.flush()

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="predict") as pool:
        for line in sys.stdin:
            if line.strip():
                pool.submit(handle, line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
