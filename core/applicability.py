"""Whether every field a job request set can take effect for that job.

Lathe refuses what it would otherwise ignore: `config.packing` on a text-classification job,
`scheduler.num_cycles` with a linear schedule, early stopping without a validation file, a freeze
deeper than the model. The answer is a 400 (or, where only the data tells, a job failed in
validating_files) naming the dotted field, instead of a run trained as if the field were absent.

A field counts when the request set it — pydantic's `model_fields_set`, walked down every
sub-config — whatever its value, even its default; a default never counts. A field set to null asks
for nothing and never counts either. What each field needs is judged from what is known when the
check runs:

- the spec itself: options against options, a validation file — always;
- the task: at create when the request names it, else after the data told (validating_files);
- `DataFacts`, what only the files tell: text-classification's problem type, zip or Parquet
  images, causal-lm row shapes;
- `ModelFacts`, what the base model folder's config.json tells without torch: depth,
  architecture family (the tables below were measured on tiny models of each family and are
  re-checked against the engine by tests/core/test_applicability.py).

A field that should take effect and is ignored by the engine is a bug to fix there, never refused
here. This module imports no torch, no transformers and no pydantic of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.architectures import ModelFacts, model_facts  # noqa: F401 - model_facts is part of this API
from core.errors import InapplicableFieldError
from core.method_rules import method_rules
from core.spec import (AUTO, CAUSAL_LM_METRICS, DPO_METRICS, LABEL_METRICS, MULTI_LABEL_METRICS, REGRESSION_METRICS, TOKEN_METRICS,
                       JobSpec, ProblemType, Task)

if TYPE_CHECKING:
    from core.datasets import DatasetSummary

TEXT, TOKEN, CAUSAL, IMAGE = (Task.TEXT_CLASSIFICATION, Task.TOKEN_CLASSIFICATION, Task.CAUSAL_LM,
                              Task.IMAGE_CLASSIFICATION)
TEXT_INPUT = frozenset({TEXT, TOKEN, CAUSAL})
CLASSIFIERS = frozenset({TEXT, TOKEN, IMAGE})

# The tasks a field (and everything under it) can take effect in; a path not listed takes effect
# in every task. Read off the adapters: who reads the field, and for which task.
TASKS: dict[str, frozenset[Task]] = {
    "config.text_column": frozenset({TEXT, CAUSAL}),  # causal-lm: plain-text rows
    "config.label_column": frozenset({TEXT, IMAGE}),  # image: Parquet only (see _data_rules)
    "config.tokens_column": frozenset({TOKEN}),
    "config.tags_column": frozenset({TOKEN}),
    "config.image_column": frozenset({IMAGE}),
    "config.weight_column": frozenset({TEXT, IMAGE}),  # image: Parquet only (see _data_rules)
    "config.problem_type": frozenset({TEXT}),
    "config.label_separator": frozenset({TEXT}),
    "config.max_length": TEXT_INPUT,
    "config.truncation_side": TEXT_INPUT,
    "config.image_size": frozenset({IMAGE}),
    "config.packing": frozenset({CAUSAL}),
    "config.train_on_inputs": frozenset({CAUSAL}),
    "config.group_by_length": TEXT_INPUT,  # every image is one unit long
    "config.head": CLASSIFIERS,  # a causal LM's output layer is its vocabulary, not a head to swap
    "config.dropout.classifier": CLASSIFIERS,
    "config.loss.label_smoothing": CLASSIFIERS,  # the causal-lm loss takes none (by design, see LossConfig)
    "config.loss.class_weights": CLASSIFIERS,
    "config.augmentation.text": frozenset({TEXT, TOKEN}),  # the causal-lm adapter never edits rows
    "config.augmentation.image": frozenset({IMAGE}),
    "config.train_rows": frozenset({TEXT, TOKEN, IMAGE}),  # causal-lm rows may be packed: no row to draw
}# The tasks each ensemble method combines (core.combine: per-example outputs; a soup: weights).
ENSEMBLE_TASKS = {**dict.fromkeys(("bagging", "boosting", "stacking", "selection"), frozenset({TEXT, IMAGE})),
                  "soup": frozenset({TEXT, TOKEN, CAUSAL, IMAGE})}

# Optimizer and schedule fields read by some names only (core.optim, core.schedules).
OPTIMIZER_NAMES = {"beta1": ("adam", "adamw", "adafactor"), "beta2": ("adam", "adamw"), "eps": ("adam", "adamw"),
                   "momentum": ("sgd",), "nesterov": ("sgd",)}
SCHEDULER_NAMES = {"num_cycles": ("cosine_with_restarts",), "min_lr_ratio": ("polynomial",), "step_size": ("step",),
                   "gamma": ("step", "exponential"), "plateau_patience": ("reduce_on_plateau",),
                   "plateau_factor": ("reduce_on_plateau",)}
NEEDS_VALIDATION = ("config.eval_every_steps", "config.evaluations_per_epoch", "config.metric_for_best_model",
                    "config.early_stopping", "config.load_best_model_at_end", "config.search")


@dataclass(frozen=True)
class Refusal:
    param: str  # the dotted field, e.g. "config.scheduler.num_cycles"
    message: str


@dataclass(frozen=True)
class DataFacts:
    """What only a job's files tell; empty/None where a file does not say (or no file of the kind)."""

    problem_type: ProblemType | None = None  # text-classification, from the training file
    image_formats: frozenset[str] = frozenset()  # image-classification: "zip" / "parquet", over all files
    row_shapes: frozenset[str] = frozenset()  # causal-lm: "messages", "prompt_completion", "alpaca", "text"

    @classmethod
    def from_summaries(cls, summaries: Mapping[str, DatasetSummary] | DatasetSummary) -> DataFacts:
        """From core.datasets.inspect_files' summaries (request field -> summary), or one summary."""
        items = [summaries] if hasattr(summaries, "details") else list(summaries.values())  # type: ignore[union-attr]
        details = [s.details for s in items]
        problem = next((d["problem_type"] for d in details if d.get("problem_type")), None)
        return cls(
            problem_type=ProblemType(problem) if problem else None,
            image_formats=frozenset(d["format"] for d in details if d.get("format")),
            row_shapes=frozenset(shape for d in details for shape in d.get("shapes", {})),
        )


