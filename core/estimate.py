"""What a dry run needs that only the engine's own reading of the data and the model can tell: each
split's examples and tokens as training would see them, and the base model's parameter counts.

`count_inputs` prepares the splits exactly as a training run does (core.adapters: the task's
reader, the base model's tokenizer, max_length truncation, chat templates, rows left without a
target dropped, packing, DPO pairs, config.train_rows draws) and counts, per example, what the
engine's `trained_tokens` counts of a batch holding it (non-padding tokens; 0 for images). It
imports torch (through the adapters), so the torch-free API has a worker's prediction process call
it (worker.predict_child answers a "count" request with `count_inputs` and `model_parameters`).

`weight_parameters` and `parameter_counts` are torch-free.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from core.errors import ModelError
from core.loading import gguf_source
from core.spec import JobSpec, Task

FILE_PARAMS = ("training_file", "validation_file", "test_file")
# Lookup tables: a token's row is read, not multiplied, so they cost no FLOPs per token (Kaplan et
# al. 2020 count "non-embedding" parameters for the same reason). A module of one of these names.
LOOKUPS = frozenset({"word_embeddings", "position_embeddings", "token_type_embeddings", "embed_tokens",
                     "embed_positions", "wte", "wpe"})
TOKEN_TABLES = frozenset({"word_embeddings", "embed_tokens", "wte"})
OUTPUT_LAYERS = ("lm_head", "embed_out")
MAX_HEADER_BYTES = 100 * 1024**2


def parameter_counts(named_shapes: Iterable[tuple[str, Sequence[int]]], *, causal_lm: bool) -> dict[str, int]:
    """{"total": every parameter, "compute": those a token's forward pass multiplies by}.

    compute = total - lookup tables (token, position and segment embeddings), plus, for a causal LM
    whose output layer is tied to its token embeddings (no lm_head tensor of its own), that table
    once more: the vocabulary-wide output projection is a matmul every position pays for.
    """
    total = lookups = token = 0
    output = False
    for name, shape in named_shapes:
        size = math.prod(int(d) for d in shape)
        parts = name.split(".")
        total += size
        if LOOKUPS.intersection(parts):
            lookups += size
            if TOKEN_TABLES.intersection(parts):
                token = max(token, size)
        output = output or any(p in OUTPUT_LAYERS for p in parts)
    compute = total - lookups + (token if causal_lm and not output else 0)
    return {"total": total, "compute": compute}


def weight_parameters(folder: Path, *, causal_lm: bool) -> dict[str, int] | None:
    """`parameter_counts` of a model folder's *.safetensors files, from their headers alone (no
    weights read); None when the folder has none or one is unreadable."""
    shapes: dict[str, Sequence[int]] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    try:
        for path in files:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > MAX_HEADER_BYTES:
                    return None
                header = json.loads(f.read(length))
            shapes.update((name, info["shape"]) for name, info in header.items() if name != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return parameter_counts(shapes.items(), causal_lm=causal_lm) if shapes else None


# GGUF's tensor names (llama.cpp's) for the token table and the output layer, as parameter_counts knows them.
GGUF_NAMES = {"token_embd": "embed_tokens", "output": "lm_head", "position_embd": "position_embeddings",
              "token_types": "token_type_embeddings"}


def gguf_parameters(path: Path, *, causal_lm: bool) -> dict[str, int] | None:
    """`parameter_counts` of a .gguf file from its tensor index (memory-mapped, nothing dequantized):
    each tensor's logical element count, whatever its quantization; None when it does not read."""
    try:
        from gguf import GGUFReader

        tensors = GGUFReader(path).tensors
    except Exception:  # noqa: BLE001 - a size we cannot tell is left out of the estimate, not an error
        return None
    named = []
    for t in tensors:
        first, _, rest = t.name.partition(".")
        named.append((".".join(filter(None, [GGUF_NAMES.get(first, first), rest])), (int(t.n_elements),)))
    return parameter_counts(named, causal_lm=causal_lm) if named else None


