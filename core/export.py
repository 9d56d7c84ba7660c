"""The trained model as a self-describing Hugging Face folder, and a tar of it.

The folder loads with `from_pretrained` (safetensors weights, tokenizer, config with id2label) and
carries lathe_job.json (the spec plus what is needed to reproduce the run) and eval_report.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tarfile
from importlib import metadata
from pathlib import Path
from typing import Any

from core.spec import JobSpec


def export_model(
    model: Any,
    tokenizer: Any,
    model_dir: Path,
    *,
    spec: JobSpec,
    files: dict[str, Path | None],
    hyperparameters: dict[str, Any],
    device: str,
    precision: str,
    report: dict[str, Any],
) -> Path:
    """Save the model, tokenizer, lathe_job.json and eval_report.json to `model_dir`.

    Args:
        model: the trained PreTrainedModel (its config already carries id2label/label2id).
        tokenizer: its tokenizer.
        model_dir: the folder to (re)create.
        spec: the job's spec, dumped into lathe_job.json.
        files: dataset role ("training_file", ...) -> local path, hashed for the record.
        hyperparameters: the resolved n_epochs/batch_size/learning_rate_multiplier.
        device: where it trained ("cpu", "cuda").
        precision: the resolved precision ("fp32", "bf16", ...).
        report: the evaluation results (best/latest validation, test, baseline_test).

    Returns:
        model_dir.
    """
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    model.save_pretrained(model_dir)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(model_dir)
    job = {
        "spec": spec.model_dump(mode="json"),
        "hyperparameters": hyperparameters,
        "reproducibility": {
            "seed": spec.seed,
            "datasets": {role: {"name": p.name, "sha256": sha256_file(p)} for role, p in files.items() if p},
            "versions": {
                "python": platform.python_version(),
                **{pkg: _version(pkg) for pkg in ("torch", "transformers", "peft", "safetensors")},
            },
            "device": device,
            "precision": precision,
        },
    }
    (model_dir / "lathe_job.json").write_text(json.dumps(job, indent=2))
    (model_dir / "eval_report.json").write_text(json.dumps(report, indent=2))
    return model_dir


def pack_archive(model_dir: Path, archive_path: Path) -> Path:
    """An uncompressed tar of model_dir's regular files, at the archive root (no folder prefix).

    Extracting it into a folder gives a directory `from_pretrained` loads.
    """
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive_path.with_name(archive_path.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for path in sorted(model_dir.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=path.relative_to(model_dir).as_posix(), recursive=False)
    os.replace(tmp, archive_path)
    return archive_path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
