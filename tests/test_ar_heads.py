"""ARModel with each factorization and head: causality, KV-cached decoding, the IAR2 window, caches, losses."""

from __future__ import annotations

import pytest
import torch

from arforge.ar_model import ARModel, DecodeInfo, cluster_cross_entropy, subtoken_loss
from arforge.interfaces import Factorization
from arforge.nn.llama import find_multiple

FAMILIES = ("llamagen", "open_magvit2", "iar2")

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(family: str, **kw) -> ARModel:
    from arforge_plugins.models import ar_presets

    torch.manual_seed(0)
    if family == "llamagen":
        m = ar_presets.llamagen_gpt("tiny", vocab_size=32, block_size=16, **kw)
    elif family == "open_magvit2":
        m = ar_presets.open_magvit2_ar("tiny", factorized_bits=(2, 3), block_size=16, **kw)
    else:
        m = ar_presets.iar2_gpt("tiny", semantic_size=8, detail_size=16, block_size=25, **kw)
    for p in m.parameters():  # the output layers start at zero (docs/llamagen.md#llama-backbone): make every logit informative
        torch.nn.init.normal_(p, std=0.1)
    return m.eval()


def _tokens(m: ARModel, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, v, (batch, m.block_size), generator=g) for v in m.vocab_sizes], -1)


# -------------------------------------------------------------- causality
@pytest.mark.parametrize("family", FAMILIES)
def test_changing_a_token_never_changes_earlier_logits(family):
    m = _model(family)
    toks, labels = _tokens(m, 2), torch.tensor([3, 7])
    base = m.logits_full(toks, labels)
    K = m.num_subtokens
    for t in (0, 5, m.block_size - 1):
        for k in range(K):
            changed = toks.clone()
            changed[:, t, k] = (changed[:, t, k] + 1) % m.vocab_sizes[k]
            out = m.logits_full(changed, labels)
            for j in range(K):
                assert torch.equal(out[j][:, :t], base[j][:, :t]), (t, k, j)
                if j <= k:  # sub-token k of t can only inform sub-tokens > k of the same position
                    assert torch.equal(out[j][:, t], base[j][:, t]), (t, k, j)
            if k < K - 1:
                assert not torch.allclose(out[K - 1][:, t], base[K - 1][:, t])  # teacher forcing is used
            if t < m.block_size - 1:
                assert not torch.allclose(out[0][:, t + 1:], base[0][:, t + 1:])  # later positions do see it


# ---------------------------------------------------------- cached decoding
def _rows(batch: int, cfg: bool):
    """The model decodes rows; with CFG, arforge.guidance lays them out as [cond; uncond]."""
    from arforge.guidance import ConstantCFG, GuidedBatch

    return GuidedBatch(ConstantCFG(scale=2.0) if cfg else None, batch=batch)


def _decode_teacher(m: ARModel, toks: torch.Tensor, labels: torch.Tensor, cfg: bool, record: bool = False):
    B, L, K = toks.shape
    rows = _rows(B, cfg)
    lab = rows.labels(labels, null_class=m.null_class)
    m.setup_caches(batch=rows.rows)
    logits = [[None] * L for _ in range(K)]
    infos = []
    prev = None
    for n in range(L):
        def choose(k: int, lg: torch.Tensor, info: DecodeInfo) -> torch.Tensor:
            assert lg.dtype == torch.float32 and lg.shape == ((2 * B if cfg else B), m.vocab_sizes[k])
            logits[k][info.n] = lg
            if k == 0:
                infos.append(rows.info(info))
            return rows.tokens(toks[:, info.n, k])
        prev = m.decode_step(n, prev, lab, choose, record_cls_attention=record)
        assert torch.equal(rows.conditional(prev), toks[:, n])
    return [torch.stack(lk, dim=1) for lk in logits], infos


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", [False, True])
def test_cached_decoding_equals_full_forward(family, cfg):
    m = _model(family)
    toks, labels = _tokens(m, 2), torch.tensor([3, 7])
    stepped, infos = _decode_teacher(m, toks, labels, cfg)
    rows = _rows(2, cfg)
    ref = m.logits_full(rows.tokens(toks), rows.labels(labels, null_class=m.null_class))
    for k in range(m.num_subtokens):
        assert torch.allclose(stepped[k], ref[k], atol=1e-5, rtol=0), (k, (stepped[k] - ref[k]).abs().max())
    assert [i.n for i in infos] == list(range(m.block_size)) and infos[0].L == m.block_size
    assert infos[0].attn_cls is None
    if cfg:  # the unconditional half really is unconditional
        assert not torch.allclose(stepped[0][:2], stepped[0][2:])


