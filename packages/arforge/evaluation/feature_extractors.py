"""The feature-extractor plugin slot and the ADM Inception-v3 port.

docs/evaluation.md#adm-evaluator-semantics, docs/evaluation.md#testing-metric-code, docs/evaluation.md#weights. Metric code takes its network as an
injected :class:`FeatureExtractor`: anything with a ``name``, a
``weights_sha256`` and ``features(uint8 NHWC images) -> Features``. Two ship:

- :class:`InceptionV3Features` (``feature_extractors.inception``): torch-fidelity's
  TF-compatible Inception-v3 with the 2015-12-05 FID weights, the network
  behind every published FID/IS/precision/recall number;
- ``DigitsClassifier`` (``feature_extractors.digits_classifier``, in
  ``arforge_plugins``): a small CNN for the 16/32 px quickstart digits, on which
  Inception features mean nothing.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from arforge.errors import ArforgeError
from arforge.weights import find_weights, sha256_of

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"


class FeatureExtractorError(ArforgeError):
    """A feature extractor that cannot be built or fed: names the file/option and the fix."""


@dataclass(frozen=True)
class Features:
    """What a feature extractor returns for N images.

    pool: (N, D) features for FID and precision/recall (Inception: pool_3, 2048-d).
    spatial: (N, D_s) features for sFID, or None (Inception: 2023-d, see below).
    logits: (N, C) pre-softmax class scores for the Inception Score, or None
        (Inception: pool_3 @ W over 1008 classes, no bias).
    """

    pool: np.ndarray
    spatial: np.ndarray | None = None
    logits: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pool)


@runtime_checkable
class FeatureExtractor(Protocol):
    """The evaluator's network. ``name`` and ``weights_sha256`` are recorded with every result."""

    name: str
    weights_sha256: str | None

    def features(self, images) -> Features: ...


