"""One TaskAdapter per task (see core.adapters.base)."""

from __future__ import annotations

from core.cache import InputCache
from core.spec import JobSpec, Task
from core.adapters.base import DataFiles, Split, TaskAdapter, TaskData


def adapter_for(task: Task, spec: JobSpec, *, cache: InputCache | None = None) -> TaskAdapter:
    """The adapter that trains `task` for `spec`, encoding through `cache` when given."""
    if task == Task.TEXT_CLASSIFICATION:
        from core.adapters.text_classification import TextClassification as adapter
    elif task == Task.TOKEN_CLASSIFICATION:
        from core.adapters.token_classification import TokenClassification as adapter
    elif task == Task.CAUSAL_LM and spec.method == "dpo":
        from core.adapters.preference import DirectPreference as adapter
    elif task == Task.CAUSAL_LM:
        from core.adapters.causal_lm import CausalLM as adapter
    elif task == Task.IMAGE_CLASSIFICATION:
        from core.adapters.image_classification import ImageClassification as adapter
    else:
        raise ValueError(f"unknown task {task!r}")
    return adapter(spec, cache=cache)


__all__ = ["DataFiles", "Split", "TaskAdapter", "TaskData", "adapter_for"]
