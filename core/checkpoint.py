"""Resumable checkpoints: written whole or not at all, then announced.

A checkpoint folder holds the model weights (safetensors), optimizer/scheduler/scaler states, the
RNG states of python, numpy and torch, and trainer_state.json (TrainState, which includes the
sampler position, each callback's state, and the run's reproducibility record). It is written to a temporary folder, fsynced and
renamed, so a crash never leaves a half checkpoint under a final name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from core.callbacks import Callback, TrainState
from core.durable import fsync_path
from core.errors import EngineError

MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training_state.pt"  # optimizer, scheduler, scaler, RNG
STATE_FILE = "trainer_state.json"


@dataclass
class TrainingParts:
    """Everything a checkpoint saves and restores."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # core.schedules.LRSchedule (state_dict/load_state_dict)
    scaler: torch.amp.GradScaler | None
    state: TrainState
    callbacks: list[Callback]
    extra: dict[str, Any]  # JSON-able facts a resume must match (task, labels, batch size, ...)
    record: dict[str, Any] = field(default_factory=dict)  # the reproducibility record, kept, not compared


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(root: Path, parts: TrainingParts) -> Path:
    """Write a checkpoint for parts.state.step under `root` atomically and return its folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(parts.state.step)
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(parts.model, str(tmp / MODEL_FILE))
    torch.save(
        {
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            "rng": _rng_state(),
        },
        tmp / TRAINING_FILE,
    )
    trainer_state = {
        "state": parts.state.state_dict(),
        "callbacks": {type(cb).__name__: cb.state_dict() for cb in parts.callbacks},
        "extra": parts.extra,
        "reproducibility": parts.record,
    }
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
    for file in tmp.iterdir():
        fsync_path(file)
    fsync_path(tmp)
    if final.exists():  # a rerun of the same step after a crash: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    return final


def load_checkpoint(path: Path, parts: TrainingParts) -> None:
    """Restore everything `save_checkpoint` wrote, in place.

    Raises:
        EngineError: code "invalid_checkpoint" (param resume_from) for a missing or incomplete folder,
            or one written for a different job (labels, batch size, ... differ from parts.extra).
    """
    missing = [f for f in (MODEL_FILE, TRAINING_FILE, STATE_FILE) if not (path / f).is_file()]
    if missing:
        raise EngineError(
            f"Checkpoint {path} is incomplete (missing {', '.join(missing)}).",
            param="resume_from",
            code="invalid_checkpoint",
        )
    saved = json.loads((path / STATE_FILE).read_text())
    for key, value in parts.extra.items():
        if saved["extra"].get(key) != value:
            raise EngineError(
                f"Checkpoint {path} was written for a different job ({key}: {saved['extra'].get(key)!r} != {value!r}).",
                param="resume_from",
                code="invalid_checkpoint",
            )
    load_model_weights(path, parts.model)
    # Our own file, but still never unpickle arbitrary objects.
    training = torch.load(path / TRAINING_FILE, map_location="cpu", weights_only=True)
    parts.optimizer.load_state_dict(training["optimizer"])
    parts.scheduler.load_state_dict(training["scheduler"])
    if parts.scaler is not None and training["scaler"] is not None:
        parts.scaler.load_state_dict(training["scaler"])
    parts.state.load_state_dict(saved["state"])
    for cb in parts.callbacks:
        if type(cb).__name__ in saved["callbacks"]:
            cb.load_state_dict(saved["callbacks"][type(cb).__name__])
    _set_rng_state(training["rng"])


def read_checkpoint_facts(path: Path) -> dict[str, Any]:
    """The facts (task, labels, batch size, ...) a checkpoint was written with.

    Raises:
        EngineError: code "invalid_checkpoint" when the folder is not a complete checkpoint.
    """
    try:
        return json.loads((path / STATE_FILE).read_text())["extra"]
    except (OSError, ValueError, KeyError):
        raise EngineError(f"{path} is not a complete checkpoint.", param="model", code="invalid_checkpoint") from None


def start_from_checkpoint(path: Path, model: torch.nn.Module, *, task: str, labels: list[str] | None) -> None:
    """Load an earlier job's checkpoint weights into `model` (built the same way: same task,
    labels, head and LoRA settings).

    Raises:
        EngineError: param "model", code "invalid_model": a checkpoint of another task or label
            set, or weights that do not fit this job's model.
    """
    facts = read_checkpoint_facts(path)
    for key, mine in (("task", str(task)), ("labels", labels)):
        if key in facts and facts[key] != mine:
            raise EngineError(f"Checkpoint {path.name} was trained with {key} {facts[key]!r}, this job has {mine!r}.",
                              param="model", code="invalid_model")
    try:
        load_model_weights(path, model)
    except (RuntimeError, KeyError) as e:
        raise EngineError(f"Checkpoint {path.name} does not fit this job's model (use the same config.head and "
                          f"config.lora as its job): {str(e)[:300]}", param="model", code="invalid_model") from None


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into `model` (same architecture)."""
    load_model(model, str(path / MODEL_FILE), device=str(next(model.parameters()).device))


def rotate_checkpoints(root: Path, *, keep_last: int, keep: set[str]) -> None:
    """Delete all checkpoints but the newest `keep_last` and those named in `keep` (the best)."""
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    for folder in folders[:-keep_last] if keep_last else folders:
        if folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
