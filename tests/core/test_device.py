import pytest
import torch

from core.device import is_out_of_memory, resolve_precision
from core.errors import EngineError
from core.spec import TrainingConfig


def test_fp16_on_cpu_is_refused():
    with pytest.raises(EngineError) as e:
        resolve_precision(TrainingConfig(precision="fp16"), torch.device("cpu"))
    assert e.value.param == "config.precision"


def test_explicit_precisions():
    cpu = torch.device("cpu")
    assert resolve_precision(TrainingConfig(precision="fp32"), cpu).dtype is None
    assert resolve_precision(TrainingConfig(precision="bf16"), cpu).dtype is torch.bfloat16


def test_out_of_memory_detection():
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
