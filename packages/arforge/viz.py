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


def labelled_grid(images, *, nrow: int, row_labels, title: str | None = None, pad: int = 2,
                  font_size: int = 14, **grid_options) -> Image.Image:
    """:func:`image_grid` with a label at the left of each row (``row_labels``, one per row, e.g.
    ``"class 3"``) and an optional ``title`` line above (e.g. the guidance that sampled it).

    The labels are drawn with PIL's own font, so no font file has to be installed.
    """
    from PIL import ImageDraw, ImageFont

    grid = image_grid(images, nrow=nrow, pad=pad, **grid_options).convert("RGB")
    labels = [str(label) for label in row_labels]
    rows = -(-len(images) // max(1, min(nrow, len(images))))
    if len(labels) != rows:
        raise ValueError(f"labelled_grid: {len(labels)} row labels for a grid of {rows} rows")
    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(4, font_size // 2)
    strip = max((measure.textlength(t, font=font) for t in labels), default=0)
    strip = int(strip) + 2 * margin if labels else 0
    top = font_size + 2 * margin if title else 0
    width = max(strip + grid.width, strip + pad + int(measure.textlength(title, font=font)) + margin if title else 0)
    canvas = Image.new("RGB", (width, top + grid.height), (255, 255, 255))
    canvas.paste(grid, (strip, top))
    draw = ImageDraw.Draw(canvas)
    row_height = (grid.height - pad) / rows  # each row: a cell and the padding above it
    for r, text in enumerate(labels):
        centre = top + pad + r * row_height + (row_height - pad) / 2
        draw.text((margin, centre), text, fill=(0, 0, 0), font=font, anchor="lm")
    if title:
        draw.text((strip + pad, top / 2), title, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


def captioned(image: Image.Image, lines, *, font_size: int = 14) -> Image.Image:
    """``image`` with lines of text above it (a study trial's values and result)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [str(line) for line in lines if line]
    margin = max(4, font_size // 2)
    line_height = font_size + margin // 2
    top = margin + line_height * len(lines)
    width = max([image.width, *(int(measure.textlength(t, font=font)) + 2 * margin for t in lines)])
    canvas = Image.new("RGB", (width, top + image.height), (255, 255, 255))
    canvas.paste(image.convert("RGB"), (0, top))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        draw.text((margin, margin + i * line_height), text, fill=(0, 0, 0), font=font)
    return canvas


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


def curves_figure(curves, *, columns: int = 4):
    """A matplotlib figure of training curves, one panel per metric: ``curves`` maps a metric name
    (``train/loss``) to its ``(steps, values)``. matplotlib is imported here, drawing off-screen
    unless the caller chose a backend (a notebook)."""
    import sys

    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    cols = max(1, min(columns, len(names)))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        steps, values = curves[name]
        ax.plot(steps, values, lw=1.2, marker="." if len(steps) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
