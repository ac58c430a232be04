"""Devices, precision and the distributed process group, decided in one place.

``auto`` picks CUDA, then an Ascend NPU (only if ``torch_npu`` is importable),
then the CPU. ``torch_npu`` is imported late and only when asked for: once it is
installed, a plain ``import torch`` fails on machines without the CANN
libraries, so it can never be a default dependency (it is the optional ``npu`` extra).

Under torchrun (one or several nodes) the global ``RANK`` decides what happens once per
job (logging, checkpoints: ``DistInfo.is_main``) and ``LOCAL_RANK`` picks the accelerator
on each node (``cuda:<LOCAL_RANK>`` / ``npu:<LOCAL_RANK>``).
"""

from __future__ import annotations

from arforge.errors import ArforgeError

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch

DEVICES = ("auto", "cpu", "cuda", "npu")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

NPU_INSTALL_HINT = (
    "the 'npu' device needs torch-npu and the Ascend CANN toolkit. Install it with "
    "`pip install 'arforge[npu]'` (torch-npu pins torch exactly: install the torch "
    "version it names first) and source the CANN set_env.sh, or choose device='cpu'/'cuda'."
)


class DeviceError(ArforgeError):
    """A user-facing device problem (no traceback in the CLI)."""


def _import_torch_npu():
    try:
        import torch_npu  # noqa: F401  (registers the 'npu' device with torch)
    except Exception as exc:  # ImportError, or OSError for a missing libhccl.so
        raise DeviceError(f"{NPU_INSTALL_HINT} (import torch_npu failed: {exc})") from exc
    return torch_npu


def npu_available() -> bool:
    try:
        _import_torch_npu()
    except DeviceError:
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def resolve_device(name: str = "auto", *, local_rank: int | None = None) -> torch.device:
    """Turn ``auto|cpu|cuda|npu`` (optionally ``cuda:1``) into a ``torch.device``."""
    base, _, index = name.partition(":")
    if base not in DEVICES:
        raise DeviceError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if base == "auto":
        if torch.cuda.is_available():
            base = "cuda"
        elif importlib_util_find("torch_npu") and npu_available():
            base = "npu"
        else:
            base = "cpu"
    if base == "cpu":
        return torch.device("cpu")
    if base == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' was asked for but torch.cuda.is_available() is False; "
                              "use device='cpu' or install a CUDA build of torch")
        return _indexed("cuda", int(index) if index else local_rank, torch.cuda.device_count())
    _import_torch_npu()
    if not torch.npu.is_available():
        raise DeviceError("device 'npu' was asked for but torch.npu.is_available() is False")
    return _indexed("npu", int(index) if index else local_rank, torch.npu.device_count())


def _indexed(kind: str, index: int, count: int) -> torch.device:
    if count and index >= count:
        raise DeviceError(f"device {kind}:{index} was asked for (LOCAL_RANK or an explicit index) but only "
                          f"{count} {kind.upper()} device(s) are visible; lower torchrun's --nproc_per_node")
    return torch.device(kind, index)


def importlib_util_find(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class Precision:
    """Autocast policy. fp32 means no autocast; bf16/fp16 autocast the forward pass.

    fp16 additionally needs a gradient scaler (``needs_scaler``); bf16 does not.
    """

    name: str = "fp32"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise DeviceError(f"unknown precision {self.name!r}; choose one of {', '.join(PRECISIONS)}")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.name]

    @property
    def needs_scaler(self) -> bool:
        return self.name == "fp16"

    @contextlib.contextmanager
    def autocast(self, device: torch.device) -> Iterator[None]:
        if self.name == "fp32":
            yield
            return
        dtype = self.dtype
        if device.type == "cpu" and dtype == torch.float16:
            # CPU autocast supports fp16 only on recent builds; bf16 is the CPU path.
            dtype = torch.bfloat16
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield

    def sampling_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the AR model's weights and KV caches take for sampling under this policy.

        Sampling casts the model instead of autocasting it, as LlamaGen's ``sample_c2i.py`` does
        (``gpt_model.to(dtype=precision)``): the KV caches take half the memory, and no op casts
        weights. Logits are processed in fp32 whatever the dtype. fp16 is a CUDA/NPU dtype; on
        the CPU it falls back to bf16, as :meth:`autocast` does.
        """
        if self.name == "fp16" and device.type == "cpu":
            return torch.bfloat16
        return self.dtype

    def grad_scaler(self, device: torch.device):
        return torch.amp.GradScaler(device.type, enabled=self.needs_scaler and device.type != "cpu")


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Disable autocast on the CPU, CUDA and the tensors' own device: quantizer lookups and
    entropy terms run in fp32 whatever precision the surrounding step uses
    (docs/open_magvit2.md#computing-the-entropy-exactly: under bf16 autocast upstream's entropies are off by 3x)."""
    with contextlib.ExitStack() as stack:
        for dt in dict.fromkeys(("cpu", "cuda", device_type)):
            try:
                stack.enter_context(torch.autocast(device_type=dt, enabled=False))
            except RuntimeError:  # a device type without autocast support: nothing to disable
                pass
        yield


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ----------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (one node or several).

    ``rank``/``world_size`` are global (``RANK``/``WORLD_SIZE``); ``local_rank`` is the index
    on this node (``LOCAL_RANK``, also the accelerator index); ``node_rank`` is torchrun's
    ``GROUP_RANK`` and ``num_nodes`` its ``GROUP_WORLD_SIZE`` (else ``WORLD_SIZE //
    LOCAL_WORLD_SIZE``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process of the whole job that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        """Local rank 0: one process per node (e.g. for work on a node's own local disk)."""
        return self.local_rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise DeviceError(f"environment variable {name}={value!r} is not an integer") from None


def dist_info() -> DistInfo:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = max(1, _env_int("LOCAL_WORLD_SIZE", world))
    num_nodes = _env_int("GROUP_WORLD_SIZE", max(1, world // local_world))
    node_rank = _env_int("GROUP_RANK", rank // local_world)
    return DistInfo(rank, world, local_rank, local_world, node_rank, num_nodes)


def process_group_backend(device: torch.device) -> str:
    """The collective backend for ``device``: NCCL on CUDA, HCCL on Ascend NPUs, else gloo."""
    return {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")


def init_distributed(device: torch.device) -> DistInfo:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 or torch.distributed.is_initialized():
        return dist_info()
    backend = process_group_backend(device)
    # The accelerator is bound before the group exists: NCCL and HCCL create their
    # communicators on the current device, which otherwise is device 0 on every rank.
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "npu":
        torch.npu.set_device(device)
    torch.distributed.init_process_group(backend=backend)
    return dist_info()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
