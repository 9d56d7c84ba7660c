"""The trained model as a self-describing Hugging Face folder, and a tar of it.

The folder loads with `from_pretrained` (safetensors weights, tokenizer or image processor, config
with id2label) and carries lathe_job.json (the spec plus the reproducibility record: dataset
hashes, seed, package versions) and eval_report.json. LoRA jobs export merged weights plus the
adapter itself in adapter/.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tarfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from core.spec import JobSpec, LoraConfig

PACKAGES = ("lathe", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers",
            "numpy", "scikit-learn", "kornia", "seqeval")


def reproducibility_record(spec: JobSpec, *, task: str, device: str, precision: str, files: dict[str, Path | None]) -> dict[str, Any]:
    """What it takes to rerun a job: the spec, resolved task, seed, dataset hashes, package versions,
    device and precision. Written into every checkpoint and exported model.

    Args:
        files: dataset role ("training_file", ...) -> local path (None when absent), hashed here.
    """
    return {
        "spec": spec.model_dump(mode="json"),
        "task": str(task),
        "seed": spec.seed,
        "datasets": {role: {"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                     for role, p in files.items() if p},
        "versions": {"python": platform.python_version(), **{pkg: _version(pkg) for pkg in PACKAGES}},
        "platform": platform.platform(),
        "device": device,
        "precision": precision,
    }


def export_model(
    save: Callable[[Any, Path], None],
    model: Any,
    model_dir: Path,
    *,
    lora: LoraConfig | None,
    spec: JobSpec,
    hyperparameters: dict[str, Any],
    record: dict[str, Any],
    report: dict[str, Any],
) -> Path:
    """Save the model (LoRA merged, adapter kept in adapter/), lathe_job.json and eval_report.json.

    Args:
        save: writes a model and its processor as a from_pretrained folder (the task adapter's save).
        model: the trained model (a peft model when trained with LoRA).
        model_dir: the folder to (re)create.
        lora: the job's LoRA settings (merge_on_export), or None.
        spec: the job's spec, dumped into lathe_job.json.
        hyperparameters: the resolved n_epochs/batch_size/learning_rate_multiplier.
        record: `reproducibility_record` of the run.
        report: the evaluation results (best/latest validation, test, baseline_test).

    Returns:
        model_dir.
    """
    from core.lora import export_weights

    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    export_weights(model, model_dir, save, lora=lora, base_model_name=spec.model)
    job = {"spec": spec.model_dump(mode="json"), "hyperparameters": hyperparameters, "reproducibility": record}
    (model_dir / "lathe_job.json").write_text(json.dumps(job, indent=2))
    (model_dir / "eval_report.json").write_text(json.dumps(report | {"reproducibility": record}, indent=2))
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
