"""ADM evaluator semantics for FID, sFID, Inception Score and precision/recall.

docs/evaluation.md#adm-evaluator-semantics (guided-diffusion ``evaluations/evaluator.py``,
"Diffusion Models Beat GANs on Image Synthesis"). The functions here take
feature arrays; which network produced them (Inception, or the small digits
classifier) is the feature extractor's business.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import linalg

from arforge.errors import ArforgeError


class MetricError(ArforgeError):
    pass


@dataclass(frozen=True)
class FeatureStats:
    """mu and the unbiased covariance (N - 1) of a feature set, float64.

    ``factor``: an (r, D) matrix with ``sigma = factor.T @ factor``, kept by :meth:`of`
    when N <= D (r < N: the centred features' non-zero singular directions), so
    that sigma has rank below D. The Fréchet
    distance then takes its trace term from that factor exactly, in O(N D^2),
    instead of from a D x D ``sqrtm`` (O(D^3): ~25 s for Inception's 2048-d on
    one CPU core, for the few-hundred-sample FIDs of multi-fidelity studies and
    tests). Statistics of N > D samples (ADM's 50k) keep ADM's ``sqrtm`` path.
    """

    mu: np.ndarray
    sigma: np.ndarray
    factor: np.ndarray | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def of(features: np.ndarray) -> "FeatureStats":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise MetricError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
        mu = f.mean(axis=0)
        factor = None
        if f.shape[0] <= f.shape[1]:
            # Centring leaves rank N - 1 at most; keeping only the non-zero singular directions
            # keeps exact zeros out of the trace term's square roots (sqrt amplifies round-off).
            _, sv, vt = np.linalg.svd((f - mu) / np.sqrt(f.shape[0] - 1), full_matrices=False)
            keep = sv > sv.max(initial=0.0) * max(f.shape) * np.finfo(np.float64).eps
            factor = sv[keep, None] * vt[keep]  # (rank, D): factor.T @ factor = sigma
        return FeatureStats(mu, np.cov(f, rowvar=False), factor)


def _trace_sqrt_product(factor: np.ndarray, other: np.ndarray) -> float:
    """tr sqrt(S1 S2) for S1 = F^T F: S1 S2 = F^T (F S2) has the non-zero eigenvalues of
    (F S2) F^T = F S2 F^T, a symmetric PSD N x N matrix; the principal square root's trace
    is the sum of their square roots."""
    gram = factor @ other @ factor.T  # (N, N)
    eig = np.linalg.eigvalsh((gram + gram.T) / 2)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """FID = ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2) (TTUR; docs/evaluation.md#adm-evaluator-semantics).

    If sqrtm yields non-finite values, eps*I is added to both covariances and it
    is retried; a complex result with a diagonal imaginary part above 1e-3 fails.
    When either side carries a low-rank ``factor`` (:class:`FeatureStats`) the
    trace term is computed exactly from it, without ``sqrtm``.
    """
    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    s1, s2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise MetricError(f"feature statistics differ in shape: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    low_rank = [(st.factor, other) for st, other in ((a, s2), (b, s1)) if st.factor is not None]
    if low_rank:
        factor, other = min(low_rank, key=lambda fo: fo[0].shape[0])  # the lower rank bounds the product's
        return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(factor, other))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(S1 S2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """IS over consecutive splits in file order (docs/evaluation.md#inception-score).

    ``logits`` are pre-softmax scores (for Inception: pool_3 @ W over 1008
    classes, no bias). The mean of per-split scores is returned.
    """
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        py = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(py))
        kl = np.nan_to_num(kl, nan=0.0, posinf=0.0, neginf=0.0)
        scores.append(float(np.exp(kl.sum(axis=1).mean())))
    return float(np.mean(scores))


def _pairwise_sq(u: np.ndarray, v: np.ndarray, fp16: bool) -> np.ndarray:
    """max(||u||^2 - 2 u.v + ||v||^2, 0), in fp16 with an fp32 fall-back (ADM ``DistanceBlock``)."""
    if fp16:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> the fp32 fall-back below
            uh, vh = u.astype(np.float16), v.astype(np.float16)
            nu = (uh.astype(np.float32) ** 2).sum(1).astype(np.float16)
            nv = (vh.astype(np.float32) ** 2).sum(1).astype(np.float16)
            d = nu[:, None] - 2 * (uh @ vh.T) + nv[None, :]
        if np.isfinite(d).all():
            return np.maximum(d.astype(np.float32), 0)
    u32, v32 = u.astype(np.float32), v.astype(np.float32)
    d = (u32 ** 2).sum(1)[:, None] - 2 * (u32 @ v32.T) + (v32 ** 2).sum(1)[None, :]
    return np.maximum(d, 0)


def _radii(features: np.ndarray, k: int, fp16: bool, block: int = 10000) -> np.ndarray:
    out = np.empty(len(features), dtype=np.float32)
    for i in range(0, len(features), block):
        d = _pairwise_sq(features[i:i + block], features, fp16)
        # k-th nearest neighbour excluding self = the (k+1)-th smallest including self at 0.
        out[i:i + block] = np.partition(d, k, axis=1)[:, k]
    return out


def _coverage(query: np.ndarray, ref: np.ndarray, ref_radii: np.ndarray, fp16: bool,
              block: int = 10000) -> np.ndarray:
    """For each query point: is it within (<=) the radius of at least one reference point?"""
    hit = np.zeros(len(query), dtype=bool)
    for i in range(0, len(query), block):
        d = _pairwise_sq(query[i:i + block], ref, fp16)
        hit[i:i + block] = (d <= ref_radii[None, :]).any(axis=1)
    return hit


def precision_recall(reference: np.ndarray, samples: np.ndarray, *, k: int = 3,
                     fp16: bool = True) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al.) with ADM's ``ManifoldEstimator`` (k = 3).

    Precision: fraction of samples inside the reference manifold. Recall: the
    fraction of reference points inside the sample manifold. ``fp16`` reproduces
    ADM's distance precision (parity); fp32 is the option.
    """
    ref = np.asarray(reference, dtype=np.float32)
    smp = np.asarray(samples, dtype=np.float32)
    if len(ref) <= k or len(smp) <= k:
        raise MetricError(f"precision/recall need more than k={k} points per set "
                          f"(got {len(ref)} reference, {len(smp)} samples)")
    r_ref = _radii(ref, k, fp16)
    r_smp = _radii(smp, k, fp16)
    precision = float(_coverage(smp, ref, r_ref, fp16).mean())
    recall = float(_coverage(ref, smp, r_smp, fp16).mean())
    return precision, recall


# ------------------------------------------------------------ pixels
def to_uint8(images) -> np.ndarray:
    """[-1, 1] float NCHW tensor/array -> uint8 NHWC by rounding (docs/evaluation.md#sample-files).

    u8 = floor(clamp(127.5 x + 128, 0, 255)): round-half-up of 127.5 (x + 1),
    never Open-MAGVIT2's truncation (docs/evaluation.md#sample-files).
    """
    try:
        import torch

        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    x = np.asarray(images, dtype=np.float32)
    u8 = np.floor(np.clip(127.5 * x + 128.0, 0, 255)).astype(np.uint8)
    return np.ascontiguousarray(u8.transpose(0, 2, 3, 1))


def psnr(original_u8: np.ndarray, recon_u8: np.ndarray) -> np.ndarray:
    """Per-image PSNR on uint8 NHWC pairs, values /255 (docs/evaluation.md#psnr)."""
    a = original_u8.astype(np.float64) / 255.0
    b = recon_u8.astype(np.float64) / 255.0
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1.0 / np.maximum(mse, 1e-20))


def ssim(original_u8: np.ndarray, recon_u8: np.ndarray) -> np.ndarray:
    """Per-image SSIM, skimage defaults with data_range=1.0 and channel_axis=-1 (docs/evaluation.md#ssim)."""
    from skimage.metrics import structural_similarity

    out = np.empty(len(original_u8))
    for i, (a, b) in enumerate(zip(original_u8, recon_u8)):
        win = min(7, a.shape[0], a.shape[1])
        win -= 1 - win % 2  # odd window, for tiny images (digits at 16 px use 7)
        out[i] = structural_similarity(a.astype(np.float64) / 255, b.astype(np.float64) / 255,
                                       data_range=1.0, channel_axis=-1, win_size=win)
    return out
