"""Image transforms of the three methods (docs/data.md#transforms, docs/data.md#ten-crop-code-extraction).

Every transform takes an RGB PIL image and returns a float tensor in [-1, 1]:
(3, S, S) for one view, (A, 3, S, S) for the A views of the extraction crops.
Pixels become x = pixel / 127.5 - 1 (the convention of docs/data.md, equal to ToTensor
followed by Normalize(0.5, 0.5) up to float rounding).

Randomness: ``random_crop_arr`` and the ADM flip draw from Python's ``random``
module, as upstream does, unless an explicit ``random.Random`` is passed. That
is deliberate: a transform holding its own generator would be copied into every
DataLoader worker with the same state and give every worker the same crops,
while torch reseeds ``random`` in each worker. The Open-MAGVIT2 crop uses
torchvision's RandomCrop, which draws from torch's generator (also reseeded per
worker).

Transforms are selectable by name (:data:`TRANSFORMS`, :func:`build_transform`):

==================  ============================================  ========================
name                what                                          used by
==================  ============================================  ========================
``adm_train``       random_crop_arr(S) -> hflip p=0.5             LlamaGen VQ, IAR, IAR2
``adm_eval``        center_crop_arr(S)                            LlamaGen VQ, IAR, IAR2
``magvit2_train``   Resize(S) (bilinear, antialias) -> RandomCrop  Open-MAGVIT2
``magvit2_eval``    Resize(S) -> CenterCrop(S)                    Open-MAGVIT2
``to_tensor``       no geometry; the image must already be S x S  pre-sized data (digits)
==================  ============================================  ========================
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from arforge.errors import ConfigError

#: A transform from an RGB PIL image to a float tensor in [-1, 1].
ImageTransform = Callable[[Image.Image], torch.Tensor]


# ------------------------------------------------------------------ pixels
def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1], x = pixel / 127.5 - 1."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


# ------------------------------------------------------------- ADM helpers
def _halve_while(image: Image.Image, short_target: int) -> Image.Image:
    """BOX-halve both sides (floor) while the shorter side is >= 2 * ``short_target``.

    The cheap BOX halving before the final BICUBIC resize is what ADM does for
    large images; keeping it keeps pixels identical to upstream.
    """
    while min(*image.size) >= 2 * short_target:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    return image


def _resize_short_side(image: Image.Image, short_target: int) -> Image.Image:
    """BICUBIC resize so the shorter side is ``short_target``; each side -> round(side * scale).

    ``scale`` is computed first and Python's ``round`` (half to even) is applied
    to ``side * scale``, exactly as upstream, so sizes match bit for bit.
    """
    scale = short_target / min(*image.size)
    return image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM ``center_crop_arr`` (docs/data.md#transforms).

    1. BOX-halve while the shorter side >= 2S; 2. BICUBIC resize to short side S
    (each side round(side * S / short)); 3. crop S x S at ((H'-S)//2, (W'-S)//2).
    """
    image = _resize_short_side(_halve_while(image, image_size), image_size)
    width, height = image.size
    top, left = (height - image_size) // 2, (width - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def random_crop_range(image_size: int, min_crop_frac: float = 0.8,
                      max_crop_frac: float = 1.0) -> tuple[int, int]:
    """The inclusive range of the short side drawn by :func:`random_crop_arr`.

    [ceil(S / max_crop_frac), ceil(S / min_crop_frac)], i.e. [256, 320] for S = 256.
    """
    return math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac)


def random_crop_arr(image: Image.Image, image_size: int, min_crop_frac: float = 0.8,
                    max_crop_frac: float = 1.0, *, rng: random.Random | None = None) -> Image.Image:
    """ADM ``random_crop_arr`` (docs/data.md#transforms).

    Draws the short side s uniformly from the integers of
    :func:`random_crop_range`, BOX-halves while the shorter side >= 2s, BICUBIC
    resizes to short side s and takes a uniformly random S x S crop. ``rng``
    defaults to Python's ``random`` module (reseeded per DataLoader worker).
    """
    rng = rng or random  # type: ignore[assignment]
    low, high = random_crop_range(image_size, min_crop_frac, max_crop_frac)
    short = rng.randrange(low, high + 1)
    image = _resize_short_side(_halve_while(image, short), short)
    width, height = image.size
    top = rng.randrange(height - image_size + 1)
    left = rng.randrange(width - image_size + 1)
    return image.crop((left, top, left + image_size, top + image_size))


# ------------------------------------------------------- named transforms
class ADMTrainTransform:
    """LlamaGen VQ / IAR / IAR2 train transform (docs/data.md#transforms).

    random_crop_arr(S, 0.8, 1.0) -> horizontal flip with p = 0.5 -> [-1, 1].
    """

    def __init__(self, *, image_size: int, min_crop_frac: float = 0.8, max_crop_frac: float = 1.0,
                 flip_prob: float = 0.5, rng: random.Random | None = None) -> None:
        self.image_size = image_size
        self.min_crop_frac = min_crop_frac
        self.max_crop_frac = max_crop_frac
        self.flip_prob = flip_prob
        self.rng = rng

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rng = self.rng or random
        image = random_crop_arr(image, self.image_size, self.min_crop_frac, self.max_crop_frac, rng=self.rng)
        if rng.random() < self.flip_prob:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image)


