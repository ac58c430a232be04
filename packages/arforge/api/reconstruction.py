""":func:`reconstruct`: images through a tokenizer and back, as a :class:`Reconstruction` (docs/api.md#reconstruct)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from arforge.api.loaded import LoadedRun
from arforge.api.runs import LoadError
from arforge.api.samples import png

if TYPE_CHECKING:  # torch and PIL are imported when a function needs them: `import arforge` stays cheap
    import torch
    from PIL import Image

__all__ = ["Reconstruction", "reconstruct"]


@dataclass(frozen=True)
class Reconstruction:
    """Images through a tokenizer and back: the originals, the token ids and the decoded images."""

    originals: "torch.Tensor"  #: uint8 (B, H, W, 3), what went in (rounded as the reconstructions are)
    images: "torch.Tensor"  #: uint8 (B, H, W, 3), decoded from ``ids``
    ids: "torch.Tensor"  #: int64 (B, L, S) token ids (docs/architecture.md conventions)
    grid_shape: tuple[int, int]  #: (h, w) tokens

    def pil(self) -> list["Image.Image"]:
        from PIL import Image

        return [Image.fromarray(im) for im in self.images.cpu().numpy()]

    def grid(self, *, nrow: int | None = None) -> "Image.Image":
        """Each row of originals with their reconstructions right below, ``nrow`` per row (default up to 8)."""
        from arforge.viz import reconstruction_grid

        def signed(u8: "torch.Tensor") -> "torch.Tensor":  # uint8 NHWC -> [-1, 1] NCHW, which to_uint8 inverts exactly
            return u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0

        return reconstruction_grid(signed(self.originals), signed(self.images), per_row=nrow or 8)

    def _repr_png_(self) -> bytes:
        return png(self.grid())


def _as_float_images(images: Any) -> "torch.Tensor":
    """uint8 NHWC / PIL / float NCHW in [-1, 1] -> float (B, 3, H, W) in [-1, 1]."""
    import numpy as np
    import torch

    if hasattr(images, "convert") and hasattr(images, "size"):  # one PIL image
        images = [images]
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    t = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise LoadError(f"images must be (B, H, W, 3) uint8, (B, 3, H, W) float in [-1, 1] or PIL images; "
                        f"got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        if t.shape[-1] != 3:
            raise LoadError(f"uint8 images must be (B, H, W, 3), got {tuple(t.shape)}")
        return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W), the inverse of to_uint8
    if t.shape[1] != 3:
        raise LoadError(f"float images must be (B, 3, H, W) in [-1, 1], got {tuple(t.shape)}")
    return t.float()


def reconstruct(tokenizer: Any, images: Any, *, batch_size: int = 64) -> Reconstruction:
    """Encode ``images`` to token ids and decode them again.

    Args:
        tokenizer: what :func:`arforge.load` returned, or a tokenizer module.
        images: uint8 (B, H, W, 3) (``Samples.images``, an ADM ``.npz``'s ``arr_0``), PIL images,
            or float (B, 3, H, W) in [-1, 1]; H and W multiples of the tokenizer's downsampling.
        batch_size: images encoded and decoded at once.
    """
    import numpy as np
    import torch

    from arforge.metrics.adm import to_uint8

    if isinstance(tokenizer, LoadedRun):
        if tokenizer.tokenizer is None:
            raise LoadError(f"{tokenizer.source} holds no tokenizer (a jobs.{tokenizer.job} run)")
        tokenizer = tokenizer.tokenizer
    if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")):
        raise LoadError(f"reconstruct needs a tokenizer (encode/decode) or what arforge.load returned, "
                        f"not {type(tokenizer).__name__}")
    if batch_size < 1:
        raise LoadError(f"batch_size must be >= 1, got {batch_size}")
    x = _as_float_images(images)
    down = int(getattr(tokenizer, "downsample", 1))
    H, W = x.shape[-2:]
    if H % down or W % down:
        raise LoadError(f"images of {H}x{W} px do not tile into {down}x{down}-pixel tokens; crop or resize them "
                        f"to a multiple of {down}")
    grid = (H // down, W // down)
    device = next(tokenizer.parameters()).device if isinstance(tokenizer, torch.nn.Module) else torch.device("cpu")
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer.eval()
    ids_all, recon = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            ids = tokenizer.encode(x[start:start + batch_size].to(device))  # (b, L, S)
            ids_all.append(ids.cpu())
            recon.append(to_uint8(tokenizer.decode(ids, grid).float()))
    return Reconstruction(originals=torch.from_numpy(to_uint8(x)), images=torch.from_numpy(np.concatenate(recon)),
                          ids=torch.cat(ids_all).to(torch.int64), grid_shape=grid)
