"""The Ascend NPU and multi-node paths, checked without an NPU or a second node.

The NPU tests import a fake ``torch_npu`` package that does what the real one does as far as
arforge uses it: it renames torch's PrivateUse1 backend to ``npu`` (so ``torch.device("npu:1")``
parses) and registers a ``torch.npu`` module (``is_available``, ``device_count``,
``set_device``). ``rename_privateuse1_backend`` works once per process, so those checks run in
a subprocess and this process keeps a clean torch. They check arforge's decisions (device,
backend, autocast device type), not kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from arforge import device as dev

pytestmark = pytest.mark.plumbing  # decisions only; no floating-point result compared

FAKE_TORCH_NPU = '''
"""A stand-in for torch_npu: the registrations arforge relies on, nothing else."""
import os
import types

import torch

torch.utils.rename_privateuse1_backend("npu")
CALLS = []
npu = types.ModuleType("torch_npu.npu")
npu.is_available = lambda: True
npu.device_count = lambda: int(os.environ.get("FAKE_NPU_COUNT", "8"))
npu.set_device = lambda d: CALLS.append(("set_device", str(torch.device(d))))
npu.current_device = lambda: 0
torch._register_device_module("npu", npu)
'''

TORCH_NPU_WITHOUT_CANN = '''
raise OSError("libhccl.so: cannot open shared object file: No such file or directory")
'''

NPU_SCRIPT = r'''
import contextlib, json, os, sys
import torch

torch.cuda.is_available = lambda: False      # the decision for an NPU-only host
import torch_npu
from arforge import device as dev

out = {}
out["npu"] = str(dev.resolve_device("npu"))
out["auto"] = str(dev.resolve_device("auto"))
out["npu:0"] = str(dev.resolve_device("npu:0"))
out["npu_available"] = dev.npu_available()
try:
    dev.resolve_device("npu:9")
except dev.DeviceError as exc:
    out["too_high"] = str(exc)

autocasts = []
@contextlib.contextmanager
def fake_autocast(device_type, dtype=None, enabled=True, **kw):
    autocasts.append([device_type, str(dtype), enabled])
    yield
torch.autocast = fake_autocast
npu0 = torch.device("npu", 0)
for name in ("bf16", "fp16", "fp32"):
    with dev.Precision(name).autocast(npu0):
        pass
out["autocast"] = autocasts

groups = []
torch.distributed.is_initialized = lambda: False
torch.distributed.init_process_group = lambda backend=None, **kw: groups.append(backend)
info = dev.init_distributed(dev.resolve_device("auto"))
out["backend"] = groups
out["set_device"] = torch_npu.CALLS
out["info"] = [info.rank, info.world_size, info.local_rank, info.node_rank, info.num_nodes, info.is_main]
print("RESULT " + json.dumps(out))
'''

# torchrun's variables for the 4th process of `torchrun --nnodes 2 --nproc_per_node 2`
NODE1_RANK3 = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
               "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2"}
NODE1_RANK2 = {**NODE1_RANK3, "RANK": "2", "LOCAL_RANK": "0"}
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")


def _package(tmp_path: Path, source: str) -> Path:
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(source)
    return tmp_path


def _run_with_fake_npu(tmp_path: Path, env: dict[str, str]) -> dict:
    root = _package(tmp_path, FAKE_TORCH_NPU)
    full_env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    full_env.update(env, PYTHONPATH=os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]),
                    FAKE_NPU_COUNT="2")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(NPU_SCRIPT)], env=full_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _torchrun_env(monkeypatch, env: dict[str, str]) -> None:
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


# ------------------------------------------------------------------ NPU (fake torch_npu)
def test_fake_npu_device_backend_and_autocast(tmp_path):
    out = _run_with_fake_npu(tmp_path, NODE1_RANK3)
    assert out["npu"] == "npu:1"            # LOCAL_RANK picks the NPU on this node
    assert out["auto"] == "npu:1"           # no CUDA, torch_npu importable -> npu
    assert out["npu:0"] == "npu:0"          # an explicit index wins
    assert out["npu_available"] is True
    assert "npu:9" in out["too_high"] and "2 NPU" in out["too_high"]
    assert out["autocast"] == [["npu", "torch.bfloat16", True], ["npu", "torch.float16", True]]
    assert out["backend"] == ["hccl"]
    assert out["set_device"] == [["set_device", "npu:1"]]  # bound before the HCCL group is made
    assert out["info"] == [3, 4, 1, 1, 2, False]


def test_npu_without_torch_npu_is_clear_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(dev.DeviceError) as err:
        dev.resolve_device("npu")
    assert "pip install 'arforge[npu]'" in str(err.value)
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert not dev.npu_available()


def test_torch_npu_without_cann_libraries(monkeypatch, tmp_path):
    """An installed torch_npu whose import fails (no CANN: OSError) is treated as absent."""
    monkeypatch.syspath_prepend(str(_package(tmp_path, TORCH_NPU_WITHOUT_CANN)))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(dev.DeviceError, match=r"pip install 'arforge\[npu\]'.*libhccl"):
        dev.resolve_device("npu")
    sys.modules.pop("torch_npu", None)


def test_backend_per_device_type():
    assert dev.process_group_backend(torch.device("cuda", 1)) == "nccl"
    assert dev.process_group_backend(torch.device("cpu")) == "gloo"


# ------------------------------------------------------------------ multi-node env parsing
def test_two_nodes_rank3_is_node1_device1_not_main(monkeypatch):
    _torchrun_env(monkeypatch, NODE1_RANK3)
    info = dev.dist_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert (info.node_rank, info.num_nodes) == (1, 2)
    assert not info.is_main and not info.is_node_main and info.enabled


def test_two_nodes_local_rank0_of_node1_is_not_main(monkeypatch):
    _torchrun_env(monkeypatch, NODE1_RANK2)
    info = dev.dist_info()
    assert info.rank == 2 and info.local_rank == 0 and info.node_rank == 1
    assert not info.is_main  # logging and checkpoints: global rank 0 only
    assert info.is_node_main


def test_node_layout_without_group_vars(monkeypatch):
    """Launchers that set only RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE: derived."""
    _torchrun_env(monkeypatch, {k: v for k, v in NODE1_RANK3.items() if not k.startswith("GROUP_")})
    info = dev.dist_info()
    assert (info.node_rank, info.num_nodes) == (1, 2)
    _torchrun_env(monkeypatch, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    info = dev.dist_info()
    assert (info.node_rank, info.num_nodes, info.local_world_size) == (0, 1, 2)


def test_single_process_defaults(monkeypatch):
    _torchrun_env(monkeypatch, {})
    info = dev.dist_info()
    assert info == dev.DistInfo() and info.is_main and not info.enabled


def test_init_distributed_two_nodes_cuda(monkeypatch):
    _torchrun_env(monkeypatch, NODE1_RANK3)
    groups, devices = [], []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend=None, **kw: groups.append(backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: devices.append(str(d)))
    device = dev.resolve_device("auto")
    assert device == torch.device("cuda", 1)
    info = dev.init_distributed(device)
    assert groups == ["nccl"] and devices == ["cuda:1"]
    assert (info.rank, info.world_size, info.local_rank, info.node_rank, info.num_nodes) == (3, 4, 1, 1, 2)
    assert not info.is_main


def test_init_distributed_single_process_makes_no_group(monkeypatch):
    _torchrun_env(monkeypatch, {"WORLD_SIZE": "1"})
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda **kw: pytest.fail("no process group for a world of 1"))
    assert dev.init_distributed(torch.device("cpu")).is_main


def test_bad_torchrun_variable_is_clear(monkeypatch):
    _torchrun_env(monkeypatch, {"RANK": "x"})
    with pytest.raises(dev.DeviceError, match="RANK='x' is not an integer"):
        dev.dist_info()
