"""The whole description of a fine-tuning job, as one typed, versioned object.

The API validates a request into a `JobSpec` and stores `spec.model_dump(mode="json")`; the worker
re-validates it with `JobSpec.model_validate`. Every knob is a field with a default, bounds and a
description, so the OpenAPI schema documents the toolbox for free. This module imports no torch.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SPEC_VERSION = 1

AUTO = "auto"


class Task(StrEnum):
    TEXT_CLASSIFICATION = "text-classification"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hyperparameters(_Strict):
    """OpenAI's hyperparameters; "auto" picks a value from the data size."""

    n_epochs: Annotated[int, Field(ge=1, le=100)] | Literal["auto"] = Field(
        AUTO, description="Passes over the training data. auto: 3."
    )
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        AUTO, description="Examples per optimizer step (before accumulation). auto: 8-32 by data size."
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] = Field(
        AUTO, description="Multiplies the task's base learning rate (5e-5 for encoders). auto: 1."
    )


class OptimizerConfig(_Strict):
    name: Literal["adamw"] = Field("adamw", description="Optimizer. AdamW (decoupled weight decay).")
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] | None = Field(
        None, description="Absolute peak learning rate; overrides base LR x learning_rate_multiplier."
    )
    weight_decay: float = Field(0.01, ge=0, le=1.0, description="Decoupled weight decay (L2), not on biases/norms.")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0, le=1e-3)


class SchedulerConfig(_Strict):
    name: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate schedule after warmup (transformers.get_scheduler)."
    )
    warmup_ratio: float = Field(0.06, ge=0, le=0.5, description="Fraction of optimizer steps spent warming up.")
    warmup_steps: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Warmup steps; overrides warmup_ratio when set."
    )


class EarlyStoppingConfig(_Strict):
    patience: int = Field(3, ge=1, le=1000, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change of the metric that counts as improvement.")


class TrainingConfig(_Strict):
    """The training toolbox (Lathe's `config` extension of the job object)."""

    text_column: str = Field("text", min_length=1, max_length=128, description="Column/key with the input text.")
    label_column: str = Field("label", min_length=1, max_length=128, description="Column/key with the label.")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per example; longer inputs are truncated.")
    truncation_side: Literal["right", "left"] = Field("right", description="Which end of a long input is cut.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_grad_norm: Annotated[float, Field(gt=0)] | None = Field(
        1.0, description="Clip the global gradient norm to this value; null disables clipping."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the device computes bf16 natively (CUDA, CPUs with avx512_bf16), else fp32."
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding); batch order stays random."
    )
    eval_every_steps: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Evaluate on the validation set every N optimizer steps; null: once per epoch."
    )
    checkpoint_every_steps: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Save a resumable checkpoint every N optimizer steps; null: after each evaluation."
    )
    metric_for_best_model: str = Field(
        "loss", description="Validation metric that picks the best checkpoint (loss, accuracy, f1_macro)."
    )
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="Stop when the validation metric stops improving; the best weights are restored."
    )
    load_best_model_at_end: bool = Field(
        True, description="Export the weights of the best evaluation, not the last step (needs a validation file)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train. auto: CUDA when present.")
    max_runtime_seconds: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Wall-clock budget from the job's start; past it the job checkpoints and fails "
                          "with error.code deadline_exceeded."
    )

    @model_validator(mode="after")
    def _check_metric(self) -> "TrainingConfig":
        if self.metric_for_best_model not in CLASSIFICATION_METRICS:
            raise ValueError(
                f"metric_for_best_model must be one of {sorted(CLASSIFICATION_METRICS)}, "
                f"not {self.metric_for_best_model!r}"
            )
        return self


# Validation metrics and whether a larger value is better.
CLASSIFICATION_METRICS: dict[str, bool] = {"loss": False, "accuracy": True, "f1_macro": True}


class JobSpec(_Strict):
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

    def learning_rate(self) -> float:
        if self.config.optimizer.learning_rate is not None:
            return self.config.optimizer.learning_rate
        mult = self.hyperparameters.learning_rate_multiplier
        return BASE_LEARNING_RATE * (1.0 if mult == AUTO else float(mult))

    def resolved_hyperparameters(self, n_train: int) -> dict[str, float | int]:
        """The concrete values "auto" stood for, as reported on the job object."""
        return {
            "n_epochs": self.n_epochs(),
            "batch_size": self.batch_size(n_train),
            "learning_rate_multiplier": self.learning_rate() / BASE_LEARNING_RATE,
        }


BASE_LEARNING_RATE = 5e-5
