"""core.applicability: every field a request sets either takes effect for its job or is refused, naming it.

The matrix goes over every field of Hyperparameters and TrainingConfig (a completeness check fails
when a new field has no row) times every task. The table here is written from reading the
adapters, independently of the module's own TASKS table, so the two check each other.
"""

from __future__ import annotations

import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core.applicability import (
    DataFacts,
    ModelFacts,
    Refusal,
    check_applicable,
    inapplicable_fields,
    model_facts,
    set_fields,
)
from core.datasets import DatasetSummary
from core.errors import EngineError, InapplicableFieldError
from core.spec import Hyperparameters, JobSpec, ProblemType, Task, TrainingConfig

TEXT, TOKEN, CAUSAL, IMAGE = (Task.TEXT_CLASSIFICATION, Task.TOKEN_CLASSIFICATION, Task.CAUSAL_LM,
                              Task.IMAGE_CLASSIFICATION)
ALL = frozenset(Task)
TEXT_INPUT = frozenset({TEXT, TOKEN, CAUSAL})
CLASSIFIERS = frozenset({TEXT, TOKEN, IMAGE})


def nested(fields: dict[str, Any]) -> dict[str, Any]:
    """{"config.head.type": "mlp"} -> {"config": {"head": {"type": "mlp"}}}."""
    body: dict[str, Any] = {}
    for path, value in fields.items():
        *parents, last = path.split(".")
        node = body
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return body


def spec_of(fields: dict[str, Any] | None = None, *, validation: bool = False, **top: Any) -> JobSpec:
    body = {"model": "base", "training_file": "file-train", **nested(fields or {}), **top}
    if validation:
        body["validation_file"] = "file-valid"
    return JobSpec.model_validate(body)


def refused(fields: dict[str, Any] | None = None, *, task: Task | None = None, data: DataFacts | None = None,
            model: ModelFacts | None = None, validation: bool = True, **top: Any) -> list[str]:
    return [r.param for r in inapplicable_fields(spec_of(fields, validation=validation, **top),
                                                 task=task, data=data, model=model)]


