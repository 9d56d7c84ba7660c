"""Loading a base model and its tokenizer, safely.

Only safetensors (or GGUF) weights are accepted and no remote code runs: a user's model folder is
data, never something we unpickle or execute. Causal LMs may also come as a GGUF file, dequantized
into a plain trainable model. torch and transformers are imported by the functions that load.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.cache import InputCache
from core.errors import ModelError

# owner/name or name, as the Hugging Face hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def check_model_source(model: str) -> Path | str:
    """Where a base model comes from: an existing local folder (safetensors weights, or a GGUF
    file, which carries its own config), a .gguf file, or a hub id.

    Raises:
        ModelError: "model_not_found" for a path that does not exist or is not a folder;
            "invalid_model" for a local folder without *.safetensors (or *.gguf) weights.
    """
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path
    if path.is_dir() and any(path.glob("*.gguf")) and not any(path.glob("*.safetensors")):
        return path
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
            found = f" (found {', '.join(pickles[:3])})" if pickles else ""
            raise ModelError(
                f"The model folder {model!r} has no *.safetensors weights{found}. Safetensors weights "
                "are required; pickle weights (.bin/.pt) are refused because loading them can run code.",
                param="model",
                code="invalid_model",
            )
        if not (path / "config.json").is_file():
            raise ModelError(f"The model folder {model!r} has no config.json.", param="model", code="invalid_model")
        return path
    if path.exists() or model.startswith(("/", ".", "~")) or not _HUB_ID.match(model):
        raise ModelError(f"Model {model!r} not found.", param="model", code="model_not_found")
    return model


def load_tokenizer(model: str, *, local_files_only: bool = False):
    """The model's own fast tokenizer; `local_files_only`: a hub id from the local cache alone (no
    request to the hub, whatever the process's HF_HUB_OFFLINE).

    Raises:
        ModelError: model_not_found / invalid_model (no fast tokenizer, unreadable files).
    """
    from transformers import AutoTokenizer

    source = check_model_source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), use_fast=True, trust_remote_code=False,
                                                  local_files_only=local_files_only)
    except OSError as e:
        raise _load_error(model, e) from None
    except (ValueError, KeyError) as e:
        raise ModelError(f"Cannot load the tokenizer of {model!r}: {e}", param="model", code="invalid_model") from None
    return _fast_and_padded(tokenizer, model, missing=" (tokenizer.json)")


def _fast_and_padded(tokenizer, model: str, *, missing: str = ""):
    """`tokenizer`, refused when it is not a fast one (offset mappings and word_ids() need it), with
    a pad token: its own, or else eos or unk (encoders nearly always have one; the fallback is the
    one most fine-tuning scripts use)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{model!r} has no fast tokenizer{missing}.", param="model", code="invalid_model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


# --- causal LMs: safetensors or GGUF ---------------------------------------------------------


def gguf_source(model: str) -> tuple[Path, str] | None:
    """(folder, file name) when `model` is a .gguf file, or a folder holding one *.gguf and no
    *.safetensors; None for anything else (a safetensors folder or a hub id).

    GGUF, like safetensors, is a plain tensor format that cannot run code when loaded.

    Raises:
        ModelError: model_not_found for a missing .gguf file; invalid_model for a folder with
            several .gguf files and no safetensors (which one is meant is unknown).
    """
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"Model {model!r} not found.", param="model", code="model_not_found")
        return path.parent, path.name
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    found = sorted(p.name for p in path.glob("*.gguf"))
    if len(found) > 1:
        raise ModelError(
            f"The model folder {model!r} holds several GGUF files ({', '.join(found[:4])}); name one: "
            f"model={str(path / found[0])!r}.",
            param="model",
            code="invalid_model",
        )
    return (path, found[0]) if found else None


def load_causal_tokenizer(model: str, *, local_files_only: bool = False):
    """The fast tokenizer of a causal LM: a safetensors folder, a hub id (`local_files_only`: from the
    local cache alone) or a GGUF file/folder.

    Raises:
        ModelError: model_not_found / invalid_model (as load_tokenizer).
    """
    gguf = gguf_source(model)
    if gguf is None:
        return load_tokenizer(model, local_files_only=local_files_only)
    from transformers import AutoTokenizer

    folder, name = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"Cannot load the tokenizer of {model!r}: {e}", param="model", code="invalid_model") from None
    return _fast_and_padded(tokenizer, model)


