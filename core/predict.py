"""Predictions from an exported model: in-process (`predict`, or `load` once and `Predictor.predict`
many times, as a long-lived prediction process does), or as a subprocess.

CLI: `python -m core.predict MODEL_DIR` reads {"inputs": [...], "top_k": N, "max_new_tokens": M} on
stdin and writes {"predictions": [[{...}, ...], ...]} on stdout (one list per input); on failure
{"error": {...}}, exit 1.

Each task goes through its transformers pipeline, on the model loaded the way it was exported
(custom heads rebuilt from config.lathe_head):

    text-classification   [{"label", "score"}] best first (softmax; sigmoid per label for multi-label);
                          regression: [{"value"}]
    token-classification  [{"label", "word", "start", "end", "score"}] per entity (grouped sub-tokens)
    causal-lm             [{"generated_text"}] (greedy continuation of the prompt; chat template applied)
    image-classification  [{"label", "score"}]; inputs are base64 images (data: URLs allowed)
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import EngineError, ModelError

BATCH_SIZE = 32
MAX_NEW_TOKENS = 64


def predict(
    model_dir: Path,
    inputs: list[str],
    *,
    top_k: int = 1,
    max_length: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[list[dict[str, Any]]]:
    """Predictions for each input: `load(model_dir).predict(...)`, the inputs checked first.

    Args:
        model_dir: an exported model folder (safetensors weights, lathe_job.json).
        inputs: texts (base64 images for image-classification).
        top_k: labels per input for classification (capped at the number of labels).
        max_length: truncate inputs to this many tokens; default the job's config.max_length.
        max_new_tokens: causal-lm: tokens generated per input.

    Returns:
        One list of dicts per input (see the module docstring for their keys per task).

    Raises:
        ModelError: the folder is missing or not a loadable safetensors model.
        EngineError: bad inputs (not a list of strings, top_k < 1, undecodable image).
    """
    _check(inputs, top_k)
    return load(model_dir).predict(inputs, top_k=top_k, max_length=max_length, max_new_tokens=max_new_tokens)


@dataclass
class Predictor:
    """An exported model loaded for predictions (what `load` returns): keep it to answer many
    requests without loading again. Not thread-safe: one
    `predict` at a time."""

    task: str
    processor: Any = None
    model: Any = None
    max_length: int | None = None  # the job's config.max_length
    ensemble: Any = None  # a core.ensemble_model.EnsembleModel keeping its members loaded

    def predict(self, inputs: list[str], *, top_k: int = 1, max_length: int | None = None,
                max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[dict[str, Any]]]:
        """As `predict` (same Args, Returns and Raises, less the folder's)."""
        _check(inputs, top_k)
        if self.ensemble is not None:
            return self.ensemble.predict(inputs, top_k=top_k, max_length=max_length)
        max_length = max_length or self.max_length
        model, processor = self.model, self.processor
        if self.task == "token-classification":
            return _entities(model, processor, inputs, max_length=max_length)
        if self.task == "causal-lm":
            return _generate(model, processor, inputs, max_new_tokens=max_new_tokens)
        if self.task == "image-classification":
            return _classify_images(model, processor, inputs, top_k=top_k)
        return _classify_texts(model, processor, inputs, top_k=top_k, max_length=max_length)


def load(model_dir: Path) -> Predictor:
    """An exported folder (one model or an ensemble's) loaded for predictions.

    Raises:
        ModelError: the folder is missing or not a loadable safetensors model.
    """
    model_dir = Path(model_dir)
    from core.ensemble_model import EnsembleModel, is_ensemble

    if is_ensemble(model_dir):  # several members' folders and how they combine (core.ensemble_model)
        ensemble = EnsembleModel.load(model_dir, keep_members=True)
        return Predictor(task=ensemble.description.get("task", "text-classification"), ensemble=ensemble)
    job = _job(model_dir)
    task = job.get("reproducibility", {}).get("task") or job.get("spec", {}).get("task") or "text-classification"
    processor, model = load_for_inference(model_dir, task)
    return Predictor(task, processor, model, job.get("spec", {}).get("config", {}).get("max_length"))


def _check(inputs: Any, top_k: Any) -> None:
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise EngineError("inputs must be a list of strings.", param="inputs")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise EngineError("top_k must be a positive integer.", param="top_k")


def load_for_inference(model_dir: Path, task: str) -> tuple[Any, Any]:
    """(tokenizer or image processor, model in eval mode) of an exported folder.

    Raises:
        ModelError: model_not_found or invalid_model.
    """
    import transformers

    from core.heads import restore_head
    from core.loading import check_model_source, load_tokenizer

    if not model_dir.is_dir():
        raise ModelError(f"Model folder {str(model_dir)!r} not found.", param="model", code="model_not_found")
    if not (model_dir / "config.json").is_file() and (model_dir / "adapter" / "adapter_config.json").is_file():
        raise ModelError("This model was exported as a LoRA adapter only (config.lora.merge_on_export false): "
                         "download it and load it over its base model with peft.", param="model", code="invalid_model")
    check_model_source(str(model_dir))
    auto = {
        "text-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
        "image-classification": transformers.AutoModelForImageClassification,
    }[task]
    try:
        if task == "image-classification":
            processor = transformers.AutoImageProcessor.from_pretrained(str(model_dir))
        else:
            processor = load_tokenizer(str(model_dir))
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
        if getattr(config, "lathe_head", None):
            # A custom head: build the architecture, put the head in, then load every weight.
            from safetensors.torch import load_model

            model = auto.from_config(config)
            restore_head(model)
            load_model(model, str(model_dir / "model.safetensors"))
        else:
            model = auto.from_pretrained(str(model_dir), use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"Cannot load {str(model_dir)!r}: {e}", param="model", code="invalid_model") from None
    return processor, model.eval()


def _classify_texts(model, tokenizer, inputs: list[str], *, top_k: int, max_length: int | None) -> list[list[dict]]:
    from transformers import pipeline

    problem = model.config.problem_type
    if problem == "regression":
        pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, function_to_apply="none", top_k=1)
        out = pipe(inputs, batch_size=BATCH_SIZE, truncation=True, max_length=_cap(tokenizer, max_length))
        return [[{"value": float(row[0]["score"])}] for row in out]
    function = "sigmoid" if problem == "multi_label_classification" else "softmax"
    pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, function_to_apply=function,
                    top_k=min(top_k, model.config.num_labels))
    out = pipe(inputs, batch_size=BATCH_SIZE, truncation=True, max_length=_cap(tokenizer, max_length))
    return [[{"label": r["label"], "score": float(r["score"])} for r in row] for row in out]


