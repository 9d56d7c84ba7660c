"""What is done to the network before training, composed: dropout, freezing, LoRA, checkpointing.

`prepare_model` is the one entry point the engine calls after the task adapter built the model (the
adapter already put its head in place, core.heads). The steps it runs live with their concern:
core.dropout, core.freezing (and the GradualUnfreezing callback), core.lora; gradient
checkpointing, one call into transformers, is here.

Parameter names: the LayerMap and the frozen names are always those of the model *before* peft
wrapped it (core.layers.original_name maps a wrapped model's names back).
"""

from __future__ import annotations

import torch

from core.dropout import apply_dropout
from core.errors import EngineError
from core.freezing import apply_freezing, freeze_adapters_of
from core.layers import LayerMap, layer_map
from core.lora import apply_lora, unwrap_peft
from core.spec import Task, TrainingConfig


def prepare_model(
    model: torch.nn.Module, config: TrainingConfig, *, task: Task
) -> tuple[torch.nn.Module, LayerMap, set[str]]:
    """Dropout, freezing, LoRA and gradient checkpointing, in that order, as `config` asks.

    Freezing applies on top of LoRA: peft freezes the base weights itself, and an adapter (or a
    trainable head copy) of a module that `config.freeze` froze is frozen too.

    Args:
        model: the task adapter's model (head already replaced), fp32.
        config: the job's training config.
        task: the job's task (picks peft's task type).

    Returns:
        (the model to train, a PeftModel with LoRA; its LayerMap, with the names of the model
        before LoRA; the names frozen by config.freeze, same naming).

    Raises:
        EngineError: as apply_dropout, apply_freezing, apply_lora, enable_gradient_checkpointing.
    """
    apply_dropout(model, config.dropout)
    layers = layer_map(model)
    frozen = set(apply_freezing(model, config.freeze, layers))
    if config.lora is not None:
        model = apply_lora(model, config.lora, task=task)
        freeze_adapters_of(model, frozen)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, layers, frozen


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (non-reentrant torch checkpointing).

    Non-reentrant checkpointing gives gradients to the parameters inside a checkpointed block
    whether or not its input requires grad, so LoRA on frozen embeddings needs no
    enable_input_require_grads (transformers calls it anyway for token-input models).

    Raises:
        EngineError: param config.gradient_checkpointing when the architecture does not support it.
    """
    base = unwrap_peft(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise EngineError(
            f"{type(base).__name__} does not support gradient checkpointing.", param="config.gradient_checkpointing"
        )
    kwargs = {"use_reentrant": False}
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias).
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