def load_causal_model(model: str):
    """AutoModelForCausalLM in fp32 from safetensors (folder or hub id) or GGUF (dequantized).

    Raises:
        ModelError: model_not_found, or invalid_model for weights that are not a causal LM.
    """
    import torch
    from transformers import AutoModelForCausalLM

    gguf = gguf_source(model)
    common = {"dtype": torch.float32, "trust_remote_code": False}
    try:
        if gguf is not None:
            return _load_gguf(*gguf, **common)
        source = check_model_source(model)
        return AutoModelForCausalLM.from_pretrained(str(source), use_safetensors=True, **common)
    except OSError as e:
        code = "invalid_model" if Path(model).expanduser().exists() else "model_not_found"
        raise ModelError(f"Cannot load {model!r}: {e}", param="model", code=code) from None
    except (ValueError, KeyError) as e:
        raise ModelError(f"{model!r} cannot be loaded as a causal LM: {e}", param="model", code="invalid_model") from None


@contextmanager
def cached_source(model: str, cache: InputCache | None) -> Iterator[str]:
    """Where to load `model` from, for the block: `model` itself, or, for a GGUF model when there
    is a cache, the safetensors folder it dequantizes to (tokenizer included), made once per GGUF
    file's content: loading that takes a fraction of a second where dequantizing takes many
    (SmolLM2-135M: 0.2 s against 26 s)."""
    gguf = gguf_source(model)
    if gguf is None or cache is None:
        yield model
        return
    import transformers

    folder, name = gguf

    def build(out: Path) -> None:
        load_causal_tokenizer(model).save_pretrained(out)
        load_causal_model(model).save_pretrained(out)

    key = {"kind": "dequantized gguf", "gguf": cache.file_hash(folder / name), "transformers": transformers.__version__}
    with cache.held(key, build) as converted:
        yield str(converted)


def _load_gguf(folder: Path, name: str, **options):
    """A GGUF file dequantized into a plain dense model: trainable (weights left in GGUF blocks are
    not) and saved as ordinary safetensors once the quantizer is detached."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=name, quantization_config=GgufConfig(gguf_file=name, dequantize=True), **options
    )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model


# --- classifiers -----------------------------------------------------------------------------


CLASSIFIER_KINDS = {
    "AutoModelForSequenceClassification": "a sequence classifier",
    "AutoModelForTokenClassification": "a token classifier",
    "AutoModelForImageClassification": "an image classifier",
}


def load_classifier(
    model: str,
    *,
    labels: list[str],
    auto_class: str = "AutoModelForSequenceClassification",
    pad_token_id: int | None = None,
    problem_type: str | None = "single_label_classification",
):
    """A transformers model with a classification head for `labels`, in fp32: a sequence, token
    or image classifier (`auto_class`).

    A base that is already a classifier with a different label count gets a fresh head
    (ignore_mismatched_sizes); the head's initialisation follows torch's global seed.

    Args:
        model: a local HF folder or a hub id.
        labels: class (or tag) names in id order, one output each; ["value"] for regression.
        auto_class: AutoModelForSequenceClassification, AutoModelForTokenClassification or
            AutoModelForImageClassification.
        pad_token_id: written to the config when the model has none (needed to pool padded batches).
        problem_type: transformers' single_label_classification, multi_label_classification or
            regression (None: leave the model's).

    Raises:
        ModelError: model_not_found, or invalid_model for an unsupported or broken model.
    """
    import torch
    import transformers

    source = check_model_source(model)
    extra = {"problem_type": problem_type} if problem_type else {}
    try:
        classifier = getattr(transformers, auto_class).from_pretrained(
            str(source),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            use_safetensors=True,
            trust_remote_code=False,
            ignore_mismatched_sizes=True,
            dtype=torch.float32,
            **extra,
        )
    except OSError as e:
        raise _load_error(model, e) from None
    except (ValueError, KeyError) as e:
        kind = CLASSIFIER_KINDS.get(auto_class, auto_class)
        raise ModelError(f"{model!r} cannot be loaded as {kind}: {e}", param="model", code="invalid_model") from None
    if pad_token_id is not None and getattr(classifier.config, "pad_token_id", None) is None:
        classifier.config.pad_token_id = pad_token_id
    return classifier


def _load_error(model: str, error: OSError) -> ModelError:
    if isinstance(model, str) and Path(model).expanduser().is_dir():
        return ModelError(f"Cannot load {model!r}: {error}", param="model", code="invalid_model")
    return ModelError(f"Model {model!r} not found or not reachable: {error}", param="model", code="model_not_found")
