"""LlamaGen VQ tokenizer backbone: the VQ-16 / VQ-8 encoder and decoder.

Source: LlamaGen, ``tokenizer/tokenizer_image/vq_model.py``; paper "Autoregressive
Model Beats Diffusion: Llama for Scalable Image Generation". Spec:
docs/llamagen.md#tokenizer, docs/llamagen.md#encoder-and-decoder (architecture), docs/iar2.md#tokenizer (IAR2 reuses VQ-16
unchanged); key layout docs/checkpoints.md#llamagen-vq-tokenizer.

Module attribute names follow the official checkpoint layout exactly
(``encoder.conv_blocks.{l}.res.{i}.norm1`` ...), so the official key map is an
identity on names (``tokenizer_checkpoints.py``). The quantizer is not part of
this file: :func:`llamagen_vq_tokenizer` composes these backbones with any
``arforge.interfaces.Quantizer`` (the l2-normalised VQ for LlamaGen/IAR, the
semantic-detail quantizer for IAR2) through :class:`~arforge_plugins.tokenizers.vq_tokenizer.VQTokenizer`.

Every block takes a keyword ``exact_ops`` (default False): use the reference
code's op order: x*sigmoid(x) for SiLU and bmm+softmax attention with the scale
applied after the product, as in LlamaGen ``tokenizer/tokenizer_image/vq_model.py``
lines 335-346 (attention) and 354-356 (``nonlinearity``) at commit ce98ec4 (IAR2's
``vq_model_second_stage.py`` lines 411-432 at 46a2437 are the same); slower; for
parity checks at 1e-6; the fast ops (F.silu, SDPA) stay the default. It is a
plain attribute of each block; ``VQTokenizer.set_exact_ops`` flips all of them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from arforge_plugins.tokenizers.vq_tokenizer import VQTokenizer, swish


def _group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GN(C): ``num_groups`` groups, eps 1e-6, affine (docs/llamagen.md#tokenizer conventions)."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, exact: bool) -> torch.Tensor:
    """Single-head softmax(q k^T / sqrt(C)) v over the h*w positions of (B, C, h, w) maps.

    ``exact``: the reference's explicit bmm + softmax (LlamaGen
    ``tokenizer/tokenizer_image/vq_model.py:335-346`` at ce98ec4), else SDPA.
    """
    b, c, h, w = q.shape
    if exact:
        # Same layouts, same products, scale after q k rather than folded in:
        # each of these changes the rounding of the result.
        w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w))  # (B, hw_q, hw_k)
        w_ = F.softmax(w_ * (int(c) ** (-0.5)), dim=2)
        return torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
    # (B, C, h, w) -> (B, 1, h*w, C): one head, positions as the sequence; SDPA's
    # default scale is C^-1/2
    q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(-1, -2).reshape(b, c, h, w)  # (B, 1, h*w, C) -> (B, C, h, w)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a shortcut (docs/llamagen.md#tokenizer).

    The shortcut is a 1x1 conv ``nin_shortcut`` only when the channel count changes.
    ``exact_ops``: swish as x*sigmoid(x) (module docstring).
    """

    def __init__(self, *, in_channels: int, out_channels: int, num_groups: int = 32,
                 dropout: float = 0.0, exact_ops: bool = False) -> None:
        super().__init__()
        self.exact_ops = bool(exact_ops)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x), self.exact_ops))
        h = self.conv2(self.dropout(swish(self.norm2(h), self.exact_ops)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, residual (docs/llamagen.md#tokenizer).

    ``exact_ops``: bmm + softmax in the reference's order (:func:`attention`).
    """

    def __init__(self, *, channels: int, num_groups: int = 32, exact_ops: bool = False) -> None:
        super().__init__()
        self.exact_ops = bool(exact_ops)
        self.norm = _group_norm(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        o = attention(self.q(y), self.k(y), self.v(y), exact=self.exact_ops)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then conv3x3 stride 2 padding 0 (docs/llamagen.md#tokenizer).

    Asymmetric, unlike Open-MAGVIT2's symmetric stride-2 conv: the official
    weights depend on which pixels the kernel sees.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3x3 stride 1 padding 1 (docs/llamagen.md#tokenizer)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """LlamaGen VQ encoder (docs/llamagen.md#encoder-and-decoder): images (B, 3, H, W) -> (B, z_channels, H/f, W/f).

    Level i has ``num_res_blocks`` ResnetBlocks (the first maps ch*in_mult[i] ->
    ch*ch_mult[i]); only the last level interleaves an AttnBlock after each
    ResnetBlock; every level but the last ends with a :class:`Downsample`.
    ``exact_ops`` reaches every block and the output swish (module docstring).
    """

    def __init__(self, *, in_channels: int = 3, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, num_groups: int = 32, dropout: float = 0.0, exact_ops: bool = False) -> None:
        super().__init__()
        self.exact_ops = bool(exact_ops)
        ex = dict(exact_ops=exact_ops)
        self.num_resolutions = len(ch_mult)
        self.downsample_factor = 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            block = nn.Module()
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            block_in = ch * in_ch_mult[level]
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks):
                block.res.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                             num_groups=num_groups, dropout=dropout, **ex))
                block_in = block_out
                if level == self.num_resolutions - 1:
                    block.attn.append(AttnBlock(channels=block_in, num_groups=num_groups, **ex))
            if level != self.num_resolutions - 1:
                block.downsample = Downsample(channels=block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([
            ResnetBlock(in_channels=block_in, out_channels=block_in, num_groups=num_groups, dropout=dropout, **ex),
            AttnBlock(channels=block_in, num_groups=num_groups, **ex),
            ResnetBlock(in_channels=block_in, out_channels=block_in, num_groups=num_groups, dropout=dropout, **ex),
        ])
        self.norm_out = _group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, block in enumerate(self.conv_blocks):
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn) > 0:
                    h = block.attn[i](h)
            if level != self.num_resolutions - 1:
                h = block.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(swish(self.norm_out(h), self.exact_ops))


class Decoder(nn.Module):
    """LlamaGen VQ decoder (docs/llamagen.md#encoder-and-decoder): (B, z_channels, h, w) -> images (B, 3, f*h, f*w).

    Levels run from the lowest resolution (``conv_blocks.0``, widest) to the
    highest; ``conv_blocks.0`` interleaves an AttnBlock after each ResnetBlock;
    every level but the last ends with an :class:`Upsample`. No output
    activation: callers clamp to [-1, 1] before converting to pixels.
    ``exact_ops`` reaches every block and the output swish (module docstring).
    """

    def __init__(self, *, out_channels: int = 3, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, num_groups: int = 32, dropout: float = 0.0, exact_ops: bool = False) -> None:
        super().__init__()
        self.exact_ops = bool(exact_ops)
        ex = dict(exact_ops=exact_ops)
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.ModuleList([
            ResnetBlock(in_channels=block_in, out_channels=block_in, num_groups=num_groups, dropout=dropout, **ex),
            AttnBlock(channels=block_in, num_groups=num_groups, **ex),
            ResnetBlock(in_channels=block_in, out_channels=block_in, num_groups=num_groups, dropout=dropout, **ex),
        ])
        self.conv_blocks = nn.ModuleList()
        for level in range(self.num_resolutions):
            block = nn.Module()
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            block_out = ch * ch_mult[self.num_resolutions - level - 1]
            for _ in range(num_res_blocks):
                block.res.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                             num_groups=num_groups, dropout=dropout, **ex))
                block_in = block_out
                if level == 0:
                    block.attn.append(AttnBlock(channels=block_in, num_groups=num_groups, **ex))
            if level != self.num_resolutions - 1:
                block.upsample = Upsample(channels=block_in)
            self.conv_blocks.append(block)
        self.norm_out = _group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for level, block in enumerate(self.conv_blocks):
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn) > 0:
                    h = block.attn[i](h)
            if level != self.num_resolutions - 1:
                h = block.upsample(h)
        return self.conv_out(swish(self.norm_out(h), self.exact_ops))


# ------------------------------------------------------------------- presets
#: Named sizes (docs/llamagen.md#tokenizer). ``encoder_res_blocks`` = 2 and
#: ``decoder_res_blocks`` = 3 are upstream's ``num_res_blocks`` = 2 (the decoder
#: uses num_res_blocks + 1). ``codebook_dim`` is the width of ``quant_conv``'s
#: output, which the quantizer must match; the official quantizer for both
#: paper presets has 16384 codes of that width (IAR2: 256 + 4096).
LLAMAGEN_VQ_PRESETS: dict[str, dict[str, Any]] = {
    "vq16": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), encoder_res_blocks=2, decoder_res_blocks=3,
                 z_channels=256, codebook_dim=8, num_groups=32, dropout=0.0),
    "vq8": dict(ch=128, ch_mult=(1, 2, 2, 4), encoder_res_blocks=2, decoder_res_blocks=3,
                z_channels=256, codebook_dim=8, num_groups=32, dropout=0.0),
    # Test scale: same layout pattern (attention at the last level, shortcuts
    # where the width changes, 2 and 3 blocks per level), 16x downsampling
    # replaced by 2x so a 32x32 image gives a 16x16 grid.
    "tiny": dict(ch=16, ch_mult=(1, 2), encoder_res_blocks=2, decoder_res_blocks=3,
                 z_channels=16, codebook_dim=8, num_groups=4, dropout=0.0),
}


def llamagen_vq_config(preset: str | dict[str, Any]) -> dict[str, Any]:
    """The settings of a named preset (or a dict of settings, validated)."""
    if isinstance(preset, str):
        try:
            cfg = dict(LLAMAGEN_VQ_PRESETS[preset])
        except KeyError:
            raise ValueError(f"unknown LlamaGen VQ preset {preset!r}; "
                             f"choose one of {sorted(LLAMAGEN_VQ_PRESETS)}") from None
    else:
        cfg = dict(preset)
    want = set(LLAMAGEN_VQ_PRESETS["vq16"])
    if set(cfg) != want:
        raise ValueError(f"LlamaGen VQ settings must have exactly the keys {sorted(want)}; "
                         f"got {sorted(cfg)}")
    return cfg


def llamagen_vq_encoder(*, preset: str | dict[str, Any] = "vq16", exact_ops: bool = False) -> Encoder:
    """The LlamaGen VQ encoder of a preset (docs/llamagen.md#encoder-and-decoder); ``exact_ops`` as in the tokenizer."""
    cfg = llamagen_vq_config(preset)
    return Encoder(ch=cfg["ch"], ch_mult=cfg["ch_mult"], num_res_blocks=cfg["encoder_res_blocks"],
                   z_channels=cfg["z_channels"], num_groups=cfg["num_groups"], dropout=cfg["dropout"],
                   exact_ops=exact_ops)


def llamagen_vq_decoder(*, preset: str | dict[str, Any] = "vq16", exact_ops: bool = False) -> Decoder:
    """The LlamaGen VQ decoder of a preset (docs/llamagen.md#encoder-and-decoder); ``exact_ops`` as in the tokenizer."""
    cfg = llamagen_vq_config(preset)
    return Decoder(ch=cfg["ch"], ch_mult=cfg["ch_mult"], num_res_blocks=cfg["decoder_res_blocks"],
                   z_channels=cfg["z_channels"], num_groups=cfg["num_groups"], dropout=cfg["dropout"],
                   exact_ops=exact_ops)


def llamagen_vq_tokenizer(*, quantizer: nn.Module, preset: str | dict[str, Any] = "vq16",
                          exact_ops: bool = False) -> VQTokenizer:
    """LlamaGen VQ-16/VQ-8 (or IAR2, which is VQ-16 with its own quantizer), docs/llamagen.md#tokenizer, docs/iar2.md#tokenizer.

    ``quantizer`` is any ``arforge.interfaces.Quantizer`` whose ``dim`` equals the
    preset's ``codebook_dim``; it becomes the ``quantize`` submodule, so official
    ``quantize.*`` keys land on it unchanged.

    ``exact_ops``: use the reference code's op order: x*sigmoid(x) for SiLU and
    bmm+softmax attention with the scale applied after the product, as in LlamaGen
    ``tokenizer/tokenizer_image/vq_model.py:335-346`` and ``:354-356`` at commit
    ce98ec4 (IAR2 ``vq_model_second_stage.py:411-432`` at 46a2437); slower; for
    parity checks at 1e-6; the fast ops (F.silu, SDPA) stay the default. In gin:
    ``tokenizers.llamagen_vq.exact_ops = True``; after construction:
    ``tokenizer.set_exact_ops(True)``.
    """
    cfg = llamagen_vq_config(preset)
    dim = getattr(quantizer, "dim", None)
    if dim != cfg["codebook_dim"]:
        raise ValueError(f"the quantizer quantises {dim}-channel features but the LlamaGen VQ preset "
                         f"{preset if isinstance(preset, str) else '(custom)'} has codebook_dim "
                         f"{cfg['codebook_dim']}; build the quantizer with dim={cfg['codebook_dim']}")
    return VQTokenizer(
        encoder=llamagen_vq_encoder(preset=cfg, exact_ops=exact_ops),
        quant_conv=nn.Conv2d(cfg["z_channels"], cfg["codebook_dim"], kernel_size=1),
        quantize=quantizer,
        post_quant_conv=nn.Conv2d(cfg["codebook_dim"], cfg["z_channels"], kernel_size=1),
        decoder=llamagen_vq_decoder(preset=cfg, exact_ops=exact_ops),
        downsample=2 ** (len(cfg["ch_mult"]) - 1),
    )
