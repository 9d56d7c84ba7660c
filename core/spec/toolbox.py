"""The training toolbox: Lathe's `config` extension of the job object (`TrainingConfig`) and its
parts, in the order a practitioner thinks about a run: what the data is (columns, lengths, packing),
what is done to the network before training (`head`, `dropout`, `freeze`, `lora`), how it is
optimised (`optimizer`, `scheduler`, `loss`, clipping, precision), what varies in the inputs
(`augmentation`), and how the run is watched (evaluation, checkpoints, early stopping)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from core.spec.base import AUTO, ProblemType, Strict, known_metric
from core.spec.ensemble import EnsembleConfig, TrainRowsConfig
from core.spec.search import SearchConfig


class HeadConfig(Strict):
    """The classification head put on top of the backbone (classification tasks)."""

    type: Literal["default", "linear", "mlp"] = Field(
        "default", description="default: the architecture's own head; linear: dropout + one linear layer; "
                               "mlp: hidden layers (hidden_sizes) with activation, optional batch norm, dropout."
    )
    hidden_sizes: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=list, max_length=8, validate_default=True, description="mlp: widths of the hidden layers."
    )
    activation: Literal["gelu", "relu", "tanh", "silu"] = Field("gelu", description="mlp: the activation.")
    batch_norm: bool = Field(False, description="mlp: BatchNorm1d after each hidden linear layer.")
    dropout: float | None = Field(
        None, ge=0, lt=1, description="linear/mlp: dropout before each linear layer of the head; default "
                                      "config.dropout.classifier, else 0.1."
    )

    # Field validators (not one model validator) so that an error names the field: config.head.hidden_sizes.
    @field_validator("hidden_sizes")
    @classmethod
    def _hidden_sizes_for_mlp(cls, value: list[int], info: ValidationInfo) -> list[int]:
        kind = info.data.get("type")  # absent when type itself was invalid
        if kind == "mlp" and not value:
            raise ValueError("head.type mlp needs hidden_sizes, e.g. [256]")
        if kind not in (None, "mlp") and value:
            raise ValueError("hidden_sizes apply to head.type mlp only")
        return value

    @field_validator("batch_norm")
    @classmethod
    def _batch_norm_for_mlp(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("type", "mlp") != "mlp":
            raise ValueError("batch_norm applies to head.type mlp only")
        return value


class DropoutConfig(Strict):
    """Overrides of the model's dropout probabilities (null keeps the model's value)."""

    hidden: float | None = Field(None, ge=0, lt=1, description="Dropout on hidden states/residual paths.")
    attention: float | None = Field(None, ge=0, lt=1, description="Dropout on attention probabilities.")
    classifier: float | None = Field(None, ge=0, lt=1, description="Dropout before the classification head "
                                                                   "(classification tasks).")


class GradualUnfreezingConfig(Strict):
    """ULMFiT-style: train the head alone first, then unfreeze one layer group from the top every interval."""

    every_steps: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Unfreeze the next group every N optimizer steps; null: every epoch."
    )


class FreezeConfig(Strict):
    """Parameters kept fixed (bit-identical) during training."""

    embeddings: bool = Field(False, description="Freeze the input embeddings (and a tied output layer).")
    first_n_layers: int = Field(0, ge=0, le=1000, description="Freeze the first N transformer blocks / stages.")
    patterns: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=64,
        description="Python regexes; a parameter whose name matches any (re.search) is frozen.",
    )
    backbone: bool = Field(False, description="Freeze everything but the head (linear probing; causal-lm: the "
                                              "output layer, when it is not tied to the embeddings).")
    gradual_unfreezing: GradualUnfreezingConfig | None = Field(
        None, description="Start with all but the head frozen and unfreeze layer groups top-down on a schedule."
    )

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"pattern {i + 1} ({pattern!r}) is not a valid Python regex: {e}") from None
        return patterns


class LoraConfig(Strict):
    """Low-rank adapters (peft) instead of full fine-tuning; merged into the exported weights."""

    r: int = Field(8, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: float = Field(16, gt=0, le=4096, description="Scaling: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] | Literal["all-linear"] | None = Field(
        None, description="Module names (or suffixes) that get adapters; null: peft's default for the "
                          "architecture (all-linear where peft has none); all-linear: every linear layer but the head."
    )
    merge_on_export: bool = Field(
        True, description="Export merged full weights (loads with plain transformers); the adapter is kept "
                          "in adapter/ either way."
    )

    @field_validator("target_modules")
    @classmethod
    def _some_target(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module, or give null (peft's default) or all-linear")
        return value


class OptimizerConfig(Strict):
    name: Literal["adamw", "adam", "sgd", "adafactor"] = Field(
        "adamw", description="adamw (decoupled weight decay), adam (L2 added to the gradient), sgd "
                             "(momentum, nesterov), adafactor (transformers', factored second moments)."
    )
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] | None = Field(
        None, description="Absolute peak learning rate; overrides base LR x learning_rate_multiplier. Base: "
                          "encoders 1e-4 at ~23M parameters, falling with the square root of the size (5e-5 "
                          "at 110M; 2e-3 with LoRA), 2e-5 for causal LMs (1e-4 with LoRA), 1e-3 for vision."
    )
    head_learning_rate: Annotated[float, Field(gt=0, le=1.0)] | None = Field(
        None, description="A separate learning rate for the head (new layers learn faster); default the same. "
                          "causal-lm: the output layer, when it trains (not tied to the embeddings, no LoRA)."
    )
    layerwise_lr_decay: float = Field(
        1.0, gt=0, le=1.0, description="Layer-wise LR decay: block i from the top trains at lr x decay^i; "
                                       "embeddings one step further down. 1: off."
    )
    weight_decay: float = Field(0.01, ge=0, le=1.0, description="L2: decoupled (adamw, adafactor) or added to "
                                                                "the gradient (adam, sgd); not on biases/norms.")
    l1_penalty: float = Field(0.0, ge=0, le=1.0, description="Adds l1_penalty x sum|w| over the decayed weights "
                                                             "to the loss.")
    beta1: float = Field(0.9, ge=0, lt=1, description="adam/adamw first-moment decay (adafactor: null when 0).")
    beta2: float = Field(0.999, ge=0, lt=1, description="adam/adamw second-moment decay (adafactor has its own).")
    eps: float = Field(1e-8, gt=0, le=1e-3, description="adam/adamw: added to the denominator (adafactor has its own).")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd momentum.")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum (needs momentum > 0).")

    @field_validator("nesterov")
    @classmethod
    def _nesterov_for_sgd(cls, value: bool, info: ValidationInfo) -> bool:
        if value and (info.data.get("name", "sgd") != "sgd" or info.data.get("momentum", 1) == 0):
            raise ValueError("nesterov applies to optimizer sgd with momentum > 0")
        return value


class SchedulerConfig(Strict):
    name: Literal[
        "constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "step", "exponential",
        "reduce_on_plateau",
    ] = Field("linear", description="Learning-rate schedule after warmup (transformers/torch schedulers).")
    warmup_ratio: float = Field(0.06, ge=0, le=0.5, description="Fraction of optimizer steps spent warming up "
                                                                "(unless warmup_steps is set).")
    warmup_steps: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Warmup steps; overrides warmup_ratio when set."
    )
    num_cycles: int = Field(1, ge=1, le=100, description="cosine_with_restarts: number of hard restarts.")
    min_lr_ratio: float = Field(0.0, ge=0, lt=1, description="polynomial: final LR as a fraction of the peak.")
    step_size: Annotated[int, Field(ge=1)] | None = Field(
        None, description="step: decay every N optimizer steps; default one epoch."
    )
    gamma: float = Field(0.5, gt=0, le=1, description="step/exponential: multiplicative decay "
                                                      "(exponential: per epoch).")
    plateau_patience: int = Field(1, ge=0, le=100, description="reduce_on_plateau (needs a validation file): "
                                                               "evaluations without improvement of "
                                                               "metric_for_best_model before the LR drops.")
    plateau_factor: float = Field(0.5, gt=0, lt=1, description="reduce_on_plateau: multiplicative drop.")


class LossConfig(Strict):
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing: single-label "
                                                                 "text, token and image classification.")
    class_weights: Literal["balanced"] | dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        None, description="Per-class loss weights: balanced (n / (k x count), as scikit-learn) or "
                          "{label: weight}; text (single-label; multi-label: positive weight), token (per tag) "
                          "and image classification."
    )


class TextAugmentationConfig(Strict):
    """EDA-style token edits to training examples (never validation/test); each a per-token probability."""

    deletion: float = Field(0.0, ge=0, le=0.5, description="Drop a token.")
    swap: float = Field(0.0, ge=0, le=0.5, description="Swap a token with a random other one of the example.")
    insertion: float = Field(0.0, ge=0, le=0.5, description="Insert a random vocabulary token after a token.")
    substitution: float = Field(0.0, ge=0, le=0.5, description="Replace a token by a random vocabulary token.")
    probability: float = Field(1.0, ge=0, le=1, description="Fraction of training examples augmented at all.")


class ImageAugmentationConfig(Strict):
    """Random image transforms of training examples (never validation/test)."""

    random_resized_crop: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="Crop a random area of at least this fraction and resize back; null: off."
    )
    horizontal_flip: float = Field(0.0, ge=0, le=1, description="Probability of a horizontal flip.")
    rotation: float = Field(0.0, ge=0, le=180, description="Random rotation within +- this many degrees.")
    brightness: float = Field(0.0, ge=0, le=1, description="Color jitter: brightness factor range.")
    contrast: float = Field(0.0, ge=0, le=1, description="Color jitter: contrast factor range.")
    saturation: float = Field(0.0, ge=0, le=1, description="Color jitter: saturation factor range.")
    hue: float = Field(0.0, ge=0, le=0.5, description="Color jitter: hue shift range.")


class AugmentationConfig(Strict):
    text: TextAugmentationConfig | None = Field(None, description="text-classification and token-classification; "
                                                                  "null: none.")
    image: ImageAugmentationConfig | None = Field(None, description="image-classification; null: none.")


class EarlyStoppingConfig(Strict):
    patience: int = Field(3, ge=1, le=1000, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change of the metric that counts as improvement.")
    metric: str | None = Field(None, description="Validation metric watched; default metric_for_best_model.")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto: from the metric (loss: min, f1: max).")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str | None) -> str | None:
        return value if value is None else known_metric(value)


class DpoConfig(Strict):
    """DPO's objective (method.type dpo), as TRL's DPOTrainer computes it (core.dpo)."""

    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: the DPO paper's loss, -log sigmoid(beta x margin); ipo: IPO's squared "
                               "loss (Azar et al. 2023) on log-ratios averaged per completion token, as TRL.")


class TrainingConfig(Strict):
    """The training toolbox (Lathe's `config` extension of the job object)."""

    text_column: str = Field("text", min_length=1, max_length=128,
                             description="Column/key with the input text: text-classification, and causal-lm "
                                         "plain-text rows.")
    label_column: str = Field("label", min_length=1, max_length=128,
                              description="Column/key with the label: text-classification, image-classification "
                                          "(Parquet).")
    tokens_column: str = Field("tokens", min_length=1, max_length=128,
                               description="token-classification: key with the list of words.")
    tags_column: str = Field("tags", min_length=1, max_length=128,
                             description="token-classification: key with one tag per word (IOB2, e.g. B-PER).")
    image_column: str = Field("image", min_length=1, max_length=128,
                              description="image-classification (Parquet): column with the image bytes.")
    weight_column: str | None = Field(
        None, min_length=1, max_length=128,
        description="text-classification, image-classification (Parquet): a column of the training file with each "
                    "row's loss weight (a number >= 0). A step's loss is the weighted mean over its rows: a weight "
                    "of 2 counts a row as if it appeared twice, 0 leaves it out. Validation and test are unweighted. "
                    "null: every row weighs 1."
    )
    problem_type: ProblemType | Literal["auto"] = Field(
        AUTO, description="text-classification only. auto: multi_label when labels are lists (or contain "
                          "label_separator), regression when they are non-integer numbers, else single_label."
    )
    label_separator: str | None = Field(
        None, min_length=1, max_length=8, description="text-classification: splits a label string (a CSV cell) "
                                                      "into several labels; implies multi_label."
    )
    max_length: int = Field(128, ge=8, le=32768, description="Tokens per example; longer inputs are truncated "
                                                             "(text tasks).")
    truncation_side: Literal["right", "left"] = Field("right", description="Which end of a long input is cut "
                                                                           "(text tasks).")
    image_size: Annotated[int, Field(ge=8, le=1024)] | None = Field(
        None, description="image-classification: side of the square input; default the processor's size."
    )
    packing: bool = Field(
        False, description="causal-lm: pack whole examples into rows of up to max_length tokens; attention never "
                           "crosses examples (position ids restart at each). Fewer padding tokens, same loss; "
                           "batch_size then counts packed rows."
    )
    train_on_inputs: bool = Field(
        False, description="causal-lm: also learn the prompt/user tokens; default only assistant/completion tokens."
    )
    head: HeadConfig = Field(default_factory=HeadConfig)
    dropout: DropoutConfig = Field(default_factory=DropoutConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    lora: LoraConfig | None = Field(None, description="Train low-rank adapters instead of all weights.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    max_grad_norm: Annotated[float, Field(gt=0)] | None = Field(
        1.0, description="Clip the global gradient norm to this value; null disables clipping."
    )
    max_grad_value: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Clip each gradient element to [-v, v] (before norm clipping); null: off."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the device computes bf16 natively (CUDA, CPUs with avx512_bf16), else fp32."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30% more compute."
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding); batch order stays random. "
                          "Text tasks (images are all one length)."
    )
    eval_every_steps: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Evaluate on the validation set every N optimizer steps (needs a validation file); "
                          "null: once per epoch."
    )
    evaluations_per_epoch: Annotated[int, Field(ge=1, le=100)] | None = Field(
        None, description="Evaluate this many times per epoch, evenly spaced (needs a validation file; not with "
                          "eval_every_steps); null: once, at the epoch's end."
    )
    checkpoint_every_steps: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Save a resumable checkpoint every N optimizer steps; null: after each evaluation "
                          "(so none without a validation file)."
    )
    metric_for_best_model: str = Field(
        "loss", description="Validation metric (needs a validation file) that picks the best checkpoint and "
                            "drives reduce_on_plateau. "
                            "By task: text/image classification loss, accuracy, f1_macro, f1_micro, f1_weighted, "
                            "precision_macro, recall_macro; multi-label loss, f1_micro, f1_macro, exact_match, "
                            "hamming_loss; regression loss, mse, rmse, mae, r2; token-classification loss, f1, "
                            "precision, recall, accuracy; causal-lm loss, perplexity, token_accuracy; DPO (method.type dpo) "
                            "loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, "
                            "logps/chosen, logps/rejected, preference_accuracy."
    )
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="Stop when the validation metric stops improving (needs a validation file); with "
                          "load_best_model_at_end the best weights are exported."
    )
    load_best_model_at_end: bool = Field(
        True, description="Export the weights of the best evaluation, not the last step (needs a validation file)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train. auto: CUDA when present.")
    max_runtime_seconds: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Wall-clock budget from the job's start; past it the job checkpoints and fails "
                          "with error.code deadline_exceeded."
    )
    search: SearchConfig | None = Field(
        None, description="Make the job a hyperparameter search: its trials are jobs listed by "
                          "GET /v1/fine_tuning/jobs?parent_job=; the best trial's model is the result."
    )
    ensemble: EnsembleConfig | None = Field(
        None, description="Make the job an ensemble: its members are jobs listed by "
                          "GET /v1/fine_tuning/jobs?parent_job=; the combined model is the result."
    )
    dpo: DpoConfig | None = Field(
        None, description="DPO's objective (method.type dpo only); null: the sigmoid loss.")
    train_rows: TrainRowsConfig | None = Field(
        None, description="Train on a draw of the training file's rows (a bootstrap resample, a subsample, all "
                          "but one fold); null: every row once. Ensembles set it on their members."
    )

    # lora is declared after freeze, so its validator sees freeze (and the error names config.lora).
    @field_validator("lora")
    @classmethod
    def _lora_without_gradual_unfreezing(cls, value: LoraConfig | None, info: ValidationInfo) -> LoraConfig | None:
        freeze = info.data.get("freeze")
        if value is not None and freeze is not None and freeze.gradual_unfreezing is not None:
            raise ValueError("freeze.gradual_unfreezing and lora cannot be combined (LoRA already freezes the base)")
        return value

    @field_validator("metric_for_best_model")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        return known_metric(value)

    # ensemble is declared after search, so its validator sees search (and the error names config.ensemble).
    @field_validator("ensemble")
    @classmethod
    def _not_both_parents(cls, value: EnsembleConfig | None, info: ValidationInfo) -> EnsembleConfig | None:
        if value is not None and info.data.get("search") is not None:
            raise ValueError("search and ensemble cannot be combined: a job is one search or one ensemble "
                             "(an ensemble can take a finished search's trials with from_search)")
        return value
