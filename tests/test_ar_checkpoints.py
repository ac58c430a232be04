"""Strict official AR key maps: LlamaGen/IAR GPT, Open-MAGVIT2 AR, IAR2 GPT (docs/checkpoints.md#llamagen-and-iar-gpt, docs/checkpoints.md#open-magvit2-ar, docs/checkpoints.md#iar2-gpt)."""

from __future__ import annotations

import argparse

import pytest
import torch

from arforge.keymap import KeyMapError
from arforge.nn.llama import ffn_hidden_size

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------ spec layouts
def _block(prefix: str, D: int, F: int) -> dict[str, tuple]:
    return {
        f"{prefix}.attention.wqkv.weight": (3 * D, D), f"{prefix}.attention.wo.weight": (D, D),
        f"{prefix}.feed_forward.w1.weight": (F, D), f"{prefix}.feed_forward.w3.weight": (F, D),
        f"{prefix}.feed_forward.w2.weight": (D, F),
        f"{prefix}.attention_norm.weight": (D,), f"{prefix}.ffn_norm.weight": (D,),
    }


def llamagen_layout(n_layer: int, D: int, V: int = 16384) -> dict[str, tuple]:
    """docs/checkpoints.md#llamagen-and-iar-gpt table."""
    F = ffn_hidden_size(D)
    out = {"cls_embedding.embedding_table.weight": (1001, D), "tok_embeddings.weight": (V, D),
           "norm.weight": (D,), "output.weight": (V, D)}
    for i in range(n_layer):
        out.update(_block(f"layers.{i}", D, F))
    return out


def om2_layout(n_layer: int, n_intra: int, D: int, V0: int = 64, V1: int = 4096) -> dict[str, tuple]:
    """docs/checkpoints.md#open-magvit2-ar table."""
    F = ffn_hidden_size(D)
    out = {"transformer.pre_emb.weight": (V0, D), "transformer.post_emb.weight": (V1, D),
           "transformer.class_emb.embedding_table.weight": (1001, D), "transformer.norm.weight": (D,),
           "transformer.head.0.weight": (V0, D), "transformer.head.1.weight": (V1, D)}
    for i in range(n_layer):
        out.update(_block(f"transformer.spatial_blocks.{i}", D, F))
    for i in range(n_intra):
        out.update(_block(f"transformer.factorized_blocks.{i}", D, F))
    return out


