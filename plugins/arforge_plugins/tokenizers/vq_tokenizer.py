"""A generic discrete image tokenizer: encoder -> [quant_conv] -> quantizer -> [post_quant_conv] -> decoder.

One composition serves LlamaGen VQ-16/VQ-8 (docs/llamagen.md#tokenizer: 1x1
``quant_conv``/``post_quant_conv`` around an l2-normalised VQ), IAR2 (docs/iar2.md#tokenizer: the
same backbone around the semantic-detail quantizer) and Open-MAGVIT2 (docs/open_magvit2.md#tokenizer: no
projections; the decoder's adaptive GroupNorms are conditioned on the
quantised map q).

Submodule names are those of the official checkpoints (``encoder``,
``decoder``, ``quant_conv``, ``post_quant_conv``, ``quantize``) so that the
official key maps in ``tokenizer_checkpoints.py`` are near-identities.

The ``exact_ops`` switch that both backbones share lives here too: :func:`swish`
and :meth:`VQTokenizer.set_exact_ops`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arforge.interfaces import QuantizerOutput, TokenizerOutput


def swish(x: torch.Tensor, exact: bool) -> torch.Tensor:
    """SiLU; with ``exact`` as ``x * torch.sigmoid(x)``, the reference code's op order.

    References: LlamaGen ``tokenizer/tokenizer_image/vq_model.py:354-356`` (commit
    ce98ec4), IAR2 ``tokenizer/tokenizer_image/vq_model_second_stage.py:430-432``
    (46a2437), Open-MAGVIT2 ``src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py:6-8``
    (3c58097).
    """
    # F.silu is one fused kernel and rounds differently from sigmoid-then-multiply;
    # the last-bit differences compound through the blocks to 1e-6..1e-5 in a reconstruction.
    return x * torch.sigmoid(x) if exact else F.silu(x)


class VQTokenizer(nn.Module):
    """Implements ``arforge.interfaces.Tokenizer`` around any ``Quantizer``.

    Token ids are (B, h*w, S) in raster order (``arforge.interfaces``).
    """

    def __init__(self, *, encoder: nn.Module, quantize: nn.Module, decoder: nn.Module,
                 quant_conv: nn.Module | None = None, post_quant_conv: nn.Module | None = None,
                 downsample: int, decoder_takes_quant: bool = False) -> None:
        """
        Args:
            encoder: images (B, 3, H, W) -> features (B, C, H/downsample, W/downsample).
            quantize: the quantizer (``arforge.interfaces.Quantizer``).
            decoder: features -> images. With ``decoder_takes_quant`` it is called as
                ``decoder(h, q)`` where q is the quantised map (Open-MAGVIT2 AGN, docs/open_magvit2.md#encoder-and-decoder, docs/open_magvit2.md#adaptive-groupnorm).
            quant_conv / post_quant_conv: optional projections around the quantizer
                (LlamaGen's 1x1 convs 256 <-> 8, docs/llamagen.md#encoder-and-decoder); None for Open-MAGVIT2.
            downsample: image pixels per token along each axis (8 or 16 at paper scale).
        """
        super().__init__()
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1 (got {downsample})")
        self.encoder = encoder
        self.quant_conv = quant_conv
        self.quantize = quantize
        self.post_quant_conv = post_quant_conv
        self.decoder = decoder
        self.downsample = int(downsample)
        self.decoder_takes_quant = decoder_takes_quant

    # ------------------------------------------------------------ exact ops
    def _exact_ops_modules(self) -> list[nn.Module]:
        return [m for m in self.modules()
                if m is not self and isinstance(getattr(m, "exact_ops", None), bool)]

    @property
    def exact_ops(self) -> bool:
        """True when every backbone block uses the reference op order (see :meth:`set_exact_ops`)."""
        mods = self._exact_ops_modules()
        return bool(mods) and all(m.exact_ops for m in mods)

    @exact_ops.setter
    def exact_ops(self, flag: bool) -> None:
        self.set_exact_ops(flag)

    def set_exact_ops(self, flag: bool) -> "VQTokenizer":
        """Switch every encoder/decoder block between the reference op order and the fast ops.

        Exact ops use the reference code's op order: x*sigmoid(x) for SiLU and
        bmm+softmax attention with the scale applied after the product (see
        :func:`swish` and ``llamagen_vq.attention`` for the upstream lines);
        slower; for parity checks at 1e-6. The fast ops (F.silu, SDPA) are the
        default. Weights are untouched, so this works after a loader has filled a
        module built from a gin preset. Returns ``self``.
        """
        for m in self._exact_ops_modules():
            m.exact_ops = bool(flag)
        return self

    # ---------------------------------------------------------------- shapes
    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(self.quantize.codebook_sizes)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """The token grid of an image of this size; errors if it does not divide."""
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"image size {height}x{width} is not a multiple of the tokenizer's "
                             f"downsampling factor {self.downsample}")
        return height // self.downsample, width // self.downsample

    # ------------------------------------------------------------- features
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the quantizer's input z (B, dim, h, w)."""
        self.grid_for(images.shape[-2], images.shape[-1])
        h = self.encoder(images)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def decode_features(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised features (B, dim, h, w) -> images; used directly by IAR2's semantic-only pass."""
        h = self.post_quant_conv(z_q) if self.post_quant_conv is not None else z_q
        return self.decoder(h, z_q) if self.decoder_takes_quant else self.decoder(h)

    # ------------------------------------------------------------ interface
    def quantize_images(self, images: torch.Tensor) -> QuantizerOutput:
        return self.quantize(self.encode_features(images))

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        q: QuantizerOutput = self.quantize_images(images)
        return TokenizerOutput(reconstruction=self.decode_features(q.z_q), ids=q.ids,
                               losses=dict(q.losses), stats=dict(q.stats))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> ids (B, h*w, S)."""
        return self.quantize.encode(self.encode_features(images))

    def decode(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Ids (B, h*w, S) -> images (B, 3, h*downsample, w*downsample), not clamped."""
        if ids.dim() != 3 or ids.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"ids of shape {tuple(ids.shape)} do not hold a {grid[0]}x{grid[1]} grid "
                             "(expected (B, h*w, S))")
        return self.decode_features(self.quantize.decode(ids, grid))
