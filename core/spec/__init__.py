"""The whole description of a fine-tuning job, as one typed, versioned object.

The API validates a request into a `JobSpec` and stores `spec.model_dump(mode="json")`; the worker
re-validates it with `JobSpec.model_validate`. Every knob is a field with a default, bounds and a
description, so the OpenAPI schema documents the toolbox for free. This module imports no torch.

Three modules: `base` (tasks, problem types, metric names), `toolbox` (TrainingConfig and its
parts), and this one (Hyperparameters and JobSpec); everything is imported from `core.spec`.

The validators here judge values alone (a regex that does not compile, an mlp head without hidden
sizes), so that any stored spec re-validates. Whether a field the request set can take effect for
its job (its task, data, model and other fields) is core.applicability's question: it reads
`model_fields_set`, which a plain `model_dump()` would lose — store `model_dump(exclude_unset=True)`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from core.spec.base import (
    ALL_METRICS,
    AUTO,
    CAUSAL_LM_METRICS,
    LABEL_METRICS,
    MULTI_LABEL_METRICS,
    REGRESSION_METRICS,
    SPEC_VERSION,
    TOKEN_METRICS,
    ProblemType,
    Strict,
    Task,
    known_metric,
)
from core.spec.toolbox import (
    AugmentationConfig,
    DropoutConfig,
    EarlyStoppingConfig,
    FreezeConfig,
    GradualUnfreezingConfig,
    HeadConfig,
    ImageAugmentationConfig,
    LoraConfig,
    LossConfig,
    OptimizerConfig,
    SchedulerConfig,
    TextAugmentationConfig,
    TrainingConfig,
)

__all__ = [
    "ALL_METRICS", "AUTO", "BASE_LEARNING_RATE", "CAUSAL_LM_METRICS", "LABEL_METRICS", "MULTI_LABEL_METRICS",
    "REGRESSION_METRICS", "SPEC_VERSION", "TOKEN_METRICS", "AugmentationConfig", "DropoutConfig",
    "EarlyStoppingConfig", "FreezeConfig", "GradualUnfreezingConfig", "HeadConfig", "Hyperparameters",
    "ImageAugmentationConfig", "JobSpec", "LoraConfig", "LossConfig", "OptimizerConfig", "ProblemType",
    "SchedulerConfig", "Task", "TextAugmentationConfig", "TrainingConfig", "known_metric",
]


class Hyperparameters(Strict):
    """OpenAI's hyperparameters; "auto" picks a value from the data size."""

    n_epochs: Annotated[int, Field(ge=1, le=100)] | Literal["auto"] = Field(
        AUTO, description="Passes over the training data. auto: 3."
    )
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        AUTO, description="Examples per optimizer step (before accumulation). auto: 8-32 by data size."
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] = Field(
        AUTO, description="Multiplies the task's base learning rate (see config.optimizer.learning_rate). auto: 1."
    )


class JobSpec(Strict):
    """Everything the engine needs to know about a job, except where the bytes live."""

    version: Literal[1] = SPEC_VERSION
    task: Task | None = Field(None, description="What is trained; inferred from the data when absent.")
    model: str = Field(..., min_length=1, max_length=512, description="The base model as the user named it.")
    training_file: str
    validation_file: str | None = None
    test_file: str | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    config: TrainingConfig = Field(default_factory=TrainingConfig)
    seed: int = Field(42, ge=0, le=2**31 - 1)
    suffix: str | None = Field(None, max_length=64)

    def n_epochs(self) -> int:
        hp = self.hyperparameters.n_epochs
        return 3 if hp == AUTO else int(hp)

    def batch_size(self, n_train: int) -> int:
        hp = self.hyperparameters.batch_size
        if hp != AUTO:
            return int(hp)
        return 32 if n_train >= 1024 else 16 if n_train >= 128 else 8

    def base_learning_rate(self, task: Task | None = None) -> float:
        """The learning rate a multiplier of 1 means for this task (and LoRA)."""
        task = task or self.task or Task.TEXT_CLASSIFICATION
        if task == Task.CAUSAL_LM:
            return 1e-4 if self.config.lora is not None else 2e-5
        if task == Task.IMAGE_CLASSIFICATION:
            return 1e-3
        # LoRA's low-rank updates need a larger step: on all-MiniLM-L6-v2 / sms_spam (512 rows, 2
        # epochs) 5e-4 and 1e-3 learn nothing, 2e-3 reaches macro-F1 0.92, 4e-3 0.96 (test_slow_toolbox_minilm).
        return 2e-3 if self.config.lora is not None else BASE_LEARNING_RATE

    def learning_rate(self, task: Task | None = None) -> float:
        if self.config.optimizer.learning_rate is not None:
            return self.config.optimizer.learning_rate
        mult = self.hyperparameters.learning_rate_multiplier
        return self.base_learning_rate(task) * (1.0 if mult == AUTO else float(mult))

    def resolved_hyperparameters(self, n_train: int, task: Task | None = None) -> dict[str, float | int]:
        """The concrete values "auto" stood for, as reported on the job object."""
        return {
            "n_epochs": self.n_epochs(),
            "batch_size": self.batch_size(n_train),
            "learning_rate_multiplier": self.learning_rate(task) / self.base_learning_rate(task),
        }


BASE_LEARNING_RATE = 5e-5