# --- The check ----------------------------------------------------------------------------------


def check_applicable(
    spec: JobSpec,
    *,
    task: Task | None = None,
    data: DataFacts | None = None,
    model: ModelFacts | None = None,
    hyperparameters_param: str = "hyperparameters",
) -> None:
    """Refuse the first field the request set that cannot take effect for this job.

    Call it at create with what the request tells (task=spec.task; model facts when the base model
    is a local folder), and again in validating_files with the inferred task, the data facts and
    the model facts. Only fields in `model_fields_set` count, so pass the spec as validated from the
    request, or re-validated from `spec.model_dump(mode="json", exclude_unset=True)` (a full dump
    marks every field as set).

    Args:
        spec: the job's spec.
        task: the job's task; None (and spec.task None): only the checks that need no task run
            (options against options, a validation file, metric names of any task).
        data: what the files told (DataFacts.from_summaries); None before they are read.
        model: what the base model's config.json told (model_facts); None when not known.
        hyperparameters_param: the prefix the request gave the hyperparameters under, e.g.
            "method.supervised.hyperparameters", used in params and messages.

    Raises:
        InapplicableFieldError: code "inapplicable_field", param the dotted field as the request
            wrote it (e.g. "config.scheduler.num_cycles"), message saying why it cannot take effect.
    """
    refusals = inapplicable_fields(spec, task=task, data=data, model=model, hyperparameters_param=hyperparameters_param)
    if refusals:
        raise InapplicableFieldError(refusals[0].message, param=refusals[0].param)


def inapplicable_fields(
    spec: JobSpec,
    *,
    task: Task | None = None,
    data: DataFacts | None = None,
    model: ModelFacts | None = None,
    hyperparameters_param: str = "hyperparameters",
) -> list[Refusal]:
    """Every refusal `check_applicable` would raise, in the order of the fields (one per field; a
    field under a refused one is left out)."""
    job = _Job(spec, task if task is not None else spec.task, data, model)
    for rules in (method_rules, _task_rules, _option_rules, _freeze_rules, _validation_rules, _metric_rules,
                  _data_rules, _model_rules, _ensemble_rules):
        rules(job)
    order = list(job.set)
    kept: dict[str, Refusal] = {}
    for refusal in sorted(job.refusals, key=lambda r: order.index(r.param)):
        if refusal.param not in kept and not any(refusal.param.startswith(p + ".") for p in kept):
            kept[refusal.param] = refusal
    rename = hyperparameters_param != "hyperparameters"
    return [Refusal(_rename(r.param, hyperparameters_param), _rename(r.message, hyperparameters_param))
            if rename else r for r in kept.values()]


