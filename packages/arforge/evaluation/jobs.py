"""Evaluation jobs: evaluate a sample batch, evaluate a tokenizer, make a reference batch.

- :func:`evaluate_samples` (``jobs.evaluate_samples``): FID/sFID/IS/precision/recall of
  a sample ``.npz`` against a reference ``.npz`` through an evaluator plugin
  (``@evaluators.generation()``), optionally on growing prefixes reported
  with ``ctx.report`` so that an Optuna pruner can stop a trial early.
- :func:`evaluate_reconstructions` (``jobs.evaluate_reconstructions``): a
  tokenizer's rFID/PSNR/SSIM/LPIPS/usage through ``@evaluators.reconstruction()``.
- :func:`make_reference` (``jobs.make_reference``): an ADM-format reference
  batch from any dataset (docs/evaluation.md#sample-files, docs/evaluation.md#reference-batch), optionally
  with FID/sFID statistics from a feature extractor.

With every result the evaluator backend, the SHA-256 of its weights, the
sample count and the seed are recorded (docs/evaluation.md#generation-protocol step 4).
"""

from __future__ import annotations

import json

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from arforge import validation as V
from arforge.errors import ConfigError
from arforge.evaluation.feature_extractors import describe
from arforge.evaluation.sample_batches import (EXTRACTOR_KEY, EXTRACTOR_SHA_KEY, LABELS_KEY, BatchFileError,
                                               ImageBatchWriter)
from arforge.metrics.adm import FeatureStats, to_uint8


