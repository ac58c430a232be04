"""Evaluator plugins: generation metrics over sample batches, reconstruction metrics over tokenizers.

docs/evaluation.md:

- :class:`GenerationEvaluator` (``evaluators.generation``): FID, sFID, Inception
  Score and precision/recall with the ADM evaluator's semantics (docs/evaluation.md#adm-evaluator-semantics; OpenAI
  guided-diffusion ``evaluations/evaluator.py``, "Diffusion Models Beat GANs on
  Image Synthesis") from a sample ``.npz`` against a reference ``.npz`` (docs/evaluation.md#sample-files, docs/evaluation.md#reference-batch),
  with any feature extractor (Inception for reported numbers, the digits
  classifier for the quickstart). Samples are streamed in batches, never
  loaded whole; FID can be reported on growing prefixes (multi-fidelity).
- :class:`ReconstructionEvaluator` (``evaluators.reconstruction``): rFID
  (protocol B), PSNR, SSIM, LPIPS with AlexNet and VGG separately, and
  codebook usage of a tokenizer over a dataset (docs/evaluation.md#tokenizer-metrics).

The metric math is :mod:`arforge.metrics.adm`; the network is injected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from arforge.evaluation.feature_extractors import FeatureExtractor, Features, describe
from arforge.evaluation.sample_batches import (EXTRACTOR_KEY, EXTRACTOR_SHA_KEY, IMAGES_KEY, STATS_KEYS,
                                               BatchFileError, ImageBatchReader, batch_keys, read_arrays)
from arforge.metrics import adm
from arforge.metrics.adm import FeatureStats, MetricError


@dataclass
class GenerationResult:
    """Metrics (floats), provenance (strings) and the FID at each requested sample count."""

    metrics: dict[str, float]
    info: dict[str, str]
    fidelity: dict[int, float] = field(default_factory=dict)


@dataclass
class _Reference:
    path: Path
    stats: FeatureStats | None = None  # from the file's mu/sigma
    stats_s: FeatureStats | None = None  # from mu_s/sigma_s
    has_images: bool = False
    features: Features | None = None  # of arr_0, extracted on first need


def _check_stats(stats: FeatureStats, dim: int, keys: str, path: Path, extractor) -> None:
    mu, sigma = np.atleast_1d(stats.mu), np.atleast_2d(stats.sigma)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise MetricError(
            f"reference {path}: {keys} have shapes {mu.shape}/{sigma.shape}, but the feature extractor "
            f"{getattr(extractor, 'name', '?')!r} gives {dim}-d features; the statistics come from another "
            "network. Use a reference made with this extractor (tools/make_reference.py --feature-extractor ...) "
            "or one without statistics (they are then computed from its arr_0).")


class GenerationEvaluator:
    """FID, sFID, IS and precision/recall of a sample batch against a reference batch (ADM semantics)."""

    def __init__(self, *, feature_extractor: FeatureExtractor, batch_size: int = 64,
                 num_samples: int | None = None, is_split_size: int = 5000, precision_recall: bool = True,
                 pr_k: int = 3, pr_fp16: bool = True, progress: bool = True) -> None:
        """
        Args:
            feature_extractor: ``@feature_extractors.inception()`` for reported numbers,
                ``@feature_extractors.digits_classifier()`` for the quickstart digits.
            batch_size: images per feature batch (ADM: 64).
            num_samples: use only the first ``num_samples`` samples in file order
                (default all); the file must hold at least that many.
            is_split_size: IS split length in file order (ADM: 5000, docs/evaluation.md#inception-score).
            precision_recall: compute improved precision/recall (k-NN manifolds, docs/evaluation.md#precision-and-recall).
            pr_k: the neighbour of the manifold radii (ADM: 3).
            pr_fp16: fp16 distances as ADM (parity, default) or fp32.
            progress: progress bars over the feature extraction.
        """
        if batch_size < 1:
            raise MetricError(f"evaluators.generation.batch_size must be >= 1, not {batch_size}")
        if num_samples is not None and num_samples < 2:
            raise MetricError(f"evaluators.generation.num_samples must be >= 2 (a covariance needs two), "
                              f"not {num_samples}")
        self.feature_extractor = feature_extractor
        self.batch_size, self.num_samples = batch_size, num_samples
        self.is_split_size, self.precision_recall = is_split_size, precision_recall
        self.pr_k, self.pr_fp16, self.progress = pr_k, pr_fp16, progress

    @property
    def name(self) -> str:
        return str(getattr(self.feature_extractor, "name", type(self.feature_extractor).__name__))

    @property
    def weights_sha256(self) -> str | None:
        return getattr(self.feature_extractor, "weights_sha256", None)

    # ------------------------------------------------------------ reference
    def _open_reference(self, path: str | os.PathLike) -> _Reference:
        path = Path(path)
        keys = set(batch_keys(path))
        arrays = read_arrays(path, STATS_KEYS + (EXTRACTOR_KEY, EXTRACTOR_SHA_KEY))
        made_with, made_sha = arrays.get(EXTRACTOR_KEY), arrays.get(EXTRACTOR_SHA_KEY)
        if made_with is not None and str(made_with) != self.name:
            raise MetricError(f"reference {path} was made with the feature extractor {str(made_with)!r}, "
                              f"but this evaluator uses {self.name!r}; their statistics are not comparable")
        if made_sha is not None and self.weights_sha256 and str(made_sha) != self.weights_sha256:
            raise MetricError(f"reference {path} was made with {self.name} weights of SHA-256 "
                              f"{str(made_sha)[:16]}..., but this evaluator's weights are "
                              f"{self.weights_sha256[:16]}...; remake the reference with these weights")
        ref = _Reference(path=path, has_images=IMAGES_KEY in keys)
        if "mu" in arrays and "sigma" in arrays:
            ref.stats = FeatureStats(arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64))
        if "mu_s" in arrays and "sigma_s" in arrays:
            ref.stats_s = FeatureStats(arrays["mu_s"].astype(np.float64), arrays["sigma_s"].astype(np.float64))
        if not ref.has_images and ref.stats is None:
            raise BatchFileError(f"reference {path} has neither '{IMAGES_KEY}' nor 'mu'/'sigma' "
                                 f"(it has {sorted(keys)})")
        return ref

    def _reference_features(self, ref: _Reference) -> Features:
        if ref.features is None:
            if not ref.has_images:
                raise BatchFileError(f"reference {ref.path} has no '{IMAGES_KEY}' to extract features from")
            from arforge.evaluation.feature_extractors import extract_features

            with ImageBatchReader(ref.path) as reader:
                ref.features = extract_features(self.feature_extractor, reader.batches(self.batch_size),
                                                total=len(reader), desc="features: reference",
                                                progress=self.progress)
        return ref.features

    def _reference_stats(self, ref: _Reference) -> str:
        """Resolve ``ref.stats``: the file's mu/sigma, else computed from its arr_0 (docs/evaluation.md#adm-evaluator-semantics)."""
        if ref.stats is not None:
            return "mu/sigma from the reference file"
        feats = self._reference_features(ref)
        ref.stats = FeatureStats.of(feats.pool)
        return f"computed from the reference arr_0 ({len(feats)} images)"

    def _check_reference(self, ref: _Reference, f: Features) -> None:
        _check_stats(ref.stats, f.pool.shape[1], "mu/sigma", ref.path, self.feature_extractor)
        if ref.stats_s is not None and f.spatial is not None:
            _check_stats(ref.stats_s, f.spatial.shape[1], "mu_s/sigma_s", ref.path, self.feature_extractor)

    # ------------------------------------------------------------ evaluate
    def evaluate_detailed(self, samples: str | os.PathLike, reference: str | os.PathLike, *,
                          fidelity_steps: Sequence[int] | None = None,
                          on_fidelity: Callable[[int, float], None] | None = None) -> GenerationResult:
        """Evaluate ``samples`` against ``reference``.

        ``fidelity_steps``: sample counts at which the FID of the prefix (in
        file order) is computed while streaming, each passed to
        ``on_fidelity(count, fid)`` as soon as it is known; an exception there
        (e.g. ``optuna.TrialPruned``) stops the evaluation before the rest of
        the samples is read.
        """
        ref = self._open_reference(reference)
        samples = Path(samples)
        metrics: dict[str, float] = {}
        fidelity: dict[int, float] = {}
        info = {**describe(self.feature_extractor), "samples": str(samples), "reference": str(ref.path)}
        with ImageBatchReader(samples) as reader:  # opened first: a bad samples file fails before any work
            available = len(reader)
            n = available if self.num_samples is None else self.num_samples
            if n > available:
                raise BatchFileError(f"{samples} holds {available} samples, fewer than "
                                     f"evaluators.generation.num_samples = {n}")
            steps = _check_steps(fidelity_steps, n)
            info["reference_stats"] = self._reference_stats(ref)
            info.update(num_samples=str(n), sample_shape="x".join(map(str, reader.image_shape)))
            pools: list[np.ndarray] = []
            spatials: list[np.ndarray] = []
            logits: list[np.ndarray] = []
            from tqdm.auto import tqdm

            count = 0
            with tqdm(total=n, desc="features: samples", unit="img", disable=not self.progress,
                      dynamic_ncols=True, mininterval=1.0) as bar:
                while count < n:
                    stop = min([s for s in steps if s > count] + [n])
                    batch = reader.read(min(self.batch_size, stop - count))
                    f = self.feature_extractor.features(batch)
                    pools.append(np.asarray(f.pool, dtype=np.float32))
                    if f.spatial is not None:
                        spatials.append(np.asarray(f.spatial, dtype=np.float32))
                    if f.logits is not None:
                        logits.append(np.asarray(f.logits, dtype=np.float32))
                    if count == 0:  # planted statistics of another network fail now, not after 50k images
                        self._check_reference(ref, f)
                    count += len(batch)
                    bar.update(len(batch))
                    if count in steps:
                        pool = np.concatenate(pools)
                        fidelity[count] = adm.frechet_distance(FeatureStats.of(pool), ref.stats)
                        if on_fidelity is not None:
                            on_fidelity(count, fidelity[count])
        pool = np.concatenate(pools)
        metrics["fid"] = fidelity[n] if n in fidelity else adm.frechet_distance(FeatureStats.of(pool), ref.stats)
        if spatials:
            spatial = np.concatenate(spatials)
            if ref.stats_s is not None:
                stats_s, info["reference_stats_s"] = ref.stats_s, "mu_s/sigma_s from the reference file"
            else:
                ref_spatial = self._reference_features(ref).spatial
                stats_s = FeatureStats.of(ref_spatial)
                info["reference_stats_s"] = f"computed from the reference arr_0 ({len(ref_spatial)} images)"
            metrics["sfid"] = adm.frechet_distance(FeatureStats.of(spatial), stats_s)
        if logits:
            metrics["is"] = adm.inception_score(np.concatenate(logits), split_size=self.is_split_size)
            info["is_split_size"] = str(self.is_split_size)
        if self.precision_recall:
            if ref.has_images:
                ref_pool = self._reference_features(ref).pool
                metrics["precision"], metrics["recall"] = adm.precision_recall(
                    ref_pool, pool, k=self.pr_k, fp16=self.pr_fp16)
                info["precision_recall"] = (f"k={self.pr_k}, {'fp16' if self.pr_fp16 else 'fp32'} distances, "
                                            f"{len(ref_pool)} reference images")
            else:
                info["precision_recall"] = f"skipped: reference has no '{IMAGES_KEY}'"
        return GenerationResult(metrics=metrics, info=info, fidelity=fidelity)

    def evaluate(self, samples: str | os.PathLike, reference: str | os.PathLike, *,
                 fidelity_steps: Sequence[int] | None = None,
                 on_fidelity: Callable[[int, float], None] | None = None) -> dict[str, float]:
        """``{"fid", "sfid" (with spatial features), "is" (with logits), "precision", "recall"}``."""
        return self.evaluate_detailed(samples, reference, fidelity_steps=fidelity_steps,
                                      on_fidelity=on_fidelity).metrics

    __call__ = evaluate


def _check_steps(steps: Sequence[int] | None, n: int) -> list[int]:
    if not steps:
        return []
    out = [int(s) for s in steps]
    if any(b <= a for a, b in zip(out, out[1:])) or out[0] < 2 or out[-1] > n:
        raise MetricError(f"fidelity_steps {tuple(steps)} must be strictly increasing sample counts between 2 "
                          f"and the {n} samples evaluated")
    return out


# ====================================================================== reconstruction
LPIPS_NETS = ("alex", "vgg")


class ReconstructionEvaluator:
    """rFID (protocol B), PSNR, SSIM, LPIPS (AlexNet, VGG) and codebook usage of a tokenizer (docs/evaluation.md#tokenizer-metrics)."""

    def __init__(self, *, feature_extractor: FeatureExtractor | None = None, lpips: Sequence[str] = LPIPS_NETS,
                 lpips_alex_path: str | os.PathLike | None = None, lpips_vgg_path: str | os.PathLike | None = None,
                 verify_hash: bool = True, batch_size: int = 32, max_images: int | None = None,
                 progress: bool = True, perceptual: Mapping[str, object] | None = None) -> None:
        """
        Args:
            feature_extractor: for rFID (originals vs reconstructions); None skips rFID.
            lpips: LPIPS backbones to report, as ``lpips_alex``/``lpips_vgg``. A backbone
                with an explicit path must exist; one without is looked up in
                ``$TORCH_HOME/hub/checkpoints`` and skipped (noted in the result's info) if absent.
            lpips_alex_path / lpips_vgg_path: torchvision ``alexnet-owt-7be5be79.pth`` /
                ``vgg16-397923af.pth`` (docs/evaluation.md#lpips-weights).
            verify_hash: check the backbones' SHA-256 prefixes.
            batch_size / max_images: reconstruction batches; the first ``max_images`` images.
            perceptual: ready-made ``name -> (x, y) -> (B,)`` modules used instead of building LPIPS.
        """
        unknown = [n for n in lpips if n not in LPIPS_NETS]
        if unknown:
            raise MetricError(f"evaluators.reconstruction.lpips: unknown backbone(s) {unknown}; use {LPIPS_NETS}")
        self.feature_extractor = feature_extractor
        self.lpips = tuple(lpips)
        self.paths = {"alex": lpips_alex_path, "vgg": lpips_vgg_path}
        self.verify_hash, self.progress = verify_hash, progress
        self.batch_size, self.max_images = batch_size, max_images
        self._perceptual = dict(perceptual) if perceptual is not None else None
        self._notes: dict[str, str] = {}

    def _build_perceptual(self) -> dict[str, object]:
        if self._perceptual is not None:
            return self._perceptual
        from arforge.weights import WeightsNotFoundError
        from arforge_plugins.losses.tokenizer_losses import LPIPS

        nets: dict[str, object] = {}
        for net in self.lpips:
            try:
                nets[f"lpips_{net}"] = LPIPS(net=net, backbone_path=self.paths[net], verify_hash=self.verify_hash)
            except WeightsNotFoundError as exc:
                if self.paths[net] is not None:
                    raise
                self._notes[f"lpips_{net}"] = f"skipped: {exc}"
        self._perceptual = nets
        return nets

    def evaluate_detailed(self, tokenizer, dataset, *, device="cpu") -> GenerationResult:
        from arforge.evaluation.reconstruction import reconstruction_metrics

        perceptual = self._build_perceptual()
        for net in perceptual.values():
            if hasattr(net, "to"):
                net.to(device)
        metrics = reconstruction_metrics(tokenizer, dataset, device=device, batch_size=self.batch_size,
                                         max_images=self.max_images, perceptual=perceptual,
                                         feature_extractor=self.feature_extractor, progress=self.progress)
        info = dict(self._notes)
        info["num_images"] = str(len(dataset) if self.max_images is None else min(len(dataset), self.max_images))
        if self.feature_extractor is not None:
            info.update({f"rfid_{k}": v for k, v in describe(self.feature_extractor).items()})
            info["rfid_protocol"] = "B (originals vs reconstructions, same crops)"
        return GenerationResult(metrics=metrics, info=info)

    def evaluate(self, tokenizer, dataset, *, device="cpu") -> dict[str, float]:
        """``{"psnr", "ssim", "lpips_alex", "lpips_vgg", "usage"[, "usage_0", ...], "rfid"}``."""
        return self.evaluate_detailed(tokenizer, dataset, device=device).metrics

    __call__ = evaluate
