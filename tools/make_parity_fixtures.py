"""Golden parity fixtures: the reference code's own outputs, saved beside its own checkpoint files.

    python tools/make_parity_fixtures.py --llamagen ~/src/LlamaGen --iar2 ~/src/IAR2 \\
        --open-magvit2 ~/src/Open-MAGVIT2 [--out tests/fixtures/parity]

Each argument is a local checkout of the upstream repository (FoundationVision/LlamaGen,
sjtuplayer/IAR2, TencentARC/Open-MAGVIT2). The upstream modules are imported from
that folder and run; nothing of theirs is copied. For each family the tool:

1. builds the upstream tokenizer and AR model at a test scale, with every tensor
   drawn from a seeded generator (upstream zero-initialises its output heads, which
   would make every logit 0 and every comparison vacuous);
2. saves them in each container arforge's official loaders accept (trainer dicts
   with ``args`` as an ``argparse.Namespace`` and optimiser/discriminator/EMA entries,
   FSDP ``consolidated.pth`` bare dicts, Lightning checkpoints, ``module.`` /
   ``_orig_mod.`` prefixes);
3. runs the upstream code on fixed inputs and saves, in ``outputs.safetensors``:
   reconstructions and token ids of fixed images, teacher-forced logits, the
   CFG-combined logits its own KV-cached sampler computed at every step, the tokens
   that sampler chose at ``top_k = 1`` (deterministic whatever its RNG), and the
   images those tokens decode to;
4. writes ``fixture.json``: the upstream commit, the arforge gin bindings that build
   the matching modules, which loader reads which file, and the smallest top-1/top-2
   logit gap met while sampling (the margin the token comparison has).

Test scale needs these run-time shims on upstream module globals, each because
upstream hard-codes a paper-scale constant; no forward code is touched:

* LlamaGen/IAR2 VQ: ``Encoder``/``Decoder`` get ``ch=16`` (``VQModel`` hard-codes 128)
  and ``Normalize`` builds 4-group GroupNorms (hard-coded 32);
* Open-MAGVIT2 tokenizer: ``nn.GroupNorm`` in ``improved_model`` gets 4 groups (hard-coded 32);
* IAR2 sampler: ``generate`` cannot run (it passes ``sample_logits`` to ``sample``, which has no
  such argument), so the tool calls ``sample`` with the inputs ``generate`` would give it;
* IAR2 sampler: the inference window is allocated in the activations' dtype; upstream
  allocates it in bf16 (``gpt_inference.py`` ``WindowExtractor.extract``), which only
  runs under CUDA autocast. arforge follows the activations' dtype too.

Every family runs in its own interpreter because LlamaGen and IAR2 share top-level
package names (``autoregressive``, ``tokenizer``, ``utils``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
from pathlib import Path

FAMILIES = ("llamagen", "iar2", "open_magvit2")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity"
SEED = 0
NUM_CLASSES = 10
SAMPLE_LABELS = [0, 1]
#: where the IAR2 fixture keeps its logits (of the 24 x 24 grid)
IAR2_POSITIONS = [0, 1, 2, 24, 25, 48, 49, 575]


# ============================================================== shared helpers
def _commit(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _randomize(module, seed: int) -> None:
    """Every parameter from a seeded generator, at a scale that gives O(1) activations and logits."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() == 1 and ("norm" in name or name.endswith(("gamma.weight",))):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embedding" in name.lower() or "emb" in name.split(".")[-2]:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def _ema_copy(state: dict, seed: int) -> dict:
    """An EMA entry that differs from the raw weights, so a loader that picks the wrong one is caught."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: (v + 0.01 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def _empty_optimizer(module) -> dict:
    """An Adam state dict as the trainers save it (here before the first step: no moments, so it stays small)."""
    import torch

    return torch.optim.AdamW(module.parameters(), lr=1e-4).state_dict()


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


@contextlib.contextmanager
def _recording(module, name: str, record: list, pick):
    """Wrap ``module.<name>`` (the upstream sampling function) to keep the logits it was given."""
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        record.append(pick(*args, **kwargs).detach().clone())
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
    try:
        yield record
    finally:
        setattr(module, name, original)


def _gap(logits) -> float:
    """The smallest top-1 minus top-2 gap over rows: how far the argmax is from a tie."""
    import torch

    top = torch.topk(torch.stack(logits).flatten(0, -2).float(), 2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def _images(seed: int, n: int, size: int):
    import torch

    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _save(out: Path, family: str, files: dict, outputs: dict, meta: dict) -> None:
    import torch
    from safetensors.torch import save_file

    folder = out / family
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for name, obj in files.items():
        torch.save(obj, folder / name)
    save_file({k: v.contiguous() for k, v in outputs.items()}, str(folder / "outputs.safetensors"))
    (folder / "fixture.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{family}: wrote {len(files) + 2} files, {total / 1e6:.2f} MB, to {folder}")


def _vq_shims(vq_model_module) -> None:
    import torch

    original_normalize = vq_model_module.Normalize

    def normalize(in_channels, norm_type="group"):
        if norm_type == "group":
            return torch.nn.GroupNorm(num_groups=4, num_channels=in_channels, eps=1e-6, affine=True)
        return original_normalize(in_channels, norm_type)

    vq_model_module.Normalize = normalize
    vq_model_module.Encoder = functools.partial(vq_model_module.Encoder, ch=8)
    vq_model_module.Decoder = functools.partial(vq_model_module.Decoder, ch=8)


#: the test scale of the LlamaGen/IAR2 VQ: ch 8, ch_mult (1, 2), 2/3 blocks, z 16, 4 groups (2x downsampling)
VQ_TINY = dict(codebook_embed_dim=8, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2], z_channels=16, dropout_p=0.0)
#: the same as an arforge preset
VQ_PRESET = ('tokenizers.llamagen_vq.preset = {"ch": 8, "ch_mult": (1, 2), "encoder_res_blocks": 2, '
             '"decoder_res_blocks": 3, "z_channels": 16, "codebook_dim": 8, "num_groups": 4, "dropout": 0.0}')


# ==================================================================== LlamaGen
def llamagen(repo: Path, out: Path) -> None:
    import torch

    sys.path.insert(0, str(repo))
    from autoregressive.models import generate as up_generate
    from autoregressive.models import gpt as up_gpt
    from tokenizer.tokenizer_image import vq_model as up_vq

    _vq_shims(up_vq)
    V, grid, size = 64, 8, 16
    # no 65,536-entry usage buffer (256 kB): the loaders' drop of it is covered by test_tokenizer_checkpoints
    vq = up_vq.VQModel(up_vq.ModelArgs(codebook_size=V, codebook_show_usage=False, **VQ_TINY)).eval()
    _randomize(vq, SEED)
    gpt = up_gpt.Transformer(up_gpt.ModelArgs(
        dim=16, n_layer=2, n_head=2, vocab_size=V, block_size=grid * grid, num_classes=NUM_CLASSES,
        cls_token_num=1, class_dropout_prob=0.1, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
        attn_dropout_p=0.0))
    _randomize(gpt, SEED + 1)

    # ---- tokenizer outputs
    x = _images(SEED + 2, 2, size)
    with torch.no_grad():
        recon, _ = vq(x)
        _, _, (_, _, ids) = vq.encode(x)
    ids = ids.view(2, grid * grid)

    # ---- teacher-forced logits: training mode is upstream's teacher-forced path; dropout is 0 and
    # label dropout is switched off so the labels are the given ones
    gpt.train()
    gpt.cls_embedding.dropout_prob = 0.0
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        tf_logits, _ = gpt(idx=ids[:, :-1], cond_idx=labels)
    gpt.cls_embedding.dropout_prob = 0.1
    gpt.eval()
    model_state = {k: v.clone() for k, v in gpt.state_dict().items()}  # before sampling adds the caches

    # ---- upstream's KV-cached CFG sampler at top_k = 1
    cfg = 2.0
    record: list = []
    with _recording(up_generate, "sample", record, lambda logits, **kw: logits[:, -1, :]), torch.no_grad():
        tokens = up_generate.generate(gpt, torch.tensor(SAMPLE_LABELS), grid * grid, cfg_scale=cfg,
                                      cfg_interval=-1, temperature=1.0, top_k=1, top_p=1.0, sample_logits=True)
        images = vq.decode_code(tokens, shape=(len(SAMPLE_LABELS), VQ_TINY["codebook_embed_dim"], grid, grid))
    decode_logits = torch.stack(record, dim=1)  # (B, L, V): CFG-combined, one row per step

    cached_state = gpt.state_dict()  # a model saved after sampling carries its KV caches: the loader drops them
    assert any("kv_cache" in k for k in cached_state) and not any("kv_cache" in k for k in model_state)
    vq_state = vq.state_dict()
    # image_size / downsample_size is the token grid the GPT was trained on (8 x 8 here)
    gpt_args = argparse.Namespace(gpt_model="GPT-parity", gpt_type="c2i", vocab_size=V, image_size=grid * 16,
                                  downsample_size=16, num_classes=NUM_CLASSES, cls_token_num=1, dropout_p=0.1,
                                  token_dropout_p=0.1, drop_path_rate=0.0, codebook_embed_dim=8)
    vq_args = argparse.Namespace(vq_model="VQ-2", codebook_size=V, codebook_embed_dim=8, codebook_l2_norm=True,
                                 image_size=size, dropout_p=0.0)
    disc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, 2, 1))  # stands in for the PatchGAN entry the loader skips
    files = {
        "vq_ds2_c2i.pt": {"model": vq_state, "optimizer": _empty_optimizer(vq),
                          "discriminator": disc.state_dict(), "optimizer_disc": _empty_optimizer(disc),
                          "steps": 1000, "args": vq_args},
        "c2i_parity.pt": {"model": model_state, "ema": _ema_copy(model_state, SEED + 4),
                          "optimizer": _empty_optimizer(gpt), "steps": 1000, "args": gpt_args},
        "consolidated.pth": model_state,
        "c2i_parity_prefixed.pt": {"model": _prefixed(cached_state, "module._orig_mod."), "steps": 1000,
                                   "args": gpt_args},
    }
    outputs = {"tokenizer.images": x, "tokenizer.reconstructions": recon, "tokenizer.ids": ids,
               "ar.labels": labels, "ar.teacher_forced_logits": tf_logits,
               "sample.labels": torch.tensor(SAMPLE_LABELS), "sample.tokens": tokens,
               "sample.decode_logits": decode_logits, "sample.images": images}
    meta = {
        "family": "llamagen", "upstream": "FoundationVision/LlamaGen", "commit": _commit(repo),
        "bindings": [VQ_PRESET, f"quantizers.vq.codebook_size = {V}",
                     "quantizers.vq.dim = 8",
                     'models.llamagen_gpt.size = {"n_layer": 2, "n_head": 2, "dim": 16}',
                     f"models.llamagen_gpt.vocab_size = {V}", f"models.llamagen_gpt.block_size = {grid * grid}",
                     f"models.llamagen_gpt.num_classes = {NUM_CLASSES}"],
        "model_files": {"c2i_parity.pt": {"weights": "model"}, "consolidated.pth": {"weights": "model"},
                        "c2i_parity_prefixed.pt": {"weights": "model"}, "c2i_parity.pt#ema": {"weights": "ema"}},
        "tokenizer_files": {"vq_ds2_c2i.pt": {"weights": "model"}},
        "sampler": {"kind": "cfg_constant", "scale": cfg, "top_k": 1},
        "grid": grid, "image_size": size,
        "min_top2_gap": _gap(record),
    }
    _save(out, "llamagen", files, outputs, meta)


# ======================================================================== IAR2
def iar2(repo: Path, out: Path) -> None:
    import torch

    sys.path.insert(0, str(repo))
    from autoregressive.models import generate as up_generate
    from autoregressive.models import gpt_inference as up_infer
    from autoregressive.models import gpt_train as up_train
    from tokenizer.tokenizer_image import vq_model_second_stage as up_vq

    _vq_shims(up_vq)

    class _WindowDtype:  # torch as seen by gpt_inference, except that bf16 window buffers follow fp32 activations
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*shape, dtype=None, **kw):
            return torch.zeros(*shape, dtype=torch.float32 if dtype is torch.bfloat16 else dtype, **kw)

    up_infer.torch = _WindowDtype()
    S, Dv, grid, size = 256, 4096, 24, 48  # upstream's inference model hard-codes 256/4096 and a 24 x 24 grid
    vq = up_vq.VQModel(up_vq.ModelArgs(codebook_size=Dv, codebook_show_usage=False, **VQ_TINY)).eval()
    _randomize(vq, SEED)
    args = dict(dim=12, n_layer=1, n_head=1, factorized_n_layer=1, block_size=grid * grid, num_classes=NUM_CLASSES,
                cls_token_num=1, class_dropout_prob=0.1, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                attn_dropout_p=0.0)
    train_model = up_train.Transformer(up_train.ModelArgs(**args))
    _randomize(train_model, SEED + 1)
    infer_model = up_infer.Transformer(up_infer.ModelArgs(**args))
    infer_model.load_state_dict(train_model.state_dict(), strict=True)

    x = _images(SEED + 2, 2, size)
    with torch.no_grad():
        recon, _ = vq(x)
        _, _, (_, _, (sem, det)) = vq.encode(x)
    sem, det = sem.view(2, -1), det.view(2, -1)

    train_model.train()
    train_model.cls_embedding.dropout_prob = 0.0
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        (tf_sem, tf_det), _ = train_model(idx=(sem, det), cond_idx=labels)

    cfg = [[1.75, 3.0], [1.75, 3.0]]
    w_attn = 0.05
    record: list = []
    infer_model.eval()
    with _recording(up_generate, "sample_from_logits", record, lambda logits, *a, **kw: logits[:, -1, :]), \
            torch.no_grad():
        # upstream ``generate`` passes ``sample_logits`` to ``sample``, which takes no such argument and raises;
        # so ``sample`` is called as ``generate`` would call it: labels as (B, 1), then the null class appended
        cond = torch.tensor(SAMPLE_LABELS)[:, None]
        cond = torch.cat([cond, torch.full_like(cond, NUM_CLASSES)])
        s_sem, s_det = up_generate.sample(cond, infer_model, grid * grid, temperature=[1.0, 1.0], top_k=[1, 1],
                                          top_p=[1.0, 1.0], cfg_scale=cfg, w_attn=w_attn)
        B = len(SAMPLE_LABELS)
        images = vq.decode_code((s_sem.reshape(-1), s_det.reshape(-1)), shape=(B, 8, grid, grid))
    # upstream records semantic, detail, semantic, ... : (B, L, V_k) each
    decode_sem = torch.stack(record[0::2], dim=1)
    decode_det = torch.stack(record[1::2], dim=1)
    # 576 positions x 4096 detail logits would be 19 MB per array: keep the positions where the local
    # window changes shape (first rows, row starts and ends, the last cell)
    keep = torch.tensor(IAR2_POSITIONS)
    tf_sem, tf_det, decode_sem, decode_det = (t[:, keep] for t in (tf_sem, tf_det, decode_sem, decode_det))

    model_state = train_model.state_dict()
    vq_state = vq.state_dict()
    gpt_args = argparse.Namespace(gpt_model="GPT-parity", gpt_type="c2i", image_size=grid * 16, downsample_size=16,
                                  num_classes=NUM_CLASSES, cls_token_num=1, w1=1.0)
    vq_args = argparse.Namespace(vq_model="VQ-2", codebook_size=Dv, codebook_embed_dim=8, codebook_l2_norm=True,
                                 image_size=size)
    disc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, 2, 1))
    files = {
        "0485000.pt": {"model": vq_state, "optimizer_main": _empty_optimizer(vq),
                       "discriminator": disc.state_dict(), "optimizer_disc": _empty_optimizer(disc),
                       "steps": 485000, "args": vq_args},
        "IAR2-parity.pth": model_state,  # FSDP: a bare state dict
        "IAR2-parity.pt": {"model": model_state, "steps": 1000, "args": gpt_args},  # DDP trainer dict
    }
    outputs = {"tokenizer.images": x, "tokenizer.reconstructions": recon, "tokenizer.ids.semantic": sem,
               "tokenizer.ids.detail": det, "ar.labels": labels,
               "ar.teacher_forced_logits.semantic": tf_sem, "ar.teacher_forced_logits.detail": tf_det,
               "positions": keep,
               "sample.labels": torch.tensor(SAMPLE_LABELS), "sample.tokens.semantic": s_sem,
               "sample.tokens.detail": s_det, "sample.decode_logits.semantic": decode_sem,
               "sample.decode_logits.detail": decode_det, "sample.images": images}
    meta = {
        "family": "iar2", "upstream": "sjtuplayer/IAR2", "commit": _commit(repo),
        "bindings": [VQ_PRESET, f"quantizers.semantic_detail.semantic_codebook_size = {S}",
                     f"quantizers.semantic_detail.detail_codebook_size = {Dv}",
                     'models.iar2_gpt.size = {"n_layer": 1, "n_head": 1, "dim": 12, "head_layers": 1}',
                     f"models.iar2_gpt.block_size = {grid * grid}", f"models.iar2_gpt.num_classes = {NUM_CLASSES}"],
        "model_files": {"IAR2-parity.pth": {"weights": "model"}, "IAR2-parity.pt": {"weights": "model"}},
        "tokenizer_files": {"0485000.pt": {"weights": "model"}},
        "sampler": {"kind": "cfg_adaptive_attention", "sem_start": 1.75, "sem_end": 3.0, "det_start": 1.75,
                    "det_end": 3.0, "w_attn": w_attn, "top_k": 1},
        "grid": grid, "image_size": size,
        "min_top2_gap": min(_gap(record[0::2]), _gap(record[1::2])),
    }
    _save(out, "iar2", files, outputs, meta)


# ================================================================ Open-MAGVIT2
def open_magvit2(repo: Path, out: Path) -> None:
    import torch

    sys.path.insert(0, str(repo))
    from src.Open_MAGVIT2.modules.diffusionmodules import improved_model as up_model
    from src.Open_MAGVIT2.modules.transformer import gpt as up_gpt
    from src.Open_MAGVIT2.modules.vqvae import lookup_free_quantize as up_lfq

    class _Groups:  # torch.nn as seen by improved_model, with 4-group GroupNorms at test scale
        def __getattr__(self, name):
            return getattr(torch.nn, name)

        @staticmethod
        def GroupNorm(num_groups, num_channels, eps=1e-5, affine=True):
            return torch.nn.GroupNorm(4, num_channels, eps=eps, affine=affine)

    up_model.nn = _Groups()
    # 12 LFQ bits split (6, 6) keep the fixture small; the paper's (6, 12) split differs only in sizes
    bits, grid, size = (6, 6), 8, 16
    dd = dict(ch=8, out_ch=3, in_channels=3, num_res_blocks=1, z_channels=sum(bits), ch_mult=(1, 2), resolution=size)
    encoder, decoder = up_model.Encoder(**dd), up_model.Decoder(**dd)
    quantize = up_lfq.LFQ(dim=sum(bits), codebook_size=2 ** sum(bits), token_factorization=True,
                          factorized_bits=list(bits))
    tokenizer = torch.nn.ModuleDict({"encoder": encoder, "decoder": decoder, "quantize": quantize}).eval()
    _randomize(tokenizer, SEED)
    gpt = up_gpt.GPT(vocab_size=2 ** sum(bits), block_size=grid * grid, spatial_n_layer=2, n_head=2, dim=32,
                     factorized_n_layer=1, token_factorization=True, factorized_bits=list(bits), class_num=NUM_CLASSES,
                     token_drop=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, embd_pdrop=0.0)
    _randomize(gpt, SEED + 1)
    gpt.eval()

    x = _images(SEED + 2, 2, size)
    with torch.no_grad():  # lfqgan.VQModel.encode/decode: encoder -> quantize -> decoder
        h = encoder(x)
        (quant, _, (pre, post)), _ = quantize(h, return_loss_breakdown=True)
        recon = decoder(quant)
    pre, post = pre.view(2, -1), post.view(2, -1)

    labels = torch.tensor([3, 7])
    with torch.no_grad():
        (tf_pre, tf_post), _ = gpt((pre, post, labels[:, None]))

    cfg = [1.9, 2.0]
    record: list = []
    B = len(SAMPLE_LABELS)
    cond = torch.tensor(SAMPLE_LABELS)[:, None]
    cond = torch.cat([cond, torch.full_like(cond, NUM_CLASSES)])
    with _recording(up_gpt, "sample_from_logits", record, lambda logits, *a, **kw: logits[:, -1, :]), torch.no_grad():
        s_pre, s_post = up_gpt.sample_Open_MAGVIT2(cond, gpt, grid * grid, temperature=[1.0, 1.0], top_k=[1, 1],
                                                   top_p=[1.0, 1.0], token_factorization=True, cfg_scale=cfg)
        # Net2NetTransformer.decode_to_img with token factorization
        q_pre = quantize.get_codebook_entry(s_pre, (B, grid, grid, bits[0]), order="pre")
        q_post = quantize.get_codebook_entry(s_post, (B, grid, grid, bits[1]), order="post")
        images = decoder(torch.concat([q_pre, q_post], dim=1))
    decode_pre = torch.stack(record[0::2], dim=1)
    decode_post = torch.stack(record[1::2], dim=1)

    tok_state = {k: v for k, v in tokenizer.state_dict().items()}
    ema = {"model_ema." + k.replace(".", ""): v for k, v in _ema_copy(dict(tokenizer.named_parameters()),
                                                                       SEED + 3).items()}
    ema.update({"model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int)})
    lightning = {"epoch": 10, "global_step": 1000, "pytorch-lightning_version": "2.2.1",
                 "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}
    # taken after sampling, so it carries the KV caches a model saved mid-inference has: the loader drops them
    ar_state = {**_prefixed(gpt.state_dict(), "transformer."), **_prefixed(tok_state, "first_stage_model.")}
    files = {
        "imagenet_16_parity.ckpt": {**lightning, "state_dict": {**tok_state, **ema}},
        "AR_16_parity.ckpt": {**lightning, "state_dict": ar_state},
    }
    outputs = {"tokenizer.images": x, "tokenizer.reconstructions": recon, "tokenizer.ids.pre": pre,
               "tokenizer.ids.post": post, "ar.labels": labels,
               "ar.teacher_forced_logits.pre": tf_pre, "ar.teacher_forced_logits.post": tf_post,
               "sample.labels": torch.tensor(SAMPLE_LABELS), "sample.tokens.pre": s_pre, "sample.tokens.post": s_post,
               "sample.decode_logits.pre": decode_pre, "sample.decode_logits.post": decode_post,
               "sample.images": images}
    meta = {
        "family": "open_magvit2", "upstream": "TencentARC/Open-MAGVIT2", "commit": _commit(repo),
        "bindings": ['tokenizers.open_magvit2.preset = {"ch": 8, "ch_mult": (1, 2), "num_res_blocks": 1, '
                     '"z_channels": 12, "num_groups": 4}', f"quantizers.lfq.bits = {sum(bits)}",
                     'quantizers.lfq.bit_order = "lsb"',
                     'models.open_magvit2_ar.size = {"n_layer": 2, "n_head": 2, "dim": 32, "head_layers": 1}',
                     f"models.open_magvit2_ar.factorized_bits = {bits}",
                     f"models.open_magvit2_ar.block_size = {grid * grid}",
                     f"models.open_magvit2_ar.num_classes = {NUM_CLASSES}"],
        "model_files": {"AR_16_parity.ckpt": {"weights": "model"}},
        "tokenizer_files": {"imagenet_16_parity.ckpt": {"weights": "model"},
                            "imagenet_16_parity.ckpt#ema": {"weights": "ema"},
                            "AR_16_parity.ckpt": {"weights": "model"}},
        "sampler": {"kind": "cfg_constant", "scale": cfg, "top_k": 1},
        "grid": grid, "image_size": size,
        "min_top2_gap": min(_gap(record[0::2]), _gap(record[1::2])),
    }
    _save(out, "open_magvit2", files, outputs, meta)


# ======================================================================== CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llamagen", type=Path, help="a checkout of FoundationVision/LlamaGen")
    p.add_argument("--iar2", type=Path, help="a checkout of sjtuplayer/IAR2")
    p.add_argument("--open-magvit2", type=Path, help="a checkout of TencentARC/Open-MAGVIT2")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the fixture folders go (default: %(default)s)")
    p.add_argument("--family", choices=FAMILIES, help=argparse.SUPPRESS)  # one family, in this interpreter
    args = p.parse_args(argv)
    repos = {"llamagen": args.llamagen, "iar2": args.iar2, "open_magvit2": args.open_magvit2}
    if args.family:
        import torch

        torch.set_num_threads(1)  # the reference outputs are written at one thread, as the tests read them
        {"llamagen": llamagen, "iar2": iar2, "open_magvit2": open_magvit2}[args.family](repos[args.family].resolve(),
                                                                                     args.out)
        return 0
    chosen = [f for f in FAMILIES if repos[f] is not None]
    if not chosen:
        p.error("give at least one of --llamagen, --iar2, --open-magvit2")
    for fam in chosen:
        if not repos[fam].is_dir():
            p.error(f"--{fam.replace('_', '-')} {repos[fam]} is not a folder")
        flag = f"--{fam.replace('_', '-')}"
        subprocess.run([sys.executable, __file__, "--family", fam, flag, str(repos[fam]), "--out", str(args.out)],
                       check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