def _params(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    return {f"{prefix}.{k}": str(v) for k, v in values.items()}


def _to_device(module: Any, device) -> None:
    """Move an injected network (a feature extractor, LPIPS) to the run's device, if it is a module."""
    if isinstance(module, torch.nn.Module):
        module.to(device)


# ================================================================ samples
def evaluate_samples(ctx, *, samples: str | os.PathLike, reference: str | os.PathLike, evaluator,
                     fidelity_steps: Sequence[int] | None = None, sample_seed: int | None = None,
                     label_scheme: str | None = None) -> dict[str, float]:
    """Evaluate a sample batch against a reference batch and log everything.

    Args:
        samples: the sample ``.npz`` (``arr_0`` uint8 NHWC, docs/evaluation.md#sample-files).
        reference: the reference ``.npz`` (e.g. ``VIRTUAL_imagenet256_labeled.npz``, docs/evaluation.md#reference-batch).
        evaluator: ``@evaluators.generation()`` (any object with ``evaluate``).
        fidelity_steps: sample counts, e.g. ``(1000, 5000, 50000)``: the FID of
            each prefix (file order) is logged as metric ``fid`` at that step and
            reported with ``ctx.report("fid", value, count)``; a pruned trial
            stops before the remaining samples are read.
        sample_seed: the seed of the run that wrote the samples, recorded with
            the result (default: this launch's seed, as in a sample-and-evaluate pipeline).
        label_scheme: how the labels were drawn ("50 per class", "uniform"), recorded (docs/evaluation.md#sample-files).

    Returns:
        The metrics: ``fid``, ``sfid``, ``is``, ``precision``, ``recall`` (those the extractor supports).
    """
    V.check_args("jobs.evaluate_samples", locals(), where=ctx,
                 samples=V.PATH, reference=V.PATH,
                 fidelity_steps=V.optional(V.sequence_of(V.POSITIVE_INT, non_empty=True)), sample_seed=V.optional(V.INT), label_scheme=V.optional(V.TEXT))
    from arforge.tracking import resolve_path

    samples, reference = resolve_path(samples), resolve_path(reference)  # "outputs:<experiment>/<run>/..."
    for what, path in (("samples", samples), ("reference", reference)):
        if not Path(path).is_file():
            raise ConfigError(f"jobs.evaluate_samples.{what} = {str(path)!r} is not a file")
    if not ctx.is_main:  # evaluation is a single-process job; other ranks have nothing to do
        return {}
    seed = ctx.seed if sample_seed is None else sample_seed
    _to_device(getattr(evaluator, "feature_extractor", None), ctx.device)

    def on_fidelity(count: int, fid: float) -> None:
        ctx.tracker.log_metrics({"fid": fid}, step=count)
        ctx.log(f"FID at {count} samples: {fid:.4f}")
        ctx.report("fid", fid, count)

    if hasattr(evaluator, "evaluate_detailed"):
        result = evaluator.evaluate_detailed(samples, reference, fidelity_steps=fidelity_steps,
                                             on_fidelity=on_fidelity)
        metrics, info = result.metrics, result.info
    else:
        metrics = evaluator.evaluate(samples, reference, fidelity_steps=fidelity_steps, on_fidelity=on_fidelity)
        info = describe(getattr(evaluator, "feature_extractor", evaluator))
        info.update(samples=str(samples), reference=str(reference))
    info = {**info, "seed": str(seed)}
    if label_scheme is not None:
        info["label_scheme"] = label_scheme
    if fidelity_steps:
        info["fidelity_steps"] = ",".join(str(int(s)) for s in fidelity_steps)
    ctx.tracker.set_tags({"arforge.eval.backend": info.get("backend", "?"),
                          "arforge.eval.weights_sha256": info.get("weights_sha256", "none"),
                          "arforge.eval.num_samples": info.get("num_samples", "?"),
                          "arforge.eval.seed": str(seed)})
    ctx.tracker.log_params(_params("eval", info))
    sidecar = Path(str(samples) + ".json")  # written by jobs.sample: the sampler's settings
    if sidecar.is_file():
        try:
            sampled = json.loads(sidecar.read_text()).get("params", {})
        except ValueError:
            sampled = {}
        if sampled:  # FID and the settings that produced it on one run, for arforge compare
            ctx.tracker.log_params(sampled)
    ctx.tracker.log_metrics(metrics, step=int(info.get("num_samples", 0) or 0))
    ctx.tracker.log_dict({"metrics": metrics, **info}, "eval/results.json")
    ctx.log("  ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + f"  ({info.get('backend')})")
    return metrics


# ========================================================== reconstructions
def evaluate_reconstructions(ctx, *, tokenizer, dataset, evaluator, checkpoint: str | os.PathLike | None = None,
                             weights: str = "auto") -> dict[str, float]:
    """rFID (protocol B), PSNR, SSIM, LPIPS and codebook usage of a tokenizer (docs/evaluation.md#tokenizer-metrics).

    Args:
        tokenizer: e.g. ``@tokenizers.llamagen_vq()``.
        dataset: the validation images (for protocol B: Resize + CenterCrop).
        evaluator: ``@evaluators.reconstruction()``.
        checkpoint: an arforge checkpoint directory to load into ``tokenizer`` (default: as built).
        weights: which weights of the checkpoint: ``ema``, ``model``, or ``auto`` (EMA if
            present, else model; upstream's rule). The choice is recorded (docs/checkpoints.md#open-magvit2-ar).
    """
    V.check_args("jobs.evaluate_reconstructions", locals(), where=ctx,
                 checkpoint=V.optional(V.PATH), weights=V.choice("auto", "ema", "model"))
    from arforge import checkpoint as ck

    used = "as built"
    if checkpoint is not None:
        loaded = ck.load_checkpoint(checkpoint)
        used = ("ema" if "ema" in loaded.weights else "model") if weights == "auto" else weights
        if used not in loaded.weights:
            raise ck.CheckpointError(f"{checkpoint} has no '{used}' weights (it has {sorted(loaded.weights)})")
        tokenizer.load_state_dict(loaded.weights[used], strict=True)
        used = f"{loaded.path} [{used}]"
    if not ctx.is_main:
        return {}
    tokenizer.to(ctx.device)
    _to_device(getattr(evaluator, "feature_extractor", None), ctx.device)
    result = evaluator.evaluate_detailed(tokenizer, dataset, device=ctx.device)
    info = {**result.info, "tokenizer_weights": used, "seed": str(ctx.seed),
            "dataset": str(getattr(dataset, "source", type(dataset).__name__))}
    ctx.tracker.log_params(_params("eval", info))
    ctx.tracker.log_metrics(result.metrics, step=0)
    ctx.tracker.log_dict({"metrics": result.metrics, **info}, "eval/reconstruction.json")
    ctx.log("  ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    return result.metrics


# ================================================================ reference
@dataclass
class ReferenceInfo:
    """What :func:`make_reference` wrote."""

    path: Path
    num_images: int
    image_size: tuple[int, int]
    seed: int
    with_stats: bool
    feature_extractor: str | None = None


def _collate(items):
    images = [it[0] for it in items]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise BatchFileError(f"the dataset yields images of different sizes {sorted(shapes)}; give the dataset a "
                             "crop transform, or set jobs.make_reference.image_size")
    return torch.stack(images), torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic, align_corners=False, no antialiasing, then clamp: the sample protocol (docs/evaluation.md#sample-files)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def make_reference(ctx, *, dataset, output: str | os.PathLike, num_images: int | None = None,
                   image_size: int | None = None, feature_extractor=None, seed: int = 0, batch_size: int = 64,
                   num_workers: int = 0, progress: bool = True) -> ReferenceInfo | None:
    """Write an ADM-format reference batch from a dataset (docs/evaluation.md#sample-files, docs/evaluation.md#reference-batch).

    ``arr_0``: the images as uint8 NHWC by rounding (``to_uint8``), in the
    order ``np.random.default_rng(seed).permutation(len(dataset))[:num_images]``;
    ``arr_1``: their labels (int64). With a ``feature_extractor`` also ``mu``/
    ``sigma`` of its pool features (and ``mu_s``/``sigma_s`` of its spatial
    features) over these images, float64, N - 1 covariance, plus
    ``feature_extractor``/``feature_extractor_sha256`` naming the network. The
    file is streamed and renamed into place when complete.

    Args:
        dataset: a map-style dataset of (image (3, H, W) in [-1, 1], label).
        output: the ``.npz`` path; an existing file is replaced only when the new one is complete.
        num_images: a seeded random subset of this size (default: all).
        image_size: resize to S x S first (bicubic, no antialiasing, as the sample protocol);
            default: keep the dataset's size (all images must share it).
        feature_extractor: e.g. ``@feature_extractors.digits_classifier()``; None writes no statistics.
        seed: the shuffle seed (recorded).
    """
    V.check_args("jobs.make_reference", locals(), where=ctx,
                 output=V.PATH, num_images=V.optional(V.at_least(2)), image_size=V.optional(V.POSITIVE_INT),
                 seed=V.INT, batch_size=V.POSITIVE_INT, num_workers=V.NON_NEGATIVE_INT, progress=V.BOOL)
    from tqdm.auto import tqdm

    try:
        total = len(dataset)
    except TypeError:
        raise ConfigError("jobs.make_reference needs a map-style dataset (with a length) for its seeded "
                          "shuffle; a shard stream has none: use the image folder") from None
    n = total if num_images is None else int(num_images)
    if not 2 <= n <= total:
        raise ConfigError(f"jobs.make_reference.num_images = {num_images} must be between 2 and the dataset's "
                          f"{total} images")
    from arforge.tracking import resolve_path

    output = resolve_path(output)
    if output.suffix != ".npz":
        raise ConfigError(f"jobs.make_reference.output = {str(output)!r} must end in .npz")
    if not ctx.is_main:
        return None
    _to_device(feature_extractor, ctx.device)
    order = np.random.default_rng(seed).permutation(total)[:n]
    subset = torch.utils.data.Subset(dataset, order.tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=_collate)
    first = dataset[int(order[0])][0]
    size = (image_size, image_size) if image_size else tuple(first.shape[-2:])
    labels: list[np.ndarray] = []
    pools, spatials = [], []
    with ImageBatchWriter(output, num_images=n, image_shape=(*size, 3)) as writer, \
            tqdm(total=n, desc="reference", unit="img", disable=not progress, mininterval=1.0) as bar:
        for images, batch_labels in loader:
            if image_size:
                images = _resize(images, image_size)
            elif tuple(images.shape[-2:]) != size:
                raise BatchFileError(f"the dataset yields {tuple(images.shape[-2:])} images after {size} ones; "
                                     "set jobs.make_reference.image_size")
            u8 = to_uint8(images)  # (B, S, S, 3)
            writer.write(u8)
            labels.append(batch_labels.numpy())
            if feature_extractor is not None:
                f = feature_extractor.features(u8)
                pools.append(np.asarray(f.pool, dtype=np.float32))
                if f.spatial is not None:
                    spatials.append(np.asarray(f.spatial, dtype=np.float32))
            bar.update(len(u8))
        writer.add_array(LABELS_KEY, np.concatenate(labels).astype(np.int64))
        provenance: dict[str, str] = {}
        if feature_extractor is not None:
            stats = FeatureStats.of(np.concatenate(pools))
            writer.add_array("mu", stats.mu)
            writer.add_array("sigma", stats.sigma)
            if spatials:
                stats_s = FeatureStats.of(np.concatenate(spatials))
                writer.add_array("mu_s", stats_s.mu)
                writer.add_array("sigma_s", stats_s.sigma)
            provenance = describe(feature_extractor)
            writer.add_array(EXTRACTOR_KEY, np.array(provenance["backend"]))
            if getattr(feature_extractor, "weights_sha256", None):
                writer.add_array(EXTRACTOR_SHA_KEY, np.array(str(feature_extractor.weights_sha256)))
    skipped = int(getattr(dataset, "skipped", 0) or 0)
    params = {"output": output, "num_images": n, "image_size": f"{size[0]}x{size[1]}", "seed": seed,
              "dataset": getattr(dataset, "source", type(dataset).__name__),
              **{f"feature_extractor.{k}": v for k, v in provenance.items()}}
    ctx.tracker.log_params(_params("reference", params))
    ctx.tracker.log_metrics({"reference/num_images": n, "data/skipped": skipped}, step=0)
    ctx.log(f"wrote {n} images ({size[0]}x{size[1]}){' with statistics' if provenance else ''} to {output}")
    return ReferenceInfo(path=output, num_images=n, image_size=size, seed=seed, with_stats=bool(provenance),
                         feature_extractor=provenance.get("backend"))
