"""Tokenizer backbones: LlamaGen VQ (docs/llamagen.md#tokenizer), Open-MAGVIT2 (docs/open_magvit2.md#tokenizer) and the generic VQTokenizer.

The real quantizers live in their own plugins; these tests use small test-local
quantizers with the same interface (``arforge.interfaces.Quantizer``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arforge.interfaces import QuantizerOutput, Tokenizer
from arforge_plugins.tokenizers import llamagen_vq as lg
from arforge_plugins.tokenizers import open_magvit2_tokenizer as om
from arforge_plugins.tokenizers.vq_tokenizer import VQTokenizer


# ------------------------------------------------------ test-local quantizers
class NearestVQ(nn.Module):
    """Stand-in for LlamaGen's l2-normalised VQ (docs/llamagen.md#vector-quantizer): cosine-nearest code, straight-through."""

    def __init__(self, *, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        self.dim = dim
        self.codebook_sizes = (codebook_size,)

    def _codes(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=1)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        flat = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, c)
        return (flat @ self._codes().t()).argmax(dim=1).view(b, h * w, 1)

    def decode(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        e = self._codes()[ids[..., 0]]  # (B, L, dim)
        return e.transpose(1, 2).reshape(ids.shape[0], self.dim, *grid)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        zn = F.normalize(z, dim=1)
        ids = self.encode(z)
        q = self.decode(ids, tuple(z.shape[-2:]))
        losses = {"vq": F.mse_loss(q, zn.detach()), "commit": 0.25 * F.mse_loss(q.detach(), zn)}
        return QuantizerOutput(zn + (q - zn).detach(), ids, losses, {})


class SignQuantizer(nn.Module):
    """Stand-in for LFQ (docs/open_magvit2.md#lfq-and-token-ids): sign quantisation, LSB-first ids, no state."""

    def __init__(self, *, dim: int = 18) -> None:
        super().__init__()
        self.dim = dim
        self.codebook_sizes = (2 ** dim,)
        self.register_buffer("powers", 2 ** torch.arange(dim), persistent=False)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        bits = (z > 0).long().flatten(2).transpose(1, 2)  # (B, L, dim)
        return (bits * self.powers).sum(-1, keepdim=True)

    def decode(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        bits = (ids[..., :1] // self.powers) % 2  # (B, L, dim)
        return (2.0 * bits - 1.0).transpose(1, 2).reshape(ids.shape[0], self.dim, *grid)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        q = torch.where(z > 0, 1.0, -1.0)
        return QuantizerOutput(z + (q - z).detach(), self.encode(z),
                               {"commit": 0.25 * F.mse_loss(z, q)}, {})


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------- parameter counts
def test_llamagen_paper_parameter_counts_on_meta():
    with torch.device("meta"):
        vq16 = lg.llamagen_vq_tokenizer(preset="vq16", quantizer=NearestVQ(codebook_size=16384, dim=8))
        vq8 = lg.llamagen_vq_tokenizer(preset="vq8", quantizer=NearestVQ(codebook_size=16384, dim=8))
    assert next(vq16.parameters()).is_meta
    assert abs(n_params(vq16) - 71.9e6) < 0.05e6, n_params(vq16)  # docs/llamagen.md#tokenizer: ~71.9M computed
    assert abs(n_params(vq8) - 70.1e6) < 0.05e6, n_params(vq8)  # ~70.1M computed
    assert vq16.downsample == 16 and vq8.downsample == 8


def test_open_magvit2_paper_parameter_counts_on_meta():
    with torch.device("meta"):
        enc = om.open_magvit2_encoder(preset="256")
        dec = om.open_magvit2_decoder(preset="256")
        v1 = om.open_magvit2_encoder(preset="v1_256")
    assert abs(n_params(enc) - 49.8e6) < 0.05e6, n_params(enc)  # docs/open_magvit2.md#tokenizer
    assert abs(n_params(dec) - 65.4e6) < 0.05e6, n_params(dec)
    assert n_params(v1) < n_params(enc)  # v1: 2 blocks per level
    # no bias in ResBlock convs or conv_in (docs/open_magvit2.md#encoder-and-decoder); bias in the downsample and conv_out
    names = dict(enc.named_parameters())
    assert "conv_in.bias" not in names and "down.0.block.0.conv1.bias" not in names
    assert "down.0.downsample.bias" in names and "conv_out.bias" in names
    assert tuple(names["conv_out.weight"].shape) == (18, 512, 1, 1)


def test_paper_presets_give_the_spec_grids_on_meta():
    with torch.device("meta"):
        vq16 = lg.llamagen_vq_tokenizer(preset="vq16", quantizer=NearestVQ(codebook_size=16, dim=8))
        omv2 = om.open_magvit2_tokenizer(preset="256", quantizer=SignQuantizer())
        x = torch.empty(1, 3, 256, 256)
        for tok in (vq16, omv2):
            z = tok.encode_features(x)
            assert tuple(z.shape[-2:]) == (16, 16)
            assert tuple(tok.decode_features(torch.empty(z.shape)).shape) == (1, 3, 256, 256)


# ----------------------------------------------------------- tiny round shapes
def _tiny_llamagen(seed: int = 0) -> VQTokenizer:
    torch.manual_seed(seed)
    return lg.llamagen_vq_tokenizer(preset="tiny", quantizer=NearestVQ(codebook_size=32, dim=8)).eval()


def _tiny_open_magvit2(seed: int = 0) -> VQTokenizer:
    torch.manual_seed(seed)
    return om.open_magvit2_tokenizer(preset="tiny", quantizer=SignQuantizer()).eval()


@pytest.mark.parametrize("build", [_tiny_llamagen, _tiny_open_magvit2], ids=["llamagen", "open_magvit2"])
def test_tiny_tokenizers_round_trip_shapes(build):
    tok = build()
    assert isinstance(tok, Tokenizer)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = tok(x)
        ids = tok.encode(x)
        grid = tok.grid_for(32, 32)
        assert grid == (16, 16) and tok.downsample == 2
        assert out.reconstruction.shape == (2, 3, 32, 32)
        assert ids.shape == (2, 256, 1) and ids.dtype == torch.int64
        assert torch.equal(ids, out.ids)
        assert 0 <= int(ids.min()) and int(ids.max()) < tok.codebook_sizes[0]
        # decoding the ids reproduces the forward reconstruction (straight-through = codes)
        rec = tok.decode(ids, grid)
    torch.testing.assert_close(rec, out.reconstruction, atol=1e-5, rtol=1e-5)
    assert set(out.losses) >= {"commit"}


def test_tiny_tokenizer_trains_end_to_end():
    tok = _tiny_open_magvit2().train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tok(x)
    (F.mse_loss(out.reconstruction, x) + sum(out.losses.values())).backward()
    # straight-through: the encoder receives the reconstruction gradient
    assert tok.encoder.conv_in.weight.grad is not None and tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.decoder.adaptive[0].gamma.weight.grad.abs().sum() > 0


def test_bad_sizes_and_quantizer_widths_are_clear_errors():
    tok = _tiny_llamagen()
    with pytest.raises(ValueError, match="not a multiple"):
        tok.encode(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match="codebook_dim 8"):
        lg.llamagen_vq_tokenizer(preset="tiny", quantizer=NearestVQ(codebook_size=4, dim=4))
    with pytest.raises(ValueError, match="z_channels 18"):
        om.open_magvit2_tokenizer(preset="tiny", quantizer=SignQuantizer(dim=10))
    with pytest.raises(ValueError, match="unknown LlamaGen VQ preset"):
        lg.llamagen_vq_encoder(preset="vq32")


# ------------------------------------------------------------ building blocks
def dcr_reference(x: torch.Tensor, s: int = 2) -> torch.Tensor:
    """out[c, s*y+i, s*x+j] = in[(s*i+j)*C + c, y, x], written out with loops (docs/open_magvit2.md#upsampler)."""
    b, cs2, h, w = x.shape
    c = cs2 // (s * s)
    out = torch.empty(b, c, h * s, w * s, dtype=x.dtype)
    for i in range(s):
        for j in range(s):
            for ch in range(c):
                out[:, ch, i::s, j::s] = x[:, (s * i + j) * c + ch]
    return out


def test_dcr_depth_to_space_matches_direct_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 4 * 3, 5, 4)
    ref = dcr_reference(x)
    assert torch.equal(om.depth_to_space_dcr(x, 2), ref)
    # pixel_shuffle is CRD order: a different permutation (so this test can fail)
    assert not torch.equal(F.pixel_shuffle(x, 2), ref)
    up = om.Upsampler(channels=3)
    with torch.no_grad():
        y = torch.randn(1, 3, 4, 4)
        assert up(y).shape == (1, 3, 8, 8)
        torch.testing.assert_close(up(y), dcr_reference(up.conv1(y)), rtol=0, atol=0)
    assert tuple(up.conv1.weight.shape) == (12, 3, 3, 3) and up.conv1.bias is not None


def test_adaptive_group_norm_uses_unbiased_variance():
    torch.manual_seed(0)
    agn = om.AdaptiveGroupNorm(z_channels=5, channels=8, num_groups=2)
    x = torch.randn(3, 8, 4, 4)
    q = torch.randn(3, 5, 4, 4)
    # manual: GN without affine (biased within-group variance, eps 1e-6)
    g = x.view(3, 2, 4 * 16)
    gn = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)).view_as(x)
    qf = q.flatten(2)
    n = qf.shape[-1]
    var_unbiased = ((qf - qf.mean(-1, keepdim=True)) ** 2).sum(-1) / (n - 1)
    sigma = torch.sqrt(var_unbiased + 1e-6)
    mu = qf.mean(-1)
    gamma = sigma @ agn.gamma.weight.t() + agn.gamma.bias
    beta = mu @ agn.beta.weight.t() + agn.beta.bias
    expected = gamma[:, :, None, None] * gn + beta[:, :, None, None]
    with torch.no_grad():
        got = agn(x, q)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the biased variance would give a measurably different answer
    sigma_b = torch.sqrt(qf.var(-1, unbiased=False) + 1e-6)
    wrong = (sigma_b @ agn.gamma.weight.t() + agn.gamma.bias)[:, :, None, None] * gn + beta[:, :, None, None]
    assert (got - wrong).abs().max() > 1e-3
    assert not agn.gn.affine


