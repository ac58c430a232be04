"""The Llama backbone blocks: RMSNorm, FFN sizes, 2D RoPE and its quirks, KV cache, label embedder, presets."""

from __future__ import annotations

import math

import pytest
import torch

from arforge.nn.llama import (
    KVCache,
    LabelEmbedder,
    LlamaBackbone,
    RMSNorm,
    apply_rotary_emb,
    ffn_hidden_size,
    find_multiple,
    precompute_freqs_cis_2d,
    subtoken_freqs_cis,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _backbone(**kw) -> LlamaBackbone:
    torch.manual_seed(0)
    args = dict(dim=32, n_layer=2, n_head=4, block_size=16)
    args.update(kw)
    bb = LlamaBackbone(**args).eval()
    for p in bb.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return bb


# ------------------------------------------------------------------ sizes
def test_find_multiple_and_ffn_hidden_sizes_follow_spec():
    assert find_multiple(257, 8) == 264 and find_multiple(577, 8) == 584 and find_multiple(256, 8) == 256
    expected = {768: 2048, 1024: 2816, 1280: 3584, 1536: 4096, 2048: 5632, 2560: 6912, 3200: 8704, 4096: 11008}
    assert {d: ffn_hidden_size(d) for d in expected} == expected


def test_rmsnorm_is_fp32_then_cast_back():
    torch.manual_seed(0)
    norm = RMSNorm(dim=8)
    assert norm.eps == 1e-5
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8, dtype=torch.bfloat16) * 30
    xf = x.float()
    ref = (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * norm.weight
    in_bf16 = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5)  # what a bf16 norm would give
    assert not torch.equal(in_bf16 * norm.weight, ref)
    out = norm(x)
    assert out.dtype == torch.float32  # bf16 activations times the fp32 gain promote, as upstream
    assert torch.equal(out, ref)


