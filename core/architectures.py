"""What a base model's config.json tells without torch: its family, depth and the parts the
toolbox needs (dropout sites, linear layers for LoRA, gradient checkpointing, tied embeddings).

The tables below were measured on tiny models of each family and are re-checked against the engine
by tests/core/test_applicability.py; an unknown `model_type` gives no facts, and nothing is refused
for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.spec import Task

TEXT, IMAGE = Task.TEXT_CLASSIFICATION, Task.IMAGE_CLASSIFICATION


@dataclass(frozen=True)
class ModelFacts:
    """What a base model's config.json tells, torch-free. None / empty: not known."""

    model_type: str | None
    modality: Literal["text", "vision"] | None = None
    decoder: bool | None = None  # a causal LM family (GPT-2, Llama, ...)
    num_layers: int | None = None  # blocks/stages as core.layers counts them (freeze.first_n_layers)
    linear_free: bool = False  # no linear layer outside the head: LoRA's default targets find nothing
    gradient_checkpointing: bool | None = None
    tied_embeddings: bool | None = None  # the output layer shares the input embeddings (causal-lm)
    dropout_absent: frozenset[str] = frozenset()  # "hidden" / "attention": no such dropout in the network
    headless_dropout_tasks: frozenset[Task] = frozenset()  # tasks whose own head has no dropout

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelFacts:
        """From the parsed config.json of a Hugging Face model folder."""
        kind = config.get("model_type")
        kind = kind if isinstance(kind, str) else None
        vision = kind in VISION or ("num_channels" in config and "vocab_size" not in config)
        text = kind in ENCODERS or kind in DECODERS or ("vocab_size" in config and "num_channels" not in config)
        tied = config.get("tie_word_embeddings")
        return cls(
            model_type=kind,
            modality="vision" if vision else "text" if text else None,
            decoder=True if kind in DECODERS else False if kind in ENCODERS or kind in VISION else None,
            num_layers=_num_layers(kind, config),
            linear_free=kind in LINEAR_FREE,
            gradient_checkpointing=False if kind in NO_GRADIENT_CHECKPOINTING else None,
            tied_embeddings=tied if isinstance(tied, bool) else None,
            dropout_absent=frozenset(k for k, kinds in NO_DROPOUT.items() if kind in kinds),
            headless_dropout_tasks=frozenset(t for t, kinds in HEAD_WITHOUT_DROPOUT.items() if kind in kinds),
        )


def model_facts(folder: Path) -> ModelFacts | None:
    """The ModelFacts of a local model folder; None without a readable config.json (a hub id, a GGUF file)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return ModelFacts.from_config(config) if isinstance(config, dict) else None


# --- Architecture tables (model_type as in config.json) ----------------------------------------

ENCODERS = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta", "deberta-v2", "mpnet",
                      "modernbert", "distilbert", "albert"})
DECODERS = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt_neox",
                      "opt", "falcon", "granite", "olmo", "smollm3", "gpt_neo", "bloom"})
VISION = frozenset({"vit", "deit", "dinov2", "beit", "resnet", "regnet", "convnext", "convnextv2", "swin", "swinv2",
                    "efficientnet", "mobilenet_v1", "mobilenet_v2", "mobilevit"})
# The config key that counts the block stack core.layers finds ("depths": a list, one per stage).
LAYER_KEYS = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta", "deberta-v2", "mpnet",
                     "modernbert", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt_neox",
                     "opt", "falcon", "granite", "olmo", "smollm3", "vit", "deit", "dinov2", "beit"],
                    "num_hidden_layers"),
    "gpt2": "n_layer", "bloom": "n_layer", "distilbert": "n_layers", "gpt_neo": "num_layers",
    "albert": "num_hidden_groups",  # ALBERT shares its layers: the stack is one block per group
    **dict.fromkeys(["resnet", "regnet", "convnext", "convnextv2", "swin", "swinv2"], "depths"),
}
LINEAR_FREE = frozenset({"resnet", "regnet", "efficientnet", "mobilenet_v1", "mobilenet_v2"})
NO_GRADIENT_CHECKPOINTING = frozenset({"resnet", "regnet", "convnext", "convnextv2", "efficientnet", "mobilenet_v1",
                                       "mobilenet_v2", "albert", "mpnet"})
NO_DROPOUT = {
    "hidden": frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "smollm3",
                         "resnet", "regnet", "convnext", "convnextv2", "mobilenet_v1", "mobilenet_v2"}),
    "attention": frozenset({"resnet", "regnet", "convnext", "convnextv2", "efficientnet", "mobilenet_v1",
                            "mobilenet_v2"}),
}
# Architectures whose own head for the task has no dropout (config.dropout.classifier finds nothing).
HEAD_WITHOUT_DROPOUT = {
    TEXT: frozenset({"gpt2", "llama", "qwen2", "qwen3"}),
    IMAGE: frozenset({"vit", "deit", "dinov2", "beit", "resnet", "regnet", "convnext", "convnextv2", "swin", "swinv2"}),
}


def _num_layers(kind: str | None, config: Mapping[str, Any]) -> int | None:
    value = config.get(LAYER_KEYS.get(kind or "", ""))
    if isinstance(value, list):
        value = len(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