def as_uint8_nchw(images, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NHWC images (numpy array or tensor) -> a uint8 (N, 3, H, W) tensor on ``device``."""
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        shape = tuple(getattr(images, "shape", ()))
        raise FeatureExtractorError(
            f"feature extractors take uint8 NHWC images (N, H, W, 3), got {getattr(images, 'dtype', type(images))} "
            f"{shape}; convert [-1, 1] NCHW floats with arforge.metrics.adm.to_uint8")
    return x.to(device).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)


def module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ================================================================ Inception
def _import_torch_fidelity():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise FeatureExtractorError(
            "the Inception feature extractor needs torch-fidelity (its TF1-exact bilinear resize; "
            "docs/evaluation.md#using-a-pytorch-port), which is not installed. Install it with: pip install 'arforge[fid]' "
            f"(or pip install torch-fidelity). ({exc})") from exc
    return FeatureExtractorInceptionV3


class InceptionV3Features(nn.Module):
    """The ADM evaluator's Inception-v3 (2015-12-05 FID weights) through torch-fidelity.

    "Diffusion Models Beat GANs on Image Synthesis" (guided-diffusion
    ``evaluations/evaluator.py``), ported per docs/evaluation.md#using-a-pytorch-port:

    - input uint8 images at any size, resized to 299 with torch-fidelity's
      TF1-exact bilinear resize (``interpolate_bilinear_2d_like_tensorflow1x``)
      and normalised as the TF graph does;
    - ``pool``: torch-fidelity feature ``'2048'`` (pool_3);
    - ``logits``: feature ``'logits_unbiased'``: pool_3 @ fc.weight.T over 1008
      classes, **no bias** (docs/evaluation.md#inception-score);
    - ``spatial`` (sFID, docs/evaluation.md#adm-evaluator-semantics): the ADM evaluator reads the TF tensor
      ``mixed_6/conv:0`` and keeps ``[..., :7]``. torch-fidelity exposes no such
      feature, so arforge hooks :attr:`SFID_MODULE` = ``Mixed_6d.branch1x1``
      (its BasicConv2d output: conv -> BN -> ReLU, 192 x 17 x 17), keeps the
      first :attr:`SFID_CHANNELS` = 7 channels and flattens NHWC to 2023-d.
      The layer is established from torch-fidelity's own TF -> PyTorch weight
      map, which loads TF ``mixed_6/conv/{conv2d_params,batchnorm}`` into
      ``Mixed_6d.branch1x1.{conv,bn}`` (TF ``mixed``..``mixed_10`` =
      ``Mixed_5b``..``Mixed_7c`` in order), and from the TF graph's op listing,
      in which the op named ``mixed_6/conv`` follows ``mixed_6/conv/batchnorm``
      (the ReLU); evidence and citations in ``docs/evaluation.md``, "sFID:
      which layer". :attr:`sfid_verified` stays False: it records a
      *numerical* comparison with the TF graph's ``mixed_6/conv:0`` on real
      images and the official weights, which has not been run.

    Weights: ``weights-inception-2015-12-05-6726825d.pth`` from ``weights_path``
    or ``$TORCH_HOME/hub/checkpoints``; no Python package ships it and arforge
    never downloads it (docs/evaluation.md#weights). The file is read with ``torch.load(weights_only=True)``
    (torch-fidelity itself would unpickle it unrestricted) and its SHA-256
    prefix is checked.
    """

    SFID_MODULE = "Mixed_6d.branch1x1"  # = TF mixed_6/conv:0 (docs/evaluation.md, "sFID: which layer")
    SFID_TF_TENSOR = "mixed_6/conv:0"
    SFID_CHANNELS = 7  # the ADM evaluator's spatial[..., :7]
    sfid_verified = False  # no numerical comparison with the TF graph's mixed_6/conv:0 yet

    def __init__(self, *, weights_path: str | os.PathLike | None = None, verify_hash: bool = True,
                 spatial: bool = True, internal_dtype: str = "float32") -> None:
        """
        Args:
            weights_path: the torch-fidelity Inception file; None looks in
                ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``.
            verify_hash: check the SHA-256 prefix ``6726825d`` (tests with random
                stand-in weights pass False).
            spatial: also return the sFID features (the hook costs a 17x17x7 copy).
            internal_dtype: torch-fidelity's ``feature_extractor_internal_dtype``
                (``float32``, or ``float64`` for a numerically closer match to TF).
        """
        super().__init__()
        extractor_cls = _import_torch_fidelity()
        path = find_weights(INCEPTION_FILENAME, weights_path, sha256_prefix=INCEPTION_SHA256_PREFIX,
                            verify_hash=verify_hash,
                            what="The Inception feature extractor (FID/sFID/IS/precision-recall)",
                            how="feature_extractors.inception.weights_path")
        from arforge.checkpoint import load_foreign, unwrap_container

        state, _ = unwrap_container(load_foreign(path))
        # torch-fidelity only takes a path (or downloads) and unpickles it unrestricted;
        # hand it a stream that torch.save wrote from the tensors loaded safely above.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            self.net = extractor_cls("inception-v3-compat", ["2048", "logits_unbiased"],
                                     feature_extractor_weights_path=buffer,
                                     feature_extractor_internal_dtype=internal_dtype)
        except RuntimeError as exc:  # load_state_dict: missing/unexpected keys, shapes
            raise FeatureExtractorError(
                f"{path} is not torch-fidelity's Inception-v3 state dict ({str(exc).splitlines()[0]}). "
                f"Supply the official {INCEPTION_FILENAME}.") from exc
        self.weights_file = str(path)
        self.weights_sha256 = sha256_of(path)
        self.name = "inception-v3-torch-fidelity"
        self.with_spatial = spatial
        self._spatial: torch.Tensor | None = None
        if spatial:
            self.spatial_description = (
                f"{self.SFID_MODULE} ReLU output (= TF {self.SFID_TF_TENSOR} per torch-fidelity's TF weight map), "
                f"first {self.SFID_CHANNELS} channels, NHWC flatten (17*17*7 = 2023); "
                "not yet compared numerically with TF")
            self.net.get_submodule(self.SFID_MODULE).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        # NCHW -> NHWC before flattening, as TF's spatial[..., :7].reshape([N, -1]) does: (N, 17*17*7)
        self._spatial = output[:, :self.SFID_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float()

    def train(self, mode: bool = True) -> "InceptionV3Features":
        return super().train(False)  # frozen: BatchNorm always uses the TF statistics

    @torch.no_grad()
    def features(self, images) -> Features:
        x = as_uint8_nchw(images, module_device(self))
        self._spatial = None
        pool, logits = self.net(x)
        spatial = self._spatial.cpu().numpy() if self.with_spatial else None
        self._spatial = None
        return Features(pool=pool.float().cpu().numpy(), spatial=spatial, logits=logits.float().cpu().numpy())


# ================================================================ helpers
def extract_features(extractor: FeatureExtractor, batches, *, total: int | None = None,
                     desc: str = "features", progress: bool = True) -> Features:
    """Run ``extractor`` over an iterable of uint8 NHWC batches and concatenate the results."""
    from tqdm.auto import tqdm

    pools, spatials, logits = [], [], []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
              mininterval=1.0) as bar:
        for batch in batches:
            f = extractor.features(batch)
            pools.append(f.pool)
            if f.spatial is not None:
                spatials.append(f.spatial)
            if f.logits is not None:
                logits.append(f.logits)
            bar.update(len(batch))
    if not pools:
        raise FeatureExtractorError("no images to extract features from")
    return Features(pool=np.concatenate(pools), spatial=np.concatenate(spatials) if spatials else None,
                    logits=np.concatenate(logits) if logits else None)


def describe(extractor: FeatureExtractor) -> dict[str, str]:
    """The provenance recorded with every result: backend, weights file and SHA-256, sFID notes."""
    out = {"backend": str(getattr(extractor, "name", type(extractor).__name__)),
           "weights_sha256": str(getattr(extractor, "weights_sha256", None) or "none"),
           "weights_file": str(getattr(extractor, "weights_file", None) or "none")}
    if getattr(extractor, "spatial_description", None):
        out["sfid_features"] = str(extractor.spatial_description)
        out["sfid_verified"] = str(bool(getattr(extractor, "sfid_verified", False))).lower()
    return out