def set_fields(spec: JobSpec) -> dict[str, Any]:
    """The fields the request set, dotted path -> value, sub-configs included, in declaration order.

    Fields set to null are left out. An optional sub-config set to an object counts by itself
    (`"lora": {}` turns LoRA on); one that is always there (`head`, `optimizer`, ...) counts only
    through the fields set inside it (`"head": {}` asks for nothing).
    """
    return {path: value for path, value, _ in _walk(spec, "")}


def _walk(node: Any, prefix: str) -> list[tuple[str, Any, bool]]:
    """(path, value, whether it is an always-there sub-config) of what `set_fields` reports."""
    found: list[tuple[str, Any, bool]] = []
    for name, info in type(node).model_fields.items():
        value = getattr(node, name)
        if name not in node.model_fields_set or value is None:
            continue
        path = prefix + name
        inner = _walk(value, path + ".") if hasattr(type(value), "model_fields") else []
        container = hasattr(type(value), "model_fields") and info.default is not None
        if container and not inner:
            continue  # a default_factory sub-config with nothing set inside
        found += [(path, value, container), *inner]
    return found


class _Job:
    def __init__(self, spec: JobSpec, task: Task | None, data: DataFacts | None, model: ModelFacts | None):
        self.spec, self.cfg, self.task, self.data, self.model = spec, spec.config, task, data, model
        walked = _walk(spec, "")
        self.set = {path: value for path, value, _ in walked}
        self.containers = {path for path, _, container in walked if container}
        self.refusals: list[Refusal] = []

    def refuse(self, path: str, why: str) -> None:
        if path in self.set:
            self.refusals.append(Refusal(path, f"{path} {why}"))

    def fields_of(self, path: str) -> list[str]:
        """The set fields that stand for `path`: itself, or for a sub-config that is always there
        (`head`), the fields set inside it — what the request wrote."""
        if path not in self.containers:
            return [path] if path in self.set else []
        return [p for p in self.set if p.startswith(path + ".") and p not in self.containers]

    @property
    def problem_type(self) -> ProblemType | None:
        """text-classification's kind of label, where the request or the data tells."""
        if self.task not in (None, TEXT):
            return None
        if self.cfg.problem_type != AUTO:
            return ProblemType(self.cfg.problem_type)
        if self.data is not None and self.data.problem_type is not None:
            return self.data.problem_type
        return ProblemType.MULTI_LABEL if self.cfg.label_separator is not None else None


def _task_rules(job: _Job) -> None:
    if job.task is None:
        return
    for key, tasks in TASKS.items():
        if job.task not in tasks:
            for path in job.fields_of(key):
                job.refuse(path, f"applies to {_names(t.value for t in Task if t in tasks)} jobs only; "
                                 f"this job is {job.task.value}.")


def _option_rules(job: _Job) -> None:
    cfg, opt, sched, head = job.cfg, job.cfg.optimizer, job.cfg.scheduler, job.cfg.head
    if opt.learning_rate is not None:
        job.refuse("hyperparameters.learning_rate_multiplier",
                   "has no effect: config.optimizer.learning_rate sets the learning rate itself.")
    if head.type != "mlp":
        for name in ("hidden_sizes", "activation", "batch_norm"):
            job.refuse(f"config.head.{name}", f"applies to head.type mlp only; this head is {head.type}.")
    if head.type == "default":
        job.refuse("config.head.dropout", "applies to head.type linear or mlp; the default head keeps the "
                                          "architecture's own dropout (config.dropout.classifier sets it).")
    problem = job.problem_type
    if cfg.problem_type in (ProblemType.SINGLE_LABEL, ProblemType.REGRESSION):
        job.refuse("config.label_separator", f"splits multi_label labels only; problem_type is {cfg.problem_type}.")
    if problem in (ProblemType.MULTI_LABEL, ProblemType.REGRESSION):
        loss = "per-label binary cross-entropy" if problem == ProblemType.MULTI_LABEL else "squared error"
        job.refuse("config.loss.label_smoothing", f"smooths a softmax cross-entropy; this {problem.value} "
                                                  f"text-classification job's loss is {loss}.")
    if problem == ProblemType.REGRESSION:
        job.refuse("config.loss.class_weights", "do not apply to regression: there are no classes to weigh.")
    if cfg.loss.class_weights == {}:
        job.refuse("config.loss.class_weights", "is an empty mapping, which weighs nothing.")
    for name, optimizers in OPTIMIZER_NAMES.items():
        if opt.name not in optimizers:
            job.refuse(f"config.optimizer.{name}", f"applies to optimizer {_names(optimizers, 'or')} only; "
                                                   f"this one is {opt.name}.")
    for name, schedules in SCHEDULER_NAMES.items():
        if sched.name not in schedules:
            job.refuse(f"config.scheduler.{name}", f"applies to scheduler {_names(schedules, 'or')} only; "
                                                   f"this one is {sched.name}.")
    if cfg.eval_every_steps is not None:
        job.refuse("config.evaluations_per_epoch", "has no effect: config.eval_every_steps sets when to evaluate.")
    if sched.warmup_steps is not None:
        job.refuse("config.scheduler.warmup_ratio", "has no effect: config.scheduler.warmup_steps sets the warmup.")
    if cfg.device == "cpu" and cfg.precision == "fp16":
        job.refuse("config.precision", "fp16 needs a CUDA device and config.device is cpu; use bf16 or fp32.")
    text = cfg.augmentation.text
    if text is not None and not (text.deletion or text.swap or text.insertion or text.substitution):
        job.refuse("config.augmentation.text", "changes nothing: deletion, swap, insertion and substitution are all 0.")
    elif text is not None and text.probability == 0:
        job.refuse("config.augmentation.text.probability", "is 0: no training example would be edited.")
    image = cfg.augmentation.image
    if image is not None and image.random_resized_crop is None and not (
        image.horizontal_flip or image.rotation or image.brightness or image.contrast or image.saturation or image.hue
    ):
        job.refuse("config.augmentation.image", "changes nothing: every transform is off.")


