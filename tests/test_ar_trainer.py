"""The AR trainer: registry-wide contract over quantizer x factorization x head, learning on
digits codes, two-process DDP equivalence, exact resume and clear errors."""

from __future__ import annotations

import math
import os

import pytest
import torch

from arforge import checkpoint as ck
from arforge import registry as reg
from arforge.ar_model import ARModel
from arforge.data.extraction import local_context
from arforge.errors import ArforgeError
from arforge.nn.llama import LlamaBackbone
from arforge.trainers.ar_trainer import train_ar

GRID = 4  # 4 x 4 tokens keep every combination cheap
DIM, HEADS = 32, 4

#: Tiny constructor arguments of the built-in plugins of the three kinds an AR model combines. A
#: registered plugin missing here brings its own through a ``tiny_args`` attribute
#: (docs/registry.md#contract-tests); one with neither fails the contract, by name.
QUANTIZER_ARGS = {"vq": dict(codebook_size=32, dim=8), "lfq": dict(bits=10),
                  "semantic_detail": dict(semantic_codebook_size=8, detail_codebook_size=16, dim=8)}


def _bit_split(*, codebook_sizes):
    if len(codebook_sizes) != 1 or codebook_sizes[0] & (codebook_sizes[0] - 1):
        return None
    bits = codebook_sizes[0].bit_length() - 1
    return dict(bits=(bits // 2, bits - bits // 2))


#: name -> f(codebook_sizes=...) -> arguments, or None where the factorization does not fit those ids
FACTORIZATION_ARGS = {
    "identity": lambda *, codebook_sizes: dict(codebook_size=codebook_sizes[0]) if len(codebook_sizes) == 1 else None,
    "bit_split": _bit_split,
    "semantic_detail": lambda *, codebook_sizes: (dict(semantic_size=codebook_sizes[0], detail_size=codebook_sizes[1])
                                                  if len(codebook_sizes) == 2 else None),
}
#: name -> f(vocab_sizes=..., dim=..., n_head=..., grid_size=...) -> arguments, or None where it does not fit
HEAD_ARGS = {
    "linear": lambda *, vocab_sizes, dim, **_: dict(dim=dim, vocab_size=vocab_sizes[0]) if len(vocab_sizes) == 1 else None,
    "next_subtoken": lambda *, vocab_sizes, dim, n_head, **_: (dict(dim=dim, n_layer=1, n_head=n_head,
                                                                    vocab_sizes=vocab_sizes)
                                                               if len(vocab_sizes) == 2 else None),
    "semantic_detail_local": lambda *, vocab_sizes, dim, n_head, grid_size: (
        dict(dim=dim, n_head=n_head, grid_size=grid_size, n_layer=1, vocab_sizes=vocab_sizes,
             rope_repeat_interleave=False) if len(vocab_sizes) == 2 else None),
}


class NoTinyArgs(LookupError):
    pass


def _tiny_args(kind, name, table, **context):
    """The tiny arguments of ``kind.name``: the built-ins' table entry, else the plugin's ``tiny_args``."""
    if name in table:
        entry = table[name]
        return entry(**context) if callable(entry) else entry
    tiny = getattr(reg.get(kind, name), "tiny_args", None)
    if tiny is None:
        raise NoTinyArgs(f"{kind}.{name}: no tiny arguments; give it a tiny_args attribute "
                         "(docs/registry.md#contract-tests)")
    return tiny(**context)


def quantizer_args(name):
    return _tiny_args("quantizers", name, QUANTIZER_ARGS)


def factorization_args(name, codebook_sizes):
    return _tiny_args("factorizations", name, FACTORIZATION_ARGS, codebook_sizes=codebook_sizes)


def head_args(name, vocab_sizes):
    return _tiny_args("heads", name, HEAD_ARGS, vocab_sizes=vocab_sizes, dim=DIM, n_head=HEADS, grid_size=GRID)


def build_model(fac, head, *, dropout=0.1, num_classes=10):
    backbone = LlamaBackbone(dim=DIM, n_layer=2, n_head=HEADS, block_size=GRID * GRID, token_dropout_p=dropout,
                             resid_dropout_p=dropout, ffn_dropout_p=dropout, final_norm=False)
    return ARModel(factorization=fac, backbone=backbone, head=head, num_classes=num_classes,
                   class_dropout_p=0.1 if dropout else 0.0)


class CodesDataset(torch.utils.data.Dataset):
    def __init__(self, codes, labels):
        self.codes, self.labels = codes, labels

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, i):
        return self.codes[i], int(self.labels[i])


def _combinations():
    """Every (quantizer, factorization, head) of registered plugins that fit together, the plugins
    registered at collection (later tests register toy plugins in this process), and the plugins
    without tiny arguments."""
    r = reg.load_plugins()
    names = {kind: r.names(kind) for kind in ("quantizers", "factorizations", "heads")}
    combos, missing = [], set()
    for q in names["quantizers"]:
        try:
            quant = r.get("quantizers", q)(**quantizer_args(q))
        except NoTinyArgs as exc:
            missing.add(str(exc))
            continue
        for f in names["factorizations"]:
            try:
                fargs = factorization_args(f, tuple(quant.codebook_sizes))
            except NoTinyArgs as exc:
                missing.add(str(exc))
                continue
            if fargs is None:
                continue
            fac = r.get("factorizations", f)(**fargs)
            for h in names["heads"]:
                try:
                    if head_args(h, tuple(fac.vocab_sizes)) is not None:
                        combos.append((q, f, h))
                except NoTinyArgs as exc:
                    missing.add(str(exc))
    return combos, names, sorted(missing)


COMBOS, REGISTERED, NO_TINY_ARGS = _combinations()


def test_contract_covers_the_published_and_new_combinations():
    assert ("vq", "identity", "linear") in COMBOS  # LlamaGen
    assert ("lfq", "bit_split", "next_subtoken") in COMBOS  # Open-MAGVIT2
    assert ("semantic_detail", "semantic_detail", "semantic_detail_local") in COMBOS  # IAR2
    assert ("lfq", "bit_split", "semantic_detail_local") in COMBOS  # no paper shipped this one
    assert len(COMBOS) >= 6


def test_every_registered_plugin_is_in_the_contract():
    """No plugin escapes the contract: each has tiny arguments and trains in some combination."""
    assert not NO_TINY_ARGS, "\n".join(NO_TINY_ARGS)
    for i, kind in enumerate(("quantizers", "factorizations", "heads")):
        untested = sorted(set(REGISTERED[kind]) - {combo[i] for combo in COMBOS})
        assert not untested, (f"{kind} {untested} fit no registered plugins of the other kinds, so no "
                              "combination trains them; their tiny_args must give sizes that fit one")


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_every_compatible_combination_builds_and_trains(combo, tmp_path):
    q, f, h = combo
    r = reg.registry()
    torch.manual_seed(0)
    quant = r.get("quantizers", q)(**quantizer_args(q))
    feats = torch.randn(12, quant.dim, GRID, GRID)
    with torch.no_grad():
        codes = quant.eval().encode(feats)  # (12, 16, S): real codes from the quantizer
    fac = r.get("factorizations", f)(**factorization_args(f, tuple(quant.codebook_sizes)))
    head = r.get("heads", h)(**head_args(h, tuple(fac.vocab_sizes)))
    model = build_model(fac, head)
    data = CodesDataset(codes, torch.arange(12) % 10)
    res = train_ar(local_context(tmp_path), model=model, dataset=data, steps=3, batch_size=4, lr=1e-3,
                   log_every=1, log_checkpoint=False)
    assert math.isfinite(res["loss"])
    assert {k for k in res if k.startswith("ce_")}, res
    sd = ck.load_checkpoint(tmp_path / "checkpoints").weights["model"]
    assert sd.keys() == model.state_dict().keys()


def _digits_codes(tmp_path):
    from arforge.data.digits import DigitsDataset
    from arforge.data.extraction import extract_codes
    from arforge.data.token_codes import TokenCodeDataset
    from arforge.trainers.tokenizer_trainer import train_tokenizer
    from arforge_plugins.tokenizers.llamagen_vq import llamagen_vq_tokenizer
    from arforge_plugins.losses.tokenizer_losses import tokenizer_loss
    from arforge_plugins.quantizers.vector_quantization import VectorQuantizer

    torch.manual_seed(0)
    tok = llamagen_vq_tokenizer(quantizer=VectorQuantizer(codebook_size=32, dim=8), preset="tiny")
    train = DigitsDataset(split="train", image_size=8)
    train_tokenizer(local_context(tmp_path / "tok"), tokenizer=tok,
                    loss=tokenizer_loss(recipe="llamagen", lpips_weight=0, gen_weight=0, disc_weight=0),
                    dataset=train, steps=40, batch_size=16, lr=2e-3, log_checkpoint=False)
    res = extract_codes(local_context(tmp_path / "x"), tokenizer=tok,
                        dataset=DigitsDataset(split="train", image_size=8, transform="to_tensor"),
                        output_dir=tmp_path / "codes", ten_crop=False, flips=False, image_size=8, batch_size=64,
                        progress=False)
    return TokenCodeDataset(root=res.output_dir)


@pytest.mark.coarse
def test_tiny_model_beats_unigram_entropy_on_digits_codes(tmp_path):
    from arforge_plugins.heads.linear_head import LinearHead
    from arforge_plugins.factorizations.token_factorizations import IdentityFactorization

    data = _digits_codes(tmp_path)
    codes = torch.stack([torch.as_tensor(data[i][0]) for i in range(len(data))])[..., 0]  # (N, 16)
    counts = torch.bincount(codes.reshape(-1), minlength=32).double()
    p = counts / counts.sum()
    unigram = float(-(p[p > 0] * p[p > 0].log()).sum())
    torch.manual_seed(0)
    model = build_model(IdentityFactorization(codebook_size=32), LinearHead(dim=DIM, vocab_size=32), dropout=0.0)
    train_ar(local_context(tmp_path / "ar"), model=model, dataset=data, steps=150, batch_size=32, lr=3e-3,
             log_every=50, log_checkpoint=False)
    model.eval()
    with torch.no_grad():
        labels = torch.as_tensor([data[i][1] for i in range(len(data))])
        loss = float(model.loss(codes[..., None], labels).total)
    assert unigram > 0.5  # the codes are not trivially constant
    assert loss < 0.6 * unigram, (loss, unigram)


def _fixed_data():
    g = torch.Generator().manual_seed(5)
    return CodesDataset(torch.randint(0, 256, (32, GRID * GRID, 1), generator=g), torch.arange(32) % 10)


def _dropout_model():
    from arforge_plugins.heads.next_subtoken_head import NextSubtokenHead
    from arforge_plugins.factorizations.token_factorizations import BitSplitFactorization

    torch.manual_seed(0)
    fac = BitSplitFactorization(bits=(3, 5))
    return build_model(fac, NextSubtokenHead(dim=DIM, n_layer=1, n_head=HEADS, vocab_sizes=fac.vocab_sizes))


class Killed(Exception):
    pass


@pytest.mark.coarse
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, monkeypatch):
    from arforge.trainers import common

    # Dropout, label dropout, EMA and a cosine schedule all have to line up after the resume.
    kwargs = dict(dataset=_fixed_data(), steps=10, batch_size=4, lr=1e-3, ema_decay=0.9, lr_schedule="cosine",
                  end_factor=0.1, save_every=4, log_checkpoint=False)
    train_ar(local_context(tmp_path / "full"), model=_dropout_model(), **kwargs)
    full = ck.load_checkpoint(tmp_path / "full" / "checkpoints")

    real_save = common.TrainLoop.save

    def save_then_die(self):
        path = real_save(self)
        if self.step == 8:
            raise Killed()  # the process dies right after its step-8 checkpoint
        return path

    monkeypatch.setattr(common.TrainLoop, "save", save_then_die)
    with pytest.raises(Killed):
        train_ar(local_context(tmp_path / "part"), model=_dropout_model(), **kwargs)
    monkeypatch.undo()
    torch.manual_seed(999)  # the new process starts from another RNG state
    train_ar(local_context(tmp_path / "part"), model=_dropout_model(), **kwargs)
    resumed = ck.load_checkpoint(tmp_path / "part" / "checkpoints")
    assert resumed.step == full.step == 10
    for name in ("model", "ema"):
        for k, v in full.weights[name].items():
            assert torch.equal(v, resumed.weights[name][k]), (name, k)


