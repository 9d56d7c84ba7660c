"""core.applicability's rules for OpenAI's `method`: what a DPO job (method.type "dpo") can take, and
the DPO-only fields a supervised job cannot. Torch-free, like core.applicability, which calls
`method_rules` with its job under judgement (`refuse`, `set`, `spec`, `task`, `data`)."""

from __future__ import annotations

from typing import Any

from core.spec import Task

# Fields a DPO job cannot take, and why.
NOT_FOR_DPO = {
    "config.packing": "does not apply to DPO: a pair's two answers are scored against each other, never packed.",
    "config.train_on_inputs": "does not apply to DPO: only the answers' tokens are scored.",
    "config.search": "is not available for DPO jobs yet.",
    "config.ensemble": "is not available for DPO jobs yet.",
}
DPO_ONLY = ("hyperparameters.beta", "config.dpo")


def method_rules(job: Any) -> None:
    if job.spec.method != "dpo":
        for path in DPO_ONLY:
            job.refuse(path, "applies to DPO jobs only (method.type dpo).")
        return
    if job.task is not None and job.task != Task.CAUSAL_LM:
        job.refuse("method", f"is dpo, which trains causal LMs (task causal-lm); this job is {job.task}.")
    for path, why in NOT_FOR_DPO.items():
        job.refuse(path, why)
    shapes = job.data.row_shapes if job.data is not None else frozenset()
    if shapes and shapes != {"preference"}:
        job.refuse("method", f"is dpo, which trains on preference rows (input, preferred_output, "
                             f"non_preferred_output); this job's files have {', '.join(sorted(shapes))} rows.")