def iar2_layout(n_layer: int, D: int, Vs: int = 256, Vd: int = 4096) -> dict[str, tuple]:
    """docs/checkpoints.md#iar2-gpt table."""
    F, c = ffn_hidden_size(D), D // 12
    out = {
        "cls_embedding.embedding_table.weight": (1001, D), "tok_embeddings1.weight": (Vs, D),
        "tok_embeddings2.weight": (Vd, D),
        "aggregation_layer.0.weight": (4 * D, 2 * D), "aggregation_layer.0.bias": (4 * D,),
        "aggregation_layer.2.weight": (D, 4 * D), "aggregation_layer.2.bias": (D,),
        "norm.weight": (D,),
        "output1.0.weight": (2 * D, D), "output1.0.bias": (2 * D,), "output1.2.weight": (Vs, 2 * D),
        "output2.0.weight": (2 * D, D), "output2.0.bias": (2 * D,), "output2.2.weight": (Vd, 2 * D),
        "mlp1.0.weight": (D // 4, D), "mlp1.0.bias": (D // 4,), "mlp1.2.weight": (c, D // 4),
        "mlp2.0.weight": (2 * D, 12 * c), "mlp2.0.bias": (2 * D,), "mlp2.2.weight": (D, 2 * D),
    }
    for i in range(n_layer):
        out.update(_block(f"layers.{i}", D, F))
    for i in range(5):
        out.update(_block(f"factorized_blocks.{i}", D, F))
    return out


def _random_state(layout: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.1 for k, shape in layout.items()}


# ---------------------------------------------------------------- families
def _family(name: str):
    from arforge_plugins.loaders import ar_checkpoints as ac
    from arforge_plugins.models import ar_presets as ap

    if name == "llamagen":
        return dict(build=lambda: ap.llamagen_gpt("tiny", vocab_size=32, block_size=16),
                    layout=llamagen_layout(2, 64, V=32), load=ac.load_llamagen_gpt, export=ac.export_llamagen_gpt,
                    keymap=ac.LLAMAGEN_GPT, vocab=(32,))
    if name == "open_magvit2":
        return dict(build=lambda: ap.open_magvit2_ar("tiny", factorized_bits=(2, 3), block_size=16),
                    layout=om2_layout(2, 1, 64, V0=4, V1=8), load=ac.load_open_magvit2_ar,
                    export=lambda m: ac.export_open_magvit2_ar(m, container="bare"),
                    keymap=ac.OPEN_MAGVIT2_AR, vocab=(4, 8))
    return dict(build=lambda: ap.iar2_gpt("tiny", semantic_size=8, detail_size=16, block_size=25),
                layout=iar2_layout(2, 64, Vs=8, Vd=16), load=ac.load_iar2_gpt, export=ac.export_iar2_gpt,
                keymap=ac.IAR2_GPT, vocab=(8, 16))


FAMILIES = ("llamagen", "open_magvit2", "iar2")


def _logits(model, seed: int = 3):
    model.eval()
    g = torch.Generator().manual_seed(seed)
    toks = torch.stack([torch.randint(0, v, (2, model.block_size), generator=g) for v in model.vocab_sizes], -1)
    return model.logits_full(toks, torch.tensor([5, 999]))


# --------------------------------------------------------- paper presets
@pytest.mark.parametrize("family,size,layout,count", [
    ("llamagen", "B", lambda: llamagen_layout(12, 768), 88),
    ("llamagen", "XXL", lambda: llamagen_layout(48, 1536), 340),
    ("llamagen", "3B", lambda: llamagen_layout(24, 3200), 7 * 24 + 4),
    ("open_magvit2", "B", lambda: om2_layout(24, 2, 1024), 188),
    ("open_magvit2", "XL", lambda: om2_layout(48, 4, 1536), 7 * (48 + 4) + 6),
    ("iar2", "B", lambda: iar2_layout(12, 768), 139),
    ("iar2", "XXL", lambda: iar2_layout(48, 1536), 7 * (48 + 5) + 20),
])
def test_paper_preset_layout_matches_spec_on_meta(family, size, layout, count):
    from arforge_plugins.loaders import ar_checkpoints as ac
    from arforge_plugins.models import ar_presets as ap

    build, keymap = {"llamagen": (ap.llamagen_gpt, ac.LLAMAGEN_GPT),
                     "open_magvit2": (ap.open_magvit2_ar, ac.OPEN_MAGVIT2_AR),
                     "iar2": (ap.iar2_gpt, ac.IAR2_GPT)}[family]
    with torch.device("meta"):
        model = build(size)
        spec = layout()
        source = {k: torch.empty(s) for k, s in spec.items()}
    assert len(spec) == count
    exported = keymap.export(model.state_dict())
    assert {k: tuple(v.shape) for k, v in exported.items()} == spec
    _, report = keymap.convert(source, model.state_dict())
    assert report.ok, report.format(family)


# ---------------------------------------------------------- strict loading
@pytest.mark.parametrize("family", FAMILIES)
def test_synthetic_official_checkpoint_loads_and_round_trips(family):
    fam = _family(family)
    src = _random_state(fam["layout"])
    model = fam["build"]()
    result = fam["load"](model, src)
    assert result.report.ok and result.container == "(bare state dict)"
    exported = fam["export"](model)
    assert set(exported) == set(src) and all(torch.equal(exported[k], src[k]) for k in src)  # bit-exact
    again = fam["build"]()
    fam["load"](again, exported)
    for a, b in zip(_logits(model), _logits(again), strict=True):
        assert torch.equal(a, b)
    assert any(torch.count_nonzero(lg) for lg in _logits(model))  # the loaded weights really are used


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_extra_or_misshaped_key_fails_listing_it(family):
    fam = _family(family)
    src = _random_state(fam["layout"])
    victim = sorted(k for k in src if "attention.wo" in k)[-1]
    missing = {k: v for k, v in src.items() if k != victim}
    with pytest.raises(KeyMapError, match="missing") as exc:
        fam["load"](fam["build"](), missing)
    mapped = fam["keymap"].rename(victim)
    assert mapped in str(exc.value)
    extra = dict(src, **{"layers.0.attention.bias": torch.zeros(3)})
    with pytest.raises(KeyMapError, match=r"unexpected .*layers\.0\.attention\.bias"):
        fam["load"](fam["build"](), extra)
    reshaped = dict(src, **{victim: src[victim][:, :-1]})
    with pytest.raises(KeyMapError, match="shape mismatch") as exc:
        fam["load"](fam["build"](), reshaped)
    assert victim in str(exc.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapped_prefixes_and_containers_load(family):
    fam = _family(family)
    src = _random_state(fam["layout"])
    ref = fam["build"]()
    fam["load"](ref, src)
    entry = "state_dict" if family == "open_magvit2" else "model"
    ddp = {entry: {f"module._orig_mod.{k}": v for k, v in src.items()}, "steps": 7}
    fsdp = {".".join(["_fsdp_wrapped_module"] + k.split(".")[:1] + ["_fsdp_wrapped_module"] + k.split(".")[1:]): v
            for k, v in src.items()}
    for container in (ddp, fsdp):
        model = fam["build"]()
        fam["load"](model, container)
        for a, b in zip(_logits(model), _logits(ref), strict=True):
            assert torch.equal(a, b)


def test_llamagen_files_ddp_and_fsdp_with_drop_list(tmp_path):
    from arforge_plugins.loaders import ar_checkpoints as ac

    fam = _family("llamagen")
    src = _random_state(fam["layout"])
    ema = _random_state(fam["layout"], seed=9)
    ddp_path = tmp_path / "0001000.pt"
    torch.save({"model": src, "ema": ema, "optimizer": {}, "steps": 1000,
                "args": argparse.Namespace(vocab_size=32, gpt_model="GPT-tiny")}, ddp_path)
    noisy = dict(src, freqs_cis=torch.zeros(17, 8, 2), causal_mask=torch.ones(24, 24, dtype=torch.bool),
                 **{"layers.1.attention.kv_cache.k_cache": torch.zeros(2, 4, 24, 16)})
    fsdp_path = tmp_path / "consolidated.pth"
    torch.save(noisy, fsdp_path)
    a, b, c = fam["build"](), fam["build"](), fam["build"]()
    ra = ac.load_llamagen_gpt(a, ddp_path)
    rb = ac.load_llamagen_gpt(b, fsdp_path)
    rc = ac.load_llamagen_gpt(c, ddp_path, weights="ema")
    assert ra.container == "model" and rc.container == "ema" and rb.container == "(bare state dict)"
    assert sorted(rb.report.dropped) == ["causal_mask", "freqs_cis", "layers.1.attention.kv_cache.k_cache"]
    assert torch.equal(_logits(a)[0], _logits(b)[0]) and not torch.equal(_logits(a)[0], _logits(c)[0])
    with pytest.raises(Exception, match="no 'ema' entry"):
        ac.load_llamagen_gpt(fam["build"](), fsdp_path, weights="ema")
    assert ac.export_llamagen_gpt(a, container="model").keys() == {"model"}


def test_open_magvit2_embedded_tokenizer_is_returned_not_dropped(tmp_path):
    from arforge_plugins.loaders import ar_checkpoints as ac

    fam = _family("open_magvit2")
    src = _random_state(fam["layout"])
    tok = {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3), "decoder.conv_out.bias": torch.randn(3)}
    state = dict(src, **{f"first_stage_model.{k}": v for k, v in tok.items()})
    path = tmp_path / "AR_256_B.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, path)
    model = fam["build"]()
    result = ac.load_open_magvit2_ar(model, path)
    assert result.container == "state_dict"
    assert set(result.tokenizer_state) == set(tok)
    assert all(torch.equal(result.tokenizer_state[k], tok[k]) for k in tok)
    assert model.head.pre_emb.weight is model.embedder.pre_emb.weight  # still one tensor after loading
    assert torch.equal(model.embedder.pre_emb.weight, src["transformer.pre_emb.weight"])
    out = ac.export_open_magvit2_ar(model, tokenizer_state=result.tokenizer_state)
    assert set(out["state_dict"]) == set(state)
    assert sum(k.endswith("pre_emb.weight") for k in out["state_dict"]) == 1


def test_iar2_load_turns_on_repeat_interleave_rope():
    from arforge_plugins.loaders import ar_checkpoints as ac
    from arforge_plugins.models import ar_presets as ap
    from arforge.nn.llama import precompute_freqs_cis_2d

    src = _random_state(iar2_layout(2, 64, Vs=8, Vd=16))
    model = ap.iar2_gpt("tiny", semantic_size=8, detail_size=16, block_size=25, rope_repeat_interleave=False)
    before = model.backbone.freqs_cis.clone()
    ac.load_iar2_gpt(model, src)
    assert model.backbone.rope_repeat_interleave and model.head.rope_repeat_interleave
    assert torch.equal(model.backbone.freqs_cis,
                       precompute_freqs_cis_2d(grid_size=5, head_dim=16, repeat_interleave=True))
    assert not torch.equal(model.backbone.freqs_cis, before)
    ref = ap.iar2_gpt("tiny", semantic_size=8, detail_size=16, block_size=25)
    ac.load_iar2_gpt(ref, src)
    for a, b in zip(_logits(model), _logits(ref), strict=True):
        assert torch.equal(a, b)


def test_wrong_family_is_rejected_with_every_problem_listed():
    from arforge_plugins.loaders import ar_checkpoints as ac

    src = _random_state(llamagen_layout(2, 64, V=32))
    with pytest.raises(KeyMapError) as exc:
        ac.load_iar2_gpt(_family("iar2")["build"](), src)
    msg = str(exc.value)
    assert "missing" in msg and "tok_embeddings1" in msg and "unexpected" in msg and "tok_embeddings.weight" in msg