# --- The matrix ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A field set to `value` (with the other fields `needs`, which it needs to take effect)
    takes effect in `tasks`; in the others it is refused as `refused_as` (default: itself)."""

    value: Any
    tasks: frozenset[Task] = ALL
    needs: dict[str, Any] = field(default_factory=dict)
    validation: bool = False
    refused_as: tuple[str, ...] = ()


MLP = {"config.head.type": "mlp", "config.head.hidden_sizes": [8]}
EDIT = {"config.augmentation.text.deletion": 0.1}
VALID = {"validation": True}


def image_aug(value):
    return Case(value, frozenset({IMAGE}), refused_as=("config.augmentation.image",))


def text_aug(value, needs=None):
    return Case(value, frozenset({TEXT, TOKEN}), needs=needs or {}, refused_as=("config.augmentation.text",))


def head(value, needs=(), refused_as=()):
    """`head` is always there: on a causal-lm job each field set inside it is refused by name."""
    return Case(value, CLASSIFIERS, needs=dict(needs), refused_as=refused_as)


CASES: dict[str, Case] = {
    "hyperparameters": Case({"n_epochs": 2}),
    "hyperparameters.n_epochs": Case(2),
    "hyperparameters.batch_size": Case(4),
    # DPO's own fields need method dpo, which trains causal LMs only (the other tasks refuse the method).
    "hyperparameters.beta": Case(0.2, frozenset({CAUSAL}), needs={"method": "dpo"}, refused_as=("method",)),
    "config.dpo": Case({"loss_type": "ipo"}, frozenset({CAUSAL}), needs={"method": "dpo"}, refused_as=("method",)),
    "config.dpo.loss_type": Case("ipo", frozenset({CAUSAL}), needs={"method": "dpo"}, refused_as=("method",)),
    "hyperparameters.learning_rate_multiplier": Case(2.0),
    "config": Case({"max_grad_norm": 0.5}),
    # data
    "config.text_column": Case("body", frozenset({TEXT, CAUSAL})),
    "config.label_column": Case("y", frozenset({TEXT, IMAGE})),
    "config.tokens_column": Case("words", frozenset({TOKEN})),
    "config.tags_column": Case("ner", frozenset({TOKEN})),
    "config.image_column": Case("img", frozenset({IMAGE})),
    "config.weight_column": Case("w", frozenset({TEXT, IMAGE})),
    "config.problem_type": Case("single_label", frozenset({TEXT})),
    "config.label_separator": Case("|", frozenset({TEXT})),
    "config.max_length": Case(64, TEXT_INPUT),
    "config.truncation_side": Case("left", TEXT_INPUT),
    "config.image_size": Case(32, frozenset({IMAGE})),
    "config.packing": Case(True, frozenset({CAUSAL})),
    "config.train_on_inputs": Case(True, frozenset({CAUSAL})),
    "config.group_by_length": Case(False, TEXT_INPUT),
    # surgery
    "config.head": head({"type": "linear"}, refused_as=("config.head.type",)),
    "config.head.type": head("linear"),
    "config.head.hidden_sizes": head([16], {"config.head.type": "mlp"},
                                     refused_as=("config.head.type", "config.head.hidden_sizes")),
    "config.head.activation": head("relu", MLP, refused_as=(*MLP, "config.head.activation")),
    "config.head.batch_norm": head(True, MLP, refused_as=(*MLP, "config.head.batch_norm")),
    "config.head.dropout": head(0.2, {"config.head.type": "linear"},
                                refused_as=("config.head.type", "config.head.dropout")),
    "config.dropout": Case({"hidden": 0.1}),
    "config.dropout.hidden": Case(0.2),
    "config.dropout.attention": Case(0.2),
    "config.dropout.classifier": Case(0.2, CLASSIFIERS),
    "config.freeze": Case({"embeddings": True}),
    "config.freeze.embeddings": Case(True),
    "config.freeze.first_n_layers": Case(1),
    "config.freeze.patterns": Case([r"\.bias$"]),
    "config.freeze.backbone": Case(True),
    "config.freeze.gradual_unfreezing": Case({}),
    "config.freeze.gradual_unfreezing.every_steps": Case(5),
    "config.lora": Case({}),
    "config.lora.r": Case(4),
    "config.lora.alpha": Case(8.0),
    "config.lora.dropout": Case(0.1),
    "config.lora.target_modules": Case(["query"]),
    "config.lora.merge_on_export": Case(False),
    "config.gradient_checkpointing": Case(True),
    # optimisation
    "config.optimizer": Case({"weight_decay": 0.1}),
    "config.optimizer.name": Case("sgd"),
    "config.optimizer.learning_rate": Case(1e-4),
    "config.optimizer.head_learning_rate": Case(1e-3),  # causal-lm: an untied output layer, no LoRA
    "config.optimizer.layerwise_lr_decay": Case(0.9),
    "config.optimizer.weight_decay": Case(0.1),
    "config.optimizer.l1_penalty": Case(1e-5),
    "config.optimizer.beta1": Case(0.8),
    "config.optimizer.beta2": Case(0.99),
    "config.optimizer.eps": Case(1e-6),
    "config.optimizer.momentum": Case(0.8, needs={"config.optimizer.name": "sgd"}),
    "config.optimizer.nesterov": Case(True, needs={"config.optimizer.name": "sgd"}),
    "config.scheduler": Case({"name": "cosine"}),
    "config.scheduler.name": Case("cosine"),
    "config.scheduler.warmup_ratio": Case(0.1),
    "config.scheduler.warmup_steps": Case(10),
    "config.scheduler.num_cycles": Case(2, needs={"config.scheduler.name": "cosine_with_restarts"}),
    "config.scheduler.min_lr_ratio": Case(0.1, needs={"config.scheduler.name": "polynomial"}),
    "config.scheduler.step_size": Case(10, needs={"config.scheduler.name": "step"}),
    "config.scheduler.gamma": Case(0.9, needs={"config.scheduler.name": "exponential"}),
    "config.scheduler.plateau_patience": Case(2, needs={"config.scheduler.name": "reduce_on_plateau"}, **VALID),
    "config.scheduler.plateau_factor": Case(0.3, needs={"config.scheduler.name": "reduce_on_plateau"}, **VALID),
    "config.loss": Case({"label_smoothing": 0.1}, CLASSIFIERS, refused_as=("config.loss.label_smoothing",)),
    "config.loss.label_smoothing": Case(0.1, CLASSIFIERS),
    "config.loss.class_weights": Case("balanced", CLASSIFIERS),
    "config.augmentation": Case({"text": {"swap": 0.1}}, frozenset({TEXT, TOKEN}),
                                refused_as=("config.augmentation.text",)),
    "config.augmentation.text": Case({"deletion": 0.1}, frozenset({TEXT, TOKEN})),
    "config.augmentation.text.deletion": text_aug(0.1),
    "config.augmentation.text.swap": text_aug(0.1),
    "config.augmentation.text.insertion": text_aug(0.1),
    "config.augmentation.text.substitution": text_aug(0.1),
    "config.augmentation.text.probability": text_aug(0.5, EDIT),
    "config.augmentation.image": Case({"horizontal_flip": 0.5}, frozenset({IMAGE})),
    "config.augmentation.image.random_resized_crop": image_aug(0.8),
    "config.augmentation.image.horizontal_flip": image_aug(0.5),
    "config.augmentation.image.rotation": image_aug(10.0),
    "config.augmentation.image.brightness": image_aug(0.2),
    "config.augmentation.image.contrast": image_aug(0.2),
    "config.augmentation.image.saturation": image_aug(0.2),
    "config.augmentation.image.hue": image_aug(0.1),
    "config.max_grad_norm": Case(0.5),
    "config.max_grad_value": Case(1.0),
    "config.gradient_accumulation_steps": Case(2),
    "config.precision": Case("bf16"),
    # watching the run
    "config.eval_every_steps": Case(10, **VALID),
    "config.evaluations_per_epoch": Case(2, **VALID),
    "config.checkpoint_every_steps": Case(10),
    "config.metric_for_best_model": Case("loss", **VALID),
    "config.early_stopping": Case({}, **VALID),
    "config.early_stopping.patience": Case(2, **VALID),
    "config.early_stopping.min_delta": Case(0.01, **VALID),
    "config.early_stopping.metric": Case("loss", **VALID),
    "config.early_stopping.mode": Case("min", **VALID),
    "config.load_best_model_at_end": Case(False, **VALID),
    "config.device": Case("cpu"),
    "config.max_runtime_seconds": Case(60),
    # a search (its space is checked against the job by lathe.search, not here)
    "config.search": Case({}, **VALID),
    "config.search.trials": Case(4, **VALID),
    "config.search.parallel": Case(1, **VALID),
    "config.search.sampler": Case({"type": "random"}, **VALID),
    "config.search.sampler.type": Case("grid", **VALID),
    "config.search.sampler.n_startup_trials": Case(3, **VALID),
    "config.search.pruner": Case({"type": "none"}, **VALID),
    "config.search.pruner.type": Case("hyperband", **VALID),
    "config.search.pruner.n_startup_trials": Case(2, **VALID),
    "config.search.pruner.n_warmup_evaluations": Case(1, **VALID),
    "config.search.pruner.percentile": Case(30.0, needs={"config.search.pruner.type": "percentile"}, **VALID),
    "config.search.pruner.min_resource": Case(1, needs={"config.search.pruner.type": "hyperband"}, **VALID),
    "config.search.pruner.reduction_factor": Case(3, needs={"config.search.pruner.type": "hyperband"}, **VALID),
    "config.search.objective": Case({"mode": "min"}, **VALID),
    "config.search.objective.metric": Case("loss", **VALID),
    "config.search.objective.mode": Case("min", **VALID),
    "config.search.space": Case({"hyperparameters.n_epochs": {"type": "int", "low": 1, "high": 2}}, **VALID),
    "config.search.warm_start_from": Case("ftjob-earlier", **VALID),
    # an ensemble: what each method combines (core.combine), refused by its method for other tasks
    "config.ensemble": Case({"method": "bagging"}, frozenset({TEXT, IMAGE}), refused_as=("config.ensemble.method",)),
    "config.ensemble.method": Case("soup", **VALID),
    "config.ensemble.members": Case(2, needs={"config.ensemble.method": "soup"}, **VALID),
    "config.ensemble.parallel": Case(1, needs={"config.ensemble.method": "soup"}, **VALID),
    "config.ensemble.vote": Case("hard", frozenset({TEXT, IMAGE}), needs={"config.ensemble.method": "bagging"},
                                 refused_as=("config.ensemble.method",)),
    "config.ensemble.subsample": Case(0.5, frozenset({TEXT, IMAGE}), needs={"config.ensemble.method": "bagging"},
                                      refused_as=("config.ensemble.method",)),
    "config.ensemble.folds": Case(2, frozenset({TEXT, IMAGE}), needs={"config.ensemble.method": "stacking"},
                                  refused_as=("config.ensemble.method",)),
    "config.ensemble.meta_learner": Case({"c": 2.0}, frozenset({TEXT, IMAGE}),
                                         needs={"config.ensemble.method": "stacking"},
                                         refused_as=("config.ensemble.method",)),
    "config.ensemble.meta_learner.c": Case(2.0, frozenset({TEXT, IMAGE}), needs={"config.ensemble.method": "stacking"},
                                           refused_as=("config.ensemble.method",)),
    "config.ensemble.from_search": Case("ftjob-search", frozenset({TEXT, IMAGE}), refused_as=("config.ensemble",),
                                        **VALID),
    # a draw of the training rows: every task whose rows are examples (a causal LM's may be packed)
    "config.train_rows": Case({"method": "bootstrap"}, frozenset({TEXT, TOKEN, IMAGE})),
    "config.train_rows.method": Case("bootstrap", frozenset({TEXT, TOKEN, IMAGE}), refused_as=("config.train_rows",)),
    "config.train_rows.fraction": Case(0.5, frozenset({TEXT, TOKEN, IMAGE}), needs={"config.train_rows.method": "subsample"},
                                       refused_as=("config.train_rows",)),
    "config.train_rows.folds": Case(3, frozenset({TEXT, TOKEN, IMAGE}), needs={"config.train_rows.method": "folds",
                                                                             "config.train_rows.holdout": 1},
                                    refused_as=("config.train_rows",)),
    "config.train_rows.holdout": Case(1, frozenset({TEXT, TOKEN, IMAGE}), needs={"config.train_rows.method": "folds",
                                                                               "config.train_rows.folds": 3},
                                      refused_as=("config.train_rows",)),
    "config.train_rows.seed": Case(3, frozenset({TEXT, TOKEN, IMAGE}), needs={"config.train_rows.method": "bootstrap"},
                                   refused_as=("config.train_rows",)),
    "config.train_rows.stream": Case(1, frozenset({TEXT, TOKEN, IMAGE}), needs={"config.train_rows.method": "bootstrap"},
                                     refused_as=("config.train_rows",)),
}


def _models_in(annotation: Any) -> list[type]:
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return [annotation]
    if typing.get_origin(annotation) is dict:  # a mapping's values are not fields (config.search.space)
        return []
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def field_paths(model: type, prefix: str) -> list[str]:
    """Every field under `model`, sub-configs and their fields, as dotted paths."""
    paths = []
    for name, info in model.model_fields.items():
        paths.append(prefix + name)
        for sub in _models_in(info.annotation):
            paths += field_paths(sub, f"{prefix}{name}.")
    return paths


def test_the_table_has_a_row_for_every_field():
    every = {"hyperparameters", "config", *field_paths(Hyperparameters, "hyperparameters."),
             *field_paths(TrainingConfig, "config.")}
    assert every - set(CASES) == set(), "decide where the new field takes effect"
    assert set(CASES) - every == set()


@pytest.mark.parametrize("task", [None, *Task], ids=lambda t: str(t))
@pytest.mark.parametrize("path", sorted(CASES))
def test_every_field_by_task(path, task):
    case = CASES[path]
    spec = spec_of({path: case.value, **case.needs}, validation=case.validation)
    assert path in set_fields(spec)
    expected = [] if task is None or task in case.tasks else list(case.refused_as or [path])
    assert [r.param for r in inapplicable_fields(spec, task=task)] == expected


def test_a_refusal_says_why_and_names_the_task():
    with pytest.raises(InapplicableFieldError) as e:
        check_applicable(spec_of({"config.packing": True}), task=TEXT)
    assert isinstance(e.value, EngineError) and e.value.code == "inapplicable_field"
    assert e.value.param == "config.packing"
    assert e.value.message == "config.packing applies to causal-lm jobs only; this job is text-classification."
    assert e.value.to_dict() == {"code": "inapplicable_field", "param": "config.packing", "message": e.value.message}


def test_the_task_named_in_the_request_counts_when_none_is_given():
    spec = spec_of({"config.augmentation.text.deletion": 0.1}, task="causal-lm")
    assert [r.param for r in inapplicable_fields(spec)] == ["config.augmentation.text"]


# --- Defaults and nulls never count; the stored form keeps what was set -------------------------


@pytest.mark.parametrize("task", [None, *Task], ids=lambda t: str(t))
def test_defaults_nulls_and_empty_sub_configs_are_never_refused(task):
    model = (ModelFacts.from_config({"model_type": "resnet", "depths": [1], "num_channels": 3}) if task == IMAGE
             else ModelFacts.from_config({"model_type": "gpt2", "n_layer": 1, "tie_word_embeddings": True}))
    nulls = {"config.lora": None, "config.early_stopping": None, "config.head.dropout": None,
             "config.dropout.classifier": None, "config.augmentation.text": None, "config.augmentation.image": None,
             "config.image_size": None, "config.label_separator": None, "config.eval_every_steps": None,
             "config.freeze.gradual_unfreezing": None, "config.scheduler.step_size": None,
             "config.scheduler.warmup_steps": None, "config.optimizer.learning_rate": None,
             "config.max_grad_value": None, "config.max_runtime_seconds": None}
    empty = {"config": {"head": {}, "dropout": {}, "freeze": {}, "optimizer": {}, "scheduler": {}, "loss": {},
                        "augmentation": {}}, "hyperparameters": {}}
    for spec in (spec_of(), spec_of(nulls), spec_of(**empty)):
        assert set(set_fields(spec)) <= {"model", "training_file"}
        for facts in (None, model):
            assert inapplicable_fields(spec, task=task, model=facts) == []


def test_the_stored_form_keeps_what_the_request_set():
    spec = spec_of({"config.scheduler.num_cycles": 3, "config.head.type": "linear",
                    "hyperparameters.batch_size": 4, "config.lora": {}}, validation=True)
    stored = spec.model_dump(mode="json", exclude_unset=True)
    again = JobSpec.model_validate(stored)
    assert set_fields(again) == set_fields(spec)
    assert again.config.scheduler.model_fields_set == {"num_cycles"}
    assert again.config.lora is not None and again.config.lora.model_fields_set == set()
    assert [r.param for r in inapplicable_fields(again)] == ["config.scheduler.num_cycles"]
    # A full dump marks every field as set: that is not the form to store.
    full = JobSpec.model_validate(spec.model_dump(mode="json"))
    assert "config.packing" in set_fields(full)


def test_the_worker_task_update_is_kept_as_set():
    spec = spec_of({"config.packing": True}).model_copy(update={"task": TEXT})
    again = JobSpec.model_validate(spec.model_dump(mode="json", exclude_unset=True))
    assert again.task == TEXT and [r.param for r in inapplicable_fields(again)] == ["config.packing"]


# --- Options against options, and the validation file --------------------------------------------


@pytest.mark.parametrize("fields, task, param", [
    ({"hyperparameters.learning_rate_multiplier": 2, "config.optimizer.learning_rate": 1e-4}, None,
     "hyperparameters.learning_rate_multiplier"),
    ({"config.head.dropout": 0.3}, None, "config.head.dropout"),
    ({"config.head.type": "default", "config.head.dropout": 0.3}, TEXT, "config.head.dropout"),
    ({"config.head.type": "linear", "config.head.activation": "relu"}, None, "config.head.activation"),
    ({"config.head.type": "linear", "config.head.batch_norm": False}, None, "config.head.batch_norm"),
    ({"config.head.type": "linear", "config.head.hidden_sizes": []}, None, "config.head.hidden_sizes"),
    ({"config.problem_type": "single_label", "config.label_separator": "|"}, TEXT, "config.label_separator"),
    ({"config.problem_type": "regression", "config.label_separator": ";"}, None, "config.label_separator"),
    ({"config.problem_type": "multi_label", "config.loss.label_smoothing": 0.1}, TEXT, "config.loss.label_smoothing"),
    ({"config.label_separator": "|", "config.loss.label_smoothing": 0.1}, None, "config.loss.label_smoothing"),
    ({"config.problem_type": "regression", "config.loss.label_smoothing": 0.1}, None, "config.loss.label_smoothing"),
    ({"config.problem_type": "regression", "config.loss.class_weights": "balanced"}, TEXT, "config.loss.class_weights"),
    ({"config.loss.class_weights": {}}, IMAGE, "config.loss.class_weights"),
    ({"config.optimizer.name": "sgd", "config.optimizer.beta1": 0.8}, None, "config.optimizer.beta1"),
    ({"config.optimizer.name": "adafactor", "config.optimizer.beta2": 0.99}, None, "config.optimizer.beta2"),
    ({"config.optimizer.name": "adafactor", "config.optimizer.eps": 1e-6}, None, "config.optimizer.eps"),
    ({"config.optimizer.name": "sgd", "config.optimizer.eps": 1e-6}, None, "config.optimizer.eps"),
    ({"config.optimizer.name": "adam", "config.optimizer.momentum": 0.5}, None, "config.optimizer.momentum"),
    ({"config.optimizer.nesterov": False}, None, "config.optimizer.nesterov"),
    ({"config.scheduler.num_cycles": 2}, None, "config.scheduler.num_cycles"),
    ({"config.scheduler.name": "cosine", "config.scheduler.num_cycles": 2}, None, "config.scheduler.num_cycles"),
    ({"config.scheduler.name": "linear", "config.scheduler.min_lr_ratio": 0.1}, None, "config.scheduler.min_lr_ratio"),
    ({"config.scheduler.name": "exponential", "config.scheduler.step_size": 5}, None, "config.scheduler.step_size"),
    ({"config.scheduler.name": "cosine", "config.scheduler.gamma": 0.9}, None, "config.scheduler.gamma"),
    ({"config.scheduler.name": "step", "config.scheduler.plateau_factor": 0.3}, None,
     "config.scheduler.plateau_factor"),
    ({"config.scheduler.plateau_patience": 3}, None, "config.scheduler.plateau_patience"),
    ({"config.scheduler.warmup_steps": 5, "config.scheduler.warmup_ratio": 0.1}, None, "config.scheduler.warmup_ratio"),
    ({"config.device": "cpu", "config.precision": "fp16"}, None, "config.precision"),
    ({"config.augmentation.text": {}}, TEXT, "config.augmentation.text"),
    ({"config.augmentation.text": {"probability": 0.5}}, None, "config.augmentation.text"),
    ({"config.augmentation.text": {"swap": 0.1, "probability": 0}}, TOKEN, "config.augmentation.text.probability"),
    ({"config.augmentation.image": {"rotation": 0}}, IMAGE, "config.augmentation.image"),
    ({"config.freeze.backbone": True, "config.freeze.embeddings": True}, None, "config.freeze.embeddings"),
    ({"config.freeze.backbone": True, "config.freeze.first_n_layers": 2}, None, "config.freeze.first_n_layers"),
    ({"config.freeze.backbone": True, "config.freeze.gradual_unfreezing": {}}, None,
     "config.freeze.gradual_unfreezing"),
    ({"config.freeze.backbone": True, "config.optimizer.layerwise_lr_decay": 0.8}, None,
     "config.optimizer.layerwise_lr_decay"),
    ({"config.freeze.backbone": True, "config.optimizer.head_learning_rate": 1e-3,
      "config.optimizer.learning_rate": 1e-4}, None, "config.optimizer.learning_rate"),
    ({"config.freeze.backbone": True, "config.lora": {"r": 4}}, None, "config.lora"),
    ({"config.lora": {}, "config.freeze.embeddings": True}, None, "config.freeze.embeddings"),
    ({"config.lora": {"target_modules": "all-linear"}, "config.freeze.embeddings": True}, TEXT,
     "config.freeze.embeddings"),
    ({"config.lora": {}, "config.optimizer.head_learning_rate": 1e-3}, CAUSAL, "config.optimizer.head_learning_rate"),
    ({"config.metric_for_best_model": "accuracy"}, CAUSAL, "config.metric_for_best_model"),
    ({"config.metric_for_best_model": "f1"}, TEXT, "config.metric_for_best_model"),
    ({"config.metric_for_best_model": "f1_macro"}, TOKEN, "config.metric_for_best_model"),
    ({"config.metric_for_best_model": "r2"}, IMAGE, "config.metric_for_best_model"),
    ({"config.problem_type": "regression", "config.metric_for_best_model": "accuracy"}, TEXT,
     "config.metric_for_best_model"),
    ({"config.early_stopping.metric": "perplexity"}, TOKEN, "config.early_stopping.metric"),
])
def test_options_that_rule_each_other_out(fields, task, param):
    assert refused(fields, task=task) == [param]


@pytest.mark.parametrize("fields, task", [
    ({"config.head.type": "mlp", "config.head.hidden_sizes": [8], "config.head.activation": "tanh",
      "config.head.batch_norm": True, "config.head.dropout": 0.2}, TEXT),
    ({"config.problem_type": "multi_label", "config.label_separator": "|", "config.loss.class_weights": "balanced"},
     TEXT),
    ({"config.optimizer.name": "adafactor", "config.optimizer.beta1": 0.0}, None),
    ({"config.scheduler.name": "step", "config.scheduler.gamma": 0.7, "config.scheduler.step_size": 3}, None),
    ({"config.scheduler.name": "reduce_on_plateau", "config.scheduler.plateau_factor": 0.3}, None),
    ({"config.scheduler.warmup_steps": 5}, None),
    ({"config.freeze.backbone": True, "config.optimizer.head_learning_rate": 1e-3, "config.freeze.patterns": ["x"]},
     IMAGE),
    ({"config.lora": {"target_modules": ["word_embeddings", "query"]}, "config.freeze.embeddings": True}, TEXT),
    ({"config.lora": {}, "config.freeze.first_n_layers": 1, "config.optimizer.head_learning_rate": 1e-3}, TOKEN),
    ({"config.optimizer.head_learning_rate": 1e-3, "config.freeze.backbone": True}, CAUSAL),
    ({"config.metric_for_best_model": "r2"}, TEXT),  # the problem type is not known yet
    ({"config.metric_for_best_model": "token_accuracy", "config.early_stopping.metric": "perplexity"}, CAUSAL),
])
def test_options_that_go_together(fields, task):
    assert refused(fields, task=task) == []


@pytest.mark.parametrize("fields, params", [
    ({"config.eval_every_steps": 5}, ["config.eval_every_steps"]),
    ({"config.metric_for_best_model": "loss"}, ["config.metric_for_best_model"]),
    ({"config.early_stopping": {"patience": 2, "metric": "loss"}}, ["config.early_stopping"]),
    ({"config.load_best_model_at_end": True}, ["config.load_best_model_at_end"]),
    ({"config.scheduler": {"name": "reduce_on_plateau", "plateau_patience": 2}},
     ["config.scheduler.name", "config.scheduler.plateau_patience"]),
])
def test_what_needs_a_validation_file(fields, params):
    for task in (None, *Task):
        assert refused(fields, task=task, validation=False) == params
        assert refused(fields, task=task, validation=True) == []


def test_every_refusal_is_listed_once_in_field_order_and_the_first_is_raised():
    fields = {"hyperparameters.learning_rate_multiplier": 2, "config.optimizer.learning_rate": 1e-4,
              "config.packing": True, "config.head": {"type": "mlp", "hidden_sizes": [4], "dropout": 0.1},
              "config.early_stopping": {"metric": "accuracy"}}
    spec = spec_of(fields)
    refusals = inapplicable_fields(spec, task=CAUSAL, hyperparameters_param="method.supervised.hyperparameters")
    assert [r.param for r in refusals] == ["method.supervised.hyperparameters.learning_rate_multiplier",
                                           "config.head.type", "config.head.hidden_sizes", "config.head.dropout",
                                           "config.early_stopping"]
    assert refusals[0].message.startswith("method.supervised.hyperparameters.learning_rate_multiplier has no effect")
    with pytest.raises(InapplicableFieldError) as e:
        check_applicable(spec, task=CAUSAL)
    assert e.value.param == "hyperparameters.learning_rate_multiplier"


# --- What only the data tells ------------------------------------------------------------------


def summary(task: Task, **details) -> DatasetSummary:
    return DatasetSummary(task=task, rows=10, details=details)


def test_data_facts_from_the_summaries():
    facts = DataFacts.from_summaries({"training_file": summary(TEXT, problem_type="regression", min=0.0, max=1.0)})
    assert facts == DataFacts(problem_type=ProblemType.REGRESSION)
    images = DataFacts.from_summaries({"training_file": summary(IMAGE, format="zip"),
                                       "validation_file": summary(IMAGE, format="parquet")})
    assert images.image_formats == {"zip", "parquet"}
    chats = DataFacts.from_summaries(summary(CAUSAL, shapes={"messages": 3, "text": 1}))
    assert chats.row_shapes == {"messages", "text"}
    assert DataFacts.from_summaries({"training_file": summary(TOKEN, scheme="IOB2")}) == DataFacts()


@pytest.mark.parametrize("fields, task, data, params", [
    ({"config.loss.label_smoothing": 0.1}, TEXT, DataFacts(problem_type=ProblemType.MULTI_LABEL),
     ["config.loss.label_smoothing"]),
    ({"config.loss.label_smoothing": 0.1}, TEXT, DataFacts(problem_type=ProblemType.SINGLE_LABEL), []),
    ({"config.loss.class_weights": "balanced"}, TEXT, DataFacts(problem_type=ProblemType.REGRESSION),
     ["config.loss.class_weights"]),
    ({"config.loss.class_weights": "balanced"}, TEXT, DataFacts(problem_type=ProblemType.MULTI_LABEL), []),
    ({"config.metric_for_best_model": "accuracy"}, TEXT, DataFacts(problem_type=ProblemType.MULTI_LABEL),
     ["config.metric_for_best_model"]),
    ({"config.metric_for_best_model": "exact_match"}, TEXT, DataFacts(problem_type=ProblemType.MULTI_LABEL), []),
    ({"config.image_column": "img", "config.label_column": "y"}, IMAGE, DataFacts(image_formats=frozenset({"zip"})),
     ["config.label_column", "config.image_column"]),
    ({"config.image_column": "img", "config.label_column": "y"}, IMAGE,
     DataFacts(image_formats=frozenset({"zip", "parquet"})), []),
    ({"config.weight_column": "w"}, IMAGE, DataFacts(image_formats=frozenset({"zip"})), ["config.weight_column"]),
    ({"config.weight_column": "w"}, IMAGE, DataFacts(image_formats=frozenset({"parquet"})), []),
    ({"config.text_column": "body"}, CAUSAL, DataFacts(row_shapes=frozenset({"messages", "alpaca"})),
     ["config.text_column"]),
    ({"config.text_column": "body", "config.train_on_inputs": True}, CAUSAL,
     DataFacts(row_shapes=frozenset({"text", "prompt_completion"})), []),
    ({"config.text_column": "body", "config.train_on_inputs": False}, CAUSAL,
     DataFacts(row_shapes=frozenset({"text"})), ["config.train_on_inputs"]),
])
def test_what_only_the_data_tells(fields, task, data, params):
    assert refused(fields, task=task, data=data) == params


# --- What only the model tells -------------------------------------------------------------------


def saved(tmp_path: Path, config) -> Path:
    folder = tmp_path / config.model_type
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import BertConfig, ConvNextConfig, GPT2Config, LlamaConfig, ResNetConfig, ViTConfig

    root = tmp_path_factory.mktemp("configs")
    return {
        "bert": saved(root, BertConfig(num_hidden_layers=2, hidden_size=32)),
        "gpt2": saved(root, GPT2Config(n_layer=3, n_embd=32)),
        "llama": saved(root, LlamaConfig(num_hidden_layers=2, hidden_size=32, tie_word_embeddings=False)),
        "resnet": saved(root, ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16])),
        "vit": saved(root, ViTConfig(num_hidden_layers=2, hidden_size=32)),
        "convnext": saved(root, ConvNextConfig(depths=[1, 1, 1], hidden_sizes=[8, 16, 16], num_stages=3)),
    }


def test_model_facts_from_config_json(folders, tmp_path):
    bert, gpt2, llama, resnet, vit, convnext = (model_facts(folders[k]) for k in
                                                ("bert", "gpt2", "llama", "resnet", "vit", "convnext"))
    assert (bert.model_type, bert.modality, bert.decoder, bert.num_layers) == ("bert", "text", False, 2)
    assert bert.dropout_absent == set() and bert.headless_dropout_tasks == set() and not bert.linear_free
    assert (gpt2.decoder, gpt2.num_layers, gpt2.tied_embeddings) == (True, 3, True)
    assert gpt2.headless_dropout_tasks == {TEXT}
    assert (llama.num_layers, llama.tied_embeddings, llama.dropout_absent) == (2, False, {"hidden"})
    assert (resnet.modality, resnet.num_layers, resnet.linear_free, resnet.gradient_checkpointing) == (
        "vision", 2, True, False)
    assert resnet.dropout_absent == {"hidden", "attention"} and resnet.headless_dropout_tasks == {IMAGE}
    assert (vit.modality, vit.num_layers, vit.dropout_absent) == ("vision", 2, set())
    assert vit.headless_dropout_tasks == {IMAGE}
    assert (convnext.num_layers, convnext.linear_free, convnext.gradient_checkpointing) == (3, False, False)
    assert model_facts(tmp_path) is None  # no config.json: a hub id, a GGUF folder
    (tmp_path / "config.json").write_text("[1, 2]")
    assert model_facts(tmp_path) is None
    odd = ModelFacts.from_config({"model_type": "somethingnew", "num_hidden_layers": 64, "vocab_size": 10})
    assert (odd.modality, odd.num_layers, odd.decoder) == ("text", None, None)  # unknown depth: never refused


@pytest.mark.parametrize("name, fields, task, params", [
    ("bert", {"config.freeze.first_n_layers": 3}, TEXT, ["config.freeze.first_n_layers"]),
    ("bert", {"config.freeze.first_n_layers": 2}, TEXT, []),
    ("resnet", {"config.freeze.first_n_layers": 3}, IMAGE, ["config.freeze.first_n_layers"]),
    ("resnet", {"config.lora": {"r": 4}}, IMAGE, ["config.lora"]),
    ("resnet", {"config.lora": {"target_modules": "all-linear"}}, IMAGE, ["config.lora.target_modules"]),
    ("resnet", {"config.lora": {"target_modules": ["convolution"]}}, IMAGE, []),
    ("convnext", {"config.lora": {}}, IMAGE, []),  # its pointwise convolutions are linear layers
    ("resnet", {"config.gradient_checkpointing": True}, IMAGE, ["config.gradient_checkpointing"]),
    ("convnext", {"config.gradient_checkpointing": False}, IMAGE, ["config.gradient_checkpointing"]),
    ("vit", {"config.gradient_checkpointing": True}, IMAGE, []),
    ("resnet", {"config.dropout": {"hidden": 0.1, "attention": 0.1}}, IMAGE,
     ["config.dropout.hidden", "config.dropout.attention"]),
    ("llama", {"config.dropout.hidden": 0.1}, CAUSAL, ["config.dropout.hidden"]),
    ("llama", {"config.dropout.attention": 0.1}, CAUSAL, []),
    ("vit", {"config.dropout.classifier": 0.2}, IMAGE, ["config.dropout.classifier"]),
    ("vit", {"config.dropout.classifier": 0.2, "config.head.type": "linear"}, IMAGE, []),
    ("vit", {"config.dropout.classifier": 0.2, "config.head": {"type": "linear", "dropout": 0.1}}, IMAGE,
     ["config.dropout.classifier"]),
    ("bert", {"config.dropout.classifier": 0.2, "config.head": {"type": "linear", "dropout": 0.1}}, TEXT, []),
    ("gpt2", {"config.dropout.classifier": 0.2}, TEXT, ["config.dropout.classifier"]),
    ("gpt2", {"config.dropout.classifier": 0.2}, TOKEN, []),
    ("gpt2", {"config.optimizer.head_learning_rate": 1e-3}, CAUSAL, ["config.optimizer.head_learning_rate"]),
    ("gpt2", {"config.freeze.backbone": True}, CAUSAL, ["config.freeze.backbone"]),
    ("gpt2", {"config.optimizer.head_learning_rate": 1e-3, "config.freeze.backbone": True}, TEXT, []),
    ("llama", {"config.optimizer.head_learning_rate": 1e-3, "config.freeze.backbone": True}, CAUSAL, []),
    ("bert", {}, IMAGE, ["model"]),
    ("bert", {"config.max_length": 64}, IMAGE, ["model", "config.max_length"]),
    ("resnet", {}, TEXT, ["model"]),
    ("vit", {}, CAUSAL, ["model"]),
])
def test_what_only_the_model_tells(folders, name, fields, task, params):
    assert refused(fields, task=task, model=model_facts(folders[name])) == params


def test_a_task_the_model_cannot_do_names_the_task_when_the_request_did(folders):
    spec = spec_of(task="image-classification")
    assert [r.param for r in inapplicable_fields(spec, model=model_facts(folders["bert"]))] == ["task"]


# Builders of the engine's own models for the architectures of the tables above.
ENGINE_MODELS = {
    "bert": ("BertConfig", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=37,
                                vocab_size=99), "AutoModelForSequenceClassification", TEXT),
    "gpt2": ("GPT2Config", dict(n_layer=3, n_embd=32, n_head=2, vocab_size=99, bos_token_id=0, eos_token_id=0),
             "AutoModelForCausalLM", CAUSAL),
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                  intermediate_size=37, vocab_size=99, tie_word_embeddings=False),
              "AutoModelForCausalLM", CAUSAL),
    "vit": ("ViTConfig", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=37,
                              image_size=32, patch_size=8), "AutoModelForImageClassification", IMAGE),
    "resnet": ("ResNetConfig", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
               "AutoModelForImageClassification", IMAGE),
    "convnext": ("ConvNextConfig", dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
                 "AutoModelForImageClassification", IMAGE),
}


@pytest.mark.parametrize("name", sorted(ENGINE_MODELS))
def test_model_facts_agree_with_the_engine(name, tmp_path):
    """What the tables say of an architecture is what the engine does with such a model."""
    import transformers

    from core.layers import layer_map
    from core.surgery import prepare_model

    config_class, values, auto_class, task = ENGINE_MODELS[name]
    config = getattr(transformers, config_class)(**values, num_labels=3)
    facts = model_facts(saved(tmp_path, config))

    def build():
        return getattr(transformers, auto_class).from_config(config)

    def fails(**fields) -> bool:
        try:
            prepare_model(build(), TrainingConfig.model_validate(nested(fields)), task=task)
        except EngineError:
            return True
        return False

    assert facts.num_layers == len(layer_map(build()).blocks)
    assert fails(gradient_checkpointing=True) == (facts.gradient_checkpointing is False)
    for kind in ("hidden", "attention"):
        assert fails(**{f"dropout.{kind}": 0.1}) == (kind in facts.dropout_absent), kind
    if task != CAUSAL:
        assert fails(**{"dropout.classifier": 0.1}) == (task in facts.headless_dropout_tasks)
    assert fails(lora={}) == facts.linear_free
    if task == CAUSAL:  # a tied output layer is no head: freezing the backbone leaves nothing to train
        assert fails(**{"freeze.backbone": True}) == bool(facts.tied_embeddings)


def test_refusing_needs_no_torch():
    code = "import sys, core.applicability; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_refusal_is_a_plain_record():
    assert Refusal("config.packing", "why") == Refusal("config.packing", "why")


def test_evaluations_per_epoch_yields_to_eval_every_steps():
    assert refused({"config.eval_every_steps": 10, "config.evaluations_per_epoch": 2}) == ["config.evaluations_per_epoch"]
    assert refused({"config.evaluations_per_epoch": 2}) == []
    assert refused({"config.evaluations_per_epoch": 2}, validation=False) == ["config.evaluations_per_epoch"]


def test_a_search_objective_must_be_a_metric_of_the_task():
    assert refused({"config.search.objective.metric": "perplexity"}, task=TEXT) == ["config.search.objective.metric"]
    assert refused({"config.search.objective.metric": "perplexity"}, task=CAUSAL) == []
    assert refused({"config.search.trials": 3}, validation=False) == ["config.search"]


@pytest.mark.parametrize("fields, data, params", [
    ({"hyperparameters.beta": 0.2}, None, ["hyperparameters.beta"]),  # DPO's fields on a supervised job
    ({"config.dpo.loss_type": "ipo"}, None, ["config.dpo"]),
    ({"method": "dpo", "config.packing": True, "config.train_on_inputs": True}, None,
     ["config.packing", "config.train_on_inputs"]),
    ({"method": "dpo", "config.metric_for_best_model": "perplexity"}, None, ["config.metric_for_best_model"]),
    ({"method": "dpo", "config.metric_for_best_model": "rewards/accuracies"}, None, []),
    ({"method": "dpo"}, DataFacts(row_shapes=frozenset({"messages"})), ["method"]),  # DPO needs preference rows
    ({"method": "dpo"}, DataFacts(row_shapes=frozenset({"preference"})), []),
])
def test_what_a_dpo_job_can_take(fields, data, params):
    assert refused(fields, task=CAUSAL, data=data) == params
