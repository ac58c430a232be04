"""Strict official tokenizer key maps (docs/checkpoints.md#strict-mapping-rules, docs/checkpoints.md#llamagen-vq-tokenizer, docs/checkpoints.md#open-magvit2-tokenizer, docs/checkpoints.md#iar2-tokenizer, docs/checkpoints.md#what-each-strict-map-covers).

The expected official layouts are generated here from the spec tables,
independently of the arforge modules' own ``state_dict`` naming.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from arforge.checkpoint import CheckpointError
from arforge.keymap import KeyMapError
from arforge_plugins.tokenizers import llamagen_vq as lg
from arforge_plugins.tokenizers import open_magvit2_tokenizer as om
from arforge_plugins.loaders import tokenizer_checkpoints as tc
from arforge_plugins.losses.tokenizer_losses import patchgan_discriminator

Shape = tuple[int, ...]


# ------------------------------------------------ official layouts, from the spec
def official_llamagen_vq_layout(*, ch: int = 128, ch_mult=(1, 1, 2, 2, 4), z: int = 256, dim: int = 8,
                                codebook: int = 16384, enc_blocks: int = 2, dec_blocks: int = 3,
                                detail_codebook: int | None = None) -> dict[str, Shape]:
    """docs/checkpoints.md#llamagen-vq-tokenizer (and docs/checkpoints.md#iar2-tokenizer with ``detail_codebook``): key -> shape of the ``model`` entry."""
    out: dict[str, Shape] = {}

    def conv(name, o, i, k):
        out[f"{name}.weight"], out[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name, c):
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def res(name, i, o):
        norm(f"{name}.norm1", i), conv(f"{name}.conv1", o, i, 3), norm(f"{name}.norm2", o), conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.nin_shortcut", o, i, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    widths = [ch * m for m in ch_mult]
    top, n = widths[-1], len(widths)
    conv("encoder.conv_in", ch, 3, 3)
    c_in = ch
    for level, w in enumerate(widths):
        for j in range(enc_blocks):
            res(f"encoder.conv_blocks.{level}.res.{j}", c_in, w)
            c_in = w
            if level == n - 1:
                attn(f"encoder.conv_blocks.{level}.attn.{j}", w)
        if level < n - 1:
            conv(f"encoder.conv_blocks.{level}.downsample.conv", w, w, 3)
    for part in ("encoder", "decoder"):
        res(f"{part}.mid.0", top, top), attn(f"{part}.mid.1", top), res(f"{part}.mid.2", top, top)
    norm("encoder.norm_out", top), conv("encoder.conv_out", z, top, 3)
    conv("quant_conv", dim, z, 1), conv("post_quant_conv", z, dim, 1)
    conv("decoder.conv_in", top, z, 3)
    c_in = top
    for k, w in enumerate(reversed(widths)):
        for j in range(dec_blocks):
            res(f"decoder.conv_blocks.{k}.res.{j}", c_in, w)
            c_in = w
            if k == 0:
                attn(f"decoder.conv_blocks.{k}.attn.{j}", w)
        if k < n - 1:
            conv(f"decoder.conv_blocks.{k}.upsample.conv", w, w, 3)
    norm("decoder.norm_out", widths[0]), conv("decoder.conv_out", 3, widths[0], 3)
    out["quantize.embedding.weight"] = (codebook, dim)
    out["quantize.codebook_used"] = (65536,)
    if detail_codebook is not None:
        out["quantize.embedding_second"] = (detail_codebook, dim)
        out["quantize.codebook_used2"] = (65536,)
    return out


