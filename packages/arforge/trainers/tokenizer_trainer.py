"""The tokenizer trainer (``jobs.train_tokenizer``): VQ, LFQ and semantic-detail tokenizers.

Follows docs/llamagen.md#tokenizer-training: a generator step then a
discriminator step every iteration; Adam for both; gradient clipping per
network; a step LR schedule (Open-MAGVIT2's x0.1 decays); bf16/fp16 autocast;
EMA of the generator only (never the discriminator, docs/open_magvit2.md#differences-from-upstream); DDP under
torchrun; periodic reconstruction grids and PSNR/SSIM/LPIPS/codebook usage to
the tracker; checkpoints with exact resume; a NaN guard that keeps the last
good checkpoint.

IAR2's two-stage recipe (docs/iar2.md#stage-2-training-schedule): stage 2 starts from a stage-1 checkpoint
(``init_from``, every weight except the new detail codebook) and runs the
``("second", 2), ("first", 1)`` cycle with four optimizers, written out
explicitly: on a "first" iteration E1 is stepped on its clipped
semantic-only gradient plus that iteration's joint gradient; E2 and the rest
step every iteration on the joint gradient, clipped separately.
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from arforge import checkpoint as ck
from arforge import validation as V
from arforge.errors import ArforgeError
from arforge.metrics import adm
from arforge.trainers.common import EMA, InfiniteLoader, Schedule, TrainLoop, lr_scheduler, step_schedulers
from arforge.trainers.parallel import (PARALLEL, FSDPModelState, FSDPOptimState, ShardedEMA, _unwrap,
                                       all_reduce_grads, fully_shard_units, uses_fsdp, wrap_ddp)
from arforge.viz import reconstruction_grid


def _collate_images(batch):
    images = torch.stack([b[0] for b in batch])
    labels = torch.as_tensor([int(b[1]) for b in batch])
    return images, labels


def _clip(params: Sequence[nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    params = [p for p in params if p.grad is not None]
    if not max_norm or not params:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _skipped(dataset) -> int:
    return int(getattr(dataset, "skipped", 0) or 0)


def load_init(model: nn.Module, path: str | Path, *, which: str = "model",
              exclude: Sequence[str] = ()) -> list[str]:
    """Initialise ``model`` from an arforge checkpoint, strictly except ``exclude`` patterns.

    Returns the names left at their fresh initialisation (e.g. IAR2's
    ``quantize.embedding_second`` when stage 2 starts from stage 1). ``path`` may
    name an earlier stage's output as ``outputs:<experiment>/<run>/checkpoints``.
    """
    from arforge.tracking import resolve_path

    loaded = ck.load_checkpoint(resolve_path(path))
    if which not in loaded.weights:
        raise ck.CheckpointError(f"{path} has no '{which}' weights (it has {sorted(loaded.weights)})")
    source = loaded.weights[which]
    target = _unwrap(model).state_dict()
    pats = [re.compile(p) for p in exclude]
    skip = [k for k in target if any(p.fullmatch(k) for p in pats)]
    missing = [k for k in target if k not in source and k not in skip]
    unexpected = [k for k in source if k not in target]
    shape = [f"{k}: {tuple(source[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
             if k in source and k not in skip and source[k].shape != v.shape]
    if missing or unexpected or shape:
        raise ck.CheckpointError(
            f"{path} does not fit this tokenizer: missing {missing[:10]}, unexpected {unexpected[:10]}, "
            f"shape mismatches {shape[:10]}")
    merged = {k: (target[k] if k in skip else source[k].to(target[k].dtype)) for k in target}
    _unwrap(model).load_state_dict(merged, strict=True)
    return skip


@torch.no_grad()
def evaluate_tokenizer(tokenizer: nn.Module, dataset, *, device: torch.device, batch_size: int = 32,
                       max_images: int | None = None, perceptual: nn.Module | None = None,
                       precision=None) -> dict[str, float]:
    """Reconstruction metrics over a dataset: PSNR, SSIM (per image, docs/evaluation.md#psnr, docs/evaluation.md#ssim),
    LPIPS when a network is given, and codebook usage per id component (docs/evaluation.md#codebook-usage)."""
    was_training = tokenizer.training
    tokenizer.eval()
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    psnrs, ssims, lp = [], [], []
    seen: list[set[int]] = []
    pairs: set[tuple[int, ...]] = set()
    for i in range(0, n, batch_size):
        batch = [dataset[j] for j in range(i, min(n, i + batch_size))]
        images, _ = _collate_images(batch)
        images = images.to(device)
        out = tokenizer(images)
        rec = out.reconstruction.float().clamp(-1, 1)
        a, b = adm.to_uint8(images), adm.to_uint8(rec)
        psnrs.append(adm.psnr(a, b))
        ssims.append(adm.ssim(a, b))
        if perceptual is not None:
            lp.append(perceptual(images, rec).float().cpu().numpy().reshape(-1))
        ids = out.ids.reshape(-1, out.ids.shape[-1]).cpu()  # (B*L, S)
        if not seen:
            seen = [set() for _ in range(ids.shape[1])]
        for s in range(ids.shape[1]):
            seen[s].update(torch.unique(ids[:, s]).tolist())
        if ids.shape[1] > 1:
            pairs.update(map(tuple, torch.unique(ids, dim=0).tolist()))
    tokenizer.train(was_training)
    sizes = _unwrap(tokenizer).codebook_sizes
    metrics = {"psnr": float(np.concatenate(psnrs).mean()), "ssim": float(np.concatenate(ssims).mean())}
    if lp:
        metrics["lpips"] = float(np.concatenate(lp).mean())
    for s, used in enumerate(seen):
        metrics["usage" if len(seen) == 1 else f"usage_{s}"] = len(used) / sizes[s]
    if len(seen) > 1:
        metrics["usage_pairs"] = len(pairs) / float(np.prod(sizes))
    return metrics


def train_tokenizer(
    ctx,
    *,
    tokenizer: nn.Module,
    loss: nn.Module,
    dataset,
    val_dataset=None,
    steps: int,
    batch_size: int,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    disc_lr: float | None = None,
    disc_betas: tuple[float, float] | None = None,
    grad_clip: float | None = 1.0,
    lr_milestones: Sequence[int] = (),
    lr_gamma: float = 0.1,
    ema_decay: float | None = None,
    parallel: str = "auto",
    save_every: int = 0,
    keep_last: int = 2,
    log_every: int = 10,
    eval_every: int = 0,
    eval_images: int = 256,
    grid_images: int = 16,
    num_workers: int = 0,
    init_from: str | None = None,
    init_exclude: Sequence[str] = (),
    stage_cycle: str | None = None,
    semantic_codebook: str = "quantize.embedding.weight",
    detail_codebook: str = "quantize.embedding_second",
    log_checkpoint: bool = True,
) -> dict[str, float]:
    """Train an image tokenizer and its discriminator.

    Args:
        tokenizer: a ``Tokenizer`` (e.g. ``@tokenizers.llamagen_vq()``).
        loss: a ``TokenizerLoss`` (``@losses.tokenizer_loss()``), holding the discriminator.
        dataset / val_dataset: (image in [-1, 1], label) datasets.
        steps: total generator iterations.
        batch_size: per-rank batch size (global = batch_size x world size).
        lr / betas: generator Adam (docs/llamagen.md#tokenizer-training: 1e-4, (0.9, 0.95); Open-MAGVIT2 (0.5, 0.9)).
        disc_lr / disc_betas: discriminator Adam (default: the generator's).
        grad_clip: max gradient norm per network (1.0; None for Open-MAGVIT2).
        lr_milestones / lr_gamma: multiply both learning rates by gamma at these iterations
            (Open-MAGVIT2's x0.1 after epochs 200 and 250, converted to iterations).
        ema_decay: EMA of the generator (0.9999 LlamaGen optional, 0.999 Open-MAGVIT2); None = off.
        parallel: ``auto`` (DDP under torchrun, as upstream), ``ddp``, ``fsdp`` (each top-level part
            of the tokenizer -- encoder, quantizer, decoder, ... -- and the discriminator become FSDP
            units; the EMA stays sharded) or ``none``.
        save_every / keep_last: checkpoint period (iterations) and how many to keep.
        log_every / eval_every: metric and reconstruction-grid periods.
        eval_images / grid_images: validation images for metrics / for the picture.
        init_from: an arforge checkpoint to start from (IAR2 stage 2 from stage 1); an earlier
            stage's ``outputs:<experiment>/<run>/checkpoints`` works.
        init_exclude: regexes of parameters left freshly initialised by ``init_from``.
        stage_cycle: ``"iar2"`` for IAR2 stage 2's (second, second, first) cycle with four optimizers.
        semantic_codebook / detail_codebook: parameter names of E1 and E2 for that cycle.
        log_checkpoint: log the final checkpoint folder as an MLflow artifact.
    """
    V.check_args(
        "jobs.train_tokenizer", locals(), where=ctx,
        steps=V.POSITIVE_INT, batch_size=V.POSITIVE_INT, lr=V.POSITIVE_FLOAT, disc_lr=V.optional(V.POSITIVE_FLOAT),
        grad_clip=V.optional(V.POSITIVE_FLOAT), lr_milestones=V.sequence_of(V.POSITIVE_INT),
        lr_gamma=V.POSITIVE_FLOAT, ema_decay=V.optional(V.DECAY), parallel=V.choice(*PARALLEL), save_every=V.NON_NEGATIVE_INT,
        keep_last=V.POSITIVE_INT, log_every=V.POSITIVE_INT, eval_every=V.NON_NEGATIVE_INT,
        eval_images=V.NON_NEGATIVE_INT, grid_images=V.NON_NEGATIVE_INT, num_workers=V.NON_NEGATIVE_INT,
        init_from=V.optional(V.PATH), stage_cycle=V.optional(V.choice("iar2")), log_checkpoint=V.BOOL)
    device = ctx.device
    tokenizer = tokenizer.to(device)
    loss = loss.to(device)
    disc = getattr(loss, "discriminator", None)
    scaler = ctx.precision.grad_scaler(device)

    if init_from and not _has_checkpoint(ctx):
        fresh = load_init(tokenizer, init_from, exclude=init_exclude)
        ctx.log(f"initialised from {init_from}; fresh: {fresh or 'nothing'}")
        if disc is not None:
            from arforge.tracking import resolve_path

            loaded = ck.load_checkpoint(resolve_path(init_from))
            if "loss" in loaded.weights:
                loss.load_state_dict(loaded.weights["loss"], strict=True)

    fsdp = uses_fsdp(ctx, parallel)
    # Under FSDP only rank 0 evaluates, on an unsharded copy refreshed from the gathered weights.
    eval_copy = copy.deepcopy(tokenizer) if fsdp and ctx.is_main and val_dataset is not None else None
    if fsdp:
        # Every top-level part is its own unit, so the calls IAR2's semantic-only pass makes past
        # the tokenizer's forward (encode_features, quantize, decode_features) gather their weights.
        fully_shard_units(tokenizer, [m for m in tokenizer.children() if next(m.parameters(), None) is not None], ctx)
        if disc is not None:
            fully_shard_units(disc, [], ctx)
        gen_model, disc_model = tokenizer, disc
    else:
        gen_model = wrap_ddp(tokenizer, ctx, parallel, find_unused_parameters=stage_cycle == "iar2")
        disc_model = wrap_ddp(disc, ctx, parallel) if disc is not None else None

    # After sharding: FSDP replaces the parameters with sharded ones.
    named = dict(_unwrap(tokenizer).named_parameters())
    if stage_cycle == "iar2":
        for name in (semantic_codebook, detail_codebook):
            if name not in named:
                raise ArforgeError(f"stage_cycle='iar2' needs parameter {name!r} in the tokenizer "
                                   f"(use quantizers.semantic_detail with the detail codebook)")
        groups = {"e1": [named[semantic_codebook]], "e2": [named[detail_codebook]],
                  "rest": [p for n, p in named.items() if n not in (semantic_codebook, detail_codebook)]}
    else:
        groups = {"gen": list(named.values())}
    optimizers = {k: torch.optim.Adam(v, lr=lr, betas=betas) for k, v in groups.items()}
    if disc is not None:
        optimizers["disc"] = torch.optim.Adam(disc.parameters(), lr=disc_lr or lr, betas=disc_betas or betas)
    schedule = Schedule(kind="step", milestones=tuple(lr_milestones), gamma=lr_gamma)
    # Each optimizer's lr is its own peak lr times schedule(iteration), checkpointed with the run.
    schedulers = {k: lr_scheduler(opt, schedule) for k, opt in optimizers.items()}

    ema = (ShardedEMA(tokenizer, decay=ema_decay) if fsdp else EMA(tokenizer, decay=ema_decay)) if ema_decay else None
    loader = InfiniteLoader(dataset, batch_size=batch_size, seed=ctx.seed, rank=ctx.dist.rank,
                            world_size=ctx.dist.world_size, num_workers=num_workers, collate_fn=_collate_images)
    weights: dict[str, Any] = {"model": FSDPModelState(tokenizer) if fsdp else tokenizer,
                               "loss": FSDPModelState(loss) if fsdp else loss}
    if ema is not None:
        weights["ema"] = ema
    states = {k: FSDPOptimState(disc if k == "disc" else tokenizer, opt) if fsdp else opt
              for k, opt in optimizers.items()}
    loop = TrainLoop(ctx=ctx, total_steps=steps, weights=weights, optimizers=states,
                     extra={"scaler": scaler} if scaler.is_enabled() else {}, schedulers=schedulers, loader=loader,
                     save_every=save_every, keep_last=keep_last, log_every=log_every,
                     config={"job": "train_tokenizer", "codebook_sizes": list(_unwrap(tokenizer).codebook_sizes),
                             "downsample": _unwrap(tokenizer).downsample},
                     lr_options={"jobs.train_tokenizer.lr": lr,
                                 **({"jobs.train_tokenizer.disc_lr": disc_lr} if disc_lr else {})})
    loop.maybe_resume()

    def eval_model() -> nn.Module | None:
        """The model rank 0 evaluates (None elsewhere); every rank calls it (gathers are collectives)."""
        if not fsdp:
            return (ema.model if ema is not None else _unwrap(tokenizer)) if ctx.is_main else None
        full = weights["ema" if ema is not None else "model"].state_dict()
        if eval_copy is None:
            return None
        eval_copy.load_state_dict(full, strict=True)
        return eval_copy

    perceptual = getattr(loss, "perceptual", None)
    bar = loop.progress()
    tokenizer.train()
    t_last, images_since = time.time(), 0

    def run_generator(images, global_step, semantic_only=False):
        with ctx.precision.autocast(device):
            if semantic_only:
                z = _unwrap(tokenizer).encode_features(images)
                q = _unwrap(tokenizer).quantize(z, semantic_only=True)
                rec = _unwrap(tokenizer).decode_features(q.z_q)
                out_losses = q.losses
            else:
                out = gen_model(images)
                rec, out_losses = out.reconstruction, out.losses
            g = loss.generator_loss(images=images, reconstruction=rec, quantizer_losses=out_losses,
                                    global_step=global_step, with_pixel_loss=not semantic_only)
        return rec, g

    metrics: dict[str, float] = {}
    while loop.step < steps:
        it = loop.step
        images, _ = next(loader)
        images = images.to(device, non_blocking=True)
        global_step = it + 1  # docs/llamagen.md#discriminator-and-gan-loss: GAN gating uses iteration index + 1
        first = stage_cycle == "iar2" and it % 3 == 2

        g_sem = None
        if first:  # the semantic-only pass trains E1 alone (docs/iar2.md#stage-2-training-schedule)
            optimizers["e1"].zero_grad(set_to_none=True)
            _, gs = run_generator(images, global_step, semantic_only=True)
            loop.check_finite(gs.total, gs.parts)
            scaler.scale(gs.total).backward()
            # This pass calls the unwrapped tokenizer (its semantic-only path is not the wrapper's
            # forward), so DDP does not average these gradients: all-reduce them here, before clipping.
            # (FSDP units reduce their gradients in their own backward hooks.)
            if not fsdp:
                all_reduce_grads(groups["e1"], ctx)
            _clip(groups["e1"], grad_clip)
            g_sem = [p.grad.detach().clone() if p.grad is not None else None for p in groups["e1"]]
        for k in groups:
            optimizers[k].zero_grad(set_to_none=True)
        rec, g = run_generator(images, global_step)
        loop.check_finite(g.total, g.parts)
        scaler.scale(g.total).backward()
        for k, opt in optimizers.items():
            if k in ("disc", "e1"):
                continue
            scaler.unscale_(opt)
            _clip(groups[k], grad_clip)
            with loop.guard_update():
                scaler.step(opt)
        if stage_cycle == "iar2" and first:
            for p, gs_ in zip(groups["e1"], g_sem):
                if gs_ is not None:
                    p.grad = gs_ if p.grad is None else p.grad + gs_
            with loop.guard_update():
                scaler.step(optimizers["e1"])
        if ema is not None:
            ema.update(tokenizer)

        d = None
        if disc is not None:
            optimizers["disc"].zero_grad(set_to_none=True)
            with ctx.precision.autocast(device):
                # Through disc_model (the DDP wrapper under DDP): only a call through the wrapper
                # averages the discriminator's gradients over ranks in backward.
                d = loss.discriminator_loss(images=images, reconstruction=rec.detach(), global_step=global_step,
                                            discriminator=disc_model)
            loop.check_finite(d.total, d.parts)
            scaler.scale(d.total).backward()
            scaler.unscale_(optimizers["disc"])
            _clip(list(disc.parameters()), grad_clip)
            with loop.guard_update():
                scaler.step(optimizers["disc"])
        scaler.update()
        step_lr = optimizers[next(iter(groups))].param_groups[0]["lr"]  # the lr this step used, logged below
        step_schedulers(schedulers)

        loop.step += 1
        loop.check_weights()
        images_since += images.shape[0] * ctx.dist.world_size
        bar.update(1)
        if loop.step % log_every == 0 or loop.step == steps:
            now = time.time()
            metrics = {f"train/{k}": float(v) for k, v in g.detached().items()}
            metrics.update({f"train/{k}": float(v) for k, v in g.stats.items()})
            if d is not None:
                metrics.update({f"train/{k}": float(v) for k, v in d.detached().items() if k != "loss"})
                metrics["train/disc_loss"] = float(d.total.detach())
            metrics["train/lr"] = step_lr
            metrics["train/images_per_s"] = images_since / max(now - t_last, 1e-9)
            metrics["data/skipped"] = _skipped(dataset)
            t_last, images_since = now, 0
            ctx.tracker.log_metrics(metrics, step=loop.step)
            bar.set_postfix(loss=f"{float(g.total.detach()):.4f}")
        # The last step is evaluated once, by the final evaluation below.
        if eval_every and loop.step % eval_every == 0 and loop.step < steps and val_dataset is not None:
            model = eval_model()
            if model is not None:
                _eval_and_log(ctx, model, val_dataset, loop.step, eval_images, grid_images, perceptual)
        if loop.should_save():
            loop.save()
    bar.close()
    final = loop.save()
    results: dict[str, float] = {}
    model = eval_model() if val_dataset is not None else None
    if ctx.is_main:
        if model is not None:
            results = _eval_and_log(ctx, model, val_dataset, loop.step, eval_images, grid_images,
                                    perceptual, final=True)
        if log_checkpoint and final is not None:
            ctx.tracker.log_artifact(final, "checkpoint")
        ctx.extra["checkpoint"] = str(final)
        ctx.tracker.log_curves("curves/training.png")  # the curves as one picture (docs/tracking.md#what-a-run-logs)
    return results


def _has_checkpoint(ctx) -> bool:
    # A non-finite checkpoint is never resumed from (TrainLoop moves it aside): init_from still applies.
    return ck.last_finite_checkpoint(Path(ctx.output_dir) / "checkpoints") is not None


def _eval_and_log(ctx, model, val_dataset, step, eval_images, grid_images, perceptual,
                  final: bool = False) -> dict[str, float]:
    res = evaluate_tokenizer(model, val_dataset, device=ctx.device, max_images=eval_images,
                             perceptual=perceptual)
    prefix = "val/"
    ctx.tracker.log_metrics({prefix + k: v for k, v in res.items()}, step=step)
    # Training-curve objectives of tokenizer loss-weight studies (docs/studies.md#pruning):
    # val_psnr, val_usage, ... by training step; a study's pruner may stop the trial here.
    for k, v in res.items():
        ctx.report(f"val_{k}", v, step)
    n = min(grid_images, len(val_dataset))
    images = torch.stack([val_dataset[i][0] for i in range(n)]).to(ctx.device)
    with torch.no_grad():
        was = model.training
        model.eval()
        rec = model(images).reconstruction.float().clamp(-1, 1)
        model.train(was)
    name = "reconstructions/final.png" if final else f"reconstructions/step_{step:07d}.png"
    ctx.tracker.log_image(reconstruction_grid(images.cpu(), rec.cpu(), per_row=8), name)
    ctx.log("val " + ", ".join(f"{k}={v:.4f}" for k, v in res.items()))
    return res
