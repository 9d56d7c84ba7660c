"""Parameters kept fixed: for the whole run (`apply_freezing`, config.freeze) or until the gradual
unfreezing schedule reaches their layer group (the `GradualUnfreezing` callback)."""

from __future__ import annotations

import re
from typing import Any

import torch

from core.callbacks import Callback, Control, TrainState
from core.errors import EngineError
from core.layers import LayerMap, original_name
from core.spec import FreezeConfig, GradualUnfreezingConfig


def apply_freezing(model: torch.nn.Module, config: FreezeConfig, layers: LayerMap) -> list[str]:
    """Set requires_grad=False on the parameters config.freeze names.

    Args:
        model: the model (not wrapped by peft).
        config: embeddings, the first N blocks, regexes (re.search on parameter names), backbone
            (all but the head). Gradual unfreezing is the GradualUnfreezing callback's.
        layers: the model's layer map.

    Returns:
        The frozen parameter names, in model order.

    Raises:
        EngineError: param config.freeze.patterns for an invalid regex or one that matches no
            parameter; config.freeze.first_n_layers when N exceeds the blocks; config.freeze when
            nothing would remain trainable.
    """
    names = [name for name, _ in model.named_parameters()]
    chosen: set[str] = set()
    if config.embeddings:
        chosen.update(layers.embeddings)
    if config.first_n_layers > len(layers.blocks):
        raise EngineError(
            f"config.freeze.first_n_layers={config.first_n_layers} but the model has {len(layers.blocks)} blocks.",
            param="config.freeze.first_n_layers",
        )
    for block in layers.blocks[: config.first_n_layers]:
        chosen.update(block)
    for pattern in config.patterns:
        chosen.update(_matching(pattern, names))
    if config.backbone:
        chosen.update(set(names) - set(layers.head))
    params = dict(model.named_parameters())
    if not any(p.requires_grad for name, p in params.items() if name not in chosen):
        raise EngineError("config.freeze leaves no parameter to train.", param="config.freeze")
    frozen = [name for name in names if name in chosen]
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


def _matching(pattern: str, names: list[str]) -> list[str]:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise EngineError(f"Invalid regex {pattern!r} in config.freeze.patterns: {e}.",
                          param="config.freeze.patterns") from None
    matched = [name for name in names if regex.search(name)]
    if not matched:
        raise EngineError(
            f"config.freeze.patterns: {pattern!r} matches no parameter (names look like {names[0]!r}).",
            param="config.freeze.patterns",
        )
    return matched


def freeze_adapters_of(model: torch.nn.Module, frozen: set[str]) -> None:
    """Freeze the trainable parameters of a peft model that stand for a frozen original.

    Raises:
        EngineError: param config.freeze when no adapter or head is left to train.
    """
    for name, param in model.named_parameters():
        if param.requires_grad and original_name(name) in frozen:
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise EngineError("config.freeze leaves no LoRA adapter or head to train.", param="config.freeze")


class GradualUnfreezing(Callback):
    """ULMFiT's gradual unfreezing: the head trains alone, then one layer group joins from the top
    every `config.every_steps` optimizer steps (every epoch when None).

    The stage is a function of state.step, so a resumed run is at the same stage. The schedule
    manages the parameters trainable when it is built (after prepare_model), except `frozen`:
    peft's base weights and config.freeze's stay frozen. Parameters of frozen groups get no
    gradient, and torch's optimizers skip a parameter whose .grad is None (the engine zeroes grads
    with set_to_none=True), so they receive no update at all, weight decay included. Build the
    optimizer over all managed parameters before on_train_begin freezes them.

    Unlike the other callbacks this one acts on the model (requires_grad): the schedule is a
    training-state matter, and a callback is where the engine gives it the step.
    """

    def __init__(self, model: torch.nn.Module, layers: LayerMap, config: GradualUnfreezingConfig, frozen: set[str]):
        self.every_steps = config.every_steps
        self.stage = 0
        named = layers.named_groups()
        position = {layer: i for i, (layer, _) in enumerate(named)}
        self.groups: list[list[torch.nn.Parameter]] = [[] for _ in named]
        # Names the map does not know go with the top block, as they do for the optimizer's learning rates.
        for name, param in model.named_parameters():
            if param.requires_grad and original_name(name) not in frozen:
                self.groups[position.get(layers.layer_of(name), len(named) - 1)].append(param)

    def stage_at(self, state: TrainState) -> int:
        """Groups unfrozen below the top one after `state.step` optimizer steps."""
        every = self.every_steps or max(1, state.steps_per_epoch)
        return min(state.step // every, len(self.groups) - 1)

    def on_train_begin(self, state: TrainState, control: Control) -> None:
        self._set_stage(self.stage_at(state))

    def on_step_end(self, state: TrainState, control: Control) -> None:
        stage = self.stage_at(state)
        if stage != self.stage:
            self._set_stage(stage)

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set_stage(int(state["stage"]))

    def _set_stage(self, stage: int) -> None:
        self.stage = stage
        first_trainable = len(self.groups) - 1 - stage
        for i, params in enumerate(self.groups):
            for param in params:
                param.requires_grad_(i >= first_trainable)

