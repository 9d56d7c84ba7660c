"""Dropout probabilities set by the job: hidden, attention and classifier dropout."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.errors import EngineError
from core.heads import ClassifierHead
from core.spec import DropoutConfig

# Config attributes that hold each kind of dropout, across the architectures transformers ships
# (BERT/ViT: *_prob; GPT-2/Phi: *_pdrop; Falcon/Bloom: hidden_dropout; DistilBERT/BART: dropout).
HIDDEN_DROPOUT_KEYS = ("hidden_dropout_prob", "hidden_dropout", "resid_pdrop", "embd_pdrop", "dropout", "dropout_rate")
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")
CLASSIFIER_DROPOUT_KEYS = ("classifier_dropout", "seq_classif_dropout")


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
