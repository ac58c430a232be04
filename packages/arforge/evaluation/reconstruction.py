"""Tokenizer reconstruction metrics in one pass: rFID (protocol B), PSNR, SSIM, LPIPS, codebook usage.

docs/evaluation.md#tokenizer-metrics. Every image is encoded and decoded once;
from the same pass come

- per-image PSNR and SSIM on the uint8-rounded pair (docs/evaluation.md#psnr, docs/evaluation.md#ssim; docs/evaluation.md#upstream-metric-bugs:
  ``data_range=1``, per image, mean over images);
- LPIPS per image for each injected network (docs/evaluation.md#lpips: original and the
  reconstruction clamped to [-1, 1]), reported separately, e.g. ``lpips_alex``
  and ``lpips_vgg``;
- codebook usage per id component, and of (s, d) pairs for two-component ids
  (docs/evaluation.md#codebook-usage: distinct ids / codebook size);
- rFID, protocol B (Open-MAGVIT2): the Fréchet distance between the features
  of the originals and of their reconstructions, same crops, with the
  injected feature extractor (docs/evaluation.md#rfid-protocols). Open-MAGVIT2 fed pytorch-fid's
  InceptionV3 float [0, 1] images with a bilinear resize; here the extractor
  sees the uint8-rounded pair (for Inception: torch-fidelity's TF1 resize), so
  the number is protocol B's pairing, not a bit-exact copy of that code path.

``arforge.trainers.tokenizer_trainer.evaluate_tokenizer`` computes the same
PSNR/SSIM/LPIPS/usage (same keys for one LPIPS network named ``lpips``) during
training; it can delegate to :func:`reconstruction_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import nn

from arforge.metrics import adm


@dataclass
class CodebookUsage:
    """Distinct ids per component (and distinct tuples when S > 1) over everything seen (docs/evaluation.md#codebook-usage)."""

    codebook_sizes: tuple[int, ...]
    seen: list[set[int]] = field(default_factory=list)
    pairs: set[tuple[int, ...]] = field(default_factory=set)

    def update(self, ids: torch.Tensor) -> None:
        ids = ids.reshape(-1, ids.shape[-1]).cpu()  # (B, L, S) -> (B*L, S)
        if not self.seen:
            self.seen = [set() for _ in range(ids.shape[1])]
        for s in range(ids.shape[1]):
            self.seen[s].update(torch.unique(ids[:, s]).tolist())
        if ids.shape[1] > 1:
            self.pairs.update(map(tuple, torch.unique(ids, dim=0).tolist()))

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s, used in enumerate(self.seen):
            out["usage" if len(self.seen) == 1 else f"usage_{s}"] = len(used) / self.codebook_sizes[s]
        if len(self.seen) > 1:
            out["usage_pairs"] = len(self.pairs) / float(np.prod(self.codebook_sizes))
        return out


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def reconstruction_metrics(tokenizer: nn.Module, dataset, *, device: torch.device | str = "cpu",
                           batch_size: int = 32, max_images: int | None = None,
                           perceptual: Mapping[str, nn.Module] | None = None,
                           feature_extractor=None, progress: bool = False) -> dict[str, float]:
    """PSNR, SSIM, LPIPS per network, codebook usage and (with a feature extractor) rFID.

    Args:
        tokenizer: returns ``TokenizerOutput(reconstruction, ids, ...)`` and has ``codebook_sizes``.
        dataset: (image (3, H, W) in [-1, 1], label) items, read in index order.
        perceptual: metric name -> LPIPS-like module ``(x, y) -> (B,)``, e.g.
            ``{"lpips_alex": ..., "lpips_vgg": ...}``.
        feature_extractor: ``features(uint8 NHWC) -> Features``; adds ``rfid``.
        max_images: the first ``max_images`` of the dataset (default all).
    """
    from tqdm.auto import tqdm

    was_training = tokenizer.training
    tokenizer.eval()
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    psnrs, ssims = [], []
    lp: dict[str, list[np.ndarray]] = {k: [] for k in (perceptual or {})}
    usage = CodebookUsage(tuple(_unwrap(tokenizer).codebook_sizes))
    feats_a, feats_b = [], []
    try:
        for i in tqdm(range(0, n, batch_size), desc="reconstruct", disable=not progress, mininterval=1.0):
            items = [dataset[j] for j in range(i, min(n, i + batch_size))]
            images = torch.stack([it[0] for it in items]).to(device)
            out = tokenizer(images)
            rec = out.reconstruction.float().clamp(-1, 1)
            a, b = adm.to_uint8(images), adm.to_uint8(rec)
            psnrs.append(adm.psnr(a, b))
            ssims.append(adm.ssim(a, b))
            for name, net in (perceptual or {}).items():
                lp[name].append(net(images, rec).float().cpu().numpy().reshape(-1))
            usage.update(out.ids)
            if feature_extractor is not None:
                feats_a.append(feature_extractor.features(a).pool)
                feats_b.append(feature_extractor.features(b).pool)
    finally:
        tokenizer.train(was_training)
    metrics = {"psnr": float(np.concatenate(psnrs).mean()), "ssim": float(np.concatenate(ssims).mean())}
    for name, values in lp.items():
        metrics[name] = float(np.concatenate(values).mean())
    metrics.update(usage.metrics())
    if feature_extractor is not None:
        metrics["rfid"] = adm.frechet_distance(adm.FeatureStats.of(np.concatenate(feats_a)),
                                               adm.FeatureStats.of(np.concatenate(feats_b)))
    return metrics
