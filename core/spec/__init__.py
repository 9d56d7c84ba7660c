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

import math
from typing import Annotated, Literal

from pydantic import Field

from core.spec.base import (
    ALL_METRICS,
    AUTO,
    CAUSAL_LM_METRICS,
    DPO_METRICS,
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
    DpoConfig,
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
    "ALL_METRICS", "AUTO", "BASE_LEARNING_RATE", "CAUSAL_LM_METRICS", "DPO_METRICS", "LABEL_METRICS", "MULTI_LABEL_METRICS",
    "REGRESSION_METRICS", "SPEC_VERSION", "TOKEN_METRICS", "AugmentationConfig", "DropoutConfig",
    "EarlyStoppingConfig", "FreezeConfig", "GradualUnfreezingConfig", "HeadConfig", "Hyperparameters",
    "DpoConfig", "ImageAugmentationConfig", "JobSpec", "LoraConfig", "LossConfig", "OptimizerConfig", "ProblemType",
    "SchedulerConfig", "Task", "TextAugmentationConfig", "TrainingConfig", "known_metric",
]


class Hyperparameters(Strict):
    """OpenAI's hyperparameters; "auto" picks a value from the data size."""

    n_epochs: Annotated[int, Field(ge=1, le=100)] | Literal["auto"] = Field(
        AUTO, description="Passes over the training data. auto: 3, or more on a small set: until the job "
                          "trains 300 optimizer steps, up to 16 passes (DPO: 3)."
    )
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        AUTO, description="Examples per optimizer step (before accumulation). auto: 8-32 by data size (DPO: 8 pairs)."
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] = Field(
        AUTO, description="Multiplies the task's base learning rate (see config.optimizer.learning_rate): "
                          "encoders 1e-4 for ~23M parameters, falling with the square root of the size (5e-5 "
                          "at 110M; never below 2e-5), with LoRA 2e-3; causal LMs 2e-5, with LoRA 1e-4; "
                          "images 1e-3; DPO (method.type dpo) 5e-6, with LoRA 2e-4. auto: 1."
    )
    beta: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] = Field(
        AUTO, description="DPO only (method.type dpo): how far the model may move from the reference (the base "
                          "model); smaller moves further. auto: 0.1."
    )


