"""Pieces shared by the tokenizer and AR trainers.

* :class:`EMA` -- an exact-copy EMA over parameters on ``AveragedModel`` (LlamaGen
  ``update_ema``; Open-MAGVIT2 ``LitEma`` with the warm-up disabled is the same recurrence).
* :func:`param_groups` -- AdamW decay groups (docs/llamagen.md#ar-model-training: decay tensors
  with >= 2 dims, never norms or biases; IAR2's name-based rule as a parity option).
* :class:`Schedule` -- constant, cosine, Open-MAGVIT2 warm-up/hold/linear,
  and step decay, as pure functions of the iteration, driven by ``LambdaLR``
  (:func:`lr_scheduler`) and checkpointed with the run.
* :class:`TrainLoop` -- checkpoint/resume with RNG states (exact resume), the
  NaN guard, periodic logging and a progress bar.

The NaN guard checks three places, since a finite loss says nothing about the
update computed from it: the loss before backward (:meth:`TrainLoop.check_finite`),
the weights after every optimizer step (:meth:`TrainLoop.check_weights`, one
max-abs reduction per tensor), and every tensor of a checkpoint before it is
written (:meth:`TrainLoop.save`). A stopped run names the newest checkpoint
that is verified finite; resume skips (and moves aside) any that is not.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from arforge import checkpoint as ck
from arforge.errors import ArforgeError
from arforge.trainers.parallel import (_local, _unwrap, any_rank, apply_multi_avg_fn, barrier, gather_objects,
                                       rank_world)


class DivergenceError(ArforgeError):
    """Training diverged (NaN/inf loss, weights or optimizer state, or an overflowing update);
    the run stopped without saving and the last finite checkpoint was kept."""


class NonFiniteLossError(DivergenceError):
    """The loss became NaN/inf; the run stopped and the last good checkpoint was kept."""


class NonFiniteWeightsError(DivergenceError):
    """An optimizer step left NaN/inf in the weights or optimizer state; nothing was saved."""


class UpdateOverflowError(DivergenceError):
    """The optimizer update overflowed the weights' dtype (a learning rate far too large)."""