def test_resume_from_a_checkpoint_without_scheduler_state_matches_uninterrupted(tmp_path, monkeypatch):
    """Checkpoints written before the LR scheduler was saved resume exactly: the scheduler is
    placed from the checkpoint's step (a warm-up + cosine schedule, EMA on)."""
    from arforge.trainers import common

    kwargs = dict(dataset=_fixed_data(), steps=10, batch_size=4, lr=1e-3, ema_decay=0.9, lr_schedule="cosine",
                  warmup_steps=3, end_factor=0.1, save_every=4, log_checkpoint=False)
    train_ar(local_context(tmp_path / "full"), model=_dropout_model(), **kwargs)
    full = ck.load_checkpoint(tmp_path / "full" / "checkpoints")
    assert "schedulers" in full.state and full.state["schedulers"]["opt"]["last_epoch"] == 10

    real_save = common.TrainLoop.save

    def save_as_before_then_die(self):
        schedulers, self.schedulers = self.schedulers, {}
        try:
            path = real_save(self)
        finally:
            self.schedulers = schedulers
        if self.step == 8:
            raise Killed()
        return path

    monkeypatch.setattr(common.TrainLoop, "save", save_as_before_then_die)
    with pytest.raises(Killed):
        train_ar(local_context(tmp_path / "part"), model=_dropout_model(), **kwargs)
    monkeypatch.undo()
    assert not ck.load_checkpoint(tmp_path / "part" / "checkpoints").state["schedulers"]
    torch.manual_seed(999)
    train_ar(local_context(tmp_path / "part"), model=_dropout_model(), **kwargs)
    resumed = ck.load_checkpoint(tmp_path / "part" / "checkpoints")
    assert resumed.step == 10
    for name in ("model", "ema"):
        for k, v in full.weights[name].items():
            assert torch.equal(v, resumed.weights[name][k]), (name, k)