class JobSpec(Strict):
    """Everything the engine needs to know about a job, except where the bytes live."""

    version: Literal[1] = SPEC_VERSION
    task: Task | None = Field(None, description="What is trained; inferred from the data when absent.")
    method: Literal["supervised", "dpo"] = Field(
        "supervised", description="OpenAI's method.type: supervised (learn the answers), or dpo (direct preference "
                                  "optimization on preferred / non-preferred answers; causal-lm only).")
    model: str = Field(..., min_length=1, max_length=512, description="The base model as the user named it.")
    training_file: str
    validation_file: str | None = None
    test_file: str | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    config: TrainingConfig = Field(default_factory=TrainingConfig)
    seed: int = Field(42, ge=0, le=2**31 - 1)
    suffix: str | None = Field(None, max_length=64)

    def n_epochs(self, n_train: int | None = None) -> int:
        """auto: 3 passes, more on a small set, until the job trains AUTO_MIN_STEPS optimizer steps
        (at most AUTO_MAX_EPOCHS passes); 3 when the set's size is not known."""
        hp = self.hyperparameters.n_epochs
        if hp != AUTO:
            return int(hp)
        if not n_train or self.method == "dpo":  # DPO: 3, TRL's default
            return AUTO_EPOCHS
            return AUTO_EPOCHS
        steps_per_epoch = math.ceil(math.ceil(n_train / self.batch_size(n_train)) / self.config.gradient_accumulation_steps)
        return max(AUTO_EPOCHS, min(AUTO_MAX_EPOCHS, math.ceil(AUTO_MIN_STEPS / steps_per_epoch)))

    def batch_size(self, n_train: int) -> int:
        hp = self.hyperparameters.batch_size
        if hp != AUTO:
            return int(hp)
        if self.method == "dpo":  # TRL's DPOConfig default: a pair is two rows, and DPO needs the steps
            return 8
        return 32 if n_train >= 1024 else 16 if n_train >= 128 else 8

    def base_learning_rate(self, task: Task | None = None, n_params: int | None = None) -> float:
        """The learning rate a multiplier of 1 means for this task, LoRA and (encoders trained in
        full) model size: `n_params`, the model's parameter count, when known."""
        task = task or self.task or Task.TEXT_CLASSIFICATION
        if self.method == "dpo":
            # LoRA: on SmolLM2-135M (LoRA r16) and TweetEval-emotion pairs, 2e-4 raised the held-out
            # preference accuracy 66% -> 77% in 64 steps of 8 pairs, and by under 1 point in 30 steps of
            # 16 (bench/dpo.py; README). In full: 5e-6, not measured (TRL's default, 1e-6, is meant for
            # long runs of large models).
            return 2e-4 if self.config.lora is not None else 5e-6
        if task == Task.CAUSAL_LM:
            return 1e-4 if self.config.lora is not None else 2e-5
        if task == Task.IMAGE_CLASSIFICATION:
            return 1e-3
        # LoRA's low-rank updates need a larger step: on all-MiniLM-L6-v2 / sms_spam (512 rows, 2
        # epochs) 5e-4 and 1e-3 learn nothing, 2e-3 reaches macro-F1 0.92, 4e-3 0.96 (test_slow_toolbox_minilm).
        if self.config.lora is not None:
            return 2e-3
        return encoder_learning_rate(n_params)

    def learning_rate(self, task: Task | None = None, n_params: int | None = None) -> float:
        if self.config.optimizer.learning_rate is not None:
            return self.config.optimizer.learning_rate
        mult = self.hyperparameters.learning_rate_multiplier
        return self.base_learning_rate(task, n_params) * (1.0 if mult == AUTO else float(mult))

    def resolved_hyperparameters(self, n_train: int, task: Task | None = None,
                                 n_params: int | None = None) -> dict[str, float | int]:
        """The concrete values "auto" stood for, as reported on the job object (beta for DPO only)."""
        values: dict[str, float | int] = {
            "n_epochs": self.n_epochs(n_train),
            "batch_size": self.batch_size(n_train),
            "learning_rate_multiplier": self.learning_rate(task, n_params) / self.base_learning_rate(task, n_params),
        }
        return values | ({"beta": self.beta} if self.method == "dpo" else {})

    @property
    def beta(self) -> float:
        """DPO's beta: hyperparameters.beta, auto 0.1 (TRL's and the DPO paper's usual value)."""
        return DPO_BETA if self.hyperparameters.beta == AUTO else float(self.hyperparameters.beta)


# "auto", fitted on searches of all-MiniLM-L6-v2 on ../shared/data (bench/auto_study.py; the
# figures in bench/results/auto_study.md and the README). With 3 passes a small set trains too few
# steps: on 300 rows of tweet_eval_emotion, 57 steps at 5e-5 reach test macro-F1 0.14; 304 steps at
# 1e-4, 0.66, the best of the grid. On 2,000 rows: 0.60 at the old defaults (189 steps, 5e-5), 0.76
# at 315 steps and 1e-4.
AUTO_EPOCHS = 3
AUTO_MIN_STEPS = 300
AUTO_MAX_EPOCHS = 16  # the longest the searches tried


def encoder_learning_rate(n_params: int | None) -> float:
    """An encoder trained in full: 1e-4 for MiniLM's 22.7M parameters (the searches' best, against
    5e-5 before), falling with the square root of the size to the 5e-5 BERT-base (110M) is usually
    trained at and 2.6e-5 for BERT-large; never above 1e-4. 5e-5 when the size is not known."""
    if not n_params:
        return BASE_LEARNING_RATE
    return float(min(1e-4, max(2e-5, 1e-4 * math.sqrt(MINILM_PARAMS / n_params))))


DPO_BETA = 0.1
MINILM_PARAMS = 22_700_000
BASE_LEARNING_RATE = 5e-5
