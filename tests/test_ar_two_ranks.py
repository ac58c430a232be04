"""The AR trainer on two ranks (gloo, CPU) against one: EMA under DDP and FSDP, and exact 2-rank
resume (the tokenizer trainer's are in test_tokenizer_two_ranks.py).

Runs that must agree with a one-process run (same global batch) are compared in float64:
an all-reduce sums the same per-sample gradients in another order, and Adam turns fp32
rounding of near-zero gradients into updates of up to lr on some CPUs; in fp64 the rounding
is ~1e-16. Resumed runs are compared bit for bit with uninterrupted runs of the same ranks
on the same machine: there arforge controls every op.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from arforge import checkpoint as ck
from arforge.data.extraction import local_context
from arforge.tracking import Tracker
from two_ranks import Killed, one_thread, run_on_ranks

pytestmark = pytest.mark.multirank


def _codes():
    from test_ar_trainer import _fixed_data

    return _fixed_data()


class LossTracker(Tracker):  # the base class no-ops what a test does not record
    def __init__(self):
        self.losses = []

    def log_metrics(self, m, step=None):
        if "train/loss" in m:
            self.losses.append(m["train/loss"])

    def set_tags(self, t):
        pass


def _ar_model(dropout: float):
    from test_ar_trainer import DIM, HEADS, build_model

    from arforge_plugins.heads.next_subtoken_head import NextSubtokenHead
    from arforge_plugins.factorizations.token_factorizations import BitSplitFactorization

    torch.manual_seed(0)
    fac = BitSplitFactorization(bits=(3, 5))
    model = build_model(fac, NextSubtokenHead(dim=DIM, n_layer=1, n_head=HEADS, vocab_sizes=fac.vocab_sizes,
                                              resid_dropout_p=dropout, ffn_dropout_p=dropout), dropout=dropout)
    with torch.no_grad():  # the output layers start at zero: give every matrix weights
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    return model.double()


AR_KW = dict(steps=4, lr=1e-3, ema_decay=0.5, log_every=1, log_checkpoint=False)


def _real_save():
    from arforge.trainers import common

    return common.TrainLoop.save


_REAL_SAVE = _real_save()


def _train_ar(out, *, parallel="none", batch_size, dropout=0.0, save_every=0, kill_at=None):
    from arforge.trainers import common
    from arforge.trainers.ar_trainer import train_ar

    if kill_at is not None:
        def save_then_die(self):
            path = _REAL_SAVE(self)
            if self.step == kill_at:
                raise Killed()
            return path

        common.TrainLoop.save = save_then_die
    model = _ar_model(dropout)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.manual_seed(7 + rank)  # as a launch seeds each rank (seed + rank): the ranks' streams differ
    tracker = LossTracker()
    train_ar(local_context(Path(out), tracker=tracker), model=model, dataset=_codes(), batch_size=batch_size,
             parallel=parallel, save_every=save_every, **AR_KW)
    if rank == 0:
        torch.save(tracker.losses, Path(out) / "losses.pt")


def _weights(out, name):
    return ck.load_checkpoint(out / "checkpoints").weights[name]


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if v.is_floating_point():
            assert v.dtype == torch.float64, k
            assert torch.allclose(v, b[k], rtol=0, atol=atol), (k, (v - b[k]).abs().max())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, parallel):
    """Losses, weights and EMA (sharded under FSDP, gathered into the checkpoint) equal the 1-rank run's."""
    one_thread(_train_ar, out=tmp_path / "one", batch_size=8)
    run_on_ranks(_train_ar, tmp_path, out=tmp_path / "two", parallel=parallel, batch_size=4)
    # Step 1 checks the data split (the two rank batches make the one-process batch), later steps
    # the gradient reduction; rank 0 logs the global-batch loss. A missing all-reduce or a wrong
    # split moves the weights by ~lr = 1e-3.
    one, two = torch.load(tmp_path / "one" / "losses.pt"), torch.load(tmp_path / "two" / "losses.pt")
    assert len(one) == len(two) == AR_KW["steps"]
    assert two == pytest.approx(one, rel=1e-9)
    for name in ("model", "ema"):
        _assert_close(_weights(tmp_path / "one", name), _weights(tmp_path / "two", name), atol=1e-9)
    # and the EMA is not the raw weights (decay 0.5 over 4 steps leaves them apart)
    raw, ema = _weights(tmp_path / "two", "model"), _weights(tmp_path / "two", "ema")
    assert any(not torch.allclose(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())


def _ar_resume_scenario(out, parallel):
    """In each rank's process: an uninterrupted run, a run killed after its step-2 checkpoint, its resume."""
    kw = dict(parallel=parallel, batch_size=4, dropout=0.1, save_every=2)
    _train_ar(os.path.join(out, "full"), **kw)
    try:
        _train_ar(os.path.join(out, "part"), kill_at=2, **kw)
    except Killed:
        pass
    from arforge.trainers import common

    common.TrainLoop.save = _REAL_SAVE
    rank = torch.distributed.get_rank()
    torch.manual_seed(999 + rank)  # a restarted process starts from other RNG states
    _train_ar(os.path.join(out, "part"), **kw)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ar_two_rank_resume_equals_uninterrupted_two_rank_run(tmp_path, parallel):
    """Each rank restores its own RNG streams: dropout and label dropout continue as if never stopped."""
    run_on_ranks(_ar_resume_scenario, tmp_path, out=str(tmp_path), parallel=parallel)
    assert ck.load_checkpoint(tmp_path / "part" / "checkpoints").step == 4
    for name in ("model", "ema"):
        full, resumed = _weights(tmp_path / "full", name), _weights(tmp_path / "part", name)
        assert full.keys() == resumed.keys()
        for k in full:
            assert torch.equal(full[k], resumed[k]), (name, k)