def test_llamagen_downsample_pads_right_and_bottom_only():
    torch.manual_seed(0)
    down = lg.Downsample(channels=2)
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        got = down(x)
        expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
        symmetric = F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1)
    assert got.shape == (1, 2, 3, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got - symmetric).abs().max() > 1e-3


def test_llamagen_attention_matches_upstream_formulation():
    torch.manual_seed(0)
    attn = lg.AttnBlock(channels=8, num_groups=2)
    x = torch.randn(2, 8, 3, 5)
    with torch.no_grad():
        h = attn.norm(x)
        q, k, v = attn.q(h), attn.k(h), attn.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
        k = k.reshape(b, c, hh * ww)  # b, c, hw
        w_ = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        o = torch.bmm(v.reshape(b, c, hh * ww), w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
        expected = x + attn.proj_out(o)
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_resnet_blocks_have_shortcut_only_when_width_changes():
    assert not hasattr(lg.ResnetBlock(in_channels=8, out_channels=8, num_groups=2), "nin_shortcut")
    blk = lg.ResnetBlock(in_channels=8, out_channels=16, num_groups=2)
    assert tuple(blk.nin_shortcut.weight.shape) == (16, 8, 1, 1) and blk.conv1.bias is not None
    ob = om.ResBlock(in_channels=8, out_channels=16, num_groups=2)
    assert ob.conv1.bias is None and ob.conv2.bias is None and ob.nin_shortcut.bias is None
