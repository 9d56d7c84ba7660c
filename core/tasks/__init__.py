"""One TaskAdapter per task (see core.tasks.base)."""

from __future__ import annotations

from core.spec import JobSpec, Task
from core.tasks.base import DataFiles, Split, TaskAdapter, TaskData


def adapter_for(task: Task, spec: JobSpec) -> TaskAdapter:
    """The adapter that trains `task` for `spec`."""
    if task == Task.TEXT_CLASSIFICATION:
        from core.tasks.text_classification import TextClassification as adapter
    elif task == Task.TOKEN_CLASSIFICATION:
        from core.tasks.token_classification import TokenClassification as adapter
    elif task == Task.CAUSAL_LM:
        from core.tasks.causal_lm import CausalLM as adapter
    elif task == Task.IMAGE_CLASSIFICATION:
        from core.tasks.image_classification import ImageClassification as adapter
    else:
        raise ValueError(f"unknown task {task!r}")
    return adapter(spec)


__all__ = ["DataFiles", "Split", "TaskAdapter", "TaskData", "adapter_for"]
