"""``exact_ops``: the tokenizer backbones in the reference code's op order (x*sigmoid(x), bmm + softmax).

The fast ops (F.silu, SDPA) are the default; ``exact_ops`` exists so that
reconstructions can be compared with upstream's at 1e-6. These tests pin the op
order bitwise against a hand-written reference, check that the two modes are the
same function, and that the switch reaches every block from Python and from gin.
"""

from __future__ import annotations

import gin
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arforge import registry as reg
from arforge_plugins.tokenizers import llamagen_vq as lg
from arforge_plugins.tokenizers import open_magvit2_tokenizer as om
from arforge_plugins.tokenizers.vq_tokenizer import VQTokenizer


class PassThroughQuantizer(nn.Module):
    """Only what the tokenizer factories read (``dim``); these tests never quantise."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.codebook_sizes = (2,)


def reference_swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _tiny(family: str, *, exact_ops: bool = False, seed: int = 0) -> VQTokenizer:
    torch.manual_seed(seed)
    if family == "llamagen":
        return lg.llamagen_vq_tokenizer(preset="tiny", quantizer=PassThroughQuantizer(dim=8),
                                        exact_ops=exact_ops).eval()
    return om.open_magvit2_tokenizer(preset="tiny", quantizer=PassThroughQuantizer(dim=18),
                                     exact_ops=exact_ops).eval()


def _flags(tok: nn.Module) -> dict[str, bool]:
    """Every module of the backbones that has a forward depending on the op order."""
    kinds = (lg.ResnetBlock, lg.AttnBlock, lg.Encoder, lg.Decoder, om.ResBlock, om.Encoder, om.Decoder)
    return {name: m.exact_ops for name, m in tok.named_modules() if isinstance(m, kinds)}


@torch.no_grad()
def test_exact_llamagen_blocks_are_bitwise_the_reference_op_order():
    torch.manual_seed(0)
    res = lg.ResnetBlock(in_channels=8, out_channels=16, num_groups=2, exact_ops=True).eval()
    attn = lg.AttnBlock(channels=8, num_groups=2, exact_ops=True).eval()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float32)

    h = res.norm1(x)
    h = reference_swish(h)
    h = res.conv1(h)
    h = res.norm2(h)
    h = reference_swish(h)
    h = res.conv2(h)
    assert torch.equal(res(x), res.nin_shortcut(x) + h)

    h_ = attn.norm(x)
    q, k, v = attn.q(h_), attn.k(h_), attn.v(h_)
    b, c, hh, ww = q.shape
    q = q.reshape(b, c, hh * ww)
    q = q.permute(0, 2, 1)  # b, hw, c
    k = k.reshape(b, c, hh * ww)  # b, c, hw
    w_ = torch.bmm(q, k)
    w_ = w_ * (int(c) ** (-0.5))
    w_ = F.softmax(w_, dim=2)
    v = v.reshape(b, c, hh * ww)
    w_ = w_.permute(0, 2, 1)
    h_ = torch.bmm(v, w_).reshape(b, c, hh, ww)
    assert torch.equal(attn(x), x + attn.proj_out(h_))


@torch.no_grad()
def test_exact_open_magvit2_resblock_is_bitwise_the_reference_op_order():
    torch.manual_seed(0)
    blk = om.ResBlock(in_channels=8, out_channels=16, num_groups=2, exact_ops=True).eval()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float32)
    h = blk.conv2(reference_swish(blk.norm2(blk.conv1(reference_swish(blk.norm1(x))))))
    assert torch.equal(blk(x), h + blk.nin_shortcut(x))


@torch.no_grad()
def test_exact_encoder_output_swish_is_the_reference_op_order():
    torch.manual_seed(0)
    enc = lg.llamagen_vq_encoder(preset="tiny", exact_ops=True).eval()
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    h = enc.conv_in(x)
    for level, block in enumerate(enc.conv_blocks):
        for i, res in enumerate(block.res):
            h = res(h)
            if len(block.attn) > 0:
                h = block.attn[i](h)
        if level != enc.num_resolutions - 1:
            h = block.downsample(h)
    for layer in enc.mid:
        h = layer(h)
    assert torch.equal(enc(x), enc.conv_out(reference_swish(enc.norm_out(h))))


@pytest.mark.parametrize("family", ["llamagen", "open_magvit2"])
@torch.no_grad()
def test_exact_and_fast_ops_are_the_same_function(family):
    fast, exact = _tiny(family), _tiny(family, exact_ops=True)
    assert not any(_flags(fast).values()) and all(_flags(exact).values())
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    # Features in and out, not ids: a last-bit change must not be able to flip a code.
    z_fast, z_exact = fast.encode_features(x), exact.encode_features(x)
    torch.testing.assert_close(z_exact, z_fast, rtol=0, atol=1e-4)
    torch.testing.assert_close(exact.decode_features(z_fast), fast.decode_features(z_fast), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["llamagen", "open_magvit2"])
@torch.no_grad()
def test_set_exact_ops_after_construction_equals_building_with_it(family):
    built, flipped = _tiny(family, exact_ops=True), _tiny(family)
    assert flipped.set_exact_ops(True) is flipped
    flags = _flags(flipped)
    # every ResnetBlock/AttnBlock (or ResBlock) plus the encoder and decoder themselves
    assert len(flags) > 10 and all(flags.values()) and flipped.exact_ops
    torch.manual_seed(1)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    z = built.encode_features(x)
    assert torch.equal(flipped.encode_features(x), z)
    assert torch.equal(flipped.decode_features(z), built.decode_features(z))
    flipped.exact_ops = False
    assert not any(_flags(flipped).values()) and not flipped.exact_ops


@pytest.mark.parametrize("name, dim", [("llamagen_vq", 8), ("open_magvit2", 18)])
def test_gin_binding_reaches_every_block(name, dim):
    reg.load_plugins()
    gin.parse_config(f'tokenizers.{name}.preset = "tiny"\ntokenizers.{name}.exact_ops = True')
    tok = gin.get_configurable(f"tokenizers.{name}")(quantizer=PassThroughQuantizer(dim=dim))
    flags = _flags(tok)
    assert flags and all(flags.values())
    gin.clear_config()
    gin.parse_config(f'tokenizers.{name}.preset = "tiny"')
    tok = gin.get_configurable(f"tokenizers.{name}")(quantizer=PassThroughQuantizer(dim=dim))
    assert not any(_flags(tok).values())