def model_parameters(model: str, task: Task, *, local_files_only: bool = False) -> dict[str, int] | None:
    """The base model's `parameter_counts`: from a local folder's safetensors headers (or its GGUF
    file's tensor index), else (a hub
    id) from its config (`local_files_only`: the locally cached one, the hub not asked), the model
    built on the meta device (no weights). None when neither works."""
    causal = task == Task.CAUSAL_LM
    try:
        gguf = gguf_source(model) if model.lower().endswith(".gguf") or Path(model).is_dir() else None
    except ModelError:  # several .gguf files, or a missing one: the run will say so; no size here
        return None
    if gguf is not None:  # an uploaded GGUF model (a folder holding one .gguf), or the file itself
        return gguf_parameters(gguf[0] / gguf[1], causal_lm=causal)
    if Path(model).is_dir():
        return weight_parameters(Path(model), causal_lm=causal)
    try:
        import torch
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(model, trust_remote_code=False, local_files_only=local_files_only)
        with torch.device("meta"):
            built = AutoModel.from_config(config)
    except Exception:  # noqa: BLE001 - a size we cannot tell is left out of the estimate, not an error
        return None
    return parameter_counts(((n, p.shape) for n, p in built.named_parameters()), causal_lm=causal)


# Config fields that never change how a split is read or encoded (the rest may, so they key it).
NOT_ENCODING = frozenset({"train_rows", "search", "ensemble", "optimizer", "scheduler", "lora", "freeze", "dropout",
                          "head", "loss", "augmentation", "metric_for_best_model", "early_stopping", "eval_every_steps",
                          "evaluations_per_epoch", "checkpoint_every_steps", "max_grad_norm", "max_grad_value",
                          "gradient_accumulation_steps", "precision", "gradient_checkpointing", "group_by_length",
                          "load_best_model_at_end", "device", "max_runtime_seconds", "dpo"})


def _encoding_key(spec: JobSpec) -> str:
    """What a split's encoding depends on: the method and the config's data fields (not the seed,
    the training rows drawn or how they are trained on), so children share their parent's."""
    return json.dumps([spec.method, spec.config.model_dump(mode="json", exclude=set(NOT_ENCODING))], sort_keys=True)


def _example_tokens(adapter: Any, split: Any, task: Task) -> list[int]:
    """What the engine's trained_tokens counts for each example (a batch's count is their sum)."""
    if task == Task.IMAGE_CLASSIFICATION:  # images have no tokens (and collating decodes them)
        return [0] * len(split)
    return [adapter.trained_tokens(adapter.collate(split, [i])) for i in range(len(split))]


def count_inputs(model: str, task: Task, files: dict[str, Path | None], specs: Sequence[JobSpec], *,
                 local_files_only: bool = False) -> list[dict[str, Any]]:
    """Examples and tokens of each split, for each spec (a job, or a search's or ensemble's children:
    specs differing only in their training rows share one encoding).

    Args:
        model: the base model's folder or hub id (its tokenizer encodes the text).
        task: the job's task (already inferred).
        files: request field -> local path (None when not given).
        specs: the specs to count for; each one's config.train_rows draw is applied.
        local_files_only: load a hub model's tokenizer or processor from the local cache alone,
            without asking the hub (per call: the process's HF_HUB_OFFLINE is not touched).

    Returns:
        Per spec, {param: {"examples", "tokens"}} for each file given; tokens per pass over the rows.

    Raises:
        DataError, ModelError, EngineError: what training would refuse while encoding (no chat
            template, nothing left within max_length, an unloadable tokenizer, ...).
    """
    from core.adapters import adapter_for
    from core.datasets import parse_files

    encoded: dict[str, tuple[Any, dict[str, list[int]]]] = {}
    runs = []
    for spec in specs:
        key = _encoding_key(spec)
        if key not in encoded:
            adapter = adapter_for(task, spec)
            processor = adapter.load_processor(model, local_files_only=local_files_only)
            _, parsed = parse_files(task, files, spec.config)
            data = adapter.prepare_parsed(parsed, processor)
            splits = {"training_file": data.train, "validation_file": data.validation, "test_file": data.test}
            encoded[key] = (data, {p: _example_tokens(adapter, s, task) for p, s in splits.items() if s is not None})
        data, tokens = encoded[key]
        rows = range(len(data.train))
        if spec.config.train_rows is not None:
            rows = adapter_for(task, spec).drawn_rows(data.train).tolist()
        run = {"training_file": {"examples": len(rows), "tokens": sum(tokens["training_file"][i] for i in rows)}}
        for param in FILE_PARAMS[1:]:
            if param in tokens:
                run[param] = {"examples": len(tokens[param]), "tokens": sum(tokens[param])}
        runs.append(run)
    return runs