# ------------------------------------------------------------------- rope
def _slow_rope_table(g: int, hd: int, cls: int = 1) -> torch.Tensor:
    """The docs/llamagen.md#2d-rope table written out cell by cell, pair by pair, in float64."""
    quarter = hd // 4
    out = torch.zeros(cls + g * g, hd // 2, 2, dtype=torch.float64)
    for r in range(g):
        for c in range(g):
            for j in range(hd // 2):
                k = j % quarter
                omega = 10000.0 ** (-4.0 * k / hd)
                angle = (r if j < quarter else c) * omega  # first half: row, second half: column
                out[cls + r * g + c, j] = torch.tensor([math.cos(angle), math.sin(angle)])
    return out


@pytest.mark.parametrize("g,hd", [(3, 16), (4, 8), (2, 100)])
def test_rope_table_matches_slow_reference(g, hd):
    table = precompute_freqs_cis_2d(grid_size=g, head_dim=hd)
    assert table.shape == (1 + g * g, hd // 2, 2)
    assert torch.allclose(table.double(), _slow_rope_table(g, hd), atol=1e-6)
    assert torch.count_nonzero(table[0]) == 0  # class row: cos = sin = 0


def test_rope_class_row_identity_when_quirk_is_off():
    table = precompute_freqs_cis_2d(grid_size=3, head_dim=16, cls_zero_rotation=False)
    assert torch.equal(table[0, :, 0], torch.ones(8)) and torch.equal(table[0, :, 1], torch.zeros(8))
    assert torch.equal(table[1:], precompute_freqs_cis_2d(grid_size=3, head_dim=16)[1:])


def test_rotary_rotates_adjacent_pairs_row_half_then_column_half():
    torch.manual_seed(0)
    g, hd, H = 3, 16, 2
    table = precompute_freqs_cis_2d(grid_size=g, head_dim=hd)
    x = torch.randn(2, 1 + g * g, H, hd)
    out = apply_rotary_emb(x, table)
    ref = torch.empty_like(x)
    for p in range(1 + g * g):
        for j in range(hd // 2):
            cos, sin = table[p, j]
            a, b = x[:, p, :, 2 * j], x[:, p, :, 2 * j + 1]
            ref[:, p, :, 2 * j] = a * cos - b * sin
            ref[:, p, :, 2 * j + 1] = b * cos + a * sin
    assert torch.allclose(out, ref, atol=1e-6)
    # cell (r=1, c=0): only the first half of the pairs turns; (0, 1): only the second half
    e = torch.zeros(1, 1, 1, hd)
    e[..., 0] = 1.0  # feature 0 pairs with feature 1 (not with hd/2 as in the half-split convention)
    row_cell = apply_rotary_emb(e, table[1 + 1 * g + 0][None])
    assert row_cell[0, 0, 0, 1] != 0 and row_cell[0, 0, 0, hd // 2] == 0
    e2 = torch.zeros(1, 1, 1, hd)
    e2[..., hd // 2] = 1.0  # first feature of the column half
    assert torch.equal(apply_rotary_emb(e2, table[1 + 1 * g + 0][None]), e2)  # row-only cell leaves it alone
    assert apply_rotary_emb(e2, table[1 + 0 * g + 1][None])[0, 0, 0, hd // 2 + 1] != 0
    # the class row zeroes q and k
    assert torch.count_nonzero(apply_rotary_emb(x[:, :1], table[:1])) == 0


def test_rotary_keeps_input_dtype():
    table = precompute_freqs_cis_2d(grid_size=2, head_dim=8)
    x = torch.randn(1, 5, 1, 8, dtype=torch.bfloat16)
    assert apply_rotary_emb(x, table).dtype == torch.bfloat16


def test_iar2_repeat_interleave_token_t_uses_cell_t_div_2():
    g, hd = 4, 16
    plain = precompute_freqs_cis_2d(grid_size=g, head_dim=hd)
    rep = precompute_freqs_cis_2d(grid_size=g, head_dim=hd, repeat_interleave=True)
    assert rep.shape == plain.shape and torch.count_nonzero(rep[0]) == 0
    for t in range(g * g):  # token t sits at sequence index t + 1
        assert torch.equal(rep[1 + t], plain[1 + t // 2]), t
    # the head slots (docs/open_magvit2.md#next-sub-token-head): zero, identity, identity under the quirk; cell 1 without it
    identity = torch.stack([torch.ones(hd // 2), torch.zeros(hd // 2)], -1)
    slots = subtoken_freqs_cis(n_slots=3, head_dim=hd, repeat_interleave=True)
    assert torch.count_nonzero(slots[0]) == 0 and torch.equal(slots[1], identity) and torch.equal(slots[2], identity)
    assert not torch.equal(subtoken_freqs_cis(n_slots=3, head_dim=hd)[2], identity)


def test_rope_table_stays_fp32_when_the_model_is_cast():
    from arforge_plugins.models import ar_presets

    m = ar_presets.iar2_gpt("tiny", semantic_size=8, detail_size=16, block_size=25).to(torch.bfloat16)
    assert m.backbone.layers[0].attention.wqkv.weight.dtype == torch.bfloat16
    ref = precompute_freqs_cis_2d(grid_size=5, head_dim=16, repeat_interleave=True)
    assert m.backbone.freqs_cis.dtype == torch.float32 and torch.equal(m.backbone.freqs_cis, ref)
    assert m.head.freqs_cis.dtype == torch.float32 and torch.equal(m.head.freqs_cis, ref[:3])
    assert m.head.window_index.dtype == torch.long


def test_backbone_rope_flag_switches_table():
    bb = _backbone(block_size=16, rope_repeat_interleave=False)
    bb.configure_rope(repeat_interleave=True)
    assert torch.equal(bb.freqs_cis, precompute_freqs_cis_2d(grid_size=4, head_dim=8, repeat_interleave=True))


# ---------------------------------------------------------- causality, cache
def test_backbone_forward_is_causal():
    bb = _backbone()
    x = torch.randn(2, 16, 32)
    y = bb(x)
    x2 = x.clone()
    x2[:, 9] += 1.0
    y2 = bb(x2)
    assert torch.equal(y[:, :9], y2[:, :9]) and not torch.allclose(y[:, 9:], y2[:, 9:])


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_cached_steps_equal_full_forward(n_kv_head):
    bb = _backbone(n_kv_head=n_kv_head)
    x = torch.randn(3, 16, 32)
    full = bb(x)
    bb.setup_cache(max_batch=3, dtype=torch.float32, device="cpu")
    steps = torch.cat([bb.step(x[:, n:n + 1], n).hidden for n in range(16)], dim=1)
    assert torch.allclose(steps, full, atol=1e-5)
    # a multi-position step (a prefill) is causal too
    bb.setup_cache(max_batch=3, dtype=torch.float32, device="cpu")
    part = bb.step(x[:, :5], 0).hidden
    rest = bb.step(x[:, 5:9], 5).hidden
    assert torch.allclose(torch.cat([part, rest], 1), full[:, :9], atol=1e-5)


def test_kv_cache_sizes_and_state():
    bb = _backbone(n_kv_head=2)  # GQA: 4 query heads, 2 key/value heads
    assert bb.max_seq_len == 24  # find_multiple(1 + 16, 8)
    bb.setup_cache(max_batch=6, dtype=torch.float32, device="cpu")
    cache = bb.layers[0].attention.kv_cache
    assert isinstance(cache, KVCache)
    assert cache.k_cache.shape == (6, 2, 24, 8) and cache.v_cache.shape == (6, 2, 24, 8)
    assert not any("cache" in k for k in bb.state_dict())  # never persistent
    assert "freqs_cis" not in bb.state_dict()
    ptr = cache.k_cache.data_ptr()
    assert bb.setup_cache(max_batch=6, dtype=torch.float32, device="cpu") is False  # reused
    assert bb.layers[0].attention.kv_cache.k_cache.data_ptr() == ptr


def test_decode_attends_only_over_the_filled_prefix():
    bb = _backbone()
    x = torch.randn(2, 16, 32)
    full = bb(x)
    bb.setup_cache(max_batch=2, dtype=torch.float32, device="cpu")
    for t in bb.cache_tensors().values():
        t.fill_(float("nan"))  # unwritten slots must never be read, even under a mask
    steps = torch.cat([bb.step(x[:, n:n + 1], n).hidden for n in range(16)], dim=1)
    assert torch.isfinite(steps).all() and torch.allclose(steps, full, atol=1e-5)


def test_decode_step_matches_math_sdpa_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bb = _backbone()
    x = torch.randn(2, 4, 32)
    outs = []
    for backends in (None, [SDPBackend.MATH]):
        bb.setup_cache(max_batch=2, dtype=torch.float32, device="cpu")
        if backends is None:
            outs.append([bb.step(x[:, n:n + 1], n).hidden for n in range(4)])
        else:
            with sdpa_kernel(backends):
                outs.append([bb.step(x[:, n:n + 1], n).hidden for n in range(4)])
    for a, b in zip(*outs, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_class_attention_identity():
    """docs/iar2.md#sampling: with the zero class key, a_n = 1 / Σ_m exp(score_m) and a_0 = 1."""
    bb = _backbone()
    x = torch.randn(2, 16, 32)
    bb.setup_cache(max_batch=2, dtype=torch.float32, device="cpu")
    recorded = torch.stack([bb.step(x[:, n:n + 1], n, return_cls_attn=True).attn_cls for n in range(16)], 1)
    assert recorded.shape == (2, 16)
    assert torch.allclose(recorded[:, 0], torch.ones(2))
    # recompute the last layer's scores from scratch
    with torch.no_grad():
        h = x
        for layer in bb.layers[:-1]:
            h = layer(h, bb.freqs_cis[:16])
        att = bb.layers[-1].attention
        q, k, _ = att._qkv(bb.layers[-1].attention_norm(h), bb.freqs_cis[:16])  # (B, H, T, hd)
        scores = q @ k.transpose(-1, -2) / math.sqrt(att.head_dim)  # (B, H, T, T)
    assert torch.count_nonzero(scores[..., 0]) == 0  # every query scores the class key exactly 0
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    denom = scores.masked_fill(~causal, float("-inf")).exp().sum(-1)  # (B, H, T)
    assert torch.allclose(recorded, (1.0 / denom).mean(1), atol=1e-6)


# ---------------------------------------------------------- class embedder
def test_label_embedder_null_class_and_dropout():
    torch.manual_seed(0)
    emb = LabelEmbedder(num_classes=1000, dim=8, dropout_p=0.1)
    assert emb.embedding_table.num_embeddings == 1001 and emb.null_class == 1000
    labels = torch.arange(4000) % 1000
    assert torch.equal(emb(labels, train=False), emb.embedding_table(labels)[:, None])
    torch.manual_seed(1)
    dropped = emb.token_drop(labels)
    frac = (dropped == 1000).float().mean().item()
    assert 0.08 < frac < 0.12 and torch.equal(dropped[dropped != 1000], labels[dropped != 1000])
    force = torch.tensor([1, 0, 1, 0])
    out = emb(torch.tensor([[1], [2], [3], [4]]), train=False, force_drop_ids=force)  # (B, 1) labels squeeze
    assert torch.equal(out[:, 0], emb.embedding_table(torch.tensor([1000, 2, 1000, 4])))
    always = LabelEmbedder(num_classes=10, dim=4, dropout_p=1.0)
    null = always.embedding_table(torch.tensor([10, 10]))[:, None]
    assert torch.equal(always(torch.tensor([1, 2]), train=True), null)


# ------------------------------------------------------------------ presets
SPEC_SIZES = {  # docs/llamagen.md#model-sizes tables, to the spec's rounding
    ("llamagen_gpt", "B"): "110.9M", ("llamagen_gpt", "L"): "342.9M", ("llamagen_gpt", "XL"): "774.7M",
    ("llamagen_gpt", "XXL"): "1.411B", ("llamagen_gpt", "XXXL"): "3.893B", ("llamagen_gpt", "1B"): "1.200B",
    ("llamagen_gpt", "3B"): "3.097B", ("llamagen_gpt", "7B"): "6.615B",
    ("open_magvit2_ar", "B"): "343.6M", ("open_magvit2_ar", "L"): "804.4M", ("open_magvit2_ar", "XL"): "1.487B",
    ("iar2_gpt", "B"): "143.1M", ("iar2_gpt", "L"): "408.2M", ("iar2_gpt", "XL"): "884.3M",
    ("iar2_gpt", "XXL"): "1.570B",
}
IAR2_HEAD_BLOCKS = {"B": "35.4M", "L": "64.2M", "XL": "101.6M", "XXL": "141.6M"}


def _fmt(n: int, like: str) -> str:
    return f"{n / 1e9:.3f}B" if like.endswith("B") else f"{n / 1e6:.1f}M"


def test_paper_preset_parameter_counts_match_spec():
    from arforge_plugins.models import ar_presets

    builders = {"llamagen_gpt": ar_presets.llamagen_gpt, "open_magvit2_ar": ar_presets.open_magvit2_ar,
                "iar2_gpt": ar_presets.iar2_gpt}
    for (family, size), spec in SPEC_SIZES.items():
        with torch.device("meta"):
            model = builders[family](size)
        n = model.num_params()
        assert _fmt(n, spec) == spec, (family, size, n)
        assert ar_presets.PRESET_PARAMS[f"{family}/{size}"] == n
        if family == "iar2_gpt":
            blocks = sum(p.numel() for p in model.head.factorized_blocks.parameters())
            assert _fmt(blocks, "M") == IAR2_HEAD_BLOCKS[size]
    assert set(ar_presets.PRESET_PARAMS) == {f"{f}/{s}" for f, s in SPEC_SIZES}


def test_preset_shapes_follow_spec_tables():
    from arforge_plugins.models import ar_presets

    with torch.device("meta"):
        gpt3b = ar_presets.llamagen_gpt("3B", block_size=576)
        om2 = ar_presets.open_magvit2_ar("L")
        iar2 = ar_presets.iar2_gpt("L")
    assert gpt3b.backbone.head_dim == 100 and gpt3b.backbone.freqs_cis.shape == (577, 50, 2)
    assert gpt3b.backbone.layers[0].feed_forward.w1.weight.shape == (8704, 3200)
    assert len(om2.head.factorized_blocks) == 3 and om2.vocab_sizes == (64, 4096)
    assert iar2.head.mlp1[2].weight.shape == (85, 256) and iar2.head.mlp2[0].weight.shape == (2048, 1020)
    assert iar2.backbone.rope_repeat_interleave and iar2.backbone.max_seq_len == 584
    from arforge.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown LlamaGen size 'M'; known sizes: tiny, B, L"):
        ar_presets.llamagen_gpt("M")