def test_codes_that_do_not_fit_are_clear_errors(tmp_path):
    from arforge_plugins.heads.linear_head import LinearHead
    from arforge_plugins.factorizations.token_factorizations import IdentityFactorization

    model = build_model(IdentityFactorization(codebook_size=32), LinearHead(dim=DIM, vocab_size=32))
    pairs = CodesDataset(torch.zeros(8, GRID * GRID, 2, dtype=torch.long), torch.zeros(8))
    with pytest.raises(ArforgeError, match="2 id component"):
        train_ar(local_context(tmp_path), model=model, dataset=pairs, steps=1, batch_size=4)
    short = CodesDataset(torch.zeros(8, 9, 1, dtype=torch.long), torch.zeros(8))
    with pytest.raises(ArforgeError, match="block_size is 16"):
        train_ar(local_context(tmp_path), model=model, dataset=short, steps=1, batch_size=4)


def test_on_the_fly_tokenisation_of_images(tmp_path):
    """Open-MAGVIT2 trains its AR model on images tokenised on the fly by the frozen tokenizer."""
    from arforge.data.digits import DigitsDataset
    from arforge_plugins.quantizers.lookup_free_quantization import LookupFreeQuantizer
    from arforge_plugins.heads.next_subtoken_head import NextSubtokenHead
    from arforge_plugins.tokenizers.open_magvit2_tokenizer import open_magvit2_tokenizer
    from arforge_plugins.factorizations.token_factorizations import BitSplitFactorization

    torch.manual_seed(0)
    tok = open_magvit2_tokenizer(quantizer=LookupFreeQuantizer(bits=18), preset="tiny")  # 2x: 8 px -> 4x4
    fac = BitSplitFactorization(bits=(6, 12))
    model = build_model(fac, NextSubtokenHead(dim=DIM, n_layer=1, n_head=HEADS, vocab_sizes=fac.vocab_sizes))
    images = DigitsDataset(split="val", image_size=8)
    res = train_ar(local_context(tmp_path), model=model, dataset=images, tokenizer=tok, steps=3, batch_size=8,
                   lr=1e-3, log_every=1, log_checkpoint=False)
    assert math.isfinite(res["loss"]) and not any(p.requires_grad for p in tok.parameters())
    with pytest.raises(ArforgeError, match="16 px images give 8x8 tokens but the model's block_size is 16"):
        train_ar(local_context(tmp_path / "x"), model=model, dataset=DigitsDataset(split="val", image_size=16),
                 tokenizer=tok, steps=1, batch_size=8)


