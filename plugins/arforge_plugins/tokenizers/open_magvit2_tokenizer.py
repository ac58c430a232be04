"""Open-MAGVIT2 tokenizer backbone: bias-free ResBlocks, adaptive GroupNorm, DCR upsampler.

Source: Open-MAGVIT2 "upgrade v2" (commit 6515009),
``src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py``; paper
"Open-MAGVIT2: An Open-Source Project Toward Democratizing Auto-regressive
Visual Generation" (arXiv 2409.04410). See docs/open_magvit2.md#tokenizer,
docs/open_magvit2.md#encoder-and-decoder, docs/open_magvit2.md#adaptive-groupnorm, docs/open_magvit2.md#upsampler; key layout docs/checkpoints.md#open-magvit2-tokenizer.

Attribute names follow the official layout (``encoder.down.{i}.block.{j}``,
``decoder.adaptive.{i}.gamma``, ``decoder.up.{i}.upsample.conv1`` ...). The
Upsampler does depth-to-space in DCR order directly (no ``pixel_shuffle``), so
official upsampler weights load without a channel permutation.

Every block takes a keyword ``exact_ops`` (default False): use the reference
code's op order: x*sigmoid(x) for SiLU, as in Open-MAGVIT2
``src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py:6-8`` (``swish``) at
commit 3c58097 (there is no attention); slower; for parity checks at 1e-6; the
fast op (F.silu) stays the default. It is a plain attribute of each block;
``VQTokenizer.set_exact_ops`` flips all of them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from arforge_plugins.tokenizers.vq_tokenizer import VQTokenizer, swish


def _group_norm(channels: int, num_groups: int, *, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=affine)


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3 (no bias) -> GN -> swish -> conv3x3 (no bias), plus a shortcut (docs/open_magvit2.md#encoder-and-decoder).

    The shortcut is a bias-free 1x1 conv ``nin_shortcut`` when the channel count
    changes. No dropout, no attention. ``exact_ops``: swish as x*sigmoid(x) (module docstring).
    """

    def __init__(self, *, in_channels: int, out_channels: int, num_groups: int = 32,
                 exact_ops: bool = False) -> None:
        super().__init__()
        self.exact_ops = bool(exact_ops)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels, num_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x), self.exact_ops))
        h = self.conv2(swish(self.norm2(h), self.exact_ops))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return h + x


