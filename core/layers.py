"""Where a model's parameters sit in its depth: embeddings, the stack of blocks, the head.

Freezing the first N layers, layer-wise LR decay and gradual unfreezing all need the same map, and
it should not be a table of architecture names. Every Hugging Face model we train is a backbone
(`model.base_model`) holding one stack of identical blocks in an nn.ModuleList (BERT's
encoder.layer, Llama's model.layers, ViT's encoder.layer, ResNet's encoder.stages), plus a head
outside the backbone. Parameters registered before the stack are the embeddings (ResNet's stem
counts as such); those after it (final norm, pooler) go with the top block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerMap:
    """Parameter names by depth, bottom to top."""

    embeddings: list[str] = field(default_factory=list)
    blocks: list[list[str]] = field(default_factory=list)  # blocks[0] is the one nearest the input
    head: list[str] = field(default_factory=list)

    def groups(self) -> list[list[str]]:
        """Bottom-to-top layer groups: [embeddings, block 0, ..., block n-1, head], empty ones dropped."""
        return [g for g in (self.embeddings, *self.blocks, self.head) if g]


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
