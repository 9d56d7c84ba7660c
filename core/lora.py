"""LoRA: peft's adapters on the model, and exported weights that load without peft.

Parameter names of the wrapped model map back to the model's own through core.layers.original_name.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from core.errors import EngineError
from core.heads import head_module_names
from core.spec import LoraConfig, Task

PEFT_TASK_TYPES = {
    Task.TEXT_CLASSIFICATION: "SEQ_CLS",
    Task.IMAGE_CLASSIFICATION: "SEQ_CLS",
    Task.TOKEN_CLASSIFICATION: "TOKEN_CLS",
    Task.CAUSAL_LM: "CAUSAL_LM",
}


def is_peft(model: torch.nn.Module) -> bool:
    """Whether `model` is peft's PeftModel."""
    # Duck typing keeps peft out of the imports: PeftModel is the only wrapper with this method.
    return callable(getattr(model, "get_base_model", None))


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside peft's PeftModel; any other model itself."""
    return model.get_base_model() if is_peft(model) else model


def apply_lora(model: torch.nn.Module, config: LoraConfig, *, task: Task):
    """Wrap the model in peft's LoRA; the head (new, randomly initialised) trains in full.

    Args:
        model: a transformers model (head already in place).
        config: rank, alpha, dropout and target modules (None: peft's default for the
            architecture; "all-linear": every linear layer but the output; a list of module
            names or name suffixes).
        task: picks peft's task type; classification heads go to modules_to_save.

    Returns:
        The peft.PeftModel (the model is modified in place, its base weights frozen).

    Raises:
        EngineError: param config.lora.target_modules when peft has no default for the
            architecture or a listed name matches no module.
    """
    import peft

    heads = head_module_names(model) if task != Task.CAUSAL_LM else []
    lora = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=_lora_targets(model, config.target_modules, heads=heads),
        task_type=PEFT_TASK_TYPES[task],
        modules_to_save=heads or None,
    )
    try:
        return peft.get_peft_model(model, lora)
    except ValueError as e:  # peft's NoMatchingPeftModuleError is one
        raise EngineError(f"LoRA cannot be applied: {e}", param="config.lora.target_modules") from None


def _lora_targets(model: torch.nn.Module, targets: list[str] | str | None, *, heads: list[str]) -> list[str] | str:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    linears = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.split(".", 1)[0] not in heads]
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linears})
    if targets is None:
        # peft's table covers the common language models; anything else (ViT, ConvNeXt, ...)
        # gets adapters on every linear layer but the head, as QLoRA recommends.
        model_type = getattr(model.config, "model_type", None)
        if model_type in DEFAULTS:
            return list(DEFAULTS[model_type])
        if not linears:
            raise EngineError(
                f"A {model_type} model has no linear layers outside its head for LoRA (convolutional "
                "networks have none); fine-tune it fully, or freeze part of it (config.freeze).",
                param="config.lora.target_modules",
            )
        return "all-linear"
    if targets == "all-linear":
        return targets
    names = [name for name, _ in model.named_modules()]
    # peft's rule for a list: a module is targeted when its name equals a target or ends in ".target".
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise EngineError(
            f"config.lora.target_modules: {missing} match no module of {type(model).__name__}; "
            f"its linear layers are named {suffixes}.",
            param="config.lora.target_modules",
        )
    return list(targets)


def export_weights(
    model: torch.nn.Module,
    out_dir: Path,
    save: Callable[[torch.nn.Module, Path], None],
    *,
    lora: LoraConfig | None,
    base_model_name: str | None = None,
) -> torch.nn.Module:
    """Save the trained weights as the job's output folder.

    A plain model is saved with `save(model, out_dir)`. A peft model always leaves its adapter in
    out_dir/adapter (peft's format: PeftModel.from_pretrained(base, out_dir / "adapter")). With
    lora.merge_on_export (the default), the adapter is merged into a copy of the model (the
    training model keeps its adapter) and `save(merged, out_dir)` writes full weights that load
    with plain transformers. Without it, only adapter/ is written, by `save(model, out_dir /
    "adapter")` (so the processor goes with it), and its adapter_config.json names the base model.

    Args:
        model: the trained model, a PeftModel or not.
        out_dir: the export folder.
        save: the task adapter's save (weights, config, processor) of a model to a folder.
        lora: the job's config.lora.
        base_model_name: written as base_model_name_or_path in adapter_config.json (the model as
            the user named it, rather than the local folder it was loaded from).

    Returns:
        The model that was saved: `model`, or the merged copy.
    """
    if not is_peft(model):
        save(model, out_dir)
        return model
    adapter_dir = Path(out_dir) / "adapter"
    if lora is not None and not lora.merge_on_export:
        save(model, adapter_dir)
        _name_base_model(adapter_dir, base_model_name)
        return model
    model.save_pretrained(adapter_dir)
    _name_base_model(adapter_dir, base_model_name)
    # A copy: merging changes the base weights, and the training model may still be evaluated.
    merged = copy.deepcopy(model).merge_and_unload()
    save(merged, out_dir)
    return merged


def _name_base_model(adapter_dir: Path, base_model_name: str | None) -> None:
    if base_model_name is None:
        return
    path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(path.read_text())
    adapter_config["base_model_name_or_path"] = base_model_name
    path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))