def test_decode_records_class_attention_of_the_conditional_half():
    m = _model("iar2")
    toks, labels = _tokens(m, 2), torch.tensor([3, 7])
    _, infos = _decode_teacher(m, toks, labels, cfg=True, record=True)
    attn = torch.stack([i.attn_cls for i in infos], 1)  # (B, L)
    assert attn.shape == (2, m.block_size)
    assert torch.allclose(attn[:, 0], torch.ones(2))  # at n = 0 the class token sees only itself
    assert ((attn > 0) & (attn <= 1)).all() and not torch.allclose(attn[:, 1:], torch.ones(2, m.block_size - 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_caches_are_allocated_once_and_reused(family):
    m = _model(family)
    toks, labels = _tokens(m, 2), torch.tensor([3, 7])
    m.setup_caches(batch=4)  # 2 images under CFG
    before = {k: v.data_ptr() for k, v in m.cache_tensors().items()}
    assert any(k.startswith("backbone.") for k in before)
    if family != "llamagen":
        assert any(k.startswith("head.") for k in before)  # the heads' own small caches
    _decode_teacher(m, toks, labels, cfg=True)  # calls setup_caches again with the same sizes
    after = {k: v.data_ptr() for k, v in m.cache_tensors().items()}
    assert after == before
    m.setup_caches(batch=3)  # other sizes: new buffers
    assert {k: v.data_ptr() for k, v in m.cache_tensors().items()} != before
    first = next(v for k, v in m.cache_tensors().items() if k.startswith("backbone."))
    assert first.shape[0] == 3 and first.shape[2] == find_multiple(1 + m.block_size, 8)  # docs/llamagen.md#kv-cache S_max
    head_caches = [v for k, v in m.cache_tensors().items() if k.endswith("k_cache") and k.startswith("head.")]
    assert all(v.shape[2] == m.head.n_slots for v in head_caches)  # sized to the head's slots


def test_decode_step_rejects_bad_inputs():
    m = _model("open_magvit2")
    with pytest.raises(RuntimeError, match="setup_caches"):
        m.decode_step(0, None, torch.tensor([1]), lambda k, lg, i: lg.argmax(-1))
    m.setup_caches(batch=4)
    lab = _rows(2, True).labels(torch.tensor([1, 2]), null_class=m.null_class)  # (4,)
    with pytest.raises(ValueError, match=r"labels must be \(4,\)"):
        m.decode_step(0, None, torch.tensor([1, 2]), lambda k, lg, i: lg.argmax(-1))
    with pytest.raises(ValueError, match="prev"):
        m.decode_step(1, None, lab, lambda k, lg, i: lg.argmax(-1))
    with pytest.raises(ValueError, match="choose must return"):
        m.decode_step(0, None, lab, lambda k, lg, i: lg.argmax(-1)[:2])


# --------------------------------------------------------- shared embedding
@pytest.mark.parametrize("family,emb,head_attr", [("open_magvit2", "pre_emb", "pre_emb"),
                                                  ("iar2", "tok_embeddings1", "tok_embeddings1")])
def test_head_shares_the_input_embedding_tensor(family, emb, head_attr):
    m = _model(family)
    shared = getattr(m.embedder, emb)
    assert getattr(m.head, head_attr) is shared  # one module, one tensor
    assert not any(k.startswith(f"head.{head_attr}") for k in m.state_dict())
    assert sum(p is shared.weight for p in m.parameters()) == 1
    m.train()
    m.loss(_tokens(m, 2), torch.tensor([1, 2])).total.backward()
    assert shared.weight.grad is not None and shared.weight.grad.abs().sum() > 0


# --------------------------------------------------------------- IAR2 window
def _slow_window(g: int, i: int, j: int) -> list[int]:
    """docs/iar2.md#input-aggregation-and-local-context-head written out: rows i-2 and i-1 over columns j-2..j+2, then (i, j-2), (i, j-1)."""
    cells = [(i - 2, j + dc) for dc in (-2, -1, 0, 1, 2)] + [(i - 1, j + dc) for dc in (-2, -1, 0, 1, 2)]
    cells += [(i, j - 2), (i, j - 1)]
    return [r * g + c if 0 <= r < g and 0 <= c < g else -1 for r, c in cells]


@pytest.mark.parametrize("g,cells", [(5, [(0, 0), (0, 4), (1, 1), (2, 2), (4, 4), (3, 0)]),
                                     (24, [(0, 0), (0, 23), (1, 22), (2, 2), (12, 7), (23, 23), (23, 0)])])
def test_window_neighbours_match_slow_reference(g, cells):
    from arforge_plugins.heads.semantic_detail_head import window_indices

    idx = window_indices(g)
    assert idx.shape == (g * g, 12)
    for i, j in cells:
        assert idx[i * g + j].tolist() == _slow_window(g, i, j), (i, j)
    n = torch.arange(g * g)[:, None]
    assert ((idx < n) | (idx == -1)).all()  # strictly causal


def test_window_border_neighbours_get_mlp1_of_zero():
    m = _model("iar2")
    head = m.head
    h = torch.randn(2, 25, 64)
    with torch.no_grad():
        raw = head.neighbour_states(h)  # (B, L, 12, D)
        # cell 12 = (2, 2): k=0 is (0, 0), k=2 is (0, 2), k=11 is (2, 1)
        assert torch.equal(raw[:, 12, 0], h[:, 0]) and torch.equal(raw[:, 12, 2], h[:, 2])
        assert torch.equal(raw[:, 12, 11], h[:, 11])
        assert torch.count_nonzero(raw[:, 0]) == 0 and torch.count_nonzero(raw[:, 6, :5]) == 0
        ref = head.mlp2(head.mlp1(raw).reshape(2, 25, -1))  # zero vectors go *into* mlp1
        assert torch.allclose(head.local_context(h), ref, atol=1e-6)
        m0 = head.mlp1(torch.zeros(64))
        assert torch.count_nonzero(m0) > 0  # so border slots carry mlp1(0), not zeros
    assert "window_index" not in m.state_dict() and head.window_index.dtype == torch.long


# --------------------------------------------------------------- embeddings
def test_factorizations_split_merge_and_embed():
    from arforge_plugins.factorizations.token_factorizations import (
        BitSplitFactorization,
        IdentityFactorization,
        SemanticDetailFactorization,
    )

    bits = BitSplitFactorization()
    assert isinstance(bits, Factorization) and bits.codebook_sizes == (1 << 18,) and bits.vocab_sizes == (64, 4096)
    ids = torch.tensor([[[0], [1], [63], [64], [1 << 17], [(1 << 18) - 1], [12345]]])
    sub = bits.split(ids)
    assert sub[0].tolist() == [[0, 0], [1, 0], [63, 0], [0, 1], [0, 2048], [63, 4095], [12345 & 63, 12345 >> 6]]
    assert torch.equal(bits.merge(sub), ids)
    rnd = torch.randint(0, 1 << 18, (3, 10, 1))
    assert torch.equal(bits.merge(bits.split(rnd)), rnd)
    for f in (IdentityFactorization(), SemanticDetailFactorization()):
        assert isinstance(f, Factorization)
        x = torch.stack([torch.randint(0, v, (2, 5)) for v in f.codebook_sizes], -1)
        assert torch.equal(f.merge(f.split(x)), x)
    with pytest.raises(ValueError, match=r"\(B, L, 1\)"):
        bits.split(torch.zeros(2, 5, 2, dtype=torch.long))

    emb = bits.build_embedder(dim=8)
    s = torch.tensor([[[3, 100]]])
    assert torch.equal(emb(s)[0, 0], emb.pre_emb.weight[3] + emb.post_emb.weight[100])
    sd = SemanticDetailFactorization(semantic_size=4, detail_size=6).build_embedder(dim=8)
    pair = torch.tensor([[[1, 5]]])
    ref = sd.aggregation_layer[2](torch.nn.functional.gelu(sd.aggregation_layer[0](
        torch.cat([sd.tok_embeddings1.weight[1], sd.tok_embeddings2.weight[5]]))))
    assert torch.allclose(sd(pair)[0, 0], ref, atol=1e-6)


def test_input_sequence_is_class_then_shifted_tokens():
    m = _model("llamagen")
    toks, labels = _tokens(m, 2), torch.tensor([3, 7])
    seen = {}
    hook = m.backbone.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    m.logits_full(toks, labels)
    hook.remove()
    x = seen["x"]
    assert x.shape == (2, 16, 64)
    assert torch.equal(x[:, 0], m.cls_embedding.embedding_table.weight[labels])
    assert torch.equal(x[:, 1:], m.embedder.tok_embeddings.weight[toks[:, :-1, 0]])


def test_training_mode_drops_labels_to_the_null_class():
    m = _model("llamagen", class_dropout_p=1.0)
    toks, labels = _tokens(m, 2), torch.tensor([3, 7])
    m.train()
    m.backbone.tok_dropout.p = 0.0
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    dropped = m(toks, labels).logits[0]
    m.eval()
    null = m.logits_full(toks, torch.full_like(labels, 1000))[0]
    assert torch.allclose(dropped, null, atol=1e-6)
    assert not torch.allclose(m.logits_full(toks, labels)[0], null)


# ------------------------------------------------------------------- losses
def test_weighted_subtoken_loss_equals_manual_sum():
    m = _model("iar2")
    toks, labels = _tokens(m, 3), torch.tensor([1, 2, 3])
    logits = m.logits_full(toks, labels)
    out = m.loss(toks, labels, weights=(2.0, 1.0))
    manual = []
    for k in range(2):
        lp = logits[k].log_softmax(-1)  # (B, L, V)
        manual.append(-lp.gather(-1, toks[..., k:k + 1]).mean())
    assert torch.allclose(out.parts["ce_sem"], manual[0], atol=1e-5)
    assert torch.allclose(out.parts["ce_det"], manual[1], atol=1e-5)
    assert torch.allclose(out.total, 2.0 * manual[0] + manual[1], atol=1e-5)
    default = m.loss(toks, labels)  # the model's loss_weights: w1 = 1
    assert torch.allclose(default.total, manual[0] + manual[1], atol=1e-5)


def test_iar_cluster_loss_is_minus_log_cluster_probability():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 32) * 3
    tokens = torch.randint(0, 32, (4, 6))
    p = logits.softmax(-1).reshape(4, 6, 4, 8)  # 4 clusters of 8
    p_cluster = p.sum(-1).gather(-1, (tokens // 8)[..., None])[..., 0]
    assert torch.allclose(cluster_cross_entropy(logits, tokens, cluster_size=8), -p_cluster.log().mean(), atol=1e-5)
    br = subtoken_loss([logits], tokens[..., None], cluster_size=8, cluster_weight=0.5, names=["token"])
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), tokens.reshape(-1))
    assert torch.allclose(br.total, ce + 0.5 * (-p_cluster.log().mean()), atol=1e-5)
    assert set(br.parts) == {"ce_token", "cce"}
    with pytest.raises(ValueError, match="clusters"):
        cluster_cross_entropy(logits, tokens, cluster_size=5)


def test_iar_builder_uses_the_cluster_loss():
    from arforge_plugins.models import ar_presets

    torch.manual_seed(0)
    m = ar_presets.iar_gpt("tiny", vocab_size=32, block_size=16, cluster_size=8).eval()
    toks = torch.randint(0, 32, (2, 16, 1))
    out = m.loss(toks, torch.tensor([1, 2]))
    assert set(out.parts) == {"ce_token", "cce"}
    assert torch.allclose(out.total, out.parts["ce_token"] + out.parts["cce"])


def test_model_initialisation_follows_spec():
    from arforge_plugins.models import ar_presets

    torch.manual_seed(0)
    for m, outs in ((ar_presets.llamagen_gpt("tiny", vocab_size=64, block_size=16), ["head.output.weight"]),
                    (ar_presets.open_magvit2_ar("tiny", block_size=16), ["head.head.0.weight", "head.head.1.weight"]),
                    (ar_presets.iar2_gpt("tiny", block_size=16), ["head.output1.2.weight", "head.output2.2.weight"])):
        sd = m.state_dict()
        for k in outs:
            assert torch.count_nonzero(sd[k]) == 0, k
        for k, v in sd.items():
            if k.endswith("norm.weight"):
                assert torch.equal(v, torch.ones_like(v)), k
            elif k.endswith(".bias"):
                assert torch.count_nonzero(v) == 0, k
        w = m.backbone.layers[0].feed_forward.w1.weight
        assert abs(w.std().item() - 0.02) < 0.002


# ------------------------------------------------------------ head factories
@pytest.mark.plumbing
def test_head_factory_gets_width_vocabularies_and_grid_from_the_model():
    """``models.ar_model.head = @heads.x`` (no parentheses): the model supplies dim, vocab_sizes
    and grid_size, so a gin file does not repeat them (and cannot get them wrong)."""
    import functools

    from arforge.nn.llama import LlamaBackbone
    from arforge_plugins.factorizations.token_factorizations import SemanticDetailFactorization
    from arforge_plugins.heads.semantic_detail_head import SemanticDetailHead

    fact = SemanticDetailFactorization(semantic_size=8, detail_size=16)
    backbone = LlamaBackbone(dim=32, n_layer=1, n_head=4, block_size=25)
    m = ARModel(factorization=fact, backbone=backbone, num_classes=10,
                head=functools.partial(SemanticDetailHead, n_head=4, n_layer=1))
    assert (m.head.dim, tuple(m.head.vocab_sizes), m.head.grid_size) == (32, (8, 16), 5)
    import gin

    from arforge import registry

    registry.load_plugins()  # the gin configurable (a subclass whose signature is (*args, **kwargs))
    with gin.config_scope(None):
        gin.bind_parameter("heads.semantic_detail_local.n_head", 4)
        gin.bind_parameter("heads.semantic_detail_local.n_layer", 1)
        try:
            g = ARModel(factorization=fact, backbone=backbone, num_classes=10,
                        head=gin.get_configurable("heads.semantic_detail_local"))
        finally:
            gin.clear_config()
    assert (g.head.dim, tuple(g.head.vocab_sizes), g.head.grid_size) == (32, (8, 16), 5)
    with pytest.raises(TypeError, match="not a torch module"):
        ARModel(factorization=fact, backbone=backbone, num_classes=10, head=lambda **kw: None)
