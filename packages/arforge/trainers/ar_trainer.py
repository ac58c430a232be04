"""The AR trainer (``jobs.train_ar``): class-conditional next-token training on extracted codes.

docs/llamagen.md#ar-model-training: AdamW with betas (0.9, 0.95) and decay only
on tensors with >= 2 dims (norm gains and biases never decayed; IAR2's
name-based rule is a parity option), gradient clipping at 1.0, bf16/fp16
autocast, gradient accumulation, optional EMA, and the LR schedules of the
three families (constant; IAR2's per-step cosine; Open-MAGVIT2's
warm-up/hold/linear). Parallelism: DDP or FSDP (``torch.distributed.fsdp.fully_shard``)
under torchrun. The loss is the weighted sum of the sub-token cross-entropies
(IAR2's w1 weights the semantic sub-token), with IAR's cluster-oriented loss
when the model has a cluster size. Checkpoints are written atomically with
full (unsharded) weights, resume is exact, and a NaN loss stops the run with
the last good checkpoint kept.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Sequence

import torch
from torch import nn

from arforge import validation as V
from arforge.data.image_datasets import DataError
from arforge.errors import ArforgeError
from arforge.trainers.common import (EMA, InfiniteLoader, Schedule, TrainLoop, lr_scheduler, param_groups,
                                     step_schedulers)
from arforge.trainers.held_out import HeldOutCodes, unweighted_nll
from arforge.trainers.parallel import (PARALLEL, FSDPModelState, FSDPOptimState, ShardedEMA, _unwrap,
                                       fully_shard_units, uses_fsdp, wrap_ddp)


def _collate_codes(batch):
    codes = torch.stack([torch.as_tensor(b[0]) for b in batch]).long()  # (B, L, S)
    labels = torch.as_tensor([int(b[1]) for b in batch])
    return codes, labels


def check_dataset_fits(model: nn.Module, dataset) -> None:
    """Codes must fit the factorization's codebook and the model's sequence length."""
    fac = _unwrap(model).factorization
    if hasattr(dataset, "check_vocab"):
        dataset.check_vocab(tuple(fac.codebook_sizes))
    sample = dataset[0]
    codes = torch.as_tensor(sample[0])
    if codes.dim() != 2:
        raise ArforgeError(f"the AR dataset yields codes of shape {tuple(codes.shape)}; expected (L, S)")
    length, comps = codes.shape
    if comps != len(fac.codebook_sizes):
        raise ArforgeError(
            f"the codes have {comps} id component(s) per token but the factorization "
            f"{type(fac).__name__} expects {len(fac.codebook_sizes)} (codebook sizes {tuple(fac.codebook_sizes)}): "
            "extract the codes with a matching tokenizer or choose another factorization")
    _check_dataset_labels(model, dataset)
    block = _unwrap(model).block_size
    if length != block:
        raise ArforgeError(f"the codes hold {length} tokens per image but the model's block_size is {block}: "
                           "set the model's block_size to the tokenizer's grid (h*w)")


def _source(dataset) -> str:
    return f"dataset {getattr(dataset, 'source', None) or type(dataset).__name__}"


def _check_dataset_labels(model: nn.Module, dataset) -> None:
    """Labels outside [0, num_classes) are refused before training: label == num_classes would
    silently train as the CFG null class, a larger one fails in the embedding lookup."""
    num_classes = _unwrap(model).null_class
    if hasattr(dataset, "label_range"):  # token codes: a chunked scan of the labels array
        low, high = dataset.label_range()
        V.check_labels(low, high, num_classes, source=_source(dataset), error=DataError)
    classes = getattr(dataset, "classes", None)
    if classes and len(classes) > num_classes:
        raise DataError(f"{_source(dataset)} has {len(classes)} classes but the model has num_classes = "
                        f"{num_classes} (labels 0..{num_classes - 1}; label {num_classes} is the CFG null class). "
                        f"Set the model's num_classes = {len(classes)}")


def _collate_images(batch):
    images = torch.stack([torch.as_tensor(b[0]) for b in batch])  # (B, 3, H, W)
    labels = torch.as_tensor([int(b[1]) for b in batch])
    return images, labels


def check_tokenizer_fits(model: nn.Module, tokenizer: nn.Module, dataset) -> None:
    """On-the-fly tokenisation: the tokenizer's ids must fit the factorization, its grid the model."""
    fac = _unwrap(model).factorization
    if tuple(tokenizer.codebook_sizes) != tuple(fac.codebook_sizes):
        raise ArforgeError(f"the tokenizer's codebook sizes {tuple(tokenizer.codebook_sizes)} differ from the "
                           f"factorization's {tuple(fac.codebook_sizes)} ({type(fac).__name__})")
    _check_dataset_labels(model, dataset)
    image = torch.as_tensor(dataset[0][0])
    if image.dim() != 3:
        raise ArforgeError(f"with a tokenizer, the AR dataset must yield images (3, H, W), not {tuple(image.shape)}")
    h, w = image.shape[-2] // tokenizer.downsample, image.shape[-1] // tokenizer.downsample
    if h * w != _unwrap(model).block_size:
        raise ArforgeError(f"{image.shape[-1]} px images give {h}x{w} tokens but the model's block_size is "
                           f"{_unwrap(model).block_size}")


