"""The sample-export job: N images per class from an AR model, written as an ADM ``.npz``.

``shared/specs/evaluation.md`` §1, §3 and ``upstream_pitfalls.md`` E1, E8, E9.

Labels
    Exactly ``samples_per_class`` per class: sample i (0 … C·N − 1) has class
    i // N and is the (i mod N)-th sample of it.
Ranks
    Rank r of W decodes the samples r, r + W, r + 2W, … in batches; every step
    rank 0 gathers the ranks' uint8 images (``gather_object``, so gloo works)
    and stores them in place. No shared file system is needed.
Seeding (per sample)
    Sample i draws its tokens from its own ``torch.Generator`` seeded with
    ``sample_seed(seed, i)`` (a SHA-256 of the pair). Its content therefore
    depends on (seed, i) only, not on the world size, the rank or the batch it
    was decoded with (up to floating-point differences between batch shapes on
    some kernels). LlamaGen instead seeds each rank with seed·W + rank, which
    makes the images depend on W.
Output
    One seeded permutation of all samples (``np.random.default_rng(seed).permutation``;
    ``arr_0[j]`` is sample ``perm[j]``), then ``np.savez`` (uncompressed) with
    ``arr_0`` uint8 NHWC and ``arr_1`` int64 labels, written to a temporary name
    and renamed into place. Pixels are rounded (``to_uint8``), after the optional
    bicubic resize to ``eval_size`` (no antialiasing). Rank 0 holds the whole
    array (the 50k × 256² file is 9.8 GB), filled directly in permuted order so
    nothing is copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from arforge.checkpoint import (CheckpointError, load_checkpoint, mark_loaded, require_loaded,
                                strip_wrapper_prefixes)
from arforge.errors import ConfigError
from arforge.generation import CFGSampler, NoGuidance, decode_tokens, generate, sampling_settings
from arforge.interfaces import as_grid
from arforge.metrics.adm import to_uint8
from arforge.viz import image_grid

__all__ = ["sample_images", "sample_seed", "sample_labels", "load_module_weights", "write_adm_npz"]


def sample_seed(seed: int, index: int) -> int:
    """The 63-bit seed of sample ``index`` under the run seed ``seed``."""
    digest = hashlib.sha256(f"arforge-sample:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_labels(num_classes: int, samples_per_class: int) -> np.ndarray:
    """Class of every sample in index order: [0]*N + [1]*N + … (int64)."""
    return np.repeat(np.arange(num_classes, dtype=np.int64), samples_per_class)


def load_module_weights(module: torch.nn.Module, path: str | os.PathLike, *, which: str = "auto",
                        what: str = "model") -> dict[str, Any]:
    """Load ``model`` or ``ema`` weights of an arforge checkpoint directory into ``module`` (strict).

    ``which="auto"`` takes ``ema`` when the checkpoint has it, else ``model``.
    ``path`` may be ``outputs:<experiment>/<run>/...`` (:func:`arforge.tracking.resolve_path`).
    Like :func:`arforge.checkpoint.restore` (``loaders.arforge_checkpoint``), it
    marks the module as loaded from that path (:func:`arforge.checkpoint.mark_loaded`).
    Returns what was loaded (path, step, entry) for logging.
    """
    from arforge.tracking import resolve_path

    if which not in ("auto", "model", "ema"):
        raise ConfigError(f"{what} weights must be 'auto', 'model' or 'ema', not {which!r}")
    ckpt = load_checkpoint(resolve_path(path))
    entry = which if which != "auto" else ("ema" if "ema" in ckpt.weights else "model")
    if entry not in ckpt.weights:
        raise CheckpointError(f"{ckpt.path} has no {entry!r} weights (it has {sorted(ckpt.weights)}); "
                              f"choose {what}_weights from those")
    state = strip_wrapper_prefixes(ckpt.weights[entry])
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt.path} [{entry}] does not fit the configured {what} "
                              f"({type(module).__name__}); check the preset/size in the gin file against the "
                              f"checkpoint. {str(exc)[:1500]}") from exc
    mark_loaded(module, ckpt.path)
    return {"path": str(ckpt.path), "step": ckpt.step, "weights": entry}


def write_adm_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """``np.savez`` (uncompressed) of ``arr_0`` uint8 NHWC and ``arr_1`` int64, atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"the sample file must end in .npz, got {path}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, arr_0=np.ascontiguousarray(images), arr_1=np.asarray(labels, dtype=np.int64))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _size_pair(eval_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if eval_size is None:
        return None
    size = (int(eval_size), int(eval_size)) if isinstance(eval_size, (int, np.integer)) else tuple(map(int, eval_size))
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"eval_size must be a positive int or (height, width), got {eval_size!r}")
    return size  # type: ignore[return-value]


