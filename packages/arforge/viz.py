"""Pictures people would rather look at than read: image grids and reconstruction pairs."""

from __future__ import annotations

import numpy as np
from PIL import Image

from arforge.metrics.adm import to_uint8


def image_grid(images, *, nrow: int, pad: int = 2, pad_value: int = 255, min_cell: int = 64) -> Image.Image:
    """A grid of images (float NCHW in [-1, 1] or uint8 NHWC), ``nrow`` images per row.

    Small images (e.g. 16 px digits) are upscaled with nearest neighbour to at
    least ``min_cell`` pixels so the grid is legible.
    """
    arr = images if isinstance(images, np.ndarray) and images.dtype == np.uint8 else to_uint8(images)
    n, h, w, c = arr.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    scale = max(1, int(np.ceil(min_cell / max(h, w))))
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    ncol = min(nrow, n)
    rows = int(np.ceil(n / ncol))
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    return Image.fromarray(grid.squeeze(-1) if c == 1 else grid)


def reconstruction_grid(originals, reconstructions, *, per_row: int = 8) -> Image.Image:
    """Originals on odd rows, their reconstructions right below (both [-1, 1] NCHW)."""
    a, b = to_uint8(originals), to_uint8(reconstructions)
    n = len(a)
    per_row = min(per_row, n)
    rows = []
    for i in range(0, n, per_row):
        rows.append(a[i:i + per_row])
        rows.append(b[i:i + per_row])
    if len(rows[-1]) < per_row:  # pad the last pair of rows to full width
        fill = np.full((per_row - len(rows[-1]),) + a.shape[1:], 255, np.uint8)
        rows[-2] = np.concatenate([rows[-2], fill])
        rows[-1] = np.concatenate([rows[-1], fill])
    return image_grid(np.concatenate(rows), nrow=per_row)