def _wrap(model: nn.Module, parallel: str, ctx) -> nn.Module:
    if uses_fsdp(ctx, parallel):  # one FSDP unit per transformer block, as LlamaGen's/IAR2's FSDP recipes
        inner = _unwrap(model)
        return fully_shard_units(inner, list(getattr(inner.backbone, "layers", [])), ctx)
    return wrap_ddp(model, ctx, parallel)


def train_ar(
    ctx,
    *,
    model: nn.Module,
    dataset,
    tokenizer: nn.Module | None = None,
    steps: int,
    batch_size: int,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.05,
    decay_rule: str = "ndim",
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    end_factor: float = 0.0,
    grad_clip: float | None = 1.0,
    grad_accum: int = 1,
    loss_weights: Sequence[float] | None = None,
    ema_decay: float | None = None,
    parallel: str = "auto",
    save_every: int = 0,
    keep_last: int = 2,
    log_every: int = 10,
    num_workers: int = 0,
    log_checkpoint: bool = True,
    val_dataset=None,
    val_tokenizer: nn.Module | None = None,
    eval_every: int = 0,
    eval_items: int = 256,
    compile: str | None = None,
    fused_adamw: bool | None = None,
) -> dict[str, float]:
    """Train a class-conditional AR model on token codes.

    Args:
        model: an ``ARModel`` (e.g. ``@models.llamagen_gpt()``).
        dataset: token codes, items ``(codes (L, S), label)`` (``@datasets.token_codes()``); or,
            with ``tokenizer``, images ``(image, label)`` tokenised on the fly.
        tokenizer: a frozen, trained tokenizer that encodes each batch of images (Open-MAGVIT2's AR
            training, docs/llamagen.md#ar-model-training: random crops of the images, no pre-extracted codes).
        steps: optimizer steps.
        batch_size: per-rank micro-batch; global batch = batch_size x grad_accum x world size.
        lr / betas / weight_decay: AdamW (docs/llamagen.md#ar-model-training: 1e-4, (0.9, 0.95), 0.05).
        decay_rule: ``ndim`` (no decay on norms/biases) or ``name_norm`` (IAR2 FSDP parity).
        lr_schedule: ``constant`` (LlamaGen), ``cosine`` (IAR2; ``end_factor`` = final/peak, e.g. 1/3),
            ``warmup_hold_linear`` (Open-MAGVIT2; ``warmup_steps`` = 6 or 7 epochs of iterations).
        grad_clip: max gradient norm (1.0 in every family).
        grad_accum: micro-batches per optimizer step.
        loss_weights: per-sub-token CE weights (IAR2 ``--w1`` = (w1, 1.0)); default: the model's.
        ema_decay: EMA of the weights (0.9999 optional in LlamaGen/IAR2); None = off. Under FSDP the
            EMA is sharded like the weights and gathered into the checkpoint (``ShardedEMA``).
        parallel: ``auto`` (DDP under torchrun), ``ddp``, ``fsdp`` or ``none``.
        save_every / keep_last / log_every: checkpoint and logging periods (optimizer steps).
        log_checkpoint: log the final checkpoint folder as an MLflow artifact.
        val_dataset: held-out data, items like ``dataset``'s (codes, or images with ``tokenizer`` or
            ``val_tokenizer``): its per-token NLL (unweighted, ``trainers/held_out.py``) is logged as
            ``val/nll``, reported with ``ctx.report("val_nll", ...)`` every ``eval_every`` steps
            and at the end, and returned as ``val_nll``. Every log also reports ``train_nll``.
        val_tokenizer: a frozen tokenizer that encodes ``val_dataset``'s images when the model
            trains on pre-extracted codes (e.g. the digits' validation split).
        eval_every / eval_items: held-out evaluation period (optimizer steps; 0: only at the
            end) and how many held-out items it reads (the first ones, encoded once).
        compile: a ``torch.compile`` backend for the training forward (``"inductor"``, torch's
            default; LlamaGen's ``train_c2i.py`` compiles unless ``--no-compile``); None runs eager.
            The compiled call goes through the DDP/FSDP wrapper; checkpoints hold the same keys.
        fused_adamw: the fused AdamW kernel (one kernel per step instead of a loop over tensors);
            None uses it on CUDA, as LlamaGen's ``creat_optimizer`` does, and torch's foreach
            implementation elsewhere; True also on the CPU.
    """
    V.check_args(
        "jobs.train_ar", locals(), where=ctx,
        steps=V.POSITIVE_INT, batch_size=V.POSITIVE_INT, lr=V.POSITIVE_FLOAT,
        weight_decay=V.NON_NEGATIVE_FLOAT, decay_rule=V.choice("ndim", "name_norm"),
        lr_schedule=V.choice("constant", "cosine", "warmup_hold_linear", "step"),
        warmup_steps=V.NON_NEGATIVE_INT, end_factor=V.NON_NEGATIVE_FLOAT, grad_clip=V.optional(V.POSITIVE_FLOAT),
        grad_accum=V.POSITIVE_INT, ema_decay=V.optional(V.DECAY), parallel=V.choice(*PARALLEL),
        save_every=V.NON_NEGATIVE_INT, keep_last=V.POSITIVE_INT, log_every=V.POSITIVE_INT,
        num_workers=V.NON_NEGATIVE_INT, log_checkpoint=V.BOOL, eval_every=V.NON_NEGATIVE_INT,
        eval_items=V.POSITIVE_INT, compile=V.optional(V.compile_backend_rule()), fused_adamw=V.optional(V.BOOL))
    device = ctx.device
    if tokenizer is None:
        check_dataset_fits(model, dataset)
    else:
        tokenizer = tokenizer.to(device).eval().requires_grad_(False)
        check_tokenizer_fits(model, tokenizer, dataset)
    num_classes = _unwrap(model).null_class  # labels must be < this; the null row is CFG's alone
    model = model.to(device)
    inner = model
    fac = inner.factorization
    wrapped = _wrap(model, parallel, ctx)
    fsdp = uses_fsdp(ctx, parallel)
    opt = torch.optim.AdamW(param_groups(inner, weight_decay=weight_decay, rule=decay_rule), lr=lr, betas=betas,
                            fused=device.type == "cuda" if fused_adamw is None else fused_adamw)
    forward = wrapped if compile is None else torch.compile(wrapped, backend=compile)
    schedule = Schedule(kind=lr_schedule, total_steps=steps, warmup_steps=warmup_steps, end_factor=end_factor)
    schedulers = {"opt": lr_scheduler(opt, schedule)}  # lr = lr * schedule(step), checkpointed with the run
    scaler = ctx.precision.grad_scaler(device)
    ema = (ShardedEMA(inner, decay=ema_decay) if fsdp else EMA(inner, decay=ema_decay)) if ema_decay else None
    loader = InfiniteLoader(dataset, batch_size=batch_size, seed=ctx.seed, rank=ctx.dist.rank,
                            world_size=ctx.dist.world_size, num_workers=num_workers,
                            collate_fn=_collate_images if tokenizer is not None else _collate_codes)
    weights: dict[str, Any] = {"model": FSDPModelState(wrapped) if fsdp else inner}
    if ema is not None:
        weights["ema"] = ema
    optimizers: dict[str, Any] = {"opt": FSDPOptimState(wrapped, opt) if fsdp else opt}
    loop = TrainLoop(ctx=ctx, total_steps=steps, weights=weights, optimizers=optimizers,
                     extra={"scaler": scaler} if scaler.is_enabled() else {}, schedulers=schedulers, loader=loader,
                     save_every=save_every, keep_last=keep_last, log_every=log_every,
                     config={"job": "train_ar", "codebook_sizes": list(fac.codebook_sizes),
                             "vocab_sizes": list(fac.vocab_sizes), "block_size": inner.block_size,
                             "num_params": inner.num_params()},
                     lr_options={"jobs.train_ar.lr": lr})
    loop.maybe_resume()
    weights_k = list(loss_weights) if loss_weights is not None else None  # None: the model's own
    if ctx.is_main and loop.step == 0:
        ctx.tracker.log_metrics({"model/params": float(inner.num_params())}, step=0)
    held_out = None
    if val_dataset is not None:
        val_tok = tokenizer if tokenizer is not None else val_tokenizer
        if val_tok is None:
            check_dataset_fits(inner, val_dataset)
        else:
            val_tok = val_tok.to(device).eval().requires_grad_(False)
            check_tokenizer_fits(inner, val_tok, val_dataset)
        held_out = HeldOutCodes(val_dataset, max_items=eval_items, batch_size=batch_size, device=device,
                                tokenizer=val_tok)

    def evaluate_held_out() -> float:
        # Every rank evaluates (FSDP's forward is a collective) on the same batches: the same value.
        value = held_out.nll(wrapped, fac, precision=ctx.precision, device=device)
        ctx.tracker.log_metrics({"val/nll": value}, step=loop.step)
        # A study's pruner may stop the trial here (optuna.TrialPruned): training ends at this step.
        ctx.report("val_nll", value, loop.step)
        return value
    wrapped.train()
    bar = loop.progress()
    t_last, tokens_since = time.time(), 0
    last: dict[str, float] = {}
    while loop.step < steps:
        opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(grad_accum):
            codes, labels = next(loader)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):  # on the CPU
                V.check_labels(int(labels.min()), int(labels.max()), num_classes, source=_source(dataset),
                               error=DataError)
            codes, labels = codes.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if tokenizer is not None:  # on-the-fly tokenisation, in fp32 (reduced precision can flip ids)
                with torch.no_grad():
                    codes = tokenizer.encode(codes.float())  # images (B, 3, H, W) -> ids (B, L, S)
            sub = fac.split(codes)  # (B, L, S) -> (B, L, K)
            sync = micro == grad_accum - 1 or not hasattr(wrapped, "no_sync")
            ctx_sync = wrapped.no_sync() if not sync else contextlib.nullcontext()
            with ctx_sync, ctx.precision.autocast(device):
                out = forward(sub, labels)  # through the DDP/FSDP wrapper: its hooks see the forward
                lb = inner.loss_from_logits(out.logits, sub, weights_k)
            loop.check_finite(lb.total, lb.parts)
            scaler.scale(lb.total / grad_accum).backward()
            for k, v in lb.detached().items():
                sums[k] = sums.get(k, 0.0) + v / grad_accum
            tokens_since += sub.shape[0] * sub.shape[1] * ctx.dist.world_size
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), grad_clip) if grad_clip else None
        with loop.guard_update():
            scaler.step(opt)
        scaler.update()
        if ema is not None:
            ema.update(inner)
        step_lr = opt.param_groups[0]["lr"]  # the lr this step used, logged below
        step_schedulers(schedulers)
        loop.step += 1
        loop.check_weights()
        bar.update(1)
        if loop.step % log_every == 0 or loop.step == steps:
            now = time.time()
            if ctx.dist.enabled:  # log the global-batch loss, not rank 0's share
                keys = sorted(sums)
                vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(vec)
                sums = {k: float(v) / ctx.dist.world_size for k, v in zip(keys, vec.tolist())}
            last = {f"train/{k}": v for k, v in sums.items()}
            last["train/lr"] = step_lr
            last["train/tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
            if gnorm is not None:
                last["train/grad_norm"] = float(gnorm)
            last["data/skipped"] = float(getattr(dataset, "skipped", 0) or 0)
            t_last, tokens_since = now, 0
            last["train/nll"] = unweighted_nll(sums)  # the loss without weights: comparable across them
            ctx.tracker.log_metrics(last, step=loop.step)
            ctx.report("loss", last["train/loss"], loop.step)
            ctx.report("train_nll", last["train/nll"], loop.step)
            bar.set_postfix(loss=f"{last['train/loss']:.4f}")
        if loop.should_save():
            loop.save()
        # After the save: a trial pruned here keeps its checkpoint of this step.
        if held_out is not None and eval_every and loop.step % eval_every == 0 and loop.step < steps:
            evaluate_held_out()
    bar.close()
    final = loop.save()
    if ctx.is_main and final is not None:
        if log_checkpoint:
            ctx.tracker.log_artifact(final, "checkpoint")
        ctx.extra["checkpoint"] = str(final)
    result = {k.removeprefix("train/"): v for k, v in last.items()}
    if held_out is not None:  # after the final checkpoint: a prune here keeps the trained weights
        result["val_nll"] = evaluate_held_out()
    if ctx.is_main:
        ctx.tracker.log_curves("curves/training.png")  # the curves as one picture (docs/tracking.md#what-a-run-logs)
    return result

