"""The tokenizer trainer under two-process DDP: the generator and the discriminator both match a
one-process run with the same global batch, with the GAN on from step 1 and in the IAR2 cycle
(issue 17: the discriminator and IAR2's semantic-only pass were never synchronised)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from arforge import checkpoint as ck
from arforge.data.extraction import local_context

STEPS, GLOBAL_BATCH = 3, 8


class FixedImages(torch.utils.data.Dataset):
    """16 fixed float64 images in [-1, 1] (a fixed dataset: the loader's split is the only randomness)."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.images = torch.rand(16, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0


def _models(stage_cycle):
    from arforge_plugins.llamagen_vq import llamagen_vq_tokenizer
    from arforge_plugins.semantic_detail_quantization import SemanticDetailQuantizer
    from arforge_plugins.tokenizer_losses import PatchGANDiscriminator, tokenizer_loss
    from arforge_plugins.vector_quantization import VectorQuantizer

    torch.manual_seed(0)
    quantizer = (SemanticDetailQuantizer(semantic_codebook_size=16, detail_codebook_size=32) if stage_cycle
                 else VectorQuantizer(codebook_size=64, dim=8))
    tok = llamagen_vq_tokenizer(quantizer=quantizer, preset="tiny")
    disc = PatchGANDiscriminator(input_channels=3, ndf=4, n_layers=1)
    # BatchNorm normalises over each rank's own batch, so with it a 2-rank run is by design not the
    # 1-rank run on the same global batch (upstream does not sync it either); without it the two
    # must agree, which is what checks the gradient all-reduce.
    for i, m in enumerate(disc.main):
        if isinstance(m, nn.BatchNorm2d):
            disc.main[i] = nn.Identity()
    # The GAN on from step 1 (global_step = 1 >= disc_start); LPIPS off.
    loss = tokenizer_loss(recipe="llamagen", lpips_weight=0.0, gen_weight=0.5, disc_weight=0.5, disc_start=0,
                          discriminator=disc)
    return tok.double(), loss.double()


def _train(out, stage_cycle):
    from arforge.trainers.tokenizer_trainer import train_tokenizer

    tok, loss = _models(stage_cycle)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    train_tokenizer(local_context(out), tokenizer=tok, loss=loss, dataset=FixedImages(), steps=STEPS,
                    batch_size=GLOBAL_BATCH // world, lr=1e-3, log_every=STEPS, stage_cycle=stage_cycle,
                    log_checkpoint=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, stage_cycle):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _train(out, stage_cycle)
    finally:
        torch.distributed.destroy_process_group()


# "iar2": the IAR2 stage-2 cycle, whose semantic-only pass (iteration 3 of 3) calls the unwrapped tokenizer.
@pytest.mark.parametrize("stage_cycle", [None, "iar2"])
def test_two_process_tokenizer_and_discriminator_match_one_process(tmp_path, stage_cycle):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(tmp_path / "one", stage_cycle)
    finally:
        torch.set_num_threads(n)
    out = tmp_path / "two"
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out), stage_cycle), nprocs=2, join=True)
    one = ck.load_checkpoint(tmp_path / "one" / "checkpoints").weights
    two = ck.load_checkpoint(out / "checkpoints").weights
    # Both runs see the same 8 images per step (the two rank batches make the one-process batch) and
    # average the same per-image gradients: in float64 they agree to ~1e-12 whatever the CPU's
    # kernels and thread count. A rank that steps on its own gradients moves a weight by ~lr = 1e-3
    # (Adam's step size) away from the averaged run.
    disc_keys = [k for k in one["loss"] if k.startswith("discriminator.")]
    assert disc_keys
    for name in ("loss", "model"):  # the discriminator (in "loss") first: it is where a missing sync starts
        assert one[name].keys() == two[name].keys()
        for k, v in one[name].items():
            if not v.is_floating_point():
                continue
            assert v.dtype == torch.float64, (name, k, v.dtype)
            assert torch.allclose(v, two[name][k], rtol=0, atol=1e-9), (name, k, (v - two[name][k]).abs().max())