def official_open_magvit2_layout(*, ch: int = 128, ch_mult=(1, 1, 2, 2, 4), blocks: int = 4,
                                 z: int = 18) -> dict[str, Shape]:
    """docs/checkpoints.md#open-magvit2-tokenizer generator keys: key -> shape of ``state_dict`` (``encoder.*``/``decoder.*``)."""
    out: dict[str, Shape] = {}

    def norm(name, c):
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def res(name, i, o):  # convs without bias
        norm(f"{name}.norm1", i), norm(f"{name}.norm2", o)
        out[f"{name}.conv1.weight"], out[f"{name}.conv2.weight"] = (o, i, 3, 3), (o, o, 3, 3)
        if i != o:
            out[f"{name}.nin_shortcut.weight"] = (o, i, 1, 1)

    widths = [ch * m for m in ch_mult]
    top, n = widths[-1], len(widths)
    out["encoder.conv_in.weight"] = (ch, 3, 3, 3)
    c_in = ch
    for i, w in enumerate(widths):
        for j in range(blocks):
            res(f"encoder.down.{i}.block.{j}", c_in, w)
            c_in = w
        if i < n - 1:
            out[f"encoder.down.{i}.downsample.weight"], out[f"encoder.down.{i}.downsample.bias"] = (w, w, 3, 3), (w,)
    for part in ("encoder", "decoder"):
        for j in range(blocks):
            res(f"{part}.mid_block.{j}", top, top)
    norm("encoder.norm_out", top)
    out["encoder.conv_out.weight"], out["encoder.conv_out.bias"] = (z, top, 1, 1), (z,)
    out["decoder.conv_in.weight"], out["decoder.conv_in.bias"] = (top, z, 3, 3), (top,)
    c_in = top
    for i in reversed(range(n)):
        for p in ("gamma", "beta"):
            out[f"decoder.adaptive.{i}.{p}.weight"], out[f"decoder.adaptive.{i}.{p}.bias"] = (c_in, z), (c_in,)
        for j in range(blocks):
            res(f"decoder.up.{i}.block.{j}", c_in, widths[i])
            c_in = widths[i]
        if i > 0:
            out[f"decoder.up.{i}.upsample.conv1.weight"] = (4 * c_in, c_in, 3, 3)
            out[f"decoder.up.{i}.upsample.conv1.bias"] = (4 * c_in,)
    norm("decoder.norm_out", widths[0])
    out["decoder.conv_out.weight"], out["decoder.conv_out.bias"] = (3, widths[0], 3, 3), (3,)
    return out


def official_discriminator_layout(ndf: int = 64) -> dict[str, Shape]:
    """docs/llamagen.md#discriminator-and-gan-loss: ``main.{0,2,3,5,6,8,9,11}``."""
    out: dict[str, Shape] = {"main.0.weight": (ndf, 3, 4, 4), "main.0.bias": (ndf,),
                             "main.11.weight": (1, 8 * ndf, 4, 4), "main.11.bias": (1,)}
    for conv, bn, i, o in ((2, 3, ndf, 2 * ndf), (5, 6, 2 * ndf, 4 * ndf), (8, 9, 4 * ndf, 8 * ndf)):
        out[f"main.{conv}.weight"] = (o, i, 4, 4)
        for b in ("weight", "bias", "running_mean", "running_var"):
            out[f"main.{bn}.{b}"] = (o,)
        out[f"main.{bn}.num_batches_tracked"] = ()
    return out


def random_state(layout: dict[str, Shape], seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(0, 100, s, generator=g) if k.endswith("num_batches_tracked")
                else torch.randn(s, generator=g, dtype=torch.float32).to(dtype)) for k, s in layout.items()}


def meta_state(layout: dict[str, Shape]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in layout.items()}