def _freeze_rules(job: _Job) -> None:
    cfg, freeze, opt = job.cfg, job.cfg.freeze, job.cfg.optimizer
    if freeze.backbone:
        for name in ("embeddings", "first_n_layers"):
            job.refuse(f"config.freeze.{name}", "has no effect: config.freeze.backbone freezes all but the head.")
        job.refuse("config.freeze.gradual_unfreezing",
                   "has nothing to unfreeze: config.freeze.backbone keeps all but the head frozen.")
        job.refuse("config.optimizer.layerwise_lr_decay", "has no effect: with config.freeze.backbone only the "
                                                          "head trains.")
        if opt.head_learning_rate is not None:
            for path in ("config.optimizer.learning_rate", "hyperparameters.learning_rate_multiplier"):
                job.refuse(path, "has no effect: with config.freeze.backbone only the head trains, at "
                                 "config.optimizer.head_learning_rate.")
        if cfg.lora is not None:
            job.refuse("config.lora", "would train nothing: config.freeze.backbone freezes every adapter "
                                      "(linear probing needs no LoRA).")
    if cfg.lora is not None and cfg.lora.target_modules in (None, "all-linear"):
        job.refuse("config.freeze.embeddings", "has no effect with config.lora: the embeddings get no adapter and "
                                               "LoRA keeps every base weight frozen already.")
    if job.task == CAUSAL and cfg.lora is not None:
        job.refuse("config.optimizer.head_learning_rate",
                   "has no effect: with config.lora a causal LM's output layer stays frozen.")


def _validation_rules(job: _Job) -> None:
    if job.spec.validation_file is not None:
        return
    for path in NEEDS_VALIDATION:
        job.refuse(path, "needs a validation file (validation_file): without one nothing is evaluated.")
    if job.cfg.scheduler.name == "reduce_on_plateau":
        for path in ("config.scheduler.name", "config.scheduler.plateau_patience", "config.scheduler.plateau_factor"):
            job.refuse(path, "needs a validation file: reduce_on_plateau lowers the LR on validation results.")


def _metric_rules(job: _Job) -> None:
    metrics = DPO_METRICS if job.spec.method == "dpo" else _task_metrics(job.task, job.problem_type)
    if metrics is None:
        return  # any task's metric (core.spec checked the name)
    stopping = job.cfg.early_stopping
    objective = job.cfg.search.objective.metric if job.cfg.search else None
    for path, name in (("config.metric_for_best_model", job.cfg.metric_for_best_model),
                       ("config.early_stopping.metric", stopping.metric if stopping else None),
                       ("config.search.objective.metric", objective)):
        if name is not None and name not in metrics:
            kind = f"{job.problem_type.value} " if job.task == TEXT and job.problem_type else ""
            what = "DPO" if job.spec.method == "dpo" else f"{kind}{job.task}"
            job.refuse(path, f"{name!r} is not a metric of this {what} job; choose one of "
                             f"{', '.join(metrics)}.")


