"""What is done to the network before training: dropout, a new head, freezing, LoRA, checkpointing.

`prepare_model` is the one entry point the engine calls after the task adapter built the model (the
adapter already called `replace_head`). The other functions are the steps it runs, public so that
adapters, the exporter and the predictor can call the one they need:

- `apply_dropout`: override the hidden / attention / classifier dropout probabilities.
- `replace_head` / `restore_head`: a `ClassifierHead` (MLP, batch norm, dropout) in place of the
  head's final linear layer, recorded in `config.lathe_head` so an exported model can be rebuilt.
- `apply_freezing` and the `GradualUnfreezing` callback: parameters kept fixed, for the whole run
  or until the schedule reaches their layer group.
- `apply_lora` / `export_weights`: peft adapters, and exported weights that load without peft.
- `enable_gradient_checkpointing`.

Parameter names: the LayerMap and the frozen names are always those of the model *before* peft
wrapped it; `original_name` maps a wrapped model's parameter name back to one of them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.callbacks import Callback, Control, TrainState
from core.errors import EngineError
from core.layers import LayerMap, layer_map
from core.spec import (
    DropoutConfig,
    FreezeConfig,
    GradualUnfreezingConfig,
    HeadConfig,
    LoraConfig,
    Task,
    TrainingConfig,
)

# Config attributes that hold each kind of dropout, across the architectures transformers ships
# (BERT/ViT: *_prob; GPT-2/Phi: *_pdrop; Falcon/Bloom: hidden_dropout; DistilBERT/BART: dropout).
HIDDEN_DROPOUT_KEYS = ("hidden_dropout_prob", "hidden_dropout", "resid_pdrop", "embd_pdrop", "dropout", "dropout_rate")
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")
CLASSIFIER_DROPOUT_KEYS = ("classifier_dropout", "seq_classif_dropout")

DEFAULT_HEAD_DROPOUT = 0.1

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}

# peft's wrapper names every parameter of the wrapped model with this prefix.
PEFT_PREFIX = "base_model.model."

PEFT_TASK_TYPES = {
    Task.TEXT_CLASSIFICATION: "SEQ_CLS",
    Task.IMAGE_CLASSIFICATION: "SEQ_CLS",
    Task.TOKEN_CLASSIFICATION: "TOKEN_CLS",
    Task.CAUSAL_LM: "CAUSAL_LM",
}


# --- Entry point ---------------------------------------------------------------------------------


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
        _freeze_adapters_of(model, frozen)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, layers, frozen


def original_name(name: str) -> str:
    """The parameter name, in the model before peft wrapped it, that `name` stands for.

    A LoRA matrix ("...query.lora_A.default.weight") stands for the weight it adapts
    ("...query.weight"); a wrapped base weight ("...query.base_layer.weight") and a head copy
    ("classifier.modules_to_save.default.weight") for the original. Other names are unchanged.
    """
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    kept: list[str] = []
    parts = name.split(".")
    i = 0
    while i < len(parts):
        part = parts[i]
        if part.startswith("lora_"):
            return ".".join([*kept, "weight"])
        if part == "modules_to_save":
            i += 2  # the wrapper and the adapter name ("default") after it
            continue
        if part not in ("base_layer", "original_module"):
            kept.append(part)
        i += 1
    return ".".join(kept)


# --- Dropout -------------------------------------------------------------------------------------


def apply_dropout(model: torch.nn.Module, config: DropoutConfig) -> None:
    """Override dropout probabilities: the config attributes and the modules that read them.

    Modules read their probability in two ways: an nn.Dropout child (BERT) or a float attribute
    read at forward time (Llama's `self.attention_dropout`). Both are set. Which kind a site is
    follows transformers' naming (see `_dropout_kind`): anything outside the backbone is the
    classifier's; inside it, attention-probability dropout lives in *Attention modules or is
    named attn/attention; the rest is hidden-state dropout. A `ClassifierHead` whose dropout was
    fixed by config.head.dropout keeps it.

    Args:
        model: a transformers model (not yet wrapped by peft).
        config: the probabilities; None keeps the model's own.

    Raises:
        EngineError: param config.dropout.<kind> when a probability > 0 is asked of a model that
            has no such dropout (Llama has no hidden dropout), since it could not take effect.
    """
    sites = _dropout_sites(model)
    for kind, p, keys in (
        ("hidden", config.hidden, HIDDEN_DROPOUT_KEYS),
        ("attention", config.attention, ATTENTION_DROPOUT_KEYS),
        ("classifier", config.classifier, CLASSIFIER_DROPOUT_KEYS),
    ):
        if p is None:
            continue
        present = [k for k in keys if _is_probability(getattr(model.config, k, None))]
        if kind == "classifier":
            # What transformers' heads read when built: the exported config then says what the
            # head trained with, even on models whose config did not have it.
            present = list(dict.fromkeys([*present, "classifier_dropout"]))
        # A config key alone counts for hidden/attention (some modules read self.config at forward
        # time); heads read classifier_dropout only when built.
        if p > 0 and not sites[kind] and (kind == "classifier" or not present):
            raise EngineError(
                f"config.dropout.{kind}={p} cannot take effect: {type(model).__name__} has no {kind} dropout.",
                param=f"config.dropout.{kind}",
            )
        for key in present:
            setattr(model.config, key, float(p))
        for owner, attr in sites[kind]:
            value = getattr(owner, attr)
            if isinstance(value, nn.Dropout):
                value.p = float(p)
            else:
                setattr(owner, attr, float(p))


def _is_probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dropout_sites(model: torch.nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """(owner module, attribute name) of every dropout in the model, by kind."""
    in_backbone = {id(m) for m in getattr(model, "base_model", model).modules()}
    fixed: set[int] = set()
    for module in model.modules():
        if isinstance(module, ClassifierHead) and module.fixed_dropout:
            fixed.update(id(m) for m in module.modules())
    sites: dict[str, list[tuple[nn.Module, str]]] = {"hidden": [], "attention": [], "classifier": []}
    for owner in model.modules():
        if id(owner) in fixed:
            continue
        candidates = [attr for attr, child in owner.named_children() if isinstance(child, nn.Dropout)]
        candidates += [attr for attr, value in vars(owner).items()
                       if isinstance(value, float) and "dropout" in attr.lower()]
        for attr in candidates:
            kind = _dropout_kind(owner, attr, in_backbone=id(owner) in in_backbone)
            if kind is not None:
                sites[kind].append((owner, attr))
    return sites


def _dropout_kind(owner: nn.Module, attr: str, *, in_backbone: bool) -> str | None:
    """hidden, attention or classifier; None for dropouts no setting covers (activation dropout)."""
    if not in_backbone:
        return "classifier"
    words = set(attr.lower().split("_"))
    if "activation" in words:
        return None
    # GPT-2's resid_dropout and GPT-NeoX's post_attention_dropout sit in or after attention but
    # drop hidden states.
    if words & {"resid", "hidden", "post", "out", "output"}:
        return "hidden"
    if words & {"attn", "attention"} or (attr == "dropout" and "Attention" in type(owner).__name__):
        return "attention"
    return "hidden"


# --- Classification head -------------------------------------------------------------------------


class _BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that normalises a one-row training batch with its running statistics.

    A batch of one has no variance, so torch refuses it in training mode; the last batch of an
    epoch can be that small, and a job must not fail on it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            training=False, eps=self.eps)
        return super().forward(x)


class ClassifierHead(nn.Module):
    """[Dropout -> Linear -> (BatchNorm1d) -> activation] per hidden size, then Dropout -> Linear.

    Takes (batch, features) or (batch, seq, features): the leading dimensions are flattened so that
    batch norm normalises each feature over all rows (tokens, for token classification).
    """

    def __init__(
        self,
        in_features: int,
        num_outputs: int,
        *,
        hidden_sizes: list[int] | tuple[int, ...] = (),
        activation: str = "gelu",
        batch_norm: bool = False,
        dropout: float = DEFAULT_HEAD_DROPOUT,
        fixed_dropout: bool = False,
    ):
        super().__init__()
        self.fixed_dropout = fixed_dropout  # set by config.head.dropout: apply_dropout leaves it alone
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Dropout(dropout), nn.Linear(width, size)]
            if batch_norm:
                layers.append(_BatchNorm(size))
            layers.append(ACTIVATIONS[activation]())
            width = size
        layers += [nn.Dropout(dropout), nn.Linear(width, num_outputs)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.layers(x.reshape(-1, x.shape[-1]))
        return rows.reshape(*x.shape[:-1], rows.shape[-1])


def replace_head(
    model: torch.nn.Module, config: HeadConfig, *, num_outputs: int, classifier_dropout: float | None
) -> None:
    """Put a ClassifierHead in place of the final linear layer of the model's head.

    The new module keeps the attribute name (BERT's `classifier`, Llama's `score`, the Linear inside
    ResNet's `classifier` Sequential), so the model's forward calls it unchanged. What was done is
    recorded in `model.config.lathe_head` for `restore_head`. type "default" changes nothing.

    Args:
        model: a transformers classification model (not wrapped by peft).
        config: the job's config.head.
        num_outputs: classes, labels or tags (1 for regression).
        classifier_dropout: config.dropout.classifier; the head's dropout when config.dropout is None
            (else DEFAULT_HEAD_DROPOUT).

    Raises:
        EngineError: param config.head.type when the model has no linear head to replace.
    """
    if config.type == "default":
        return
    dropout = config.dropout if config.dropout is not None else classifier_dropout
    _install_head(model, config, num_outputs=num_outputs, dropout=dropout)
    model.config.lathe_head = config.model_dump()


def restore_head(model: torch.nn.Module) -> None:
    """Rebuild the ClassifierHead recorded in `model.config.lathe_head` (nothing when absent).

    For a model loaded from an exported folder: from_pretrained builds the architecture's own head
    (and warns that the ClassifierHead's weights do not fit it); after this call the folder's state
    dict loads exactly, e.g. `model.load_state_dict(safetensors.torch.load_file(dir / "model.safetensors"))`.
    """
    recorded = getattr(model.config, "lathe_head", None)
    if not recorded:
        return
    config = HeadConfig.model_validate(recorded)
    _, _, linear = final_head_linear(model)
    # apply_dropout wrote config.dropout.classifier to classifier_dropout: the head trained with it.
    dropout = config.dropout if config.dropout is not None else getattr(model.config, "classifier_dropout", None)
    _install_head(model, config, num_outputs=linear.out_features, dropout=dropout)


def _install_head(model: torch.nn.Module, config: HeadConfig, *, num_outputs: int, dropout: float | None) -> None:
    parent, attr, linear = final_head_linear(model)
    head = ClassifierHead(
        linear.in_features,
        num_outputs,
        hidden_sizes=config.hidden_sizes,
        activation=config.activation,
        batch_norm=config.batch_norm,
        dropout=dropout if dropout is not None else DEFAULT_HEAD_DROPOUT,
        fixed_dropout=config.dropout is not None,
    )
    setattr(parent, attr, head.to(device=linear.weight.device, dtype=linear.weight.dtype))


def final_head_linear(model: torch.nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent module, attribute, the Linear) of the last linear layer among the head's modules."""
    head_modules = {name.rsplit(".", 1)[0] for name in layer_map(model).head}
    found: tuple[nn.Module, str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name in head_modules:
            parent_name, _, attr = name.rpartition(".")
            found = (model.get_submodule(parent_name), attr, module)
    if found is None:
        raise EngineError(
            f"{type(model).__name__} has no linear classification head to replace; use head.type default.",
            param="config.head.type",
        )
    return found


def _head_module_names(model: torch.nn.Module) -> list[str]:
    """Top-level modules holding the head's parameters (BERT: ["classifier"])."""
    return list(dict.fromkeys(name.split(".", 1)[0] for name in layer_map(model).head))


# --- Freezing ------------------------------------------------------------------------------------


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


def _freeze_adapters_of(model: torch.nn.Module, frozen: set[str]) -> None:
    """Freeze the trainable parameters of a peft model that stand for a frozen original."""
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
        groups = layers.groups()
        group_of = {name: i for i, names in enumerate(groups) for name in names}
        # Names the map does not know go with the top block, as core.optim does for learning rates.
        fallback = len(groups) - 2 if layers.head and len(groups) >= 2 else len(groups) - 1
        self.groups: list[list[torch.nn.Parameter]] = [[] for _ in groups]
        for name, param in model.named_parameters():
            original = original_name(name)
            if param.requires_grad and original not in frozen:
                self.groups[group_of.get(original, fallback)].append(param)

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


# --- LoRA ----------------------------------------------------------------------------------------


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

    heads = _head_module_names(model) if task != Task.CAUSAL_LM else []
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
    if not _is_peft(model):
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


def _is_peft(model: torch.nn.Module) -> bool:
    # Duck typing keeps peft out of the imports: PeftModel is the only wrapper with this method.
    return callable(getattr(model, "get_base_model", None))


def _name_base_model(adapter_dir: Path, base_model_name: str | None) -> None:
    if base_model_name is None:
        return
    path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(path.read_text())
    adapter_config["base_model_name_or_path"] = base_model_name
    path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))


# --- Gradient checkpointing ----------------------------------------------------------------------


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (non-reentrant torch checkpointing).

    Non-reentrant checkpointing gives gradients to the parameters inside a checkpointed block
    whether or not its input requires grad, so LoRA on frozen embeddings needs no
    enable_input_require_grads (transformers calls it anyway for token-input models).

    Raises:
        EngineError: param config.gradient_checkpointing when the architecture does not support it.
    """
    base = model.get_base_model() if _is_peft(model) else model
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
