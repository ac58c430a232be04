"""Parity with the reference code, on outputs the reference code itself produced.

``tests/fixtures/parity/<family>/`` holds upstream checkpoints in every official
container (written by ``tools/make_parity_fixtures.py`` from the upstream
repositories; see its README) and what the upstream code computed with them.
These tests need no upstream code: they load every file as a user would, through
``official_sample.gin``'s bindings, the registered ``loaders.official_*``, and
``tools/convert_checkpoint.py`` -> ``loaders.arforge_checkpoint``, and compare.

Tolerances, per op chain:
* logits: fp32 matmuls, RMSNorm and RoPE in a different (fused) order from upstream;
  errors stay at a few ulps of the largest logit, asserted at 1e-5 of it;
* token ids (tokenizer and sampler): exact. The sampler runs at top_k = 1, and the
  fixture records the smallest top-1/top-2 gap it met (>= 4e-5 of logits of order 1),
  well above the logit error;
* reconstructions: with ``exact_ops`` (upstream's x*sigmoid(x) and bmm+softmax) only the
  conv/GroupNorm kernels' summation order differs: 1e-5 of the image range; with the
  fast default ops, 1e-4;
* sampled images in the launch file's uint8 npz: within one grey level of the
  fixture's float images (rounding can flip at a .5 boundary).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import gin
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from arforge import launch
from arforge.checkpoint import CheckpointError
from arforge.guidance import GuidedBatch, combine_cfg
from arforge.keymap import KeyMapError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "parity"
FAMILIES = ("llamagen", "iar2", "open_magvit2")
#: (AR loader, tokenizer loader, convert_checkpoint formats)
LOADERS = {
    "llamagen": ("official_llamagen_gpt", "official_llamagen_vq", "llamagen_gpt", "llamagen_vq"),
    "iar2": ("official_iar2_gpt", "official_iar2_vq", "iar2_gpt", "iar2_vq"),
    "open_magvit2": ("official_open_magvit2_ar", "official_open_magvit2_tokenizer", "open_magvit2_ar",
                     "open_magvit2_tokenizer"),
}
#: the sub-token names of each family's fixture arrays
SUBTOKENS = {"llamagen": [""], "iar2": [".semantic", ".detail"], "open_magvit2": [".pre", ".post"]}
LOGIT_RTOL = 1e-5


@functools.lru_cache(maxsize=None)
def fixture(family: str) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = FIXTURES / family
    return json.loads((folder / "fixture.json").read_text()), load_file(str(folder / "outputs.safetensors"))


def build(family: str, extra: tuple[str, ...] = ()):
    """The modules and guidance of the family's ``official_sample.gin``, at the fixture's scale."""
    meta, _ = fixture(family)
    launch.parse(REPO / f"experiments/{family}/official_sample.gin", [*meta["bindings"], *extra])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn().eval()
    tokenizer = gin.query_parameter("%TOKENIZER").scoped_configurable_fn().eval()
    guidance = gin.query_parameter("jobs.sample.guidance").scoped_configurable_fn()
    return model, tokenizer, guidance


def loader(name: str):
    return launch.reg.get("loaders", name)


def load_model(family: str, entry: str, model):
    file, _, ema = entry.partition("#")
    kw = {"weights": "ema"} if ema else {}
    return loader(LOADERS[family][0])(module=model, checkpoint=FIXTURES / family / file, **kw)


def load_tokenizer(family: str, entry: str, tokenizer):
    file, _, ema = entry.partition("#")
    return loader(LOADERS[family][1])(module=tokenizer, checkpoint=FIXTURES / family / file,
                                      weights="ema" if ema else "model")


def fixture_subtokens(family: str, prefix: str) -> torch.Tensor:
    """(B, L, K) sub-tokens from the fixture's per-sub-token arrays."""
    _, out = fixture(family)
    return torch.stack([out[f"{prefix}{s}"] for s in SUBTOKENS[family]], dim=-1)


def assert_logits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got.double() - want.double()).abs().max().item()
    scale = want.abs().max().item()
    assert err <= LOGIT_RTOL * scale, f"{what}: max |arforge - upstream| = {err:.3g} > {LOGIT_RTOL} x {scale:.3g}"


def positions(family: str, L: int) -> torch.Tensor:
    _, out = fixture(family)
    return out["positions"] if "positions" in out else torch.arange(L)


def raw_entries(family: str, kind: str) -> list[str]:
    meta, _ = fixture(family)
    return [e for e in meta[kind] if "#" not in e]


