"""The tokenizer trainer on two ranks (gloo, CPU) under DDP and FSDP.

* Equivalence: a 2-rank run equals a 1-rank run with the same global batch, for every
  generator, discriminator and EMA weight and the LeCAM statistics, in three setups: VQ with
  the GAN, LeCAM and EMA; LFQ with its entropy losses; IAR2's stage-2 cycle (whose
  semantic-only pass calls the tokenizer past its forward). Issue 17 found the discriminator
  and the semantic-only pass unsynchronised under DDP, and the LFQ codebook-entropy gradient
  halved on two ranks.
* Resume: a 2-rank run killed after its step-2 checkpoint and rerun equals an uninterrupted
  2-rank run bit for bit (the same ranks on the same machine: arforge controls every op).

Equivalence is checked in float64: an all-reduce sums the same per-image gradients in another
order, and Adam turns fp32 rounding of near-zero gradients into updates of up to lr on some
CPUs; in fp64 the two runs agree to ~1e-12. A rank that steps on its own gradients moves a
weight by ~lr = 1e-3 (Adam's step size), so atol 1e-9 separates the two by six orders.
One spawn per parallel mode runs every setup (process start-up dominates their cost).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from arforge import checkpoint as ck
from arforge.data.extraction import local_context
from two_ranks import Killed, one_thread, run_on_ranks

pytestmark = pytest.mark.multirank

STEPS, GLOBAL_BATCH = 3, 8
SETUPS = ("vq_gan_lecam_ema", "lfq_entropy", "iar2_stage2")


class FixedImages(torch.utils.data.Dataset):
    """16 fixed float64 images in [-1, 1] (a fixed dataset: the loader's split is the only randomness)."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.images = torch.rand(16, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0


def _models(setup: str):
    from arforge_plugins.tokenizers.llamagen_vq import llamagen_vq_tokenizer
    from arforge_plugins.quantizers.lookup_free_quantization import LookupFreeQuantizer
    from arforge_plugins.tokenizers.open_magvit2_tokenizer import open_magvit2_tokenizer
    from arforge_plugins.quantizers.semantic_detail_quantization import SemanticDetailQuantizer
    from arforge_plugins.losses.tokenizer_losses import PatchGANDiscriminator, tokenizer_loss
    from arforge_plugins.quantizers.vector_quantization import VectorQuantizer

    torch.manual_seed(0)
    if setup == "lfq_entropy":
        # Open-MAGVIT2's sizes scaled down (18 bits at 256 px -> 6): the codebook entropy is a
        # global-batch statistic, the term a per-rank computation gets wrong.
        tok = open_magvit2_tokenizer(quantizer=LookupFreeQuantizer(bits=6, entropy_weight=0.1),
                                     preset=dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=6, num_groups=4))
    else:
        quantizer = (SemanticDetailQuantizer(semantic_codebook_size=16, detail_codebook_size=32)
                     if setup == "iar2_stage2" else VectorQuantizer(codebook_size=64, dim=8))
        tok = llamagen_vq_tokenizer(quantizer=quantizer, preset="tiny")
    disc = PatchGANDiscriminator(input_channels=3, ndf=4, n_layers=1)
    # BatchNorm normalises over each rank's own batch, so with it a 2-rank run is by design not the
    # 1-rank run on the same global batch (upstream does not sync it either); without it the two
    # must agree, which is what checks the gradient reduction.
    for i, m in enumerate(disc.main):
        if isinstance(m, nn.BatchNorm2d):
            disc.main[i] = nn.Identity()
    # The GAN on from step 1 (global_step = 1 >= disc_start); LPIPS off (it needs VGG weights).
    loss = tokenizer_loss(recipe="llamagen", lpips_weight=0.0, gen_weight=0.5, disc_weight=0.5, disc_start=0,
                          lecam_weight=0.1 if setup == "vq_gan_lecam_ema" else 0.0, discriminator=disc)
    return tok.double(), loss.double()


