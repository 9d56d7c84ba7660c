"""The trained model as a self-describing Hugging Face folder, and a tar of it.

The folder loads with `from_pretrained` (safetensors weights, tokenizer or image processor, config
with id2label) and carries lathe_job.json (the spec plus the reproducibility record: dataset
hashes, seed, package versions) and eval_report.json. LoRA jobs export merged weights plus the
adapter itself in adapter/.

The folder is written from the model in memory (save_pretrained: safetensors straight from the
parameters, no reload) into a temporary sibling, fsynced and renamed: once `export_model` returns
it is stored for good. The tar is derived from it and can be made later (`ensure_archive`).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import tarfile
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from core.durable import fsync_path, fsync_tree
from core.spec import JobSpec, LoraConfig

ARCHIVE_NAME = "model.tar"
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
        "versions": dict(package_versions()),
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
    """Save the model (LoRA merged, adapter kept in adapter/), lathe_job.json and eval_report.json,
    durably (written beside model_dir, fsynced, renamed over it).

    Args:
        save: writes a model and its processor as a from_pretrained folder (the task adapter's save).
        model: the trained model (a peft model when trained with LoRA).
        model_dir: the folder to (re)create (what an earlier attempt left there is replaced).
        lora: the job's LoRA settings (merge_on_export), or None.
        spec: the job's spec, dumped into lathe_job.json.
        hyperparameters: the resolved n_epochs/batch_size/learning_rate_multiplier.
        record: `reproducibility_record` of the run.
        report: the evaluation results (best/latest validation, test, baseline_test).

    Returns:
        model_dir.
    """
    from core.lora import export_weights

    tmp = model_dir.with_name(f".{model_dir.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    export_weights(model, tmp, save, lora=lora, base_model_name=spec.model)
    job = {"spec": spec.model_dump(mode="json"), "hyperparameters": hyperparameters, "reproducibility": record}
    (tmp / "lathe_job.json").write_text(json.dumps(job, indent=2))
    (tmp / "eval_report.json").write_text(json.dumps(report | {"reproducibility": record}, indent=2))
    fsync_tree(tmp)
    if model_dir.exists():  # an earlier attempt's export, and the archive packed from it
        shutil.rmtree(model_dir)
    archive_path_for(model_dir).unlink(missing_ok=True)
    os.replace(tmp, model_dir)
    fsync_path(model_dir.parent)
    return model_dir


def archive_path_for(model_dir: Path) -> Path:
    """Where the tar of an exported folder goes: beside it."""
    return model_dir.parent / ARCHIVE_NAME


def pack_archive(model_dir: Path, archive_path: Path | None = None) -> Path:
    """An uncompressed tar of model_dir's regular files, at the archive root (no folder prefix),
    written under a name of its own and renamed into place (readers see all of it or nothing).
    `archive_path` defaults to `archive_path_for(model_dir)`.

    Extracting it into a folder gives a directory `from_pretrained` loads.
    """
    archive_path = archive_path or archive_path_for(model_dir)
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive_path.with_name(f"{archive_path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        with tarfile.open(tmp, "w") as tar:
            for path in sorted(model_dir.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    tar.add(path, arcname=path.relative_to(model_dir).as_posix(), recursive=False)
        os.replace(tmp, archive_path)
    finally:
        tmp.unlink(missing_ok=True)
    return archive_path


def ensure_archive(model_dir: Path, archive_path: Path) -> Path:
    """`archive_path`, packed from `model_dir` now unless it exists: once however many threads and
    processes ask at the same time (an exclusive lock on a file beside it).

    Raises:
        FileNotFoundError: neither the archive nor the folder exists.
    """
    if archive_path.is_file():
        return archive_path
    if not model_dir.is_dir():
        raise FileNotFoundError(model_dir)
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    with open(archive_path.with_name(f".{archive_path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not archive_path.is_file():
            pack_archive(model_dir, archive_path)
    return archive_path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def package_versions() -> dict[str, str | None]:
    """Python's and PACKAGES' versions (read once per process: a metadata scan per package)."""
    return {"python": platform.python_version(), **{pkg: _version(pkg) for pkg in PACKAGES}}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
