"""Device and precision selection in one place."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from arforge import device as dev

pytestmark = pytest.mark.plumbing  # no floating-point result compared across kernels


def test_cpu_and_auto():
    assert dev.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert dev.resolve_device("auto") == torch.device("cpu")


def test_unknown_device_is_clear():
    with pytest.raises(dev.DeviceError, match="choose one of auto, cpu, cuda, npu"):
        dev.resolve_device("tpu")


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu installed")
def test_npu_without_torch_npu_says_how_to_install():
    with pytest.raises(dev.DeviceError) as err:
        dev.resolve_device("npu")
    assert "pip install 'arforge[npu]'" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")
def test_cuda_missing_is_clear():
    with pytest.raises(dev.DeviceError, match="torch.cuda.is_available"):
        dev.resolve_device("cuda")


def test_precision_autocast_cpu_bf16():
    p = dev.Precision("bf16")
    a = torch.randn(4, 4)
    with p.autocast(torch.device("cpu")):
        out = a @ a
    assert out.dtype == torch.bfloat16
    with dev.Precision("fp32").autocast(torch.device("cpu")):
        assert (a @ a).dtype == torch.float32
    assert dev.Precision("fp16").needs_scaler and not p.needs_scaler
    with pytest.raises(dev.DeviceError, match="unknown precision"):
        dev.Precision("fp8")