def sample_images(ctx: Any = None, *, model: Any, tokenizer: Any, sampler: CFGSampler | None = None,
                  model_checkpoint: str | os.PathLike | None = None,
                  tokenizer_checkpoint: str | os.PathLike | None = None,
                  model_weights: str = "auto", tokenizer_weights: str = "auto",
                  temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
                  top_p: float | Sequence[float] = 1.0, greedy: bool | Sequence[bool] = False,
                  samples_per_class: int = 50, num_classes: int | None = None, batch_size: int = 32,
                  eval_size: int | Sequence[int] | None = None, seed: int | None = None,
                  output: str | os.PathLike | None = None, grid_classes: int = 10, grid_samples: int = 10,
                  untrained_model: bool = False, progress: bool = True) -> dict[str, Any]:
    """Generate ``samples_per_class`` images of each class and write the ADM sample ``.npz``.

    See the module docstring for labels, sharding, seeding and the file format.

    Args:
        ctx: a :class:`arforge.launch.RunContext` or
            :func:`arforge.data.extraction.local_context` (None: a local one in
            the parent folder of ``output``).
        model: an :class:`arforge.ar_model.ARModel` (moved to ``ctx.device``, eval mode).
        tokenizer: its tokenizer (``decode(ids (B, L, S), grid) -> images``).
        sampler: the guidance schedule (``samplers.*``; None: unguided).
        model_checkpoint, tokenizer_checkpoint: arforge checkpoint directories
            (a ``step_*`` folder, or a ``checkpoints`` folder with ``latest``;
            ``outputs:<experiment>/<run>/...`` works) to load strictly. Leave them
            None for components already restored by a loader (``loaders.arforge_checkpoint``,
            ``loaders.official_*``). A model or tokenizer that neither filled is refused
            (:func:`arforge.checkpoint.mark_loaded` says why).
        model_weights, tokenizer_weights: ``auto`` (``ema`` if present, else
            ``model``), ``model`` or ``ema``.
        temperature, top_k, top_p, greedy: per sub-token (a tuple) or for all (§9.1, §10).
        samples_per_class: N (evaluation.md §3: 50).
        num_classes: C (default: the model's, 1000 for ImageNet).
        batch_size: images per decode batch per rank (the caches hold 2× with CFG).
        eval_size: resize to this size before rounding (256 for the 384 px models); None keeps it.
        seed: generation and permutation seed (default ``ctx.seed``).
        output: the ``.npz`` path (default ``ctx.output_dir / "samples.npz"``; ``outputs:...`` works);
            always rewritten whole.
        grid_classes, grid_samples: the logged grid shows the first classes, one row each.
        untrained_model: sample from a model no loader filled, on purpose: the "untrained" baseline
            row of a results table. Logged as the ``sample.untrained_model`` param; the tokenizer
            must still be loaded.
        progress: a progress bar on rank 0.

    Returns:
        ``{"path", "num_samples", "num_classes", "samples_per_class", "image_shape",
        "images_per_s", "tokens_per_s", "seed"}`` (the same on every rank).
    """
    if ctx is None:
        from arforge.data.extraction import local_context

        if output is None:
            raise ConfigError("sample_images without a run context needs output=...npz")
        ctx = local_context(Path(output).parent)
    seed = int(ctx.seed if seed is None else seed)
    C = int(num_classes if num_classes is not None else model.null_class)
    N = int(samples_per_class)
    if C < 1 or N < 1 or batch_size < 1:
        raise ConfigError(f"num_classes ({C}), samples_per_class ({N}) and batch_size ({batch_size}) must be >= 1")
    if C > model.null_class:
        raise ConfigError(f"num_classes {C} exceeds the model's {model.null_class} classes")
    size = _size_pair(eval_size)
    sampler = sampler if sampler is not None else NoGuidance()
    settings = sampling_settings(model.num_subtokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 greedy=greedy)
    from arforge.tracking import resolve_path

    out_path = resolve_path(output) if output is not None else Path(ctx.output_dir) / "samples.npz"
    if out_path.suffix != ".npz":
        raise ConfigError(f"output must be a .npz file, got {out_path}")

    device = torch.device(ctx.device)
    loaded: dict[str, Any] = {}
    if model_checkpoint is not None:
        loaded["model"] = load_module_weights(model, model_checkpoint, which=model_weights, what="model")
    if tokenizer_checkpoint is not None:
        loaded["tokenizer"] = load_module_weights(tokenizer, tokenizer_checkpoint, which=tokenizer_weights,
                                                  what="tokenizer")
    # Random weights decode noise that looks like a result: refuse them before any work.
    if not untrained_model:
        require_loaded(model, binding="jobs.sample.model", checkpoint_binding="jobs.sample.model_checkpoint",
                       on_purpose="jobs.sample.untrained_model = True")
    require_loaded(tokenizer, binding="jobs.sample.tokenizer",
                   checkpoint_binding="jobs.sample.tokenizer_checkpoint")
    model.to(device).eval()
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer.to(device).eval()

    dist = ctx.dist
    rank, world = dist.rank, dist.world_size
    distributed = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if world > 1 and not distributed:
        raise ConfigError(f"ctx.dist says world_size {world} but torch.distributed is not initialised")
    total = C * N
    labels_all = sample_labels(C, N)
    mine = np.arange(rank, total, world)  # this rank's sample indices
    steps = -(-len(range(0, total, world)) // batch_size)  # rank 0 has the most: all ranks step together
    L = model.block_size
    grid = as_grid(L)

    if dist.is_main:
        params = {**sampler.params(), "sample.temperature": _fmt(s.temperature for s in settings),
                  "sample.top_k": _fmt(s.top_k for s in settings), "sample.top_p": _fmt(s.top_p for s in settings),
                  "sample.greedy": _fmt(s.greedy for s in settings), "sample.samples_per_class": N,
                  "sample.num_classes": C, "sample.num_samples": total, "sample.batch_size": batch_size,
                  "sample.world_size": world, "sample.eval_size": str(size) if size else "native",
                  "sample.seed": seed, "sample.seeding": "per-sample sha256(seed, index)",
                  "sample.label_scheme": f"exactly {N} per class, seeded permutation",
                  "sample.output": str(out_path), "sample.untrained_model": bool(untrained_model)}
        for what, module in (("model", model), ("tokenizer", tokenizer)):  # restored by loaders.arforge_checkpoint
            if what not in loaded and getattr(module, "checkpoint_path", None):
                params[f"sample.{what}_checkpoint"] = str(module.checkpoint_path)
        for what, info in loaded.items():
            params.update({f"sample.{what}_checkpoint": info["path"], f"sample.{what}_step": info["step"],
                           f"sample.{what}_weights": info["weights"]})
        ctx.tracker.log_params(params)
        ctx.log(f"sampling {N} x {C} classes = {total} images on {world} rank(s), batch {batch_size}, "
                f"{type(sampler).__name__} (guided={sampler.guided}), into {out_path}")

    images: np.ndarray | None = None
    labels_out: np.ndarray | None = None
    inverse: np.ndarray | None = None
    grid_rows: dict[int, dict[int, np.ndarray]] = {}
    if dist.is_main:
        perm = np.random.default_rng(seed).permutation(total)  # arr_0[j] = sample perm[j]
        inverse = np.empty(total, dtype=np.int64)
        inverse[perm] = np.arange(total)
        labels_out = labels_all[perm]
    from tqdm import tqdm

    bar = tqdm(total=total, desc="sample", unit="img", disable=not (dist.is_main and progress))
    ar_seconds = dec_seconds = 0.0
    start = time.perf_counter()
    try:
        for step in range(steps):
            idx = mine[step * batch_size:(step + 1) * batch_size]
            payload = None
            if len(idx):
                gens = [torch.Generator(device=device).manual_seed(sample_seed(seed, int(i))) for i in idx]
                lab = torch.from_numpy(labels_all[idx]).to(device)
                t0 = time.perf_counter()
                with ctx.precision.autocast(device):
                    sub = generate(model, lab, sampler=sampler, sampling=settings, generator=gens)  # (b, L, K)
                t1 = time.perf_counter()
                pix = to_uint8(decode_tokens(tokenizer, model.factorization, sub, grid, eval_size=size).float())
                dec_seconds += time.perf_counter() - t1
                ar_seconds += t1 - t0
                payload = (idx, pix)  # (b,), (b, H, W, 3) uint8
            if distributed:
                gathered: list[Any] | None = [None] * world if dist.is_main else None
                torch.distributed.gather_object(payload, gathered, dst=0)
                payloads = [p for p in gathered if p is not None] if gathered is not None else []
            else:
                payloads = [payload] if payload is not None else []
            for p_idx, p_pix in payloads:
                if images is None:
                    images = np.empty((total,) + p_pix.shape[1:], dtype=np.uint8)
                images[inverse[p_idx]] = p_pix  # straight into permuted order
                for i, im in zip(p_idx, p_pix):
                    c, j = divmod(int(i), N)
                    if c < grid_classes and j < grid_samples:
                        grid_rows.setdefault(c, {})[j] = im
                bar.update(len(p_idx))
    finally:
        bar.close()
    wall = time.perf_counter() - start

    result: dict[str, Any] = {}
    if dist.is_main:
        assert images is not None and labels_out is not None
        write_adm_npz(out_path, images, labels_out)
        # The sampler's settings travel with the samples, so the run that evaluates them can log
        # them next to its FID (jobs.evaluate_samples reads <samples>.json).
        sidecar = out_path.with_name(out_path.name + ".json")
        tmp = sidecar.with_name(f".{sidecar.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"params": {k: str(v) for k, v in params.items()}}, indent=1, sort_keys=True))
        os.replace(tmp, sidecar)
        cols = min(grid_samples, N)
        rows = [np.stack([grid_rows[c][j] for j in range(cols)]) for c in sorted(grid_rows)]
        ctx.tracker.log_image(image_grid(np.concatenate(rows), nrow=cols), "samples/grid.png")
        metrics = {"sample/images_per_s": total / wall, "sample/tokens_per_s": total * L / wall,
                   "sample/seconds": wall, "sample/ar_seconds_rank0": ar_seconds,
                   "sample/decode_seconds_rank0": dec_seconds,
                   "sample/ar_tokens_per_s_rank0": len(mine) * L / max(ar_seconds, 1e-9)}
        ctx.tracker.log_metrics(metrics)
        result = {"path": str(out_path), "num_samples": total, "num_classes": C, "samples_per_class": N,
                  "image_shape": tuple(int(v) for v in images.shape[1:]), "images_per_s": total / wall,
                  "tokens_per_s": total * L / wall, "seed": seed}
        ctx.log(f"wrote {total} samples {result['image_shape']} to {out_path} "
                f"({result['images_per_s']:.2f} images/s, {result['tokens_per_s']:.1f} tokens/s)")
    if distributed:  # every rank returns the same, and none reads the file before it exists
        shared = [result]
        torch.distributed.broadcast_object_list(shared, src=0)
        result = shared[0]
        torch.distributed.barrier()
    return result


def _fmt(values) -> Any:
    vals = list(values)
    return vals[0] if all(v == vals[0] for v in vals) else str(tuple(vals))
