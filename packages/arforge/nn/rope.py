"""The 2D rotary position table of LlamaGen's blocks, with its two upstream quirks.

docs/llamagen.md#2d-rope: the class rows are zero rotations (or identity, when asked); IAR2's
checkpoints index a repeat-interleaved table (docs/iar2.md#the-repeat-interleaved-rope-table). The
backbone and the sub-token heads keep their table in fp32 whatever the module is cast to
(:class:`RotaryTableMixin`).

Shapes: T sequence length, H heads, hd head dimension, g grid side.
"""

from __future__ import annotations

import torch

from arforge.device import at_least_fp32


def precompute_freqs_cis_2d(*, grid_size: int, head_dim: int, base: float = 10000.0,
                            cls_token_num: int = 1, cls_zero_rotation: bool = True,
                            repeat_interleave: bool = False) -> torch.Tensor:
    """The 2D rotary table (docs/llamagen.md#2d-rope), shape (cls_token_num + g*g, hd/2, 2).

    Row ``cls_token_num + p`` holds (cos, sin) of cell p = r*g + c: the first hd/4
    pairs rotate by r·ω_k and the last hd/4 by c·ω_k, ω_k = base^(-2k/(hd/2)).

    ``cls_zero_rotation`` (docs/llamagen.md#2d-rope, upstream default): the class rows are (0, 0), so the
    class token's q and k are zero vectors; ``False`` gives them the identity (1, 0).
    ``repeat_interleave`` (docs/iar2.md#the-repeat-interleaved-rope-table, IAR2 checkpoints): the grid rows are repeated twice
    so that row cls + p holds cell ⌊p/2⌋ (token t rotates by cell ⌊t/2⌋). Upstream's
    table then has 2·g² grid rows of which only the first g² are ever used; this
    table keeps those g², so every variant has the same shape.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4 (got {head_dim})")
    half = head_dim // 2
    # exactly upstream's fp32 arithmetic, so the official weights see the same angles
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (hd/4,)
    t = torch.arange(grid_size, device=freqs.device).float()
    freqs = torch.outer(t, freqs)  # (g, hd/4)
    freqs_grid = torch.cat([
        freqs[:, None, :].expand(-1, grid_size, -1),  # row index in the first half
        freqs[None, :, :].expand(grid_size, -1, -1),  # column index in the second half
    ], dim=-1)  # (g, g, hd/2)
    cache = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1)  # (g, g, hd/2, 2)
    cache = cache.flatten(0, 1)  # (g*g, hd/2, 2), row-major cells
    if repeat_interleave:
        cache = cache.repeat_interleave(2, dim=0)[: grid_size * grid_size]  # (g*g, hd/2, 2): row p -> cell p//2
    cls = torch.zeros(cls_token_num, half, 2, device=freqs.device)
    if not cls_zero_rotation:
        cls[..., 0] = 1.0  # identity rotation: the class token's q/k pass unrotated
    return torch.cat([cls, cache])  # (cls + g*g, hd/2, 2)


def subtoken_freqs_cis(*, n_slots: int, head_dim: int, base: float = 10000.0, cls_zero_rotation: bool = True,
                       repeat_interleave: bool = False) -> torch.Tensor:
    """Rows 0 … n_slots-1 of the 2D table, as used inside the sub-token heads (docs/open_magvit2.md#next-sub-token-head).

    Open-MAGVIT2's intra transformer uses rows 0–1 (zero, identity); IAR2's head
    rows 0–2 under ``repeat_interleave`` (zero, identity, identity). Without the
    IAR2 quirk row 2 would be cell 1 = (0, 1), a column rotation.
    """
    table = precompute_freqs_cis_2d(grid_size=max(n_slots, 2), head_dim=head_dim, base=base, cls_token_num=1,
                                    cls_zero_rotation=cls_zero_rotation, repeat_interleave=repeat_interleave)
    return table[:n_slots].clone()  # (n_slots, hd/2, 2)


class RotaryTableMixin:
    """Keeps a module's ``freqs_cis`` buffer in fp32 when the module is cast.

    Upstream keeps the table a plain fp32 attribute, so casting the GPT to bf16
    for sampling (docs/llamagen.md#sampling) leaves the angles exact; a buffer would be cast too.
    The module rebuilds the table (``_table()``) whenever a cast changed its dtype.
    """

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.freqs_cis.dtype != torch.float32:
            self.freqs_cis = self._table().to(self.freqs_cis.device)
        return out


class SubtokenRotaryMixin(RotaryTableMixin):
    """The rotary table of a sub-token head's slots (docs/open_magvit2.md#next-sub-token-head), rebuilt when a quirk flag changes.

    The head sets ``n_slots``, ``head_dim``, ``rope_base``, ``cls_zero_rotation`` and
    ``rope_repeat_interleave``; loading IAR2 weights turns ``repeat_interleave`` on.
    """

    def _table(self) -> torch.Tensor:
        return subtoken_freqs_cis(n_slots=self.n_slots, head_dim=self.head_dim, base=self.rope_base,
                                  cls_zero_rotation=self.cls_zero_rotation,
                                  repeat_interleave=self.rope_repeat_interleave)

    def configure_rope(self, *, cls_zero_rotation: bool | None = None, repeat_interleave: bool | None = None) -> None:
        if cls_zero_rotation is not None:
            self.cls_zero_rotation = cls_zero_rotation
        if repeat_interleave is not None:
            self.rope_repeat_interleave = repeat_interleave
        self.freqs_cis = self._table().to(self.freqs_cis.device)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs (2j, 2j+1) (docs/llamagen.md#2d-rope, gpt-fast/Meta interleaved convention).

    x: (B, T, H, hd); freqs_cis: (T, hd/2, 2). Computed in fp32 and cast back to
    x's dtype (LlamaGen/IAR2; Open-MAGVIT2 keeps fp32, identical in fp32 runs).
    """
    xs = at_least_fp32(x).reshape(*x.shape[:-1], -1, 2)  # (B, T, H, hd/2, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)  # (1, T, 1, hd/2, 2)
    out = torch.stack([
        xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
        xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1],
    ], dim=-1)  # (B, T, H, hd/2, 2)
    return out.flatten(3).type_as(x)  # (B, T, H, hd)
