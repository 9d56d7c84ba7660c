"""Predictions from an exported model, in-process or as a subprocess for the torch-free API.

CLI: `python -m core.predict MODEL_DIR` reads {"inputs": [...], "top_k": N} on stdin and writes
{"predictions": [[{"label", "score"}, ...], ...]} on stdout; on failure {"error": {...}}, exit 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from core.errors import EngineError

BATCH_SIZE = 32


def predict(model_dir: Path, inputs: list[str], *, top_k: int = 1, max_length: int | None = None) -> list[list[dict]]:
    """Class probabilities for each input, best first.

    Args:
        model_dir: an exported model folder (safetensors weights).
        inputs: the texts.
        top_k: how many labels per input (capped at the number of labels).
        max_length: truncate inputs to this many tokens; default: the job's config.max_length
            from lathe_job.json, else the tokenizer's limit.

    Returns:
        One list per input of {"label": str, "score": float}.

    Raises:
        ModelError: the folder is missing or not a loadable safetensors model.
        EngineError: bad inputs (not a list of strings, top_k < 1).
    """
    import torch

    from core.models import load_classifier_for_inference

    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise EngineError("inputs must be a list of strings.", param="inputs")
    if not isinstance(top_k, int) or top_k < 1:
        raise EngineError("top_k must be a positive integer.", param="top_k")
    tokenizer, model = load_classifier_for_inference(Path(model_dir))
    max_length = max_length or _job_max_length(Path(model_dir)) or min(tokenizer.model_max_length, 512)
    id2label = model.config.id2label
    k = min(top_k, len(id2label))
    results: list[list[dict]] = []
    with torch.inference_mode():
        for start in range(0, len(inputs), BATCH_SIZE):
            batch = tokenizer(
                inputs[start : start + BATCH_SIZE], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            probs = model(**batch).logits.float().softmax(-1)
            scores, ids = probs.topk(k, dim=-1)
            for row_scores, row_ids in zip(scores.tolist(), ids.tolist()):
                results.append([{"label": id2label[i], "score": s} for s, i in zip(row_scores, row_ids)])
    return results


def _job_max_length(model_dir: Path) -> int | None:
    try:
        job = json.loads((model_dir / "lathe_job.json").read_text())
        return int(job["spec"]["config"]["max_length"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


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
        predictions = predict(Path(argv[0]), request["inputs"], top_k=request.get("top_k", 1))
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