class AdaptiveGroupNorm(nn.Module):
    """AGN(x, q) = gamma(sigma_q) * GN0(x) + beta(mu_q)   (docs/open_magvit2.md#adaptive-groupnorm).

    GN0 has no affine transform; mu_q and sigma_q are per-channel spatial
    statistics of the quantised map q, with the **unbiased** (N - 1) variance
    and eps 1e-6 inside the square root, as the official weights were trained
    (upstream's "not unbias" comment is wrong about its own code).
    """

    def __init__(self, *, z_channels: int, channels: int, num_groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__()
        self.gn = _group_norm(channels, num_groups, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)
        self.eps = eps

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        if q.shape[-2] * q.shape[-1] < 2:
            raise ValueError("adaptive GroupNorm needs a quantised map with at least 2 positions "
                             f"(unbiased variance); got {tuple(q.shape[-2:])}")
        flat = q.flatten(2)  # (B, z, h, w) -> (B, z, h*w)
        sigma = torch.sqrt(flat.var(dim=-1, unbiased=True) + self.eps)  # (B, z)
        mu = flat.mean(dim=-1)  # (B, z)
        scale = self.gamma(sigma).view(b, c, 1, 1)
        shift = self.beta(mu).view(b, c, 1, 1)
        return scale * self.gn(x) + shift


def depth_to_space_dcr(x: torch.Tensor, block_size: int = 2) -> torch.Tensor:
    """Depth-to-space in DCR order: out[c, s*y+i, s*x+j] = in[(s*i+j)*C + c, y, x]  (docs/open_magvit2.md#upsampler).

    PyTorch's ``pixel_shuffle`` is CRD order (in[s*s*c + s*i + j]); the two differ
    by a channel permutation, and the official weights were trained with DCR.
    """
    b, cs2, h, w = x.shape
    s = block_size
    if cs2 % (s * s):
        raise ValueError(f"depth_to_space: {cs2} channels are not divisible by {s * s}")
    c = cs2 // (s * s)
    x = x.reshape(b, s, s, c, h, w)  # channel index (i*s + j)*C + c -> (i, j, c)
    x = x.permute(0, 3, 4, 1, 5, 2)  # (B, C, h, i, w, j)
    return x.reshape(b, c, h * s, w * s)


class Upsampler(nn.Module):
    """conv3x3 C -> 4C (with bias, ``conv1``), then DCR depth-to-space x2 (docs/open_magvit2.md#upsampler)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels * 4, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space_dcr(self.conv1(x), 2)


class Encoder(nn.Module):
    """Open-MAGVIT2 encoder (docs/open_magvit2.md#encoder-and-decoder): images (B, 3, H, W) -> z (B, z_channels, H/f, W/f).

    ``conv_in`` has no bias; each level has ``num_res_blocks`` ResBlocks then,
    except the last level, ``downsample``: a 3x3 stride-2 conv with symmetric
    padding 1 and a bias (not LlamaGen's asymmetric pad). ``exact_ops`` reaches every
    block and the output swish (module docstring).
    """

    def __init__(self, *, in_channels: int = 3, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, num_groups: int = 32, exact_ops: bool = False) -> None:
        super().__init__()
        self.exact_ops = bool(exact_ops)
        self.num_blocks = len(ch_mult)
        self.downsample_factor = 2 ** (self.num_blocks - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1, bias=False)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_blocks):
            down = nn.Module()
            down.block = nn.ModuleList()
            block_in = ch * in_ch_mult[level]
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks):
                down.block.append(ResBlock(in_channels=block_in, out_channels=block_out, num_groups=num_groups,
                                           exact_ops=exact_ops))
                block_in = block_out
            if level < self.num_blocks - 1:
                down.downsample = nn.Conv2d(block_out, block_out, kernel_size=3, stride=2, padding=1)
            self.down.append(down)
        self.mid_block = nn.ModuleList(
            ResBlock(in_channels=block_in, out_channels=block_in, num_groups=num_groups, exact_ops=exact_ops)
            for _ in range(num_res_blocks))
        self.norm_out = _group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for block in down.block:
                h = block(h)
            if level < self.num_blocks - 1:
                h = down.downsample(h)
        for block in self.mid_block:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h), self.exact_ops))


class Decoder(nn.Module):
    """Open-MAGVIT2 decoder (docs/open_magvit2.md#encoder-and-decoder): (B, z_channels, h, w) -> images (B, 3, f*h, f*w).

    For level i = n-1 ... 0: ``adaptive.i`` (AGN conditioned on q), the
    ``up.i.block`` ResBlocks, and for i > 0 the Upsampler ``up.i.upsample``.
    ``exact_ops`` reaches every block and the output swish (module docstring).
    """

    def __init__(self, *, out_channels: int = 3, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, num_groups: int = 32, exact_ops: bool = False) -> None:
        super().__init__()
        self.exact_ops = bool(exact_ops)
        self.num_blocks = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1, bias=True)
        self.mid_block = nn.ModuleList(
            ResBlock(in_channels=block_in, out_channels=block_in, num_groups=num_groups, exact_ops=exact_ops)
            for _ in range(num_res_blocks))
        adaptive: list[nn.Module] = [nn.Identity()] * self.num_blocks
        up: list[nn.Module] = [nn.Identity()] * self.num_blocks
        for level in reversed(range(self.num_blocks)):
            adaptive[level] = AdaptiveGroupNorm(z_channels=z_channels, channels=block_in, num_groups=num_groups)
            stage = nn.Module()
            stage.block = nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks):
                stage.block.append(ResBlock(in_channels=block_in, out_channels=block_out, num_groups=num_groups,
                                            exact_ops=exact_ops))
                block_in = block_out
            if level > 0:
                stage.upsample = Upsampler(channels=block_in)
            up[level] = stage
        self.adaptive = nn.ModuleList(adaptive)
        self.up = nn.ModuleList(up)
        self.norm_out = _group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """``q`` conditions the AGNs; it defaults to the decoder input, which is q itself here."""
        q = z if q is None else q
        h = self.conv_in(z)
        for block in self.mid_block:
            h = block(h)
        for level in reversed(range(self.num_blocks)):
            h = self.adaptive[level](h, q)
            for block in self.up[level].block:
                h = block(h)
            if level > 0:
                h = self.up[level].upsample(h)
        return self.conv_out(swish(self.norm_out(h), self.exact_ops))


# ------------------------------------------------------------------- presets
#: Named sizes (docs/open_magvit2.md#tokenizer). ``z_channels`` is the LFQ code width
#: (18 bits -> 2^18 implicit codes). v1 (commit ec8fba5) used 2 blocks per level.
OPEN_MAGVIT2_PRESETS: dict[str, dict[str, Any]] = {
    "256": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, z_channels=18, num_groups=32),
    "128": dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=4, z_channels=18, num_groups=32),
    "v1_256": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=18, num_groups=32),
    "v1_128": dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, z_channels=18, num_groups=32),
    # Test scale: the same layout pattern (shortcut in block 0 where the width
    # changes, AGN per level, one upsampler), 2x downsampling.
    "tiny": dict(ch=16, ch_mult=(1, 2), num_res_blocks=2, z_channels=18, num_groups=4),
}


def open_magvit2_config(preset: str | dict[str, Any]) -> dict[str, Any]:
    """The settings of a named preset (or a dict of settings, validated)."""
    if isinstance(preset, str):
        try:
            cfg = dict(OPEN_MAGVIT2_PRESETS[preset])
        except KeyError:
            raise ValueError(f"unknown Open-MAGVIT2 preset {preset!r}; "
                             f"choose one of {sorted(OPEN_MAGVIT2_PRESETS)}") from None
    else:
        cfg = dict(preset)
    want = set(OPEN_MAGVIT2_PRESETS["256"])
    if set(cfg) != want:
        raise ValueError(f"Open-MAGVIT2 settings must have exactly the keys {sorted(want)}; got {sorted(cfg)}")
    return cfg


def open_magvit2_encoder(*, preset: str | dict[str, Any] = "256", exact_ops: bool = False) -> Encoder:
    """The Open-MAGVIT2 encoder of a preset (docs/open_magvit2.md#encoder-and-decoder); ``exact_ops`` as in the tokenizer."""
    return Encoder(**open_magvit2_config(preset), exact_ops=exact_ops)


def open_magvit2_decoder(*, preset: str | dict[str, Any] = "256", exact_ops: bool = False) -> Decoder:
    """The Open-MAGVIT2 decoder of a preset (docs/open_magvit2.md#encoder-and-decoder); ``exact_ops`` as in the tokenizer."""
    return Decoder(**open_magvit2_config(preset), exact_ops=exact_ops)


def open_magvit2_tokenizer(*, quantizer: nn.Module, preset: str | dict[str, Any] = "256",
                           exact_ops: bool = False) -> VQTokenizer:
    """Open-MAGVIT2's tokenizer (docs/open_magvit2.md#tokenizer) around an LFQ-style quantizer.

    There are no projections: the quantizer sees the encoder output directly and
    the decoder receives the quantised map q, which also conditions its AGNs.

    ``exact_ops``: use the reference code's op order: x*sigmoid(x) for SiLU (this
    backbone has no attention), as in Open-MAGVIT2
    ``src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py:6-8`` at commit
    3c58097; slower; for parity checks at 1e-6; the fast op (F.silu) stays the
    default. In gin: ``tokenizers.open_magvit2.exact_ops = True``; after
    construction: ``tokenizer.set_exact_ops(True)``.
    """
    cfg = open_magvit2_config(preset)
    dim = getattr(quantizer, "dim", None)
    if dim != cfg["z_channels"]:
        raise ValueError(f"the quantizer quantises {dim}-channel features but the Open-MAGVIT2 preset "
                         f"has z_channels {cfg['z_channels']}; build it with dim={cfg['z_channels']}")
    return VQTokenizer(encoder=Encoder(**cfg, exact_ops=exact_ops), quantize=quantizer,
                       decoder=Decoder(**cfg, exact_ops=exact_ops),
                       downsample=2 ** (len(cfg["ch_mult"]) - 1), decoder_takes_quant=True)