def _entities(model, tokenizer, inputs: list[str], *, max_length: int | None) -> list[list[dict]]:
    from transformers import pipeline

    pipe = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="simple")
    out = pipe(inputs, batch_size=BATCH_SIZE)
    return [
        [{"label": e["entity_group"], "word": e["word"], "start": int(e["start"]), "end": int(e["end"]),
          "score": float(e["score"])} for e in row]
        for row in out
    ]


def _generate(model, tokenizer, inputs: list[str], *, max_new_tokens: int) -> list[list[dict]]:
    import torch

    results = []
    for prompt in inputs:
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
        else:
            ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        results.append([{"generated_text": text}])
    return results


def _classify_images(model, processor, inputs: list[str], *, top_k: int) -> list[list[dict]]:
    from PIL import Image, UnidentifiedImageError
    from transformers import pipeline

    images = []
    for i, value in enumerate(inputs):
        data = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            images.append(Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB"))
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
            raise EngineError(f"inputs[{i}] is not a base64-encoded image.", param="inputs") from None
    pipe = pipeline("image-classification", model=model, image_processor=processor,
                    top_k=min(top_k, model.config.num_labels))
    out = pipe(images, batch_size=BATCH_SIZE)
    return [[{"label": r["label"], "score": float(r["score"])} for r in row] for row in out]


def _cap(tokenizer, max_length: int | None) -> int:
    return int(max_length or min(tokenizer.model_max_length, 512))


def _job(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "lathe_job.json").read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) != 1:
            raise EngineError("usage: python -m core.predict MODEL_DIR < request.json")
        try:
            request = json.loads(sys.stdin.read())
        except json.JSONDecodeError as e:
            raise EngineError(f"The request is not valid JSON: {e}") from None
        if not isinstance(request, dict) or "inputs" not in request:
            raise EngineError('The request must be a JSON object with "inputs".', param="inputs")
        predictions = predict(Path(argv[0]), request["inputs"], top_k=request.get("top_k", 1),
                              max_new_tokens=request.get("max_new_tokens", MAX_NEW_TOKENS))
    except EngineError as e:
        json.dump({"error": e.to_dict()}, sys.stdout)
        return 1
    except Exception as e:  # report, don't traceback: the caller parses stdout
        json.dump({"error": {"code": "internal_error", "message": str(e), "param": None}}, sys.stdout)
        return 1
    json.dump({"predictions": predictions}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
