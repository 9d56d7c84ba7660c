"""Tiny transformers models built from configs (no tokenizer, nothing downloaded) for surgery tests.

Each builder seeds torch first, so two calls give the same weights.
"""

from __future__ import annotations

import torch

VOCAB = 64


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    values = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0,
    )
    return BertConfig(**(values | overrides))


def tiny_bert_classifier(num_labels: int = 3, *, seed: int = 0, **overrides):
    """BertForSequenceClassification, 2 blocks of width 32."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels=num_labels, **overrides))


def tiny_bert_tagger(num_labels: int = 5, *, seed: int = 0, **overrides):
    """BertForTokenClassification, 2 blocks of width 32."""
    from transformers import BertForTokenClassification

    torch.manual_seed(seed)
    return BertForTokenClassification(tiny_bert_config(num_labels=num_labels, **overrides))


def tiny_llama(*, seed: int = 0, **overrides):
    """LlamaForCausalLM, 2 blocks of width 32, untied output layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    values = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(LlamaConfig(**(values | overrides)))


def tiny_resnet(num_labels: int = 3, *, seed: int = 0):
    """ResNetForImageClassification with two stages; its head is Sequential(Flatten, Linear)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    return ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=num_labels)
    )


def token_batch(batch: int = 4, seq: int = 6, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random input_ids (no padding) and attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
