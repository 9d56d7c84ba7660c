"""A tiny causal LM (Llama) with its own byte-level BPE tokenizer and a ChatML chat template, built on
the spot for tests and benchmarks; nothing is downloaded.

The tokenizer is trained in milliseconds on the texts given, has ChatML's special tokens
(<|im_start|>, <|im_end|> as eos) and a pad token distinct from eos, so that tests can tell padding
from end-of-turn tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PAD, EOS, IM_START = "<pad>", "<|im_end|>", "<|im_start|>"

# ChatML, as SmolLM2 and Qwen use it, without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same template with transformers' {% generation %} markers around what the assistant says,
# so that `return_assistant_tokens_mask` gives an independent reference for the label mask.
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
FRUITS = ["apple", "lime", "berry", "banana", "plum", "mango", "olive", "coconut"]


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 400, chat_template: str | None = CHATML_TEMPLATE):
    """A fast byte-level BPE tokenizer trained on `texts`, with ChatML specials and a chat template.

    Args:
        texts: the training corpus (any text: byte-level BPE covers every input).
        vocab_size: target vocabulary size, special tokens included.
        chat_template: the Jinja chat template to set; None leaves the tokenizer without one.

    Returns:
        A transformers PreTrainedTokenizerFast (eos <|im_end|>, pad <pad>, no bos).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, IM_START],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START]})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_llama(
    dir: Path,
    *,
    texts: Iterable[str] | None = None,
    tokenizer=None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 400,
    max_positions: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a tiny LlamaForCausalLM (safetensors) and its tokenizer to `dir`.

    Args:
        dir: the folder to create.
        texts: corpus for `build_tokenizer` (default: the chat rows of `chat_rows`).
        tokenizer: use this tokenizer instead of training one.
        hidden_size, num_layers, num_heads: the model's size (2 key/value heads: grouped-query attention).
        vocab_size: target size of a trained tokenizer.
        max_positions: max_position_embeddings (RoPE: only a bound).
        seed: torch seed of the random initialisation.

    Returns:
        `dir`, loadable with AutoModelForCausalLM / AutoTokenizer.from_pretrained.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        corpus = texts if texts is not None else corpus_of(chat_rows(64, seed=0))
        tokenizer = build_tokenizer(corpus, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return dir


def chat_rows(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """OpenAI chat rows with a learnable rule: "what goes with COLOR?" -> that color's fruit.

    Some rows carry a system message and some a second user/assistant exchange, so that masking
    is tested over several turns.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randrange(len(COLORS))
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "You answer with one fruit."})
        messages += [
            {"role": "user", "content": f"what goes with {COLORS[k]}?"},
            {"role": "assistant", "content": f"{FRUITS[k]} goes with {COLORS[k]}."},
        ]
        if i % 4 == 1:
            j = rng.randrange(len(COLORS))
            messages += [
                {"role": "user", "content": f"and {COLORS[j]}?"},
                {"role": "assistant", "content": f"{FRUITS[j]}."},
            ]
        rows.append({"messages": messages})
    return rows


def corpus_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every string in chat / prompt-completion / alpaca / text rows, for training a tokenizer."""
    texts = []
    for row in rows:
        for key, value in row.items():
            if key == "messages":
                texts += [m["content"] for m in value] + [m["role"] for m in value]
            elif isinstance(value, str):
                texts.append(value)
    return texts


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as JSON Lines; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def preference_rows(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """OpenAI DPO rows on `chat_rows`' rule: the preferred answer names the color's fruit, the
    non-preferred one another fruit. Some prompts carry a system message or an earlier exchange."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randrange(len(COLORS))
        wrong = (k + 1 + rng.randrange(len(FRUITS) - 1)) % len(FRUITS)
        messages = [{"role": "system", "content": "You answer with one fruit."}] if i % 3 == 0 else []
        if i % 4 == 1:
            j = rng.randrange(len(COLORS))
            messages += [{"role": "user", "content": f"what goes with {COLORS[j]}?"},
                         {"role": "assistant", "content": f"{FRUITS[j]} goes with {COLORS[j]}."}]
        messages.append({"role": "user", "content": f"what goes with {COLORS[k]}?"})
        rows.append({"input": {"messages": messages, "tools": [], "parallel_tool_calls": True},
                     "preferred_output": [{"role": "assistant", "content": f"{FRUITS[k]} goes with {COLORS[k]}."}],
                     "non_preferred_output": [{"role": "assistant",
                                               "content": f"{FRUITS[wrong]} goes with {COLORS[k]}."}]})
    return rows
