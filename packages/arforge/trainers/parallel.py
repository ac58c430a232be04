"""Data parallelism shared by the trainers: DDP and FSDP wrapping, the sharded EMA,
full-state adapters for checkpoints, and the few collectives the training loop needs.

Checkpoints always hold full (unsharded) tensors under the model's own names, so a
run trained under FSDP on N ranks resumes on M ranks and loads into a one-process
sampler. ``parallel="auto"`` means DDP under torchrun, as in LlamaGen's and
Open-MAGVIT2's recipes; FSDP (``torch.distributed.fsdp.fully_shard``, FSDP2) is what
IAR2's recipe and XL+ models need.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from arforge import checkpoint as ck

PARALLEL = ("auto", "none", "ddp", "fsdp")


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def uses_fsdp(ctx: Any, parallel: str) -> bool:
    return bool(ctx.dist.enabled) and parallel == "fsdp"


def wrap_ddp(module: nn.Module, ctx: Any, parallel: str, **kwargs: Any) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` under torchrun (``parallel`` auto/ddp), else itself."""
    if not ctx.dist.enabled or parallel not in ("auto", "ddp"):
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(module, device_ids=ids, **kwargs)


def fully_shard_units(root: nn.Module, units: Iterable[nn.Module], ctx: Any) -> nn.Module:
    """Shard each unit, then ``root`` (which keeps whatever parameters no unit holds).

    Parameters become DTensors: build optimizers after this call. Gradients are reduced
    in fp32 under bf16/fp16 autocast and in the parameters' own dtype otherwise (an fp64
    model, as the 2-rank equivalence tests use, keeps fp64 reductions).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed = ctx.precision.name != "fp32"
    mp = MixedPrecisionPolicy(param_dtype=ctx.precision.dtype if mixed else None,
                              reduce_dtype=torch.float32 if mixed else None)
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    fully_shard(root, mp_policy=mp)
    return root


class FSDPModelState:
    """Adapts an FSDP-sharded module (or one holding sharded submodules) to TrainLoop's
    state_dict/load_state_dict protocol with full tensors. Both calls are collectives."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, sd) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, sd, options=StateDictOptions(full_state_dict=True, strict=True))


class FSDPOptimState:
    """The same for an optimizer over (some of) an FSDP-sharded module's parameters; its
    state is keyed by parameter name, so it resumes on another world size."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer):
        self.model, self.opt = model, opt

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, sd) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.opt, sd, options=StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------- EMA
@torch.no_grad()
def apply_multi_avg_fn(multi_avg_fn: Any, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                       num_averaged: Any = None) -> None:
    """``multi_avg_fn(averaged, current, num_averaged)`` (``torch.optim.swa_utils``'s form) over
    ``(averaged, current)`` pairs, grouped by the averaged tensors' (device, dtype) as
    ``AveragedModel.update_parameters`` groups them; ``current`` is moved/cast to match."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for avg, cur in pairs:
        avg_list, cur_list = groups.setdefault((avg.device, avg.dtype), ([], []))
        avg_list.append(avg)
        cur_list.append(cur.to(device=avg.device, dtype=avg.dtype))
    for avg_list, cur_list in groups.values():
        multi_avg_fn(avg_list, cur_list, num_averaged)


class ShardedEMA:
    """The EMA of an FSDP-sharded model, kept sharded: each rank averages its own shards.

    The average is elementwise, so the EMA of a shard is the shard of the EMA, and the
    update needs no communication and 1/world of the memory of a full copy (what XL/XXL
    training on 40-80 GB cards needs). ``state_dict`` gathers full tensors (a collective:
    every rank calls it, as ``TrainLoop.save`` does) under the model's own names, so the
    checkpoint is the one a single-process run writes; ``load_state_dict`` keeps each
    rank's shard of the full tensors. Buffers are replicated under FSDP and copied as-is.

    The update is ``torch.optim.swa_utils.get_ema_multi_avg_fn(decay)``, the function
    ``common.EMA``'s ``AveragedModel`` applies, here applied to the local shards.
    ``AveragedModel`` itself cannot hold this EMA: it deep-copies the module, and a copy
    of an FSDP2 module carries the original's sharding state, hooks and process group
    (its forward would all-gather, its parameters are DTensors), while this EMA must be
    plain local tensors that no collective touches.
    """

    def __init__(self, model: nn.Module, *, decay: float):
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = model
        self.shadow = {n: _local(p).detach().clone() for n, p in model.named_parameters()}
        self._ema_update = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = [(self.shadow[name], _local(p).detach()) for name, p in model.named_parameters()]
        apply_multi_avg_fn(self._ema_update, pairs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for name, value in self.model.state_dict().items():
            if name in params:
                p = params[name]
                if _is_dtensor(p):
                    from torch.distributed.tensor import DTensor

                    value = DTensor.from_local(self.shadow[name], p.device_mesh, p.placements, shape=p.shape,
                                               stride=p.stride()).full_tensor()
                else:
                    value = self.shadow[name]
            elif _is_dtensor(value):
                value = value.full_tensor()
            out[name] = value.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        expected = set(self.model.state_dict())
        if set(sd) != expected:
            raise ck.CheckpointError(f"the EMA weights do not fit the model: missing "
                                     f"{sorted(expected - set(sd))[:8]}, unexpected {sorted(set(sd) - expected)[:8]}")
        for name, p in params.items():
            full = sd[name].to(device=self.shadow[name].device, dtype=self.shadow[name].dtype)
            if _is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements).to_local()
            self.shadow[name].copy_(full)


# ------------------------------------------------------------- collectives
def all_reduce_grads(params: Sequence[nn.Parameter], ctx: Any) -> None:
    """Average the gradients of ``params`` over ranks (a missing gradient counts as zero),
    for a pass that does not go through the DDP wrapper."""
    if not ctx.dist.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= ctx.dist.world_size


def any_rank(ctx: Any, flag: bool) -> bool:
    """``flag`` on any rank (an all-reduce under torchrun), so every rank stops together."""
    dist = getattr(ctx, "dist", None)
    if dist is None or not getattr(dist, "enabled", False):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def rank_world(ctx: Any) -> tuple[int, int]:
    dist = getattr(ctx, "dist", None)
    if dist is None or not getattr(dist, "enabled", False):
        return 0, 1
    return int(dist.rank), int(dist.world_size)


def gather_objects(ctx: Any, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective under torchrun)."""
    rank, world = rank_world(ctx)
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(ctx: Any) -> None:
    dist = getattr(ctx, "dist", None)
    if dist is not None and getattr(dist, "enabled", False):
        torch.distributed.barrier()
