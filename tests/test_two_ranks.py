"""Two ranks (gloo, CPU) against one: EMA under DDP and FSDP, and exact 2-rank resume for both trainers.

Runs that must agree with a one-process run (same global batch) are compared in float64:
an all-reduce sums the same per-sample gradients in another order, and Adam turns fp32
rounding of near-zero gradients into updates of up to lr on some CPUs; in fp64 the rounding
is ~1e-16. Resumed runs are compared bit for bit with uninterrupted runs of the same ranks
on the same machine: there arforge controls every op.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from arforge import checkpoint as ck
from arforge.data.extraction import local_context

GRID = 4


class Killed(Exception):
    """Stands in for a SIGKILL right after a checkpoint."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _codes():
    from test_ar_trainer import CodesDataset

    g = torch.Generator().manual_seed(5)
    return CodesDataset(torch.randint(0, 256, (32, GRID * GRID, 1), generator=g), torch.arange(32) % 10)


def _ar_model(dropout: float):
    from test_ar_trainer import DIM, HEADS, build_model

    from arforge_plugins.next_subtoken_head import NextSubtokenHead
    from arforge_plugins.token_factorizations import BitSplitFactorization

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
    train_ar(local_context(Path(out)), model=model, dataset=_codes(), batch_size=batch_size,
             parallel=parallel, save_every=save_every, **AR_KW)


def _worker(rank, world, port, fn, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.manual_seed(1000 + rank)  # a fresh process: nothing may depend on the RNG it starts with
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(**kwargs)
    except Killed:
        pass  # the "killed" run ends here on every rank, after its checkpoint
    finally:
        torch.distributed.destroy_process_group()


def _two_ranks(fn, **kwargs) -> None:
    mp.spawn(_worker, args=(2, _free_port(), fn, kwargs), nprocs=2, join=True)


def _weights(out, name):
    return ck.load_checkpoint(out / "checkpoints").weights[name]


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if v.is_floating_point():
            assert v.dtype == torch.float64, k
            assert torch.allclose(v, b[k], rtol=0, atol=atol), (k, (v - b[k]).abs().max())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ar_ema_on_two_ranks_matches_one_rank(tmp_path, parallel):
    """EMA under DDP and FSDP (sharded there, gathered into the checkpoint) equals the 1-rank EMA."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_ar(tmp_path / "one", batch_size=8)
    finally:
        torch.set_num_threads(n)
    _two_ranks(_train_ar, out=tmp_path / "two", parallel=parallel, batch_size=4)
    one, two = _weights(tmp_path / "one", "ema"), _weights(tmp_path / "two", "ema")
    _assert_close(one, two, atol=1e-9)
    # and the EMA is not the raw weights (decay 0.5 over 4 steps leaves them apart)
    raw = _weights(tmp_path / "two", "model")
    assert any(not torch.allclose(raw[k], two[k]) for k in raw if raw[k].is_floating_point())


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
    _two_ranks(_ar_resume_scenario, out=str(tmp_path), parallel=parallel)
    assert ck.load_checkpoint(tmp_path / "part" / "checkpoints").step == 4
    for name in ("model", "ema"):
        full, resumed = _weights(tmp_path / "full", name), _weights(tmp_path / "part", name)
        assert full.keys() == resumed.keys()
        for k in full:
            assert torch.equal(full[k], resumed[k]), (name, k)
