"""Where training runs and in which precision.

bf16 autocast is the default wherever the hardware computes bf16 natively: it is the largest
single speed-up on the CPUs we run on (see BENCHMARKS.md) and needs no loss scaling. fp16 needs a
GradScaler and is only offered on CUDA.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from core.errors import EngineError
from core.spec import TrainingConfig


@dataclass(frozen=True)
class Precision:
    """The resolved precision: the name reported, and the autocast dtype (None for fp32)."""

    name: str
    dtype: torch.dtype | None

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """An autocast context for the forward pass (a no-op for fp32)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """fp16 gradients need scaling; bf16 has fp32's range and does not."""
        if self.dtype is torch.float16:
            return torch.amp.GradScaler(device.type)
        return None


def resolve_device(config: TrainingConfig) -> torch.device:
    """The device named by config.device; auto is CUDA when present.

    Raises:
        EngineError: cuda requested but not available (param config.device).
    """
    if config.device == "cpu":
        return torch.device("cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise EngineError("config.device is 'cuda' but no CUDA device is available.", param="config.device")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(config: TrainingConfig, device: torch.device) -> Precision:
    """The autocast precision for config.precision on this device.

    auto: bf16 on CUDA devices that support it and on CPUs with avx512_bf16 or amx_bf16, else fp32.

    Raises:
        EngineError: fp16 on a CPU (param config.precision).
    """
    choice = config.precision
    if choice == "auto":
        choice = "bf16" if bf16_native(device) else "fp32"
    if choice == "fp16" and device.type != "cuda":
        raise EngineError(
            "precision fp16 needs a CUDA device; use bf16 or fp32 on CPU.", param="config.precision"
        )
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    return Precision(choice, dtype)


def bf16_native(device: torch.device) -> bool:
    """Whether the device computes bf16 matmuls in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception means the device (or host) ran out of memory."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