def _task_metrics(task: Task | None, problem: ProblemType | None) -> dict[str, bool] | None:
    if task == TEXT:
        by_problem = {ProblemType.SINGLE_LABEL: LABEL_METRICS, ProblemType.MULTI_LABEL: MULTI_LABEL_METRICS,
                      ProblemType.REGRESSION: REGRESSION_METRICS}
        return by_problem[problem] if problem else LABEL_METRICS | MULTI_LABEL_METRICS | REGRESSION_METRICS
    return {TOKEN: TOKEN_METRICS, CAUSAL: CAUSAL_LM_METRICS, IMAGE: LABEL_METRICS}.get(task)  # type: ignore[arg-type]


def _data_rules(job: _Job) -> None:
    data = job.data
    if data is None:
        return
    if job.task == CAUSAL and data.row_shapes:
        if "text" not in data.row_shapes:
            job.refuse("config.text_column", f"names the text of plain-text rows, and this job's rows are "
                                             f"{_names(sorted(data.row_shapes))}.")
        if data.row_shapes == {"text"}:
            job.refuse("config.train_on_inputs", "has no effect: every row is plain text, whose tokens are all "
                                                 "learned anyway.")
    if job.task == IMAGE and data.image_formats and "parquet" not in data.image_formats:
        for path in ("config.image_column", "config.label_column", "config.weight_column"):
            job.refuse(path, "applies to Parquet image datasets; this job's images come in a zip of label folders.")


def _model_rules(job: _Job) -> None:
    model, cfg, task = job.model, job.cfg, job.task
    if model is None:
        return
    name = model.model_type or "this"
    need = "vision" if task == IMAGE else "text" if task is not None else None
    if need and model.modality and model.modality != need:
        job.refuse("task" if "task" in job.set else "model",
                   f"{task} needs a {need} model; the base model ({name}) is a {model.modality} model.")
        return
    if model.num_layers is not None and cfg.freeze.first_n_layers > model.num_layers:
        job.refuse("config.freeze.first_n_layers", f"is {cfg.freeze.first_n_layers} but the model ({name}) has "
                                                   f"{model.num_layers} blocks.")
    if cfg.lora is not None and model.linear_free and cfg.lora.target_modules in (None, "all-linear"):
        path = "config.lora.target_modules" if "config.lora.target_modules" in job.set else "config.lora"
        job.refuse(path, f"finds nothing to adapt: a {name} model has no linear layers outside its head "
                         "(convolutional networks have none); fine-tune it fully, or freeze part of it.")
    if model.gradient_checkpointing is False:
        job.refuse("config.gradient_checkpointing", f"cannot take effect: {name} models do not support it.")
    for kind in sorted(model.dropout_absent):
        job.refuse(f"config.dropout.{kind}", f"cannot take effect: {name} models have no {kind} dropout.")
    own_head = cfg.head.type == "default" or cfg.head.dropout is not None
    if task in model.headless_dropout_tasks and own_head:
        where = ("its own head" if cfg.head.type == "default"
                 else "its backbone (config.head.dropout fixes the new head's)")
        job.refuse("config.dropout.classifier", f"cannot take effect: a {name} {task} model has no classifier "
                                                f"dropout in {where}; a linear or mlp head has one.")
    if task == CAUSAL and model.tied_embeddings and cfg.lora is None:
        job.refuse("config.optimizer.head_learning_rate", f"has no effect: the {name} model's output layer is tied "
                                                          "to its input embeddings, so it is no separate head.")
        job.refuse("config.freeze.backbone", f"would leave nothing to train: the {name} model's output layer is "
                                             "tied to its input embeddings, so there is no head outside the backbone.")


def _names(items: Iterable[str], last: str = "and") -> str:
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def _rename(text: str, prefix: str) -> str:
    return text.replace("hyperparameters.", f"{prefix}.")


def _ensemble_rules(job: _Job) -> None:
    method = job.cfg.ensemble.resolved_method if job.cfg.ensemble else None
    path = "config.ensemble.method" if "config.ensemble.method" in job.set else "config.ensemble"
    if method and job.task is not None and job.task not in ENSEMBLE_TASKS[method]:
        job.refuse(path, f"is {method}, which combines {_names(sorted(ENSEMBLE_TASKS[method]), 'or')} models, "
                         f"not {job.task}.")
    if method == "boosting" and job.problem_type not in (None, ProblemType.SINGLE_LABEL):
        job.refuse(path, f"is boosting (SAMME), which combines single-label classifiers, not {job.problem_type.value}.")
    if method in ("soup", "selection") and job.spec.validation_file is None:
        job.refuse(path, f"is {method}, which needs a validation file: it keeps a member only if validation improves.")
    if method and "config.train_rows" in job.set:
        job.refuse("config.train_rows", "is set by the ensemble on each member (bootstrap, subsample or folds).")