# ============================================================= tokenizers
@pytest.mark.parametrize("family,entry", [(f, e) for f in FAMILIES for e in raw_entries(f, "tokenizer_files")])
def test_tokenizer_reconstructions_and_ids_match_upstream(family, entry):
    _, out = fixture(family)
    _, tokenizer, _ = build(family)
    load_tokenizer(family, entry, tokenizer)
    x, want = out["tokenizer.images"], out["tokenizer.reconstructions"]
    with torch.no_grad():
        fast = tokenizer(x)
        exact = tokenizer.set_exact_ops(True)(x)
    scale = want.abs().max().item()
    assert (fast.reconstruction - want).abs().max().item() <= 1e-4 * scale
    assert (exact.reconstruction - want).abs().max().item() <= 1e-5 * scale
    ids = exact.ids
    if family == "open_magvit2":  # one LFQ id per cell; upstream reports its (pre, post) bit groups
        ids = build(family)[0].factorization.split(ids)
    assert torch.equal(ids, fixture_subtokens(family, "tokenizer.ids"))


# ============================================================ AR models
@pytest.mark.parametrize("family,entry", [(f, e) for f in FAMILIES for e in raw_entries(f, "model_files")])
def test_teacher_forced_logits_match_upstream(family, entry):
    _, out = fixture(family)
    model, _, _ = build(family)
    load_model(family, entry, model)
    sub = fixture_subtokens(family, "tokenizer.ids")
    logits = model.logits_full(sub, out["ar.labels"])
    keep = positions(family, sub.shape[1])
    for k, name in enumerate(SUBTOKENS[family]):
        assert_logits(logits[k][:, keep], out[f"ar.teacher_forced_logits{name}"], f"{family} {entry} sub-token {k}")


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_logits_and_top1_tokens_match_upstream_sampler(family):
    """The KV-cached decode path with CFG, step by step, against the logits upstream's own sampler combined."""
    _, out = fixture(family)
    model, _, guidance = build(family)
    load_model(family, raw_entries(family, "model_files")[0], model)
    tokens = fixture_subtokens(family, "sample.tokens")  # (B, L, K)
    labels = out["sample.labels"]
    B, L, K = tokens.shape
    combined = [[None] * L for _ in range(K)]

    rows = GuidedBatch(guidance, batch=B)
    assert rows.guided

    def choose(k, logits, info):
        c = combine_cfg(logits, rows.scale(k, rows.info(info)))  # (B, V_k)
        combined[k][info.n] = c
        return rows.tokens(tokens[:, info.n, k])  # teacher-forced through the caches: one divergence can't hide the rest

    model.setup_caches(batch=rows.rows)
    lab = rows.labels(labels, null_class=model.null_class)
    prev = None
    with torch.no_grad():
        for n in range(L):
            prev = model.decode_step(n, prev, lab, choose, record_cls_attention=guidance.needs_cls_attention)
    keep = positions(family, L)
    for k, name in enumerate(SUBTOKENS[family]):
        got = torch.stack(combined[k], dim=1)  # (B, L, V_k)
        assert torch.equal(got.argmax(-1), tokens[..., k]), f"{family}: top-1 differs from upstream's choice"
        assert_logits(got[:, keep], out[f"sample.decode_logits{name}"], f"{family} cached decode, sub-token {k}")


@pytest.mark.parametrize("family", FAMILIES)
def test_ema_entries_load_the_ema_tensors(family):
    """``weights="ema"`` fills the module with the file's EMA tensors, not the raw ones."""
    from arforge_plugins.loaders import ar_checkpoints, tokenizer_checkpoints

    meta, _ = fixture(family)
    for entry in [e for e in meta["model_files"] if e.endswith("#ema")]:
        model, _, _ = build(family)
        load_model(family, entry, model)
        file = torch.load(FIXTURES / family / entry.split("#")[0], weights_only=False)
        exported = ar_checkpoints.export_llamagen_gpt(model)
        assert exported.keys() == file["ema"].keys()
        assert all(torch.equal(exported[k], file["ema"][k]) for k in exported)
        assert not torch.equal(exported["output.weight"], file["model"]["output.weight"])
    for entry in [e for e in meta["tokenizer_files"] if e.endswith("#ema")]:
        _, tokenizer, _ = build(family)
        load_tokenizer(family, entry, tokenizer)
        state = torch.load(FIXTURES / family / entry.split("#")[0], weights_only=False)["state_dict"]
        exported = tokenizer_checkpoints.export_open_magvit2_tokenizer(tokenizer, which="ema")
        assert exported and all(torch.equal(v, state[k]) for k, v in exported.items())


