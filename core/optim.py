"""The optimisation toolbox: parameter groups, optimizers, L1, clipping (schedules: core.schedules).

Every part is a thin layer over a well-kept implementation: torch's AdamW/Adam/SGD, transformers'
Adafactor and torch's `clip_grad_*_`. What is ours is the wiring the JobSpec asks for: which
parameters decay and which learning rate each layer gets (layer-wise LR decay, a separate head LR).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from transformers.optimization import Adafactor

from core.layers import LayerMap, layer_map
from core.lora import unwrap_peft
from core.spec import OptimizerConfig

# --- Parameter groups ---------------------------------------------------------------------------


def build_param_groups(
    model: torch.nn.Module, config: OptimizerConfig, *, lr: float, layers: LayerMap | None = None
) -> list[dict[str, Any]]:
    """The trainable parameters in optimizer groups by layer (learning rate) and by weight decay.

    Matrices (ndim >= 2) get `config.weight_decay`; biases and norm weights get none. With layer-wise
    LR decay (`config.layerwise_lr_decay` < 1) the top block trains at `lr`, the block below at
    lr x decay, and so on down; the embeddings sit one step below the lowest block. The head trains
    at `config.head_learning_rate` when set, else at `lr`. Parameters the layer map does not know
    go with the top block (core.layers.LayerMap.layer_of places every name, peft's included).

    Args:
        model: the model to train, a transformers model or peft's wrapper of one. Only parameters
            with requires_grad now are included (frozen ones stay out of the optimizer).
        config: the job's optimizer settings.
        lr: the peak learning rate of the top block.
        layers: the model's layer map; default `core.layers.layer_map` of the (unwrapped) model.
            Names may be the wrapped or the unwrapped model's.

    Returns:
        Group dicts with "params", "lr", "weight_decay" and a "name" such as "block3/decay" (layer
        name/decay kind), in the order of named_parameters, none empty. Each trainable parameter is
        in exactly one group. Without layer-wise decay the layers below the head share one "body"
        learning rate, so they make one pair of groups rather than a pair per block (fewer groups,
        fewer kernel launches a step).
    """
    if layers is None:
        layers = layer_map(unwrap_peft(model))
    depths = _layer_depths(layers)
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layers.layer_of(name)
        key, layer_lr = _lr_group(layer, depths.get(layer, 0), config, lr=lr)
        kind, decay = ("decay", config.weight_decay) if param.ndim >= 2 else ("no_decay", 0.0)
        group_name = f"{key}/{kind}"
        group = groups.setdefault(group_name, {"params": [], "lr": layer_lr, "weight_decay": decay, "name": group_name})
        group["params"].append(param)
    return list(groups.values())


def _layer_depths(layers: LayerMap) -> dict[str, int]:
    """Depth below the top block: block i of n at n-1-i, the embeddings at n (one under block 0)."""
    n = len(layers.blocks)
    return {"embeddings": n, **{f"block{i}": n - 1 - i for i in range(n)}}


def _lr_group(layer: str, depth: int, config: OptimizerConfig, *, lr: float) -> tuple[str, float]:
    """The name and learning rate of the lr group a layer's parameters join."""
    if layer == "head":
        if config.head_learning_rate is not None:
            return "head", config.head_learning_rate
        return ("head" if config.layerwise_lr_decay != 1.0 else "body"), lr
    if config.layerwise_lr_decay == 1.0:
        return "body", lr
    return layer, lr * config.layerwise_lr_decay**depth


# --- Optimizers ---------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig, *, lr: float) -> torch.optim.Optimizer:
    """The optimizer `config.name` over `build_param_groups`.

    adamw and adam run fused into one kernel on CPU and CUDA: torch's default AdamW on CPU loops
    over the tensors one by one, for MiniLM-L6 ~90 ms a step against ~16 ms fused, a quarter of a
    batch-32 bf16 step (bench/engine_vs_trainer.py). The fused kernel is the same algorithm;
    transformers' Trainer uses it by default as well.

    Args:
        model: the model to train (only parameters with requires_grad now are optimized).
        config: the job's optimizer settings.
        lr: the peak learning rate (of the top block; see build_param_groups).

    Returns:
        adamw: torch AdamW (decoupled decay); adam: torch Adam (weight_decay x w added to the
        gradient); sgd: torch SGD with momentum/nesterov; adafactor: transformers' Adafactor with
        the external learning rate (no relative step, no parameter scaling).

    Raises:
        ValueError: an optimizer name this function does not know (the spec allows none such).
    """
    groups = build_param_groups(model, config, lr=lr)
    if config.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=_fused(groups)
        )
    if config.name == "adam":
        return torch.optim.Adam(
            groups, lr=lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=_fused(groups)
        )
    if config.name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
        )
    if config.name == "adafactor":
        return Adafactor(
            groups,
            lr=lr,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            beta1=None if config.beta1 == 0 else config.beta1,
            weight_decay=config.weight_decay,
        )
    raise ValueError(f"unknown optimizer {config.name!r}")


def _fused(groups: list[dict[str, Any]]) -> bool | None:
    """True when the fused Adam kernel can take every parameter (floats on CPU or CUDA), else None.

    None, not False: torch then picks its default (foreach) implementation.
    """
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return True if fused else None


# --- Penalties and clipping ---------------------------------------------------------------------


def decayed_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The optimizer's weight matrices (ndim >= 2): those L1 and weight decay apply to."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.ndim >= 2]


def l1_penalty(params: Iterable[torch.nn.Parameter], coefficient: float) -> torch.Tensor:
    """coefficient x sum(|w|) over `params`, a differentiable fp32 scalar to add to the loss.

    Args:
        params: the weights penalised (usually `decayed_parameters(optimizer)`).
        coefficient: the job's `config.optimizer.l1_penalty`.

    Returns:
        A 0-dim float32 tensor on the parameters' device (CPU zero when there are none).
    """
    # Summing in fp32 keeps a bf16 model's penalty from rounding away small weights.
    sums = [p.abs().sum(dtype=torch.float32) for p in params]
    if not sums:
        return torch.zeros((), dtype=torch.float32)
    return coefficient * torch.stack(sums).sum()


def clip_gradients(
    parameters: Iterable[torch.nn.Parameter], *, max_norm: float | None, max_value: float | None
) -> float:
    """Clip gradients by value, then by global norm; return the norm before norm clipping.

    Call it after unscaling (GradScaler.unscale_) so the limits apply to the true gradients.

    Args:
        parameters: the parameters whose .grad to clip (those without a gradient are skipped).
        max_norm: the largest global L2 norm; None: no norm clipping (the norm is still measured).
        max_value: the largest absolute gradient element; None: no value clipping.

    Returns:
        The global gradient norm after value clipping and before norm clipping.
    """
    parameters = list(parameters)
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(parameters, max_value)
    # With norm clipping off an infinite threshold still measures the norm for reporting.
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm is not None else math.inf)
    return float(norm)