class ADMEvalTransform:
    """LlamaGen VQ / IAR / IAR2 eval transform: center_crop_arr(S) -> [-1, 1] (docs/data.md#transforms)."""

    def __init__(self, *, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(center_crop_arr(image, self.image_size))


class Magvit2TrainTransform:
    """Open-MAGVIT2 train transform (docs/data.md#transforms).

    torchvision Resize(S) on the short side (bilinear, antialiased on PIL input)
    -> RandomCrop(S); **no flip**; x / 127.5 - 1.
    """

    def __init__(self, *, image_size: int) -> None:
        from torchvision import transforms as T  # late: torchvision takes seconds to import

        self.image_size = image_size
        self._geometry = T.Compose([
            T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.RandomCrop(image_size),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(self._geometry(image))


class Magvit2EvalTransform:
    """Open-MAGVIT2 eval transform: Resize(S) -> CenterCrop(S) -> [-1, 1] (docs/data.md#transforms)."""

    def __init__(self, *, image_size: int) -> None:
        from torchvision import transforms as T

        self.image_size = image_size
        self._geometry = T.Compose([
            T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(image_size),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(self._geometry(image))


class ToTensorTransform:
    """No geometry: the image is used at its own size (it must be ``image_size`` square)."""

    def __init__(self, *, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.image_size, self.image_size):
            raise ConfigError(f"the 'to_tensor' transform needs {self.image_size}x{self.image_size} "
                             f"images, got {image.size[0]}x{image.size[1]}; use 'adm_eval' to resize")
        return to_tensor(image)


# ----------------------------------------------------- extraction crops
FIVE_CROP_NAMES: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right", "center")


def five_crop(image: Image.Image, size: int) -> list[Image.Image]:
    """torchvision's ``five_crop`` (same order and offsets), without importing torchvision.

    Top-left, top-right, bottom-left, bottom-right, then the centre crop at
    (int(round((H - s) / 2)), int(round((W - s) / 2))), Python rounding as in
    torchvision's ``center_crop``. Importing torchvision costs seconds per
    process (it pulls in torch._dynamo), which every extraction rank and
    DataLoader worker would pay; a test checks equality with torchvision.
    """
    width, height = image.size
    if size > min(width, height):
        raise ValueError(f"crop size {size} is larger than the image ({width}x{height})")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    corners = [(0, 0), (width - size, 0), (0, height - size), (width - size, height - size), (left, top)]
    return [image.crop((x, y, x + size, y + size)) for x, y in corners]


def ten_crop(image: Image.Image, size: int) -> list[Image.Image]:
    """torchvision's ``ten_crop``: the five crops, then the five of the horizontally flipped image."""
    return five_crop(image, size) + five_crop(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), size)


class ExtractionCrops:
    """The augmented views of code extraction (docs/data.md#ten-crop-code-extraction).

    - ``ten_crop=True``: center_crop_arr to int(S * crop_range) (422 for S = 384,
      crop_range 1.1), then torchvision TenCrop(S): top-left, top-right,
      bottom-left, bottom-right, centre, then the same five of the horizontally
      flipped image (``flips=False`` keeps only the first five); see :func:`ten_crop`.
    - ``ten_crop=False``: center_crop_arr(S) and its horizontal flip
      (``flips=False``: the centre crop only); ``crop_range`` is not used.

    Returns (A, 3, S, S) in [-1, 1], A = len(:attr:`names`).
    """

    def __init__(self, *, image_size: int, ten_crop: bool = True, crop_range: float = 1.1,
                 flips: bool = True) -> None:
        if ten_crop and not crop_range >= 1.0:
            raise ConfigError(f"crop_range must be >= 1.0 (got {crop_range}): the ten crops of size "
                              "image_size are cut from a center crop of int(image_size * crop_range)")
        self.image_size = image_size
        self.ten_crop = ten_crop
        self.crop_range = crop_range if ten_crop else 1.0
        self.flips = flips
        # int() truncates, as upstream: int(384 * 1.1) = 422, int(384 * 1.05) = 403.
        self.crop_size = int(image_size * crop_range) if ten_crop else image_size
        if ten_crop:
            names = [f"crop{self.crop_size}/{n}" for n in FIVE_CROP_NAMES]
        else:
            names = [f"center{self.crop_size}"]
        if flips:
            names += [f"hflip/{n}" for n in names]
        self.names: tuple[str, ...] = tuple(names)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        base = center_crop_arr(image, self.crop_size)
        if self.ten_crop:
            views: Sequence[Image.Image] = (ten_crop(base, self.image_size) if self.flips
                                            else five_crop(base, self.image_size))
        else:
            views = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if self.flips else [base]
        return torch.stack([to_tensor(v) for v in views])  # (A, 3, S, S)


# ------------------------------------------------------------- by name
TRANSFORMS: dict[str, type] = {
    "adm_train": ADMTrainTransform,
    "adm_eval": ADMEvalTransform,
    "magvit2_train": Magvit2TrainTransform,
    "magvit2_eval": Magvit2EvalTransform,
    "to_tensor": ToTensorTransform,
}


def build_transform(name: str, *, image_size: int) -> ImageTransform:
    """The named transform of :data:`TRANSFORMS` at ``image_size``."""
    try:
        cls = TRANSFORMS[name]
    except KeyError:
        raise ConfigError(f"unknown transform {name!r}; choose one of {', '.join(TRANSFORMS)}") from None
    return cls(image_size=image_size)


def resolve_transform(transform: str | ImageTransform | None, *, image_size: int) -> ImageTransform | None:
    """A name -> :func:`build_transform`; a callable or None passes through."""
    if transform is None or callable(transform):
        return transform
    return build_transform(transform, image_size=image_size)
