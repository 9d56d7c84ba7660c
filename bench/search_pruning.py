"""The same hyperparameter search with and without pruning, through the real service.

    .venv/bin/python bench/search_pruning.py                      # tweet_eval_emotion, 800 rows, 12 trials, 3 epochs
    .venv/bin/python bench/search_pruning.py --rows 400 --trials 10 --search-epochs
    .venv/bin/python bench/search_pruning.py --trials 16 --rows 1200 --pruner hyperband

`lathe serve` on a free port with a data folder of its own; all-MiniLM-L6-v2 (from its wheel)
uploaded as a purpose=model tar, a seeded --rows subset of the training split and the whole
validation split as files. Then two searches, one after the other, identical but for the pruner
(same seed, sampler, space and trials; trials evaluate twice per epoch, so a pruner has something
to compare early): `--pruner` (median by default: after 3 finished trials, a trial below the
median of the finished ones at the same evaluation stops) and none.

The space: learning rate, batch size and weight decay, every trial --epochs long; with
--search-epochs the number of epochs (1 to 4) is searched too. A pruner compares trials at their
n-th evaluation, so it fits a fixed budget best: with the epochs searched, the short trials cost
little either way and a long one's learning-rate schedule is still high at an evaluation where a
short one's has decayed.

For each: the optimizer steps all its trials trained (the cost pruning cuts), the wall time, the
best validation objective (macro-F1), and the best trial's parameters. The target the issue sets:
>= 30% fewer trial-steps for a best objective within 0.5 point of the unpruned search's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_vs_trainer import Service, minilm_and_subset  # noqa: E402 - the same `lathe serve` harness

SPACE = {
    "hyperparameters.learning_rate_multiplier": {"type": "float", "low": 0.5, "high": 30.0, "log": True},
    "hyperparameters.batch_size": {"type": "categorical", "choices": [16, 32]},
    "config.optimizer.weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
}
EPOCHS = {"hyperparameters.n_epochs": {"type": "int", "low": 1, "high": 4}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tweet_eval_emotion")
    ap.add_argument("--rows", type=int, default=800, help="training rows (a seeded subset)")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--pruner", default="median", help="the pruned search's pruner (Optuna's, by Lathe's name)")
    ap.add_argument("--startup", type=int, default=3, help="median/percentile: finished trials before pruning")
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3, help="every trial's epochs (without --search-epochs)")
    ap.add_argument("--search-epochs", action="store_true", help="search the epochs (1-4) too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lathe-search-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_tar, train = minilm_and_subset(tmp, args.data, rows=args.rows, seed=args.seed)

        service = Service(tmp / "data", poll=1.0)
        try:
            client = service.client
            with open(model_tar, "rb") as f:
                model = client.files.create(file=f, purpose="model")
            with open(train, "rb") as f:
                training = client.files.create(file=f, purpose="fine-tune")
            with open(args.data / "validation.csv", "rb") as f:
                validation = client.files.create(file=f, purpose="fine-tune")
            pruner = ({"type": args.pruner, "n_startup_trials": args.startup}
                      if args.pruner in ("median", "percentile") else {"type": args.pruner})
            results = []
            for label, chosen in (("pruned", pruner), ("unpruned", {"type": "none"})):
                service.wait_quiet()
                results.append(run_search(service, label, model=model.id, training=training.id,
                                          validation=validation.id, args=args, pruner=chosen))
        finally:
            service.stop()
    report(results, args)


def run_search(service: Service, label: str, *, model: str, training: str, validation: str,
               args: argparse.Namespace, pruner: dict) -> dict:
    search = {"trials": args.trials, "parallel": 1, "sampler": args.sampler, "pruner": pruner,
              "objective": {"metric": "f1_macro", "mode": "max"},
              "space": {**SPACE, **(EPOCHS if args.search_epochs else {})}}
    print(f"{label}: {args.trials} trials, pruner {pruner['type']} ...", flush=True)
    started = time.time()
    job = service.succeeded(model=model, training_file=training, validation_file=validation, seed=args.seed,
                            hyperparameters={} if args.search_epochs else {"n_epochs": args.epochs},
                            extra_body={"task": "text-classification", "config": {
                                "max_length": args.max_length, "label_column": "label_text",
                                "evaluations_per_epoch": 2, "search": search}})
    seconds = time.time() - started
    board = (job.model_extra or {}).get("search") or {}
    rows = board.get("trials") or []
    steps = sum(row.get("steps") or 0 for row in rows)
    states = [row["state"] for row in rows]
    best = board.get("best_trial") or {}
    result = {"label": label, "pruner": pruner["type"], "seconds": seconds, "steps": steps, "best": best.get("value"),
              "best_params": best.get("params"), "complete": states.count("complete"),
              "pruned": states.count("pruned"), "failed": states.count("failed"), "job": job.id, "rows": rows}
    print(f"  {label}: {steps} trial-steps, best f1_macro {result['best']:.4f}, {seconds:.0f} s, "
          f"{result['complete']} complete / {result['pruned']} pruned", flush=True)
    return result


def report(results: list[dict], args: argparse.Namespace) -> None:
    pruned, full = results
    epochs = "epochs searched (1-4)" if args.search_epochs else f"{args.epochs} epochs per trial"
    print(f"\nsearch_pruning: {args.trials} trials ({args.sampler}, seed {args.seed}) on {args.data.name}, "
          f"{args.rows} training rows, {epochs}, all-MiniLM-L6-v2, objective validation f1_macro")
    print(f"{'search':<10} {'pruner':<19} {'trial-steps':>11} {'seconds':>8} {'best f1':>8} "
          f"{'complete':>8} {'pruned':>6}")
    for r in results:
        print(f"{r['label']:<10} {r['pruner']:<19} {r['steps']:>11} {r['seconds']:>8.0f} {r['best']:>8.4f} "
              f"{r['complete']:>8} {r['pruned']:>6}")
    fewer = 1 - pruned["steps"] / full["steps"] if full["steps"] else float("nan")
    gap = (pruned["best"] - full["best"]) * 100
    print(f"\npruning trained {fewer:.0%} fewer trial-steps ({pruned['steps']} vs {full['steps']}), "
          f"{1 - pruned['seconds'] / full['seconds']:.0%} less wall time; best objective {gap:+.2f} points "
          f"(target: >= 30% fewer steps, within 0.5 point)")
    for r in results:
        print(f"{r['label']} best: {r['best_params']}")
        for row in r["rows"]:
            print(f"   trial {row['trial']:>2} {row['state']:<9} value {row['value'] if row['value'] is None else round(row['value'], 4)!s:<7}"
                  f" steps {row['steps']!s:>4}  {row['params']}")


if __name__ == "__main__":
    main()