# ----------------------------------------------------------------------- EMA
class EMA:
    """p_ema <- decay * p_ema + (1 - decay) * p over parameters; buffers keep their copied values.

    Built on ``torch.optim.swa_utils``: an ``AveragedModel`` holds the copy and its count,
    and the update is its ``get_ema_multi_avg_fn(decay)``, whose
    ``torch._foreach_lerp_(ema, p, 1 - decay)`` is, element for element, the
    ``p_ema.lerp_(p, 1 - decay)`` arforge used before (the foreach kernels run the same lerp
    per tensor). Starts as an exact copy of the model (LlamaGen ``utils/ema.py``; Open-MAGVIT2
    ``LitEma`` with the warm-up disabled is the same recurrence): the copy counts as the first
    average (``n_averaged = 1``), so the first update already averages.

    Hand-written on purpose: the function is applied to the parameters here rather than
    through ``AveragedModel.update_parameters``, which with ``use_buffers=False`` copies the
    live model's buffers into the EMA at every update (and with ``use_buffers=True`` averages
    them). LlamaGen's ``update_ema`` and ``LitEma`` touch parameters only, so the EMA's
    buffers keep the values copied at construction (or loaded from a checkpoint); doing it
    here also spares copying every buffer (rotary tables, caches) each step.
    Only the modules handed in are tracked -- the trainers pass the generator, never the
    discriminator (docs/open_magvit2.md#differences-from-upstream).

    ``state_dict``/``load_state_dict`` are the tracked model's own (no ``module.`` prefix,
    no ``n_averaged``), so checkpoints keep the layout they had before ``AveragedModel``.
    """

    def __init__(self, model: nn.Module, *, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(_unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.averaged.module.eval().requires_grad_(False)
        self.averaged.n_averaged.fill_(1)  # the deepcopy is the first average

    @property
    def model(self) -> nn.Module:
        """The averaged copy (what is evaluated and checkpointed)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = dict(_unwrap(model).named_parameters())
        pairs = [(p, src[name].detach()) for name, p in self.model.named_parameters()]
        apply_multi_avg_fn(self.averaged.multi_avg_fn, pairs, self.averaged.n_averaged)
        self.averaged.n_averaged += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(sd, strict=True)
        # Loaded weights are an average already: the next update averages, never re-copies.
        # (The count itself is not checkpointed: the EMA average does not depend on it.)
        if int(self.averaged.n_averaged) < 1:
            self.averaged.n_averaged.fill_(1)


# -------------------------------------------------------------- decay groups
def param_groups(model: nn.Module, *, weight_decay: float, rule: str = "ndim") -> list[dict[str, Any]]:
    """AdamW parameter groups.

    ``rule="ndim"``: decay tensors with >= 2 dims (weights, embeddings), not
    1-D ones (norm gains, biases) -- LlamaGen's rule and arforge's default.
    ``rule="name_norm"``: IAR2 FSDP parity -- decay every parameter whose name
    lacks "norm" (biases decayed; docs/iar2.md#differences-from-upstream).
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if rule == "ndim":
            (decay if p.dim() >= 2 else no_decay).append(p)
        elif rule == "name_norm":
            (no_decay if "norm" in name else decay).append(p)
        else:
            raise ValueError(f"unknown decay rule {rule!r}; use 'ndim' or 'name_norm'")
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


# --------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Schedule:
    """An LR multiplier of the iteration ``it`` (0-based), applied to the peak lr.

    kinds:
      * ``constant``.
      * ``cosine``: from 1 to ``end_factor`` over ``total_steps`` (IAR2: 3e-4 -> 1e-4 is end_factor 1/3),
        after ``warmup_steps`` of linear warm-up.
      * ``warmup_hold_linear``: Open-MAGVIT2 ``lr_wd_annealing`` (docs/open_magvit2.md#training-recipe): linear
        warm-up from ``wp0`` over ``warmup_steps``, hold at peak for the first 5 % of the rest,
        then linear to ``wpe`` at the last iteration.
      * ``step``: multiply by ``gamma`` at each of ``milestones`` (iterations).
    """

    kind: str = "constant"
    total_steps: int = 0
    warmup_steps: int = 0
    end_factor: float = 0.0
    wp0: float = 0.005
    wpe: float = 0.1
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "cosine", "warmup_hold_linear", "step"):
            raise ValueError(f"unknown LR schedule {self.kind!r}; use constant, cosine, "
                             "warmup_hold_linear or step")
        if self.kind in ("cosine", "warmup_hold_linear") and self.total_steps <= self.warmup_steps:
            raise ValueError(f"{self.kind} schedule needs total_steps > warmup_steps "
                             f"(got {self.total_steps} <= {self.warmup_steps})")

    def __call__(self, it: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** sum(it >= m for m in self.milestones)
        if self.kind == "cosine":
            if it < self.warmup_steps:
                return (it + 1) / self.warmup_steps
            f = min(1.0, (it - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return self.end_factor + (1 - self.end_factor) * 0.5 * (1 + math.cos(math.pi * f))
        # warmup_hold_linear
        wp = self.warmup_steps
        if it < wp:
            return self.wp0 + (1 - self.wp0) * it / wp
        f = (it - wp) / max(1, self.total_steps - 1 - wp)
        if f < 0.05:
            return 1.0
        return self.wpe + (1 - self.wpe) * (1 - f) / 0.95


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> LambdaLR:
    """``torch.optim.lr_scheduler.LambdaLR`` driving every group of ``optimizer`` by ``schedule``.

    The multipliers stay hand-written in :class:`Schedule` because they must match their
    references exactly (Open-MAGVIT2's ``lr_wd_annealing``, IAR2's cosine down to an end
    factor); ``step`` is ``MultiStepLR``'s schedule but computed as ``gamma ** k`` from the
    iteration, since ``MultiStepLR`` multiplies the current lr in place (``lr * 0.1 * 0.1``
    is not ``lr * 0.1 ** 2`` in floating point) and could not be derived from the step of an
    older checkpoint. ``LambdaLR`` sets ``lr = base_lr * schedule(it)``, the same product as
    before. The trainers call :func:`step_schedulers` after each iteration's optimizer
    steps, so during iteration ``it`` (0-based) the lr is ``base_lr * schedule(it)``.
    """
    return LambdaLR(optimizer, lr_lambda=schedule)


def step_schedulers(schedulers: Mapping[str, LRScheduler]) -> None:
    """Advance every scheduler by one iteration. The schedule is a function of the
    iteration, also for an optimizer that skipped its step (a GradScaler skip, IAR2's E1
    optimizer stepping one iteration in three): torch's warning about a scheduler stepped
    before its optimizer does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        for s in schedulers.values():
            s.step()


def scheduler_state(scheduler: LRScheduler) -> dict[str, Any]:
    """What a checkpoint keeps of a scheduler: its position and last lrs. The schedule's
    shape (``lr_lambdas``) comes from the run's config, as the peak lr does."""
    sd = scheduler.state_dict()
    sd.pop("lr_lambdas", None)
    return sd


def restore_scheduler(scheduler: LRScheduler, saved: Mapping[str, Any] | None, step: int) -> None:
    """Resume ``scheduler`` at iteration ``step``: from its saved state, or, for a checkpoint
    written before schedulers were checkpointed, from ``step`` alone (the schedule is a pure
    function of the iteration). The peak lrs (``base_lrs``) stay the run's own, so a resumed
    run with an edited lr uses it, as before; every group's lr is then set from the schedule
    (an older checkpoint's optimizer holds the previous iteration's lr)."""
    if saved is not None:
        if int(saved["last_epoch"]) != step:
            raise ck.CheckpointError(f"the LR scheduler was saved at iteration {saved['last_epoch']} but the "
                                     f"checkpoint is of step {step}; the checkpoint is inconsistent")
        state = {k: v for k, v in saved.items() if k not in ("base_lrs", "_last_lr")}
        state["lr_lambdas"] = [None] * len(getattr(scheduler, "lr_lambdas", []))
        scheduler.load_state_dict(state)
    else:
        scheduler.last_epoch = step
        scheduler._step_count = step + 1  # noqa: SLF001  (as if stepped once per iteration)
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)  # noqa: SLF001


# ----------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _np_state_to_tensors(np.random.get_state()),
             "python": _py_state_to_tensor(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_np_state_from_tensors(state["numpy"]))
    random.setstate(_py_state_from_tensor(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# The checkpoint's state file is loaded with weights_only=True: keep RNG states as tensors/plain data.
def _np_state_to_tensors(st) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = st
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _np_state_from_tensors(d) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _py_state_to_tensor(st) -> dict[str, Any]:
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _py_state_from_tensor(d) -> tuple:
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


# ------------------------------------------------------------------ sampler
class ResumableSampler(torch.utils.data.Sampler[int]):
    """Seeded shuffle per epoch, sharded by rank, resumable mid-epoch.

    The permutation of epoch ``e`` depends only on ``(seed, e)``, so a resumed
    run sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        if n <= 0:
            raise ArforgeError("the training dataset is empty")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.start = 0  # samples of this rank's shard already consumed in this epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.n // self.world_size if self.drop_last else math.ceil(self.n / self.world_size)
        if not self.drop_last:
            order = order + order[: per_rank * self.world_size - self.n]
        return order[self.rank: per_rank * self.world_size: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return len(self._indices()) - self.start


class InfiniteLoader:
    """Iterates batches forever over epochs, tracking (epoch, batches done) for resume.

    Map-style datasets are read through a :class:`ResumableSampler`: a resumed
    run continues at the exact sample of its epoch's permutation.

    Iterable datasets (webdataset shards, ``ImageShardsDataset``) order and
    split themselves: by rank and DataLoader worker, shuffled by their own
    settings and reseeded per epoch with ``set_epoch``; a DataLoader refuses a
    sampler for them. An epoch is one pass of the stream and ends when the
    stream does (its length need not be known, and ranks may reach the end at
    different steps: training is step-based). Resume restores the same
    position, (epoch, batches done in it): the epoch's stream is reopened and
    the batches already trained on are read again and dropped. A stream is a
    function of (its seed, the epoch, rank, worker count), so with the same
    ``num_workers`` the resumed run sees the batches an uninterrupted run would
    have; the cost is re-reading the finished part of the epoch. The RNG state
    restored from the checkpoint is kept across that skip, so transforms
    running in the main process (``num_workers=0``) do not shift it. A stream
    that repeats forever (``repeat=True``) is one endless epoch: leave it off
    here, the loader makes the passes.
    """

    def __init__(self, dataset, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, collate_fn: Callable | None = None, shuffle: bool = True):
        self.dataset = dataset
        self.batch_size = batch_size
        self.streaming = isinstance(dataset, torch.utils.data.IterableDataset)
        self.sampler: ResumableSampler | None = None
        self.batches_per_epoch: int | None = None  # unknown for a stream: its end ends the epoch
        if not self.streaming:
            self.sampler = ResumableSampler(len(dataset), seed=seed, shuffle=shuffle, rank=rank,
                                            world_size=world_size)
            per_epoch = len(self.sampler) // batch_size
            if per_epoch == 0:
                raise ArforgeError(
                    f"the dataset has {len(dataset)} samples, fewer than one batch of {batch_size}"
                    f"{' per rank' if world_size > 1 else ''}; lower the batch size")
            self.batches_per_epoch = per_epoch
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.epoch = 0
        self.batch_in_epoch = 0
        self._it: Iterator | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state(self, st: Mapping[str, int]) -> None:
        self.epoch, self.batch_in_epoch = int(st["epoch"]), int(st["batch_in_epoch"])
        self._it = None

    def _open(self) -> None:
        if hasattr(self.dataset, "set_epoch"):  # token codes pick their ten-crop view, shards reshuffle
            self.dataset.set_epoch(self.epoch)
        generator = torch.Generator().manual_seed(self.epoch)
        if self.streaming:
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=self.batch_size, drop_last=True, num_workers=self.num_workers,
                collate_fn=self.collate_fn, persistent_workers=False, generator=generator)
            self._it = iter(loader)
            if self.batch_in_epoch:
                self._skip(self.batch_in_epoch)
            return
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch * self.batch_size)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=self.num_workers, collate_fn=self.collate_fn,
            persistent_workers=False, generator=generator)
        self._it = iter(loader)

    def _skip(self, batches: int) -> None:
        saved = rng_state()
        try:
            for done in range(batches):
                try:
                    next(self._it)
                except StopIteration:
                    raise ArforgeError(
                        f"cannot resume at batch {batches} of epoch {self.epoch}: the data stream now ends "
                        f"after {done} batches; the shards (or num_workers, which splits them) changed "
                        "since the checkpoint") from None
        finally:
            set_rng_state(saved)

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._open()
        try:
            batch = next(self._it)
        except StopIteration:
            if self.streaming and self.batch_in_epoch == 0:
                raise self._short_stream() from None
            self.epoch += 1
            self.batch_in_epoch = 0
            self._open()
            try:
                batch = next(self._it)
            except StopIteration:
                raise self._short_stream() from None
        self.batch_in_epoch += 1
        if self.batches_per_epoch is not None and self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._it = None
        return batch

    def _short_stream(self) -> ArforgeError:
        source = getattr(self.dataset, "source", type(self.dataset).__name__)
        return ArforgeError(
            f"the data stream {source} yields fewer than one batch of {self.batch_size} in a pass (per rank "
            "and DataLoader worker); lower the batch size or give every rank and worker more shards")


# ----------------------------------------------------------------- the loop
@dataclass
class TrainLoop:
    """Checkpointing, exact resume, NaN guard and progress for a step-based trainer.

    ``weights`` maps names to modules whose state dicts go into safetensors;
    ``optimizers``/``extra`` hold state that goes into the small state file.
    """

    ctx: Any
    total_steps: int
    weights: dict[str, Any]
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # objects with state_dict/load_state_dict
    #: LR schedulers (:func:`lr_scheduler`), stepped once per iteration; checkpointed and restored
    schedulers: dict[str, LRScheduler] = field(default_factory=dict)
    loader: InfiniteLoader | None = None
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 10
    config: dict[str, Any] = field(default_factory=dict)
    #: gin option name -> value of the learning rates, named in the advice when training diverges
    lr_options: dict[str, float] = field(default_factory=dict)
    step: int = 0
    _t0: float = 0.0

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.ctx.output_dir) / "checkpoints"

    # ------------------------------------------------------------ resume
    def maybe_resume(self) -> bool:
        loaded = self._load_finite_checkpoint()
        if loaded is None:
            return False
        path = loaded.path
        for name, obj in self.weights.items():
            if name not in loaded.weights:
                raise ck.CheckpointError(f"{path} has no '{name}' weights; it was written by another trainer")
            _unwrap(obj).load_state_dict(loaded.weights[name], strict=True) if isinstance(obj, nn.Module) \
                else obj.load_state_dict(loaded.weights[name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(loaded.state["optimizers"][name])
        for name, obj in self.extra.items():
            if name in loaded.state.get("extra", {}):
                obj.load_state_dict(loaded.state["extra"][name])
        if self.loader is not None and "loader" in loaded.state:
            self.loader.load_state(loaded.state["loader"])
        self._restore_rng(loaded.state, path)
        self.step = loaded.step
        saved_schedulers = loaded.state.get("schedulers", {})
        for name, scheduler in self.schedulers.items():
            restore_scheduler(scheduler, saved_schedulers.get(name), self.step)
        self.ctx.log(f"resumed from {path} at step {self.step}")
        return True

    def _restore_rng(self, state: Mapping[str, Any], path: Path) -> None:
        """Each rank continues its own random streams (dropout, label dropout, augmentation).

        Checkpoints keep one RNG state per rank (``rng_per_rank``); rank 0's is also ``rng``.
        Resumed with another number of ranks, the streams cannot continue: each rank then
        starts a stream of its own, seeded from (step, rank), and the log says the resume
        is not exact.
        """
        rank, world = rank_world(self.ctx)
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == world:
            set_rng_state(per_rank[rank])
            return
        saved = len(per_rank) if per_rank is not None else 1
        if world == 1 and saved == 1:
            set_rng_state(state["rng"])
            return
        seed = int(state.get("step", 0)) * 1_000_003 + rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        self.ctx.log(f"{path} was written by {saved} rank(s) and this run has {world}: the random streams "
                     "(dropout, label dropout, augmentation) restart per rank, so this resume is not exact")

    def _load_finite_checkpoint(self) -> ck.Checkpoint | None:
        """The newest checkpoint whose tensors are all finite, loaded. A non-finite one (written
        before saves were checked, or by other code) is never resumed from: it is moved aside
        as ``nonfinite-step_...`` and the next older one is tried."""
        directory = self.checkpoint_dir
        newest = ck.latest_checkpoint(directory)
        if newest is None:
            return None
        candidates = [newest] + [p for p in reversed(ck.list_checkpoints(directory)) if p != newest]
        skipped: list[tuple[Path, str]] = []
        chosen = None
        for path in candidates:
            loaded = ck.load_checkpoint(path)
            bad = ck.first_non_finite(loaded.weights) or ck.first_non_finite(loaded.state, "state")
            if bad is None:
                chosen = loaded
                break
            skipped.append((path, bad))
        if skipped:
            barrier(self.ctx)  # every rank has read the checkpoints before rank 0 moves any
            for path, bad in skipped:
                if self.ctx.is_main:
                    moved = ck.quarantine_checkpoint(path)
                    self.ctx.log(f"not resuming from {path}: {bad} holds NaN/inf; moved it to {moved}")
            barrier(self.ctx)
        return chosen

    def save(self) -> Path | None:
        # Every rank gathers the state (FSDP full state dicts are collectives); rank 0 writes.
        weights = {name: (_unwrap(obj).state_dict() if isinstance(obj, nn.Module) else obj.state_dict())
                   for name, obj in self.weights.items()}
        rng = rng_state()
        state = {"optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                 "extra": {n: o.state_dict() for n, o in self.extra.items()},
                 "schedulers": {n: scheduler_state(s) for n, s in self.schedulers.items()},
                 "rng": rng, "rng_per_rank": gather_objects(self.ctx, rng), "step": self.step}
        # Checked on every rank (ranks without a full copy find nothing) and agreed on, so all
        # ranks stop together instead of the others waiting in the next collective.
        bad = ck.first_non_finite(weights) or ck.first_non_finite(state["optimizers"], "optimizer") \
            or ck.first_non_finite(state["extra"], "extra")
        if any_rank(self.ctx, bad is not None):
            raise self._diverged(NonFiniteWeightsError,
                                 f"{bad or 'a tensor on another rank'} holds NaN/inf after step {self.step}",
                                 f"refused to write checkpoint step_{self.step:08d}; the run stopped")
        path = None
        if self.ctx.is_main:
            if self.loader is not None:
                state["loader"] = self.loader.state()
            path = ck.save_checkpoint(self.checkpoint_dir, self.step, weights, state,
                                      config=self.config, keep_last=self.keep_last)
        # Once save returns, the checkpoint exists for every rank: a rank that stops (or reads it)
        # right after cannot race rank 0's write.
        barrier(self.ctx)
        return path

    # ------------------------------------------------------------ guard
    def last_finite_checkpoint(self) -> Path | None:
        """The newest checkpoint verified finite by reading it back (not just ``latest``)."""
        return ck.last_finite_checkpoint(self.checkpoint_dir)

    def check_finite(self, loss: torch.Tensor, parts: Mapping[str, Any] | None = None) -> None:
        if torch.isfinite(loss.detach()).all():
            return
        detail = ", ".join(f"{k}={float(torch.as_tensor(v).detach()):.4g}" for k, v in (parts or {}).items())
        raise self._diverged(NonFiniteLossError,
                             f"the loss became {float(loss.detach())} at step {self.step + 1} ({detail})",
                             "the run stopped without saving")

    def check_weights(self) -> None:
        """After an optimizer step (``step`` already counting it): every parameter of ``weights``
        is finite. One max-abs reduction per tensor and one sync per step; the names are looked
        up only on failure. Buffers and optimizer state are checked when saving."""
        params = [_local(p) for obj in self.weights.values() for _, p in _named_parameters(obj)]
        params = [p for p in params if p.numel() and (p.is_floating_point() or p.is_complex())]
        finite = True
        if params:
            try:
                norms = torch._foreach_norm(params, float("inf"))  # noqa: SLF001  (NaN propagates through max)
            except (AttributeError, RuntimeError, TypeError):
                norms = [p.abs().max() for p in params]
            finite = bool(torch.isfinite(torch.stack([n.float().to(params[0].device) for n in norms])).all())
        if not any_rank(self.ctx, not finite):
            return
        bad = None
        for name, obj in self.weights.items():
            bad = bad or ck.first_non_finite({n: _local(p) for n, p in _named_parameters(obj)}, name)
        raise self._diverged(NonFiniteWeightsError,
                             f"the optimizer step left NaN/inf in {bad or 'the weights on another rank'} "
                             f"at step {self.step}", "the run stopped without saving")

    @contextlib.contextmanager
    def guard_update(self):
        """Around the optimizer step(s): an update that overflows the weights' dtype (torch raises
        RuntimeError when lr / (1 - beta1) leaves float32's range) stops the run with a clear
        error instead of a raw traceback."""
        try:
            yield
        except RuntimeError as exc:
            if "overflow" not in str(exc):
                raise
            lrs = ", ".join(f"optimizer '{n}' lr={g['lr']:g}" for n, o in self.optimizers.items()
                            for g in _param_groups(o)[:1])
            raise self._diverged(UpdateOverflowError,
                                 f"the optimizer update at step {self.step + 1} overflowed the weights' dtype "
                                 f"({lrs}; torch: {str(exc).strip()})",
                                 "the run stopped without saving", suggest=1e-4) from None

    def _diverged(self, cls: type[DivergenceError], what: str, outcome: str,
                  suggest: float | None = None) -> DivergenceError:
        """The error to raise: what happened, the newest checkpoint verified finite, and the
        command to rerun (a FAILED run resumes from that checkpoint; launch.resume='auto')."""
        self.ctx.tracker.set_tags({"arforge.stopped": f"{cls.__name__} at step {self.step}"})
        last = self.last_finite_checkpoint() if self.ctx.is_main else None
        if last is not None:
            kept, then = f"Last finite checkpoint (verified): {last}", "resumes from that checkpoint"
        elif not self.ctx.is_main:  # only rank 0 reads the checkpoints back
            kept, then = "Last finite checkpoint: see rank 0's message", "resumes from it"
        else:
            kept, then = "Last finite checkpoint: none yet", "starts over"
        fp16 = getattr(getattr(self.ctx, "precision", None), "name", "") == "fp16"
        precision = " or train in bf16/fp32 instead of fp16" if fp16 else ""
        if self.lr_options:
            name, value = next(iter(self.lr_options.items()))
            if suggest is None:
                suggest = value / 10 if value and math.isfinite(value) else 1e-4
            config = getattr(self.ctx, "config_file", None)
            cmd = f"arforge run {config} --bind '{name} = {suggest:g}'" if config else f"--bind '{name} = {suggest:g}'"
            advice = f"Lower {name} (now {value:g}){precision}, e.g. `{cmd}`: the rerun {then}."
        else:
            advice = f"Lower the learning rate{precision} and rerun: the rerun {then}."
        return cls(f"{what}; {outcome}. {kept}. {advice}")

    # ------------------------------------------------------------ progress
    def progress(self):
        from tqdm.auto import tqdm

        self._t0 = time.time()
        return tqdm(total=self.total_steps, initial=self.step, disable=not self.ctx.is_main,
                    desc=self.ctx.run_name, dynamic_ncols=True, mininterval=1.0)

    def should_save(self) -> bool:
        return bool(self.save_every) and self.step % self.save_every == 0


def _named_parameters(obj: Any) -> list[tuple[str, torch.Tensor]]:
    """Parameters of a module, or of the module behind a state adapter (FSDP's ``.model``)."""
    module = obj if isinstance(obj, nn.Module) else getattr(obj, "model", None)
    if not isinstance(module, nn.Module):
        return []
    return [(n, p.detach()) for n, p in _unwrap(module).named_parameters()]


def _param_groups(opt: Any) -> list[dict[str, Any]]:
    inner = getattr(opt, "opt", opt)  # FSDP optimizer-state adapter
    return list(getattr(inner, "param_groups", []))