# ------------------------------------------------------------------ speed options
class _Losses:
    """A tracker that keeps train/loss by step."""

    def __init__(self):
        self.loss: dict[int, float] = {}

    def log_metrics(self, metrics, step=None):
        if "train/loss" in metrics:
            self.loss[step] = metrics["train/loss"]

    def __getattr__(self, name):  # params, tags, artifacts: not needed here
        return lambda *a, **k: None


def _losses(tmp_path, name, *, precision="fp32", **kw) -> list[float]:
    import dataclasses

    from arforge.device import Precision
    from arforge_plugins.heads.next_subtoken_head import NextSubtokenHead
    from arforge_plugins.factorizations.token_factorizations import BitSplitFactorization

    torch.manual_seed(0)
    fac = BitSplitFactorization(bits=(3, 5))
    model = build_model(fac, NextSubtokenHead(dim=DIM, n_layer=1, n_head=HEADS, vocab_sizes=fac.vocab_sizes),
                        dropout=0.0)  # no random draws: the options must change nothing but rounding
    tracker = _Losses()
    ctx = dataclasses.replace(local_context(tmp_path / name, tracker=tracker), precision=Precision(precision))
    train_ar(ctx, model=model, dataset=_fixed_data(), steps=4, batch_size=8, lr=1e-3, log_every=1,
             log_checkpoint=False, **kw)
    return [tracker.loss[s] for s in range(1, 5)]


