"""The quickstart's real dataset: scikit-learn's handwritten digits, no download.

``sklearn.datasets.load_digits`` ships inside scikit-learn: 1,797 grey 8 x 8
images of the digits 0-9 (UCI optical recognition of handwritten digits), pixel
values 0..16, ink high. arforge maps them to [-1, 1] (x = v / 8 - 1: background
-1, ink +1), upsamples them to ``image_size`` and repeats the grey channel to RGB.

Split (fixed): ``sklearn.model_selection.train_test_split`` of the indices with
``test_size=300``, ``stratify`` = the labels and ``random_state=0`` gives

- train: 1,497 images (per class 0-9: 148 152 147 152 151 152 151 149 145 150),
- val: 300 images (per class 0-9: 30 30 30 31 30 30 30 30 29 30),

each kept in the original dataset order.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from arforge.data.image_datasets import DataError, ImageSample
from arforge.data.transforms import ImageTransform, resolve_transform

TRAIN_SIZE, VAL_SIZE, TOTAL_SIZE = 1497, 300, 1797
SPLIT_SEED = 0

Split = Literal["train", "val", "all"]
Resample = Literal["bicubic", "nearest"]


def digits_split_indices(split: Split, *, val_size: int = VAL_SIZE, seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices into ``load_digits()`` of a split (stratified, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split == "all":
        return np.arange(TOTAL_SIZE)
    if split not in ("train", "val"):
        raise DataError(f"digits split must be 'train', 'val' or 'all', not {split!r}")
    labels = load_digits().target
    train, val = train_test_split(np.arange(len(labels)), test_size=val_size, stratify=labels, random_state=seed)
    return np.sort(train if split == "train" else val)


class DigitsDataset(Dataset):
    """scikit-learn digits as (3, S, S) images in [-1, 1] with labels 0-9 (offline).

    Args:
        split: ``train`` (1,497), ``val`` (300) or ``all`` (1,797); see the module docstring.
        image_size: output side S (16 or 32 for the quickstart; any size >= 8 works).
        resample: ``bicubic`` (``torch.nn.functional.interpolate``, a = -0.75,
            align_corners=False, then clamped to [-1, 1] because bicubic
            overshoots) or ``nearest`` (pixel repeat).
        transform: None returns the upsampled float tensor as is. A transform
            name or callable receives the upsampled digit as an RGB PIL image
            (quantised to uint8), like a folder image: e.g. for ten-crop extraction.
        val_size, seed: the split (defaults give the documented 1,497 / 300).
    """

    def __init__(self, *, split: Split = "train", image_size: int = 16, resample: Resample = "bicubic",
                 transform: str | ImageTransform | None = None, val_size: int = VAL_SIZE,
                 seed: int = SPLIT_SEED) -> None:
        from sklearn.datasets import load_digits  # late: scikit-learn takes a second to import

        if resample not in ("bicubic", "nearest"):
            raise DataError(f"digits resample must be 'bicubic' or 'nearest', not {resample!r}")
        if image_size < 8:
            raise DataError(f"digits image_size must be >= 8 (the source is 8x8), not {image_size}")
        data = load_digits()
        index = digits_split_indices(split, val_size=val_size, seed=seed)
        grey = torch.from_numpy(data.images[index]).float().div(8.0).sub(1.0).unsqueeze(1)  # (N, 1, 8, 8)
        if resample == "bicubic":
            grey = F.interpolate(grey, size=(image_size, image_size), mode="bicubic", align_corners=False)
            grey = grey.clamp(-1.0, 1.0)
        else:
            grey = F.interpolate(grey, size=(image_size, image_size), mode="nearest")
        self.images = grey.contiguous()  # (N, 1, S, S)
        self.targets: list[int] = [int(t) for t in data.target[index]]
        self.indices = index  #: positions in ``load_digits()``
        self.classes = [str(d) for d in range(10)]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.split, self.image_size, self.resample = split, image_size, resample
        self.transform = resolve_transform(transform, image_size=image_size)
        self.source = f"sklearn.datasets.load_digits[{split}, {image_size}px, {resample}, seed={seed}]"

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def skipped(self) -> int:
        """Always 0: the arrays ship with scikit-learn (kept for a uniform dataset API)."""
        return 0

    def pil_image(self, index: int) -> Image.Image:
        """The upsampled digit as an RGB uint8 PIL image."""
        grey = ((self.images[index, 0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (S, S)
        return Image.fromarray(grey.numpy()).convert("RGB")

    def read(self, index: int) -> ImageSample:
        if self.transform is not None:
            return ImageSample(self.transform(self.pil_image(index)), self.targets[index])
        return ImageSample(self.images[index].repeat(3, 1, 1), self.targets[index])  # (3, S, S)

    def __getitem__(self, index: int) -> ImageSample:
        return self.read(index)

    def with_transform(self, transform: str | ImageTransform | None) -> "DigitsDataset":
        """A view of the same images through another transform (the arrays are shared)."""
        out = copy.copy(self)
        out.transform = resolve_transform(transform, image_size=self.image_size)
        return out