# ------------------------------------------------ test-local quantizer stand-ins
class Codebook(nn.Module):
    """Parameter layout of the VQ quantizer (``embedding.weight``) and, optionally,
    IAR2's bare detail codebook ``embedding_second``."""

    def __init__(self, *, size: int, dim: int = 8, detail: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.embedding = nn.Embedding(size, dim)
        self.codebook_sizes = (size,) if detail is None else (size, detail)
        if detail is not None:
            self.embedding_second = nn.Parameter(torch.randn(detail, dim))


class Stateless(nn.Module):
    """LFQ holds no persistent state (docs/checkpoints.md#open-magvit2-tokenizer)."""

    dim = 18
    codebook_sizes = (2 ** 18,)


def llamagen(preset="tiny", size=32, detail=None):
    return lg.llamagen_vq_tokenizer(preset=preset, quantizer=Codebook(size=size, detail=detail))


def tiny_llamagen_layout(**kw):
    kw.setdefault("codebook", 32)
    cfg = lg.LLAMAGEN_VQ_PRESETS["tiny"]
    return official_llamagen_vq_layout(ch=cfg["ch"], ch_mult=cfg["ch_mult"], z=cfg["z_channels"], dim=8,
                                       enc_blocks=cfg["encoder_res_blocks"], dec_blocks=cfg["decoder_res_blocks"],
                                       **kw)


def tiny_omv2_layout():
    cfg = om.OPEN_MAGVIT2_PRESETS["tiny"]
    return official_open_magvit2_layout(ch=cfg["ch"], ch_mult=cfg["ch_mult"], blocks=cfg["num_res_blocks"])


def assert_state_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ====================================================== the layouts themselves
def test_llamagen_official_layout_matches_the_spec_rows():
    vq16 = official_llamagen_vq_layout()
    assert {k for k in vq16 if "nin_shortcut.weight" in k} == {
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight", "encoder.conv_blocks.4.res.0.nin_shortcut.weight",
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight", "decoder.conv_blocks.3.res.0.nin_shortcut.weight"}
    assert vq16["encoder.conv_blocks.4.res.0.nin_shortcut.weight"] == (512, 256, 1, 1)
    assert vq16["decoder.conv_blocks.3.res.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert {k for k in vq16 if ".attn." in k and k.endswith("q.weight")} == {
        "encoder.conv_blocks.4.attn.0.q.weight", "encoder.conv_blocks.4.attn.1.q.weight",
        "decoder.conv_blocks.0.attn.0.q.weight", "decoder.conv_blocks.0.attn.1.q.weight",
        "decoder.conv_blocks.0.attn.2.q.weight"}
    assert [vq16[f"decoder.conv_blocks.{k}.upsample.conv.weight"][0] for k in range(4)] == [512, 256, 256, 128]
    assert vq16["encoder.conv_out.weight"] == (256, 512, 3, 3) and vq16["quant_conv.weight"] == (8, 256, 1, 1)
    vq8 = official_llamagen_vq_layout(ch_mult=(1, 2, 2, 4))
    assert {k for k in vq8 if "nin_shortcut.weight" in k} == {
        "encoder.conv_blocks.1.res.0.nin_shortcut.weight", "encoder.conv_blocks.3.res.0.nin_shortcut.weight",
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight", "decoder.conv_blocks.3.res.0.nin_shortcut.weight"}
    assert [vq8[f"encoder.conv_blocks.{k}.downsample.conv.weight"][0] for k in range(3)] == [128, 256, 256]


def test_open_magvit2_official_layout_matches_the_spec_rows():
    l256 = official_open_magvit2_layout()
    assert [l256[f"decoder.adaptive.{i}.gamma.weight"] for i in range(5)] == [
        (128, 18), (256, 18), (256, 18), (512, 18), (512, 18)]
    assert [l256[f"decoder.up.{i}.upsample.conv1.weight"][:2] for i in range(1, 5)] == [
        (512, 128), (1024, 256), (1024, 256), (2048, 512)]
    assert {k for k in l256 if "nin_shortcut" in k} == {
        "encoder.down.2.block.0.nin_shortcut.weight", "encoder.down.4.block.0.nin_shortcut.weight",
        "decoder.up.3.block.0.nin_shortcut.weight", "decoder.up.1.block.0.nin_shortcut.weight"}
    assert "encoder.conv_in.bias" not in l256 and "decoder.conv_in.bias" in l256


@pytest.mark.parametrize("preset,layout", [
    ("vq16", dict()), ("vq8", dict(ch_mult=(1, 2, 2, 4)))])
def test_llamagen_paper_layout_maps_exactly_on_meta(preset, layout):
    with torch.device("meta"):
        tok = llamagen(preset, size=16384)
    source = meta_state(official_llamagen_vq_layout(**layout))
    _, report = tc.llamagen_vq_keymap().convert(source, tok.state_dict())
    assert report.ok, report.format("paper layout")
    assert report.dropped == ["quantize.codebook_used"]


def test_iar2_and_open_magvit2_paper_layouts_map_exactly_on_meta():
    with torch.device("meta"):
        iar2 = llamagen("vq16", size=256, detail=4096)
        omv2 = om.open_magvit2_tokenizer(preset="256", quantizer=Stateless())
        omv2_128 = om.open_magvit2_tokenizer(preset="128", quantizer=Stateless())
    src = meta_state(official_llamagen_vq_layout(codebook=256, detail_codebook=4096))
    _, report = tc.iar2_vq_keymap().convert(src, iar2.state_dict())
    assert report.ok and sorted(report.dropped) == ["quantize.codebook_used", "quantize.codebook_used2"]
    for tok, mult in ((omv2, (1, 1, 2, 2, 4)), (omv2_128, (1, 2, 2, 4))):
        _, report = tc.open_magvit2_keymap().convert(meta_state(official_open_magvit2_layout(ch_mult=mult)),
                                                     tok.state_dict())
        assert report.ok, report.format("paper layout")
    # EMA names map injectively at paper scale, one per parameter (no buffers in this tokenizer)
    names = tc.ema_name_map(omv2)
    assert len(names) == len(dict(omv2.named_parameters())) == len(omv2.state_dict())
    assert names["model_ema.decoderup0block0conv1weight"] == "decoder.up.0.block.0.conv1.weight"


# ============================================================ LlamaGen VQ
def test_llamagen_vq_loads_from_a_file_strictly_and_round_trips(tmp_path):
    model = random_state(tiny_llamagen_layout(), seed=1)
    ema = random_state(tiny_llamagen_layout(), seed=2)
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": model, "ema": ema, "optimizer": {}, "steps": 7,
                "args": argparse.Namespace(codebook_size=32)}, path)
    tok = llamagen()
    result = tc.load_llamagen_vq(tok, path)
    assert (result.weights, result.entry, result.dropped) == ("model", "model", ["quantize.codebook_used"])
    assert result.sha256 and len(result.sha256) == 64
    assert torch.equal(tok.quantize.embedding.weight, model["quantize.embedding.weight"])
    assert torch.equal(tok.decoder.conv_blocks[0].attn[1].proj_out.bias,
                       model["decoder.conv_blocks.0.attn.1.proj_out.bias"])
    exported = tc.export_llamagen_vq(tok)
    expected = {k: v for k, v in model.items() if k != "quantize.codebook_used"}
    assert_state_equal(exported, expected)
    again = llamagen()
    tc.load_llamagen_vq(again, {"model": exported})
    assert_state_equal(again.state_dict(), tok.state_dict())
    # upstream's strict loader needs the usage buffer: offered on export
    assert tc.export_llamagen_vq(tok, with_usage_buffers=True)["quantize.codebook_used"].shape == (65536,)
    # ema on request, or automatically when present
    assert tc.load_llamagen_vq(tok, path, which="ema").weights == "ema"
    assert torch.equal(tok.encoder.conv_in.weight, ema["encoder.conv_in.weight"])
    assert tc.load_llamagen_vq(llamagen(), {"model": model, "ema": ema}, which="auto").weights == "ema"
    with pytest.raises(CheckpointError, match="no 'ema' entry"):
        tc.load_llamagen_vq(llamagen(), {"model": model, "steps": 1}, which="ema")


@pytest.mark.parametrize("change", ["remove", "add", "reshape"])
def test_llamagen_vq_strict_failures_name_the_key(change):
    state = random_state(tiny_llamagen_layout(), seed=3)
    key = "decoder.conv_blocks.1.res.0.nin_shortcut.weight"
    if change == "remove":
        del state[key]
        expected = key
    elif change == "add":
        key = "encoder.conv_blocks.0.res.0.extra.weight"
        state[key] = torch.zeros(3)
        expected = key
    else:
        state[key] = state[key][:, :-1]
        expected = f"{key}: "
    with pytest.raises(KeyMapError) as info:
        tc.load_llamagen_vq(llamagen(), {"model": state})
    assert expected in str(info.value)
    assert {"remove": "missing", "add": "unexpected", "reshape": "shape mismatch"}[change] in str(info.value)


def test_wrong_codebook_size_and_dtype_cast():
    state = random_state(tiny_llamagen_layout(codebook=64), seed=4)
    with pytest.raises(KeyMapError, match="quantize.embedding.weight"):
        tc.load_llamagen_vq(llamagen(size=32), {"model": state})
    half = random_state(tiny_llamagen_layout(), seed=5, dtype=torch.bfloat16)  # official files may be bf16
    tok = llamagen()
    tc.load_llamagen_vq(tok, half)  # a bare state dict
    assert tok.encoder.conv_in.weight.dtype == torch.float32
    assert torch.equal(tok.encoder.conv_in.weight, half["encoder.conv_in.weight"].float())


def test_wrapper_prefixes_are_stripped():
    state = random_state(tiny_llamagen_layout(), seed=6)
    wrapped = {f"module._orig_mod.{k}": v for k, v in state.items()}
    tok = llamagen()
    tc.load_llamagen_vq(tok, {"model": wrapped})
    assert torch.equal(tok.post_quant_conv.weight, state["post_quant_conv.weight"])


# ====================================================================== IAR2
def test_iar2_vq_loads_strictly_and_round_trips(tmp_path):
    layout = tiny_llamagen_layout(codebook=16, detail_codebook=64)
    state = random_state(layout, seed=7)
    path = tmp_path / "0485000.pt"
    torch.save({"model": state, "optimizer_main": {}, "steps": 485000, "args": argparse.Namespace()}, path)
    tok = llamagen(size=16, detail=64)
    result = tc.load_iar2_vq(tok, path)
    assert sorted(result.dropped) == ["quantize.codebook_used", "quantize.codebook_used2"]
    assert torch.equal(tok.quantize.embedding_second, state["quantize.embedding_second"])
    exported = tc.export_iar2_vq(tok)
    assert_state_equal(exported, {k: v for k, v in state.items() if "codebook_used" not in k})
    again = llamagen(size=16, detail=64)
    tc.load_iar2_vq(again, exported)
    assert_state_equal(again.state_dict(), tok.state_dict())
    # the formats are distinct: the LlamaGen map rejects the detail codebook ...
    with pytest.raises(KeyMapError, match="quantize.embedding_second"):
        tc.load_llamagen_vq(llamagen(size=16), state)
    # ... and the IAR2 map requires it
    del state["quantize.embedding_second"]
    with pytest.raises(KeyMapError, match="missing.*quantize.embedding_second"):
        tc.load_iar2_vq(llamagen(size=16, detail=64), state)


# ============================================================== Open-MAGVIT2
def _lightning_container(seed: int = 8) -> tuple[dict, dict, dict]:
    tok = om.open_magvit2_tokenizer(preset="tiny", quantizer=Stateless())
    raw = random_state(tiny_omv2_layout(), seed=seed)
    ema_values = random_state(tiny_omv2_layout(), seed=seed + 1)
    flat = {"model_ema." + k.replace(".", ""): v for k, v in ema_values.items()}
    disc = {f"loss.discriminator.{k}": v for k, v in random_state(official_discriminator_layout(8), seed).items()}
    sd = {**raw, **flat, **disc,
          "loss.perceptual_loss.net.slice1.0.weight": torch.zeros(64, 3, 3, 3),
          "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1),
          "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(-1),
          "model_ema.lossdiscriminatormain0weight": torch.zeros(8, 3, 4, 4)}
    assert set(raw) == set(tok.state_dict())  # sanity: the tiny preset keeps the official pattern
    return {"state_dict": sd, "epoch": 3, "global_step": 100}, raw, flat


def test_open_magvit2_raw_and_ema_weights_load_strictly_and_round_trip(tmp_path):
    container, raw, flat = _lightning_container()
    path = tmp_path / "imagenet_256_L.ckpt"
    torch.save(container, path)
    tok = om.open_magvit2_tokenizer(preset="tiny", quantizer=Stateless())
    result = tc.load_open_magvit2_tokenizer(tok, path, which="model")
    assert (result.weights, result.entry) == ("model", "state_dict")
    assert all(k.startswith(("loss.", "model_ema.")) for k in result.dropped)
    assert_state_equal(tok.state_dict(), raw)
    assert_state_equal(tc.export_open_magvit2_tokenizer(tok), raw)

    ema_tok = om.open_magvit2_tokenizer(preset="tiny", quantizer=Stateless())
    result = tc.load_open_magvit2_tokenizer(ema_tok, container, which="auto")
    assert result.weights == "ema"
    assert torch.equal(ema_tok.decoder.up[1].upsample.conv1.weight, flat["model_ema.decoderup1upsampleconv1weight"])
    exported = tc.export_open_magvit2_tokenizer(ema_tok, which="ema")
    assert_state_equal(exported, flat)
    again = om.open_magvit2_tokenizer(preset="tiny", quantizer=Stateless())
    tc.load_open_magvit2_tokenizer(again, {"state_dict": exported}, which="ema")
    assert_state_equal(again.state_dict(), ema_tok.state_dict())

    no_ema = {k: v for k, v in raw.items()}
    with pytest.raises(CheckpointError, match="no EMA weights"):
        tc.load_open_magvit2_tokenizer(again, no_ema, which="ema")
    assert tc.load_open_magvit2_tokenizer(again, no_ema, which="auto").weights == "model"


@pytest.mark.parametrize("which", ["model", "ema"])
@pytest.mark.parametrize("change", ["remove", "add", "reshape"])
def test_open_magvit2_strict_failures_name_the_key(which, change):
    container, raw, flat = _lightning_container()
    sd = container["state_dict"]
    key = "decoder.adaptive.1.gamma.weight" if which == "model" else "model_ema.decoderadaptive1gammaweight"
    if change == "remove":
        del sd[key]
        expected = "decoder.adaptive.1.gamma.weight"  # reported under the arforge name it should fill
    elif change == "add":
        key = "decoder.adaptive.9.gamma.weight" if which == "model" else "model_ema.decoderadaptive9gammaweight"
        sd[key] = torch.zeros(4, 18)
        expected = key
    else:
        sd[key] = torch.zeros(5, 18)
        expected = key
    tok = om.open_magvit2_tokenizer(preset="tiny", quantizer=Stateless())
    with pytest.raises(KeyMapError) as info:
        tc.load_open_magvit2_tokenizer(tok, container, which=which)
    assert expected in str(info.value)


def test_ema_name_map_refuses_collisions():
    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Module()
            self.a.bc = nn.Linear(1, 1, bias=False)
            self.ab = nn.Module()
            self.ab.c = nn.Linear(1, 1, bias=False)

    with pytest.raises(KeyMapError, match="not injective"):
        tc.ema_name_map(Clash())


# ============================================================== discriminator
def test_discriminator_loads_from_both_layouts():
    disc_state = random_state(official_discriminator_layout(8), seed=9)
    d = patchgan_discriminator(preset="tiny")
    tc.load_patchgan_discriminator(d, {"model": {}, "discriminator": disc_state})
    assert_state_equal(d.state_dict(), disc_state)
    container, _, _ = _lightning_container(seed=10)
    d2 = patchgan_discriminator(preset="tiny")
    tc.load_patchgan_discriminator(d2, container, layout="open_magvit2")
    assert torch.equal(d2.main[3].running_var, container["state_dict"]["loss.discriminator.main.3.running_var"])
    with pytest.raises(CheckpointError, match="no 'discriminator' entry"):
        tc.load_patchgan_discriminator(d, {"model": {}})