# ======================================================= launch files
@pytest.mark.parametrize("family", FAMILIES)
def test_official_sample_launch_decodes_the_upstream_images(family):
    """``arforge run experiments/<family>/official_sample.gin`` on the fixture files: upstream's images."""
    meta, out = fixture(family)
    folder = FIXTURES / family
    ar_file = folder / raw_entries(family, "model_files")[0]
    files = [f'AR_OFFICIAL = "{ar_file}"']
    if family != "open_magvit2":  # Open-MAGVIT2's AR file holds its tokenizer
        files.append(f'VQ_OFFICIAL = "{folder / raw_entries(family, "tokenizer_files")[0]}"')
    result = launch.run_file(REPO / f"experiments/{family}/official_sample.gin", [
        *meta["bindings"], *files, "jobs.sample.top_k = 1", "jobs.sample.samples_per_class = 1",
        "jobs.sample.num_classes = 2", "jobs.sample.batch_size = 2", "jobs.sample.eval_size = None",
        'launch.device = "cpu"', 'launch.precision = "fp32"'])
    data = np.load(result["path"])
    assert data["arr_1"].tolist() == out["sample.labels"].tolist()
    want = ((out["sample.images"].clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()  # float NHWC in [0, 255]
    assert data["arr_0"].shape == want.shape
    assert np.abs(data["arr_0"].astype(np.float64) - want).max() <= 1.0


# ============================================== convert -> arforge checkpoint
def _convert_module():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import convert_checkpoint
    finally:
        sys.path.remove(str(REPO / "tools"))
    return convert_checkpoint


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_checkpoint_then_arforge_loader_gives_the_same_outputs(family, tmp_path):
    convert = _convert_module().convert
    meta, out = fixture(family)
    gin_file = REPO / f"experiments/{family}/official_sample.gin"
    model_file = FIXTURES / family / raw_entries(family, "model_files")[0]
    tok_file = FIXTURES / family / raw_entries(family, "tokenizer_files")[0]
    convert(LOADERS[family][2], model_file, tmp_path / "ar", gin_file=gin_file, bindings=meta["bindings"])
    convert(LOADERS[family][3], tok_file, tmp_path / "tok", gin_file=gin_file, bindings=meta["bindings"],
            weights="model")
    model, tokenizer, _ = build(family)
    loader("arforge_checkpoint")(module=model, checkpoint=tmp_path / "ar")
    loader("arforge_checkpoint")(module=tokenizer, checkpoint=tmp_path / "tok")
    sub = fixture_subtokens(family, "tokenizer.ids")
    logits = model.logits_full(sub, out["ar.labels"])
    keep = positions(family, sub.shape[1])
    for k, name in enumerate(SUBTOKENS[family]):
        assert_logits(logits[k][:, keep], out[f"ar.teacher_forced_logits{name}"], f"{family} converted")
    with torch.no_grad():
        rec = tokenizer.set_exact_ops(True)(out["tokenizer.images"]).reconstruction
    want = out["tokenizer.reconstructions"]
    assert (rec - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    if family == "open_magvit2":  # the AR file's embedded tokenizer is written beside it
        assert (tmp_path / "ar" / "tokenizer").is_dir()


# ==================================================== altered fixtures
def _altered(family: str, file: str, tmp_path: Path, change) -> Path:
    obj = torch.load(FIXTURES / family / file, weights_only=False)
    change(obj)
    path = tmp_path / file
    torch.save(obj, path)
    return path


def _state(obj: dict) -> dict:
    return obj["model"] if "model" in obj else obj.get("state_dict", obj)


def test_renamed_key_is_named_as_in_the_official_file(tmp_path):
    def rename(obj):
        s = _state(obj)
        s["layers.1.attention.w0.weight"] = s.pop("layers.1.attention.wo.weight")

    path = _altered("llamagen", "c2i_parity.pt", tmp_path, rename)
    model, _, _ = build("llamagen")
    with pytest.raises(KeyMapError) as exc:
        loader("official_llamagen_gpt")(module=model, checkpoint=path)
    msg = str(exc.value)
    assert "unexpected (1): layers.1.attention.w0.weight" in msg
    assert "missing (1): layers.1.attention.wo.weight (arforge backbone.layers.1.attention.wo.weight)" in msg


def test_missing_key_of_an_open_magvit2_file_is_named_as_in_the_file(tmp_path):
    path = _altered("open_magvit2", "AR_16_parity.ckpt", tmp_path,
                    lambda obj: obj["state_dict"].pop("transformer.head.1.weight"))
    model, _, _ = build("open_magvit2")
    with pytest.raises(KeyMapError, match=r"missing \(1\): transformer\.head\.1\.weight \(arforge head\.head\.1"):
        loader("official_open_magvit2_ar")(module=model, checkpoint=path)


def test_reshaped_tensor_is_named_with_both_shapes(tmp_path):
    def reshape(obj):
        obj["tok_embeddings2.weight"] = obj["tok_embeddings2.weight"].reshape(2048, -1)

    path = _altered("iar2", "IAR2-parity.pth", tmp_path, reshape)
    model, _, _ = build("iar2")
    with pytest.raises(KeyMapError, match=r"tok_embeddings2\.weight: \(2048, 24\) vs embedder\.tok_embeddings2"):
        loader("official_iar2_gpt")(module=model, checkpoint=path)


@pytest.mark.parametrize("arg,value,needle", [
    ("image_size", 256, r"args\.image_size = 256 with args\.downsample_size = 16 is a 16x16 token grid "
                        r"\(256 tokens\), but the model has block_size = 64: bind 'models\.llamagen_gpt\.block_size = 256'"),
    ("num_classes", 1000, r"args\.num_classes = 1000, but the model has 10 classes"),
    ("vocab_size", 16384, r"args\.vocab_size = 16384, but the model's vocabulary is 64"),
    ("cls_token_num", 120, r"args\.cls_token_num = 120"),
])
def test_contradicting_gpt_args_are_refused_naming_the_argument(tmp_path, arg, value, needle):
    path = _altered("llamagen", "c2i_parity.pt", tmp_path, lambda obj: setattr(obj["args"], arg, value))
    model, _, _ = build("llamagen")
    with pytest.raises(CheckpointError, match=needle):
        loader("official_llamagen_gpt")(module=model, checkpoint=path)


def test_gpt_model_arg_names_the_gin_file_of_its_size():
    from arforge_plugins.loaders import ar_checkpoints
    from arforge_plugins.models import ar_presets

    with torch.device("meta"):  # the check runs before any tensor is read
        model = ar_presets.llamagen_gpt("B", block_size=576)
    with pytest.raises(CheckpointError, match=r"args\.gpt_model = 'GPT-L', but the model is size 'B' "
                                              r"\(models\.llamagen_gpt\.size\): use gin/models/llamagen_l\.gin"):
        ar_checkpoints.check_args(model, argparse.Namespace(gpt_model="GPT-L", image_size=384, downsample_size=16),
                                  "c2i_L_384.pt")
    assert (REPO / "gin/models/llamagen_l.gin").is_file()
    ar_checkpoints.check_args(model, argparse.Namespace(gpt_model="GPT-B", image_size=384, downsample_size=16),
                              "c2i_B_384.pt")  # agreeing args pass


def test_iar2_block_size_arg_is_checked(tmp_path):
    path = _altered("iar2", "IAR2-parity.pt", tmp_path, lambda obj: setattr(obj["args"], "image_size", 256))
    model, _, _ = build("iar2")
    with pytest.raises(CheckpointError, match=r"block_size = 576: bind 'models\.iar2_gpt\.block_size = 256'"):
        loader("official_iar2_gpt")(module=model, checkpoint=path)


@pytest.mark.parametrize("arg,value,needle", [
    ("vq_model", "VQ-16", r"args\.vq_model = 'VQ-16' downsamples by 16, but the tokenizer downsamples by 2: "
                          r"use tokenizers\.llamagen_vq\.preset = \"vq16\""),
    ("codebook_size", 16384, r"args\.codebook_size = 16384, but the quantizer has 64 codes: "
                             r"bind 'quantizers\.vq\.codebook_size = 16384'"),
])
def test_contradicting_vq_args_are_refused_naming_the_argument(tmp_path, arg, value, needle):
    path = _altered("llamagen", "vq_ds2_c2i.pt", tmp_path, lambda obj: setattr(obj["args"], arg, value))
    _, tokenizer, _ = build("llamagen")
    with pytest.raises(CheckpointError, match=needle):
        loader("official_llamagen_vq")(module=tokenizer, checkpoint=path)


class NotAllowed:  # a global the loaders' allow-list does not name
    pass


def test_foreign_pickle_global_is_refused_naming_it(tmp_path):
    path = _altered("llamagen", "c2i_parity.pt", tmp_path, lambda obj: obj.__setitem__("extra", NotAllowed()))
    model, _, _ = build("llamagen")
    with pytest.raises(CheckpointError, match="NotAllowed"):
        loader("official_llamagen_gpt")(module=model, checkpoint=path)
