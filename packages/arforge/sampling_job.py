"""The sample-export job: N images per class from an AR model, written as an ADM ``.npz``.

See docs/evaluation.md#generation-protocol, docs/evaluation.md#sample-files and
docs/iar2.md#differences-from-upstream (the released IAR2 sampler).

Labels
    Exactly ``samples_per_class`` per class: sample i (0 … C·N − 1) has class
    i // N and is the (i mod N)-th sample of it.
Ranks
    Rank r of W decodes the samples r, r + W, r + 2W, … in batches and writes
    their pixels itself into the shared work file (below); only a count of
    images travels to rank 0 per step (for the progress bar). Rank 0 assembles
    the ``.npz`` after a barrier, so the ranks need one shared file system.
Seeding (per sample)
    Sample i draws its tokens from its own ``torch.Generator`` seeded with
    ``sample_seed(seed, i)`` (a SHA-256 of the pair). Its content therefore
    depends on (seed, i) only, not on the world size, the rank or the batch it
    was decoded with (up to floating-point differences between batch shapes on
    some kernels). LlamaGen instead seeds each rank with seed·W + rank, which
    makes the images depend on W. A resumed run decodes the remaining batches
    exactly as an uninterrupted one would (same world size and batch size: same
    batches), so it writes the same file byte for byte.
Work folder (resume, memory)
    ``<output>.work/`` next to the output holds ``pixels.npy`` (uint8
    (C·N, H, W, 3), already in the file's permuted order, written with
    ``pwrite``: nothing of size N is ever held in memory), ``settings.json``
    (what decides the pixels: seed, C, N, image size, guidance and sampling
    settings, SHA-256 of the model's and tokenizer's weights, device type,
    precision) and one ``done-rank<r>.json`` per rank: a bitmap of the samples
    whose pixels are on disk, replaced atomically after each batch's pixels are
    synced. A rerun of the same command (after a kill, at any point) skips the
    done samples; a rerun with other settings is refused
    (:class:`SampleResumeError`) rather than mixing two configurations. The
    folder is removed once the ``.npz`` is in place.
Output
    One seeded permutation of all samples (``np.random.default_rng(seed).permutation``;
    ``arr_0[j]`` is sample ``perm[j]``), stored as ``np.savez`` (uncompressed)
    would store it, with ``arr_0`` uint8 NHWC and ``arr_1`` int64 labels: the
    zip is streamed from ``pixels.npy`` a batch at a time (the bytes equal those
    of ``np.savez`` on the whole array), to a temporary name, and renamed into
    place. Pixels are rounded (``to_uint8``), after the optional bicubic resize
    to ``eval_size`` (no antialiasing). Peak memory is O(batch): the 50k × 256²
    file (9.8 GB) is never in RAM. The ``.npz`` writer and the work folder are
    :mod:`arforge.sample_files`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from arforge.checkpoint import (CheckpointError, load_checkpoint, mark_loaded, require_loaded,
                                strip_wrapper_prefixes, write_json_atomic)
from arforge import validation as V
from arforge.errors import ArforgeError, ConfigError
from arforge.generation import decode_tokens, generate, sampling_settings
from arforge.guidance import Guidance, NoGuidance, guidance_params
from arforge.interfaces import as_grid
from arforge.memory import auto_sample_batch, decode_bytes_per_image
from arforge.metrics.adm import to_uint8
# The ADM file writer and the resumable work folder are arforge.sample_files; sample_images calls
# them through these names (a test stands in for _write_adm_zip to kill a run mid-write).
from arforge.sample_files import (PIXELS, SampleResumeError, _encode_done, _npy_layout, _pixel_chunks,  # noqa: F401
                                  _prepare_work, _read_done, _read_images, _weights_sha256, _write_adm_zip,
                                  work_folder, write_adm_npz)
from arforge.viz import labelled_grid

__all__ = ["sample_images", "sample_seed", "sample_labels", "load_module_weights", "write_adm_npz",
           "work_folder", "SampleResumeError"]



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


_BATCH_SIZE = V.Rule(lambda v: v == "auto" or V.POSITIVE_INT(v), 'a positive integer, or "auto" (from free memory)',
                     '"auto"')


def _size_pair(eval_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if eval_size is None:
        return None
    size = (int(eval_size), int(eval_size)) if isinstance(eval_size, (int, np.integer)) else tuple(map(int, eval_size))
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"eval_size must be a positive int or (height, width), got {eval_size!r}")
    return size  # type: ignore[return-value]


def sample_images(ctx: Any = None, *, model: Any, tokenizer: Any, guidance: Guidance | None = None,
                  model_checkpoint: str | os.PathLike | None = None,
                  tokenizer_checkpoint: str | os.PathLike | None = None,
                  model_weights: str = "auto", tokenizer_weights: str = "auto",
                  temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
                  top_p: float | Sequence[float] = 1.0, greedy: bool | Sequence[bool] = False,
                  samples_per_class: int = 50, num_classes: int | None = None, batch_size: int | str = "auto",
                  eval_size: int | Sequence[int] | None = None, seed: int | None = None,
                  output: str | os.PathLike | None = None, grid_classes: int = 10, grid_samples: int = 10,
                  untrained_model: bool = False, progress: bool = True,
                  compile: str | None = None) -> dict[str, Any]:
    """Generate ``samples_per_class`` images of each class and write the ADM sample ``.npz``.

    See the module docstring for labels, sharding, seeding and the file format.

    Args:
        ctx: a :class:`arforge.launch.RunContext` or
            :func:`arforge.data.extraction.local_context` (None: a local one in
            the parent folder of ``output``).
        model: an :class:`arforge.ar_model.ARModel` (moved to ``ctx.device``, eval mode).
        tokenizer: its tokenizer (``decode(ids (B, L, S), grid) -> images``).
        guidance: the CFG schedule (``guidance.*``, :mod:`arforge.guidance`; None: unguided). Its
            settings are logged under their gin bindings (``guidance.cfg_linear.start``) and its
            ``repr`` as the tag ``sample.guidance``.
        model_checkpoint, tokenizer_checkpoint: arforge checkpoint directories
            (a ``step_*`` folder, or a ``checkpoints`` folder with ``latest``;
            ``outputs:<experiment>/<run>/...`` works) to load strictly. Leave them
            None for components already restored by a loader (``loaders.arforge_checkpoint``,
            ``loaders.official_*``). A model or tokenizer that neither filled is refused
            (:func:`arforge.checkpoint.mark_loaded` says why).
        model_weights, tokenizer_weights: ``auto`` (``ema`` if present, else
            ``model``), ``model`` or ``ema``.
        temperature, top_k, top_p, greedy: per sub-token (a tuple) or for all (docs/llamagen.md#logit-processing, docs/llamagen.md#sampling-defaults).
        samples_per_class: N (docs/evaluation.md#sample-files: 50).
        num_classes: C (default: the model's, 1000 for ImageNet).
        batch_size: images per decode batch per rank (the caches hold 2× with CFG); ``"auto"`` picks
            the largest batch whose decoding caches fit in half the free device memory, and the
            tokenizer's decode chunk the same way (:mod:`arforge.memory`); every rank takes the
            smallest of the ranks' picks. The batch does not change the samples (per-sample seeds).
        eval_size: resize to this size before rounding (256 for the 384 px models); None keeps it.
        seed: generation and permutation seed (default ``ctx.seed``).
        output: the ``.npz`` path (default ``ctx.output_dir / "samples.npz"``; ``outputs:...`` works);
            rewritten whole. Its work folder ``<output>.work`` (see the module docstring) lets a
            killed job, rerun with the same settings, continue where it stopped.
        grid_classes, grid_samples: the logged grid shows the first classes, one row each.
        untrained_model: sample from a model no loader filled, on purpose: the "untrained" baseline
            row of a results table. Logged as the ``sample.untrained_model`` param; the tokenizer
            must still be loaded.
        progress: a progress bar on rank 0 (a resumed job starts it at the samples already done).
        compile: decode through ``torch.compile`` with this backend (``"inductor"``; on CUDA with
            CUDA graphs, ``mode="reduce-overhead"``): ``ARModel.compile_decode``. None: eager.

    Returns:
        ``{"path", "num_samples", "num_classes", "samples_per_class", "image_shape",
        "images_per_s", "tokens_per_s", "seed", "resumed"}`` (the same on every rank; ``resumed``:
        samples an earlier, killed run had finished; the speeds count this run's samples only).
    """
    V.check_args("jobs.sample", locals(), where=ctx,
                 samples_per_class=V.POSITIVE_INT, num_classes=V.optional(V.POSITIVE_INT), batch_size=_BATCH_SIZE,
                 temperature=V.one_or_many(V.POSITIVE_FLOAT), top_k=V.one_or_many(V.NON_NEGATIVE_INT),
                 top_p=V.one_or_many(V.PROBABILITY), greedy=V.one_or_many(V.BOOL),
                 model_weights=V.choice("auto", "model", "ema"), tokenizer_weights=V.choice("auto", "model", "ema"),
                 eval_size=V.optional(V.one_or_many(V.POSITIVE_INT)), seed=V.optional(V.INT),
                 grid_classes=V.NON_NEGATIVE_INT, grid_samples=V.NON_NEGATIVE_INT,
                 untrained_model=V.BOOL, progress=V.BOOL, compile=V.optional(V.compile_backend_rule()))
    if ctx is None:
        from arforge.data.extraction import local_context

        if output is None:
            raise ConfigError("sample_images without a run context needs output=...npz")
        ctx = local_context(Path(output).parent)
    seed = int(ctx.seed if seed is None else seed)
    C = int(num_classes if num_classes is not None else model.null_class)
    N = int(samples_per_class)
    if C < 1 or N < 1:
        raise ConfigError(f"num_classes ({C}) and samples_per_class ({N}) must be >= 1")
    if C > model.null_class:  # class C would be the null (unconditional) row: never a class to sample
        raise ConfigError(f"{V.where_prefix(ctx)}jobs.sample.num_classes = {C} exceeds the model's {model.null_class} "
                          f"classes (labels 0..{model.null_class - 1}; {model.null_class} is the CFG null class). "
                          f"Set jobs.sample.num_classes <= {model.null_class} or leave it unset")
    size = _size_pair(eval_size)
    guidance = guidance if guidance is not None else NoGuidance()
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
    # bf16/fp16: the weights and caches in that dtype, as LlamaGen samples (Precision.sampling_dtype);
    # the tokenizer decodes in fp32.
    sample_dtype = ctx.precision.sampling_dtype(device)
    model.to(device=device, dtype=sample_dtype).eval()
    if compile is not None:
        model.compile_decode(backend=compile, mode="reduce-overhead" if device.type == "cuda" else None)
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer.to(device).eval()

    dist = ctx.dist
    rank, world = dist.rank, dist.world_size
    distributed = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if world > 1 and not distributed:
        raise ConfigError(f"ctx.dist says world_size {world} but torch.distributed is not initialised")
    total = C * N
    labels_all = sample_labels(C, N)
    L = model.block_size
    grid = as_grid(L)
    decode_batch = batch_size
    if batch_size == "auto":
        picked = auto_sample_batch(model, guided=guidance.guided, dtype=sample_dtype, device=device,
                                   decode_bytes=decode_bytes_per_image(
                                       lambda: _probe_shape(model, tokenizer, grid, size, device)),
                                   samples=-(-total // world))
        batch_size, decode_batch = picked.batch, picked.decode_batch
        if distributed:  # every rank steps with the same batch: the smallest pick
            both = torch.tensor([batch_size, decode_batch], device=device)
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MIN)
            batch_size, decode_batch = (int(v) for v in both.tolist())
        if dist.is_main:
            ctx.log(f"jobs.sample.batch_size = \"auto\": {picked.describe()}"
                    + (f"; {batch_size} on every rank (the smallest pick)" if distributed else ""))

    if dist.is_main:
        params = {**guidance_params(guidance, _registered_name(guidance)),  # under their gin bindings
                  "sample.temperature": _fmt(s.temperature for s in settings),
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
        ctx.tracker.set_tags({"sample.guidance": repr(guidance)})  # a description, not a second name
        ctx.log(f"sampling {N} x {C} classes = {total} images on {world} rank(s), batch {batch_size}, "
                f"{guidance!r} (guided={guidance.guided}), into {out_path}")

    perm = np.random.default_rng(seed).permutation(total)  # arr_0[j] = sample perm[j]
    inverse = np.empty(total, dtype=np.int64)
    inverse[perm] = np.arange(total)
    work = work_folder(out_path)

    # Rank 0 creates the work folder, or checks that the one there was made with these settings;
    # every rank learns the verdict, so none waits at a barrier for a rank that gave up.
    failure: BaseException | None = None
    if dist.is_main:
        try:
            shape = _probe_shape(model, tokenizer, grid, size, device)
            recorded = _work_settings(model=model, tokenizer=tokenizer, guidance=guidance, settings=settings,
                                      seed=seed, C=C, N=N, shape=shape, eval_size=size, device=device,
                                      precision=ctx.precision, untrained_model=untrained_model,
                                      info={k: str(v) for k, v in params.items()})
            _prepare_work(work, recorded, (total,) + shape)
        except Exception as exc:  # noqa: BLE001 - told to every rank, then raised
            failure = exc
    if distributed:
        box = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        torch.distributed.broadcast_object_list(box, src=0)
        if failure is None and box[0] is not None:
            raise SampleResumeError(f"rank 0 could not prepare {work}: {box[0]}")
    if failure is not None:
        raise failure
    if distributed:
        torch.distributed.barrier()  # the folder exists before any rank opens it

    problem = None
    try:
        offset, shape_all, _ = _npy_layout(work / PIXELS)
        done = _read_done(work, total)
    except (OSError, ArforgeError) as exc:
        problem = f"rank {rank}: {exc}"
    problems = [problem]
    if distributed:  # also a barrier: every rank has read the ledgers before any rank adds to them
        problems = [None] * world
        torch.distributed.all_gather_object(problems, problem)
    if any(problems):
        raise SampleResumeError(f"cannot open the work folder {work} ({'; '.join(p for p in problems if p)}); "
                                "every rank writes its samples there, so all ranks must see it (one shared "
                                "file system)")
    image_bytes = int(np.prod(shape_all[1:]))
    resumed = int(done.sum())
    # the batches each rank has left: the unfinished part of its own list r, r + W, ...; with the same W
    # and batch size these are exactly the batches an uninterrupted run decodes (a batch is done whole)
    left = [part[~done[part]] for part in (np.arange(r, total, world) for r in range(world))]
    steps = max(-(-len(part) // batch_size) for part in left)  # all ranks step together
    mine = left[rank]
    if dist.is_main and resumed:
        ctx.log(f"resuming from {work}: {resumed} of {total} samples were already done")

    from tqdm import tqdm

    bar = tqdm(total=total, initial=resumed, desc="sample", unit="img", disable=not (dist.is_main and progress))
    ar_seconds = dec_seconds = 0.0
    decoded = 0
    ledger = work / f"done-rank{rank}.json"
    sync = getattr(os, "fdatasync", os.fsync)
    start = time.perf_counter()
    fd = os.open(work / PIXELS, os.O_RDWR)
    try:
        for step in range(steps):
            idx = mine[step * batch_size:(step + 1) * batch_size]
            if len(idx):
                gens = [torch.Generator(device=device).manual_seed(sample_seed(seed, int(i))) for i in idx]
                lab = torch.from_numpy(labels_all[idx]).to(device)
                t0 = time.perf_counter()
                sub = generate(model, lab, guidance=guidance, sampling=settings, generator=gens)  # (b, L, K)
                t1 = time.perf_counter()
                pix = np.concatenate([to_uint8(decode_tokens(tokenizer, model.factorization, sub[i:i + decode_batch],
                                                             grid, eval_size=size).float())
                                      for i in range(0, len(sub), decode_batch)])  # (b, H, W, 3)
                dec_seconds += time.perf_counter() - t1
                ar_seconds += t1 - t0
                if pix.shape[1:] != shape_all[1:]:
                    raise RuntimeError(f"decoded images of shape {pix.shape[1:]}, the work file holds "
                                       f"{shape_all[1:]}")
                for i, im in zip(idx, pix):  # (H, W, 3) uint8 each, straight to its permuted place
                    os.pwrite(fd, memoryview(im.reshape(-1)), offset + int(inverse[i]) * image_bytes)
                sync(fd)  # the pixels are on disk before the ledger says so
                done[idx] = True
                decoded += len(idx)
                write_json_atomic(ledger, {"num_samples": total, "count": int(done.sum()),
                                            "done": _encode_done(done)})
            if distributed:  # a count, not pixels: rank 0's bar shows every rank's progress
                counts: list[Any] | None = [None] * world if dist.is_main else None
                torch.distributed.gather_object(len(idx), counts, dst=0)
                bar.update(sum(counts) if counts is not None else 0)
            else:
                bar.update(len(idx))
    finally:
        os.close(fd)
        bar.close()
    wall = time.perf_counter() - start
    if distributed:
        torch.distributed.barrier()  # every rank's pixels and ledger are written

    result: dict[str, Any] = {}
    if dist.is_main:
        missing = np.flatnonzero(~_read_done(work, total))
        if len(missing):
            raise SampleResumeError(f"{len(missing)} samples (e.g. {missing[:5].tolist()}) are missing from {work} "
                                    "after every rank finished: do all ranks see the same folder (one shared "
                                    "file system)? Rerun the same command to fill them in")
        chunk = batch_size * image_bytes  # the copy holds one batch of pixels at a time
        _write_adm_zip(out_path, shape_all, _pixel_chunks(work / PIXELS, offset, total * image_bytes, chunk),
                       labels_all[perm])
        # The guidance and sampling settings travel with the samples, so the run that evaluates them can log
        # them next to its FID (jobs.evaluate_samples reads <samples>.json).
        sidecar = out_path.with_name(out_path.name + ".json")
        tmp = sidecar.with_name(f".{sidecar.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"params": {k: str(v) for k, v in params.items()}}, indent=1, sort_keys=True))
        os.replace(tmp, sidecar)
        cols = min(grid_samples, N)
        cells = _read_images(work / PIXELS, offset, shape_all[1:],
                             [inverse[c * N + j] for c in range(min(grid_classes, C)) for j in range(cols)])
        # One row per class, labelled, under the guidance that sampled it (docs/tracking.md#what-a-run-logs).
        rows = [f"class {c}" for c in range(min(grid_classes, C))]
        ctx.tracker.log_image(labelled_grid(cells, nrow=cols, row_labels=rows, title=repr(guidance)),
                              "samples/grid.png")
        shutil.rmtree(work, ignore_errors=True)
        made = total - resumed  # by all ranks in this run
        metrics = {"sample/images_per_s": made / max(wall, 1e-9), "sample/tokens_per_s": made * L / max(wall, 1e-9),
                   "sample/seconds": wall, "sample/resumed": resumed, "sample/ar_seconds_rank0": ar_seconds,
                   "sample/decode_seconds_rank0": dec_seconds,
                   "sample/ar_tokens_per_s_rank0": decoded * L / max(ar_seconds, 1e-9)}
        ctx.tracker.log_metrics(metrics)
        result = {"path": str(out_path), "num_samples": total, "num_classes": C, "samples_per_class": N,
                  "image_shape": tuple(int(v) for v in shape_all[1:]), "images_per_s": metrics["sample/images_per_s"],
                  "tokens_per_s": metrics["sample/tokens_per_s"], "seed": seed, "resumed": resumed}
        ctx.log(f"wrote {total} samples {result['image_shape']} to {out_path} ({resumed} resumed; "
                f"{result['images_per_s']:.2f} images/s, {result['tokens_per_s']:.1f} tokens/s)")
    if distributed:  # every rank returns the same, and none reads the file before it exists
        shared = [result]
        torch.distributed.broadcast_object_list(shared, src=0)
        result = shared[0]
        torch.distributed.barrier()
    return result


def _registered_name(guidance: Any) -> str | None:
    """``guidance.<name>``, the registered name of ``guidance``'s class (None: not registered)."""
    from arforge import registry as reg

    for comp in reg.load_plugins().all():
        if comp.kind == "guidance" and comp.obj is type(guidance):
            return comp.qualified_name
    return None


def _probe_shape(model: Any, tokenizer: Any, grid: tuple[int, int], size: tuple[int, int] | None,
                 device: torch.device) -> tuple[int, ...]:
    """(H, W, 3) of a decoded sample, from one all-zero token grid (no random numbers drawn)."""
    with torch.no_grad():
        sub = torch.zeros(1, model.block_size, model.num_subtokens, dtype=torch.long, device=device)  # (1, L, K)
        images = decode_tokens(tokenizer, model.factorization, sub, grid, eval_size=size)  # (1, 3, H, W)
    return (int(images.shape[2]), int(images.shape[3]), 3)


def _work_settings(*, model: Any, tokenizer: Any, guidance: Any, settings: Sequence[Any], seed: int, C: int, N: int,
                   shape: tuple[int, ...], eval_size: Any, device: torch.device, precision: Any,
                   untrained_model: bool, info: dict[str, str]) -> dict[str, Any]:
    """What a resumed run must share with the run that started the work folder (``match``), and what
    it may change (``info``: batch size and world size only regroup the same per-sample draws)."""
    sampling = [{"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "greedy": s.greedy}
                for s in settings]
    match = {"seed": seed, "num_classes": C, "samples_per_class": N, "num_samples": C * N,
             "image_shape": list(shape), "eval_size": list(eval_size) if eval_size else None,
             "guidance": {"type": type(guidance).__qualname__,
                          **{k: repr(v) for k, v in sorted(vars(guidance).items())}},
             "sampling": sampling, "device": device.type, "precision": getattr(precision, "name", str(precision)),
             "model": {"type": type(model).__qualname__, "weights_sha256": _weights_sha256(model)},
             "tokenizer": {"type": type(tokenizer).__qualname__, "weights_sha256": _weights_sha256(tokenizer)},
             "untrained_model": bool(untrained_model), "seeding": "per-sample sha256(seed, index)"}
    return {"match": match, "info": {**info, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}


def _fmt(values) -> Any:
    vals = list(values)
    return vals[0] if all(v == vals[0] for v in vals) else str(tuple(vals))
