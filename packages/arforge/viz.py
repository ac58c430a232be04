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
    import torch
    from torchvision.utils import make_grid

    arr = images if isinstance(images, np.ndarray) and images.dtype == np.uint8 else to_uint8(images)
    n, h, w, c = arr.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    scale = max(1, int(np.ceil(min_cell / max(h, w))))
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    cells = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if n == 1:  # make_grid returns a lone image as it is; frame it like every other grid
        grid = torch.nn.functional.pad(cells[0], (pad, pad, pad, pad), value=pad_value)  # (C, H + 2p, W + 2p)
    else:
        grid = make_grid(cells, nrow=min(nrow, n), padding=pad, pad_value=pad_value)  # (3 or C, H', W') uint8
    grid = grid[:c].permute(1, 2, 0).numpy()  # make_grid repeats a grey channel three times; keep one
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
