"""core.spec: value checks name their field; defaults and bounds stay; what was set survives storage."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.spec import HeadConfig, JobSpec, Task, TrainingConfig

BASE = {"model": "base", "training_file": "file-train"}


def error_of(body: dict) -> tuple[str, str]:
    """(dotted location, message) of the one validation error of a JobSpec body."""
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(BASE | body)
    errors = e.value.errors()
    assert len(errors) == 1, errors
    return ".".join(str(p) for p in errors[0]["loc"]), errors[0]["msg"]


@pytest.mark.parametrize("patterns", [["("], [r"\.bias$", "[unclosed"], ["(?P<x>a)(?P<x>b)"], ["*"]])
def test_a_freeze_regex_that_does_not_compile_is_refused_naming_the_field(patterns):
    where, message = error_of({"config": {"freeze": {"patterns": patterns}}})
    assert where == "config.freeze.patterns"
    assert "not a valid Python regex" in message and repr(patterns[-1]) in message


def test_freeze_regexes_that_compile_are_kept():
    patterns = [r"^bert\.embeddings\.", r"layer\.[01]\."]
    spec = JobSpec.model_validate(BASE | {"config": {"freeze": {"patterns": patterns}}})
    assert spec.config.freeze.patterns == [r"^bert\.embeddings\.", r"layer\.[01]\."]


@pytest.mark.parametrize("config, where", [
    ({"head": {"type": "mlp"}}, "config.head.hidden_sizes"),
    ({"head": {"type": "linear", "hidden_sizes": [8]}}, "config.head.hidden_sizes"),
    ({"head": {"type": "default", "batch_norm": True}}, "config.head.batch_norm"),
    ({"optimizer": {"name": "adamw", "nesterov": True}}, "config.optimizer.nesterov"),
    ({"optimizer": {"name": "sgd", "momentum": 0, "nesterov": True}}, "config.optimizer.nesterov"),
    ({"freeze": {"gradual_unfreezing": {}}, "lora": {}}, "config.lora"),
    ({"metric_for_best_model": "bleu"}, "config.metric_for_best_model"),
    ({"early_stopping": {"metric": "bleu"}}, "config.early_stopping.metric"),
    ({"lora": {"target_modules": []}}, "config.lora.target_modules"),
])
def test_value_checks_name_the_field(config, where):
    assert error_of({"config": config})[0] == where


def test_values_that_go_together_validate():
    config = TrainingConfig.model_validate({
        "head": {"type": "mlp", "hidden_sizes": [16], "batch_norm": True},
        "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True},
        "lora": {"target_modules": "all-linear"}, "metric_for_best_model": "f1_macro",
        "early_stopping": {"metric": "accuracy"},
    })
    assert config.head.batch_norm and config.optimizer.nesterov and config.lora.target_modules == "all-linear"


def test_a_full_dump_still_validates():
    """What was stored before (model_dump without exclude_unset), and what heads record, re-validates."""
    config = TrainingConfig.model_validate({"head": {"type": "linear", "dropout": 0.2}, "lora": {}})
    assert TrainingConfig.model_validate(config.model_dump(mode="json")) == config
    assert HeadConfig.model_validate(config.head.model_dump()) == config.head


def test_defaults_and_bounds_are_unchanged():
    assert TrainingConfig().model_dump(mode="json") == {
        "text_column": "text", "label_column": "label", "tokens_column": "tokens", "tags_column": "tags",
        "image_column": "image", "weight_column": None, "problem_type": "auto", "label_separator": None, "max_length": 128,
        "truncation_side": "right", "image_size": None, "packing": False, "train_on_inputs": False,
        "head": {"type": "default", "hidden_sizes": [], "activation": "gelu", "batch_norm": False, "dropout": None},
        "dropout": {"hidden": None, "attention": None, "classifier": None},
        "freeze": {"embeddings": False, "first_n_layers": 0, "patterns": [], "backbone": False,
                   "gradual_unfreezing": None},
        "lora": None,
        "optimizer": {"name": "adamw", "learning_rate": None, "head_learning_rate": None, "layerwise_lr_decay": 1.0,
                      "weight_decay": 0.01, "l1_penalty": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-08,
                      "momentum": 0.9, "nesterov": False},
        "scheduler": {"name": "linear", "warmup_ratio": 0.06, "warmup_steps": None, "num_cycles": 1,
                      "min_lr_ratio": 0.0, "step_size": None, "gamma": 0.5, "plateau_patience": 1,
                      "plateau_factor": 0.5},
        "loss": {"label_smoothing": 0.0, "class_weights": None},
        "augmentation": {"text": None, "image": None},
        "max_grad_norm": 1.0, "max_grad_value": None, "gradient_accumulation_steps": 1, "precision": "auto",
        "gradient_checkpointing": False, "group_by_length": True, "eval_every_steps": None,
        "evaluations_per_epoch": None, "checkpoint_every_steps": None, "metric_for_best_model": "loss",
        "early_stopping": None, "load_best_model_at_end": True, "device": "auto", "max_runtime_seconds": None,
        "search": None, "ensemble": None, "dpo": None, "train_rows": None,
    }
    schema = TrainingConfig.model_json_schema()
    assert schema["properties"]["max_length"]["maximum"] == 32768 and schema["properties"]["max_length"]["minimum"] == 8


def test_the_spec_is_frozen_and_strict():
    spec = JobSpec.model_validate(BASE)
    with pytest.raises(ValidationError):
        spec.seed = 1
    assert error_of({"config": {"packnig": True}})[0] == "config.packnig"


def test_the_stored_form_keeps_what_was_set_and_nothing_else():
    spec = JobSpec.model_validate(BASE | {"hyperparameters": {"n_epochs": 2},
                                          "config": {"freeze": {"patterns": ["x"]}, "early_stopping": {}}})
    stored = spec.model_dump(mode="json", exclude_unset=True)
    assert stored == BASE | {"hyperparameters": {"n_epochs": 2},
                             "config": {"freeze": {"patterns": ["x"]}, "early_stopping": {}}}
    again = JobSpec.model_validate(stored)
    assert again == spec
    assert again.model_fields_set == spec.model_fields_set == {"model", "training_file", "hyperparameters", "config"}
    assert again.config.model_fields_set == {"freeze", "early_stopping"}
    assert again.config.freeze.model_fields_set == {"patterns"}
    assert again.config.early_stopping.model_fields_set == set()
    assert again.hyperparameters.model_fields_set == {"n_epochs"}


def test_auto_epochs_reach_a_minimum_number_of_steps_on_small_sets():
    spec = JobSpec(model="m", training_file="f")
    assert spec.n_epochs() == 3  # the size not known yet
    assert spec.n_epochs(300) == 16  # batch 16: 19 steps a pass; 300 steps would need 16 passes
    assert spec.n_epochs(2000) == 5  # batch 32: 63 steps a pass
    assert spec.n_epochs(9000) == 3  # 282 steps a pass: the floor of 3
    assert spec.n_epochs(60) == 16  # capped
    accumulating = JobSpec(model="m", training_file="f", config={"gradient_accumulation_steps": 4})
    assert accumulating.n_epochs(2000) == 16  # 16 optimizer steps a pass
    assert JobSpec(model="m", training_file="f", hyperparameters={"n_epochs": 2}).n_epochs(300) == 2
    assert spec.resolved_hyperparameters(300)["n_epochs"] == 16


def test_auto_learning_rate_of_an_encoder_falls_with_its_size():
    spec = JobSpec(model="m", training_file="f")
    assert spec.learning_rate(Task.TEXT_CLASSIFICATION, 22_700_000) == pytest.approx(1e-4)
    assert spec.learning_rate(Task.TEXT_CLASSIFICATION, 110_000_000) == pytest.approx(4.54e-5, rel=0.01)
    assert spec.learning_rate(Task.TEXT_CLASSIFICATION, 3_000_000_000) == pytest.approx(2e-5)
    assert spec.learning_rate(Task.TEXT_CLASSIFICATION, 40_000) == pytest.approx(1e-4)  # never above
    assert spec.learning_rate(Task.TEXT_CLASSIFICATION) == pytest.approx(5e-5)  # size not known
    assert spec.learning_rate(Task.TOKEN_CLASSIFICATION, 22_700_000) == pytest.approx(1e-4)
    lora = JobSpec(model="m", training_file="f", config={"lora": {}})
    assert lora.learning_rate(Task.TEXT_CLASSIFICATION, 22_700_000) == pytest.approx(2e-3)
    assert spec.learning_rate(Task.IMAGE_CLASSIFICATION, 11_000_000) == pytest.approx(1e-3)
    doubled = JobSpec(model="m", training_file="f", hyperparameters={"learning_rate_multiplier": 2})
    assert doubled.learning_rate(Task.TEXT_CLASSIFICATION, 22_700_000) == pytest.approx(2e-4)
    assert doubled.resolved_hyperparameters(100, Task.TEXT_CLASSIFICATION, 22_700_000)["learning_rate_multiplier"] == 2
