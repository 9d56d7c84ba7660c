"""Where a model's parameters sit in its depth: embeddings, the stack of blocks, the head.

Freezing the first N layers, layer-wise LR decay and gradual unfreezing all need the same map, and
it should not be a table of architecture names. Every Hugging Face model we train is a backbone
(`model.base_model`) holding one stack of identical blocks in an nn.ModuleList (BERT's
encoder.layer, Llama's model.layers, ViT's encoder.layer, ResNet's encoder.stages), plus a head
outside the backbone. Parameters registered before the stack are the embeddings (ResNet's stem
counts as such); those after it (final norm, pooler) go with the top block.

The map always holds the names of the model *before* peft wrapped it; `original_name` maps a
wrapped model's parameter name back to one of them, and `LayerMap.layer_of` places any parameter
name, wrapped or not. Freezing, gradual unfreezing and the optimizer's param groups all place
parameters through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

# peft's wrapper names every parameter of the wrapped model with this prefix.
PEFT_PREFIX = "base_model.model."


@dataclass
class LayerMap:
    """Parameter names by depth, bottom to top."""

    embeddings: list[str] = field(default_factory=list)
    blocks: list[list[str]] = field(default_factory=list)  # blocks[0] is the one nearest the input
    head: list[str] = field(default_factory=list)

    def groups(self) -> list[list[str]]:
        """Bottom-to-top layer groups: [embeddings, block 0, ..., block n-1, head], empty ones dropped."""
        return [names for _, names in self.named_groups()]

    def named_groups(self) -> list[tuple[str, list[str]]]:
        """(layer, names) of `groups()`, the layer "embeddings", "block0" ... "block{n-1}" or "head"."""
        named = [("embeddings", self.embeddings), *((f"block{i}", b) for i, b in enumerate(self.blocks))]
        named.append(("head", self.head))
        return [(layer, names) for layer, names in named if names]

    def layer_of(self, name: str) -> str:
        """The layer ("embeddings", "block3", "head") of a parameter of the model or of peft's wrapper
        of it (see `original_name`); a name the map does not know goes with the top block."""
        top = f"block{len(self.blocks) - 1}" if self.blocks else "embeddings"
        return self._layers.get(original_name(name), top)

    @cached_property
    def _layers(self) -> dict[str, str]:
        # Through original_name too: a map built from a wrapped model has peft's names.
        return {original_name(n): layer for layer, names in self.named_groups() for n in names}


def layer_map(model: torch.nn.Module) -> LayerMap:
    """The LayerMap of a transformers model (names as in `model.named_parameters()`).

    A model with no block stack (a plain MLP) maps everything outside the head to one block.
    """
    names = [name for name, p in model.named_parameters()]
    backbone = getattr(model, "base_model", model)
    prefix = _prefix_of(model, backbone)
    head = [n for n in names if prefix and not n.startswith(prefix)] if backbone is not model else []
    stack_path, stack = _block_stack(backbone)
    body = [n for n in names if n not in set(head)]
    if stack is None:
        return LayerMap(blocks=[body] if body else [], head=head)
    stack_prefix = prefix + (stack_path + "." if stack_path else "")
    blocks: list[list[str]] = [[] for _ in range(len(stack))]
    embeddings: list[str] = []
    top: list[str] = []
    seen_stack = False
    for name in body:
        if name.startswith(stack_prefix):
            index = int(name[len(stack_prefix):].split(".", 1)[0])
            blocks[index].append(name)
            seen_stack = True
        elif seen_stack:
            top.append(name)
        else:
            embeddings.append(name)
    blocks[-1].extend(top)
    return LayerMap(embeddings=embeddings, blocks=[b for b in blocks if b], head=head)


def _prefix_of(model: torch.nn.Module, backbone: torch.nn.Module) -> str:
    if backbone is model:
        return ""
    for name, module in model.named_modules():
        if module is backbone:
            return name + "." if name else ""
    return ""


def _block_stack(backbone: torch.nn.Module) -> tuple[str, torch.nn.ModuleList | None]:
    """The largest ModuleList of same-type modules in the backbone (ties: the shallowest)."""
    best: tuple[int, int, str, torch.nn.ModuleList | None] = (0, 0, "", None)
    for name, module in backbone.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1:
                size = sum(p.numel() for p in module.parameters())
                key = (size, -name.count("."))
                if key > best[:2]:
                    best = (size, -name.count("."), name, module)
    return best[2], best[3]


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