def _train(out, setup: str, parallel: str = "none", save_every: int = 0, steps: int = STEPS) -> None:
    from arforge.trainers.tokenizer_trainer import train_tokenizer

    tok, loss = _models(setup)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    # Validation (rank 0 only; under FSDP on an unsharded copy of the gathered EMA) in the VQ setup.
    val = FixedImages() if setup == "vq_gan_lecam_ema" and not save_every else None
    res = train_tokenizer(local_context(Path(out)), tokenizer=tok, loss=loss, dataset=FixedImages(), steps=steps,
                          batch_size=GLOBAL_BATCH // world, lr=1e-3, log_every=steps, parallel=parallel,
                          stage_cycle="iar2" if setup == "iar2_stage2" else None,
                          ema_decay=0.5 if setup == "vq_gan_lecam_ema" else None, val_dataset=val,
                          eval_every=1 if val is not None else 0, eval_images=8, grid_images=4,
                          save_every=save_every, log_checkpoint=False)
    if res:
        (Path(out) / "val.json").write_text(json.dumps(res))


def _real_save():
    from arforge.trainers import common

    return common.TrainLoop.save


def _resume_scenario(out: str, parallel: str) -> None:
    """An uninterrupted 4-step run, a run killed after its step-2 checkpoint, and its rerun."""
    from arforge.trainers import common

    real = _real_save()
    kw = dict(setup="vq_gan_lecam_ema", parallel=parallel, save_every=2, steps=4)
    _train(os.path.join(out, "full"), **kw)

    def save_then_die(self):
        path = real(self)
        if self.step == 2:
            raise Killed()
        return path

    common.TrainLoop.save = save_then_die
    try:
        _train(os.path.join(out, "part"), **kw)
    except Killed:
        pass
    finally:
        common.TrainLoop.save = real
    torch.manual_seed(999 + torch.distributed.get_rank())  # a restarted process starts from other RNG states
    _train(os.path.join(out, "part"), **kw)


def _all_runs(out: str, parallel: str) -> None:
    for setup in SETUPS:
        _train(os.path.join(out, setup), setup, parallel)
    _resume_scenario(os.path.join(out, "resume"), parallel)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank")
    for setup in SETUPS:
        one_thread(_train, out=out / setup, setup=setup)
    return out


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"two_ranks_{request.param}")
    run_on_ranks(_all_runs, out, out=str(out), parallel=request.param)
    return out


def _weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return ck.load_checkpoint(path / "checkpoints").weights


@pytest.mark.parametrize("setup", SETUPS)
def test_two_ranks_match_one_rank_with_the_same_global_batch(one_rank, two_ranks, setup):
    one, two = _weights(one_rank / setup), _weights(two_ranks / setup)
    assert one.keys() == two.keys() and {"model", "loss"} <= one.keys()
    assert ("ema" in one) == (setup == "vq_gan_lecam_ema")
    assert any(k.startswith("discriminator.") for k in one["loss"])
    if setup == "vq_gan_lecam_ema":
        assert float(one["loss"]["lecam.ema_real"]) != 0.0  # LeCAM ran and is part of the comparison
    moved = 0
    for name in one:  # "loss" holds the discriminator: where a missing sync starts
        assert one[name].keys() == two[name].keys(), name
        for k, v in one[name].items():
            if not v.is_floating_point():
                continue
            assert v.dtype == torch.float64, (name, k, v.dtype)
            assert torch.allclose(v, two[name][k], rtol=0, atol=1e-9), (name, k, (v - two[name][k]).abs().max())
            moved += int(name == "model" and v.numel() > 1)
    assert moved
    if setup == "vq_gan_lecam_ema":
        # Only rank 0 wrote the validation metrics of the EMA weights; they are the 1-rank ones.
        v1, v2 = (json.loads((p / setup / "val.json").read_text()) for p in (one_rank, two_ranks))
        assert v1.keys() == v2.keys() and "psnr" in v1
        assert v1 == pytest.approx(v2, rel=1e-6)


def test_two_rank_resume_equals_uninterrupted_two_rank_run(two_ranks):
    full, part = two_ranks / "resume" / "full", two_ranks / "resume" / "part"
    assert ck.load_checkpoint(part / "checkpoints").step == 4
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys() == {"model", "loss", "ema"}
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