def test_speed_options_give_the_eager_fp32_losses_within_their_tolerances(tmp_path, monkeypatch):
    """Stated tolerances, on the mean loss of each of 4 steps (lr 1e-3; ln 256 ≈ 5.5 at the start):

    * ``compile`` (aot_eager here: dynamo's graph and AOTAutograd's backward, what inductor
      then lowers; inductor's own kernels are torch's to test) and ``fused_adamw``: the same
      arithmetic in another order, 1e-4 relative: four Adam steps move a loss by ~lr per step,
      and a reordered sum changes it by ~1e-7;
    * bf16 autocast: 8 significant bits in the matmuls, 2e-2 relative;
    * each option must change something to be worth a test, so the losses are not all identical
      bit for bit across the bf16 run.
    """
    eager = _losses(tmp_path, "eager")
    assert eager[-1] < eager[0]  # it trains
    backends, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: backends.append(kw.get("backend")) or real_compile(m, **kw))
    compiled = _losses(tmp_path, "compiled", compile="aot_eager")
    assert backends == ["aot_eager"]  # the training forward really went through torch.compile
    steps, real_step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(self.defaults["fused"])
                        or real_step(self, *a, **k))
    fused = _losses(tmp_path, "fused", fused_adamw=True)
    assert steps and all(steps)
    bf16 = _losses(tmp_path, "bf16", precision="bf16")
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert fused == pytest.approx(eager, rel=1e-4)
    assert bf16 == pytest.approx(eager, rel=2e-2) and bf16 != eager
    with pytest.raises(ArforgeError, match=r"jobs\.train_ar\.compile.*torch\.compile backend"):
        _losses(tmp_path, "bad", compile="no_such_backend")
