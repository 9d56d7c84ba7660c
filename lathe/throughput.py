"""How long training takes: the one cost model of a dry run's estimate (lathe.estimate), measured on
this server's finished jobs where it can be, else a formula. Torch-free.

Work. A trained token costs `coefficient × compute parameters` FLOPs: the forward pass multiplies
each token by every weight once (2 FLOPs per weight), the backward pass twice (4: the gradient of
the activations and of the weights), so 6 in full fine-tuning (Kaplan et al. 2020). Without weight
gradients the backward pass halves: LoRA (its adapters are negligible) 4; a frozen backbone (only
the head learns) 2; the first n of L blocks frozen: 6 - 4n/L; gradient checkpointing recomputes the
forward pass: +2. Compute parameters are the weights a token is multiplied by: all but the lookup
tables (token, position, segment embeddings), plus a causal LM's tied output projection
(core.estimate.parameter_counts). Evaluation and DPO's reference pass are forward only: 2 FLOPs
per weight per token. An image counts as IMAGE_TOKENS tokens (a ViT-B/16's patches at 224 px; a
rough figure for convolutional nets, which no measurement here backs).

Duration = STARTUP_SECONDS + FLOPs / rate, the rate in FLOP/s:
  measured  from the tenant's own succeeded jobs (one attempt, trained_tokens recorded, not a
            search or ensemble parent): each one's training FLOPs / (finished_at - started_at -
            STARTUP_SECONDS); the median over the most comparable: the same base model (`model` as
            named), else a base model of the same size class (compute parameters within a factor of
            2, read off its exported weights). Its evaluations are in its time, so only the training
            FLOPs of the estimated job are divided by it. Other tenants' jobs are never read: their
            timings would tell one tenant of another's work.
  formula   FORMULA_FLOPS_PER_SECOND, training and evaluation FLOPs both.

The formula's constants are anchored in ../shared/BENCHMARKS.md (2-core AMD EPYC with
avx512_bf16, torch CPU; 2026-11-27/12-01): all-MiniLM-L6-v2 costs 6 × 10.7M non-embedding weights
= 64 MFLOP per trained token, and a job through the service trained 74.9 samples/s of a sentiment
set whose rows average 24.5 tokens: 74.9 × 24.5 × 64e6 = 117 GFLOP/s, 28% of the cores' 420 GFLOP/s
bf16 matmul peak. The same job spent ~10 s between `running` and its first optimizer step and
~3-4 s after its last: STARTUP_SECONDS = 14. A server whose workers have a GPU is far faster than
this formula says until its first job has finished: then the measured rate takes over.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.architectures import model_facts
from core.estimate import weight_parameters
from core.spec import JobSpec, Task
from lathe.db.tables import Job, JobStatus, Model

FORMULA_FLOPS_PER_SECOND = 117e9
STARTUP_SECONDS = 14.0
IMAGE_TOKENS = 197
HISTORY = 50  # the tenant's most recent finished jobs looked at
SIZE_CLASS = 2.0  # a base model within this factor of compute parameters counts as comparable


def coefficient(spec: JobSpec, num_layers: int | None) -> float:
    """FLOPs per compute parameter per trained token (see the module docstring)."""
    cfg = spec.config
    if cfg.lora is not None:
        c = 4.0
    elif cfg.freeze.backbone:
        c = 2.0
    elif cfg.freeze.first_n_layers and num_layers:
        c = 6.0 - 4.0 * min(1.0, cfg.freeze.first_n_layers / num_layers)
    else:
        c = 6.0
    return c + (2.0 if cfg.gradient_checkpointing else 0.0)


def work_tokens(task: Task | str | None, tokens: int, examples: int) -> int:
    """The tokens a split costs: its tokens, or IMAGE_TOKENS per image."""
    return examples * IMAGE_TOKENS if task == Task.IMAGE_CLASSIFICATION else tokens


@dataclass(frozen=True)
class Rate:
    """FLOP/s a duration is estimated at, and the basis the estimate reports."""

    flops_per_second: float
    basis: dict[str, Any]
    measured: bool

    def seconds(self, train_flops: float, forward_flops: float) -> float:
        """A run's duration: start-up, then its FLOPs (forward-only ones too under the formula; a
        measured rate already holds the evaluations of the jobs it was measured on)."""
        flops = train_flops if self.measured else train_flops + forward_flops
        return STARTUP_SECONDS + flops / self.flops_per_second


FORMULA = Rate(FORMULA_FLOPS_PER_SECOND, {
    "kind": "formula", "flops_per_second": FORMULA_FLOPS_PER_SECOND, "startup_seconds": STARTUP_SECONDS,
    "description": ("FLOPs = 6 x compute parameters x trained tokens (4 with LoRA, less with frozen layers) + 2 x "
                    "compute parameters x evaluated tokens, at 117 GFLOP/s (all-MiniLM-L6-v2 through the service "
                    "on a 2-core AMD EPYC, bf16), + 14 s of start-up and export. No comparable job of yours has "
                    "finished on this server yet.")}, measured=False)


def job_rate(session: Session, *, tenant_id: str, model: str, compute_params: int | None,
             num_layers: int | None) -> Rate | None:
    """The measured rate for a job on `model` (see the module docstring), or None when no finished
    job of the tenant is comparable. With `compute_params` unknown only jobs on the same model
    compare, per token (FLOP/s then count 1 per compute parameter, as must the estimate's FLOPs)."""
    rows = session.execute(
        select(Job.model, Job.spec, Job.task, Job.trained_tokens, Job.started_at, Job.finished_at, Job.search,
               Job.ensemble, Model.path)
        .outerjoin(Model, Model.id == Job.fine_tuned_model)
        .where(Job.tenant_id == tenant_id, Job.status == JobStatus.SUCCEEDED, Job.attempt == 1,
               Job.trained_tokens > 0, Job.started_at.is_not(None), Job.finished_at > Job.started_at)
        .order_by(Job.finished_at.desc()).limit(HISTORY)).all()
    same, similar = [], []
    for row in rows:
        if row.search or row.ensemble:  # a parent: its tokens are its children's, its time theirs and the wait
            continue
        if row.model != model and compute_params is None:
            continue
        rate = _measured(row, compute_params, num_layers) if row.model == model else _measured_other(row)
        if rate is None:
            continue
        if row.model == model:
            same.append(rate)
        elif compute_params and 1 / SIZE_CLASS <= rate[1] / compute_params <= SIZE_CLASS:
            similar.append(rate)
    chosen, match = (same, "the same base model") if same else (similar, "a base model of the same size class")
    if not chosen:
        return None
    flops = statistics.median(r[0] for r in chosen)
    speed = (f"{flops / 1e9:.3g} GFLOP/s" if compute_params else
             f"{flops:.3g} weighted tokens/s (the model's size is unknown: a token counts 6, 4 with LoRA, "
             "less with frozen layers)")
    return Rate(flops, {
        "kind": "measured", "flops_per_second": flops if compute_params else None, "startup_seconds": STARTUP_SECONDS,
        "jobs": len(chosen),
        "description": (f"The median training speed of your {len(chosen)} most recent succeeded job(s) on {match} "
                        f"on this server: {speed} after {STARTUP_SECONDS:g} s of start-up and export"
                        + (", with FLOPs = 6 x compute parameters x trained tokens (4 with LoRA, less with "
                           "frozen layers)." if compute_params else "."))},
        measured=True)


def _measured(row: Any, params: int | None, num_layers: int | None) -> tuple[float, int] | None:
    """(the FLOP/s one finished job trained at, its compute parameters: 1 when not known); None
    when its spec no longer reads."""
    try:
        spec = JobSpec.model_validate(row.spec)
    except ValueError:
        return None
    seconds = max(1.0, row.finished_at - row.started_at - STARTUP_SECONDS)
    return coefficient(spec, num_layers) * (params or 1) * row.trained_tokens / seconds, params or 1


def _measured_other(row: Any) -> tuple[float, int] | None:
    """`_measured` of a job on another base model, its size read off its exported weights."""
    if not row.path:
        return None
    counts = weight_parameters(Path(row.path), causal_lm=row.task == Task.CAUSAL_LM)
    facts = model_facts(Path(row.path))
    return _measured(row, counts["compute"], facts.num_layers if facts else None) if counts else None
