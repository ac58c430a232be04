"""Trainer building blocks: EMA, decay groups, LR schedules, resumable data order, RNG state."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from arforge.trainers import common as tc


def test_ema_recurrence_and_buffers():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = tc.EMA(m, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    m(torch.randn(4, 3))  # changes BN running stats on the live model only
    ema.update(m)
    for (name, p_live) in m.named_parameters():
        expect = 0.9 * before[name] + 0.1 * p_live.detach()
        assert torch.allclose(ema.state_dict()[name], expect)
    assert torch.equal(ema.state_dict()["1.running_mean"], before["1.running_mean"])
    with pytest.raises(ValueError):
        tc.EMA(m, decay=1.0)


def _ema_test_model():
    return torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4),
                               torch.nn.Linear(4, 3, bias=False))


def _perturb(m, step):
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
    m.train()(torch.randint(0, 5, (6,)))  # moves the live model's BN running stats


def test_ema_equals_the_old_lerp_recurrence_bit_for_bit():
    """EMA (AveragedModel + get_ema_multi_avg_fn) and ShardedEMA (the same function on local
    tensors) are p_ema.lerp_(p, 1 - decay) from an exact copy, to the bit; buffers keep the
    values copied at construction; the checkpoint keys are the model's own."""
    from arforge.trainers.parallel import ShardedEMA

    torch.manual_seed(0)
    m = _ema_test_model()
    decay = 0.9
    ref = {n: p.detach().clone() for n, p in m.named_parameters()}
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    ema, sharded = tc.EMA(m, decay=decay), ShardedEMA(m, decay=decay)
    assert list(ema.state_dict()) == list(m.state_dict())  # no "module." prefix, no n_averaged
    for step in range(5):
        _perturb(m, step)
        for n, p in m.named_parameters():
            ref[n].lerp_(p.detach(), 1.0 - decay)
        ema.update(m)
        sharded.update(m)
        sd = ema.state_dict()
        for n in ref:
            assert torch.equal(sd[n], ref[n]), (step, n)
            assert torch.equal(sharded.shadow[n], ref[n]), (step, n)
    for n, b in buffers.items():
        assert torch.equal(ema.state_dict()[n], b), n
    assert not torch.equal(m[2].running_mean, buffers["2.running_mean"])  # the live stats did move
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_loaded_from_a_checkpoint_keeps_averaging():
    """A resumed EMA loads today's checkpoint layout (the model's state dict) and its next
    update averages, never re-copies the live weights."""
    torch.manual_seed(0)
    m = _ema_test_model()
    first = tc.EMA(m, decay=0.9)
    for step in range(3):
        _perturb(m, step)
        first.update(m)
    torch.manual_seed(1)
    resumed = tc.EMA(_ema_test_model(), decay=0.9)  # another start, overwritten by the load
    resumed.load_state_dict(first.state_dict())
    assert int(resumed.averaged.n_averaged) >= 1
    _perturb(m, 3)
    first.update(m)
    resumed.update(m)
    for n, v in first.state_dict().items():
        assert torch.equal(resumed.state_dict()[n], v), n
    assert not torch.equal(resumed.state_dict()["1.weight"], m[1].weight.detach())
    with pytest.raises(RuntimeError, match="Missing key"):
        resumed.load_state_dict({k: v for k, v in first.state_dict().items() if k != "1.bias"})


_SCHEDULES = [tc.Schedule(),
              tc.Schedule(kind="step", milestones=(3, 7, 7, 12), gamma=0.1),
              tc.Schedule(kind="cosine", total_steps=20, warmup_steps=4, end_factor=1 / 3),
              tc.Schedule(kind="warmup_hold_linear", total_steps=25, warmup_steps=5)]


def _opt(lrs=(3e-4, 1e-4)):
    return torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr} for lr in lrs],
                             lr=lrs[0])


@pytest.mark.parametrize("schedule", _SCHEDULES, ids=lambda s: s.kind)
def test_lambda_lr_gives_the_schedule_bit_for_bit(schedule):
    """During iteration ``it`` every group's lr is exactly base_lr * schedule(it), the value the
    trainers set by hand before LambdaLR drove them (also past total_steps)."""
    opt = _opt()
    schedulers = {"opt": tc.lr_scheduler(opt, schedule)}
    for it in range(30):
        assert [g["lr"] for g in opt.param_groups] == [3e-4 * schedule(it), 1e-4 * schedule(it)], it
        opt.step()
        tc.step_schedulers(schedulers)


def test_step_schedule_is_multisteplr_up_to_rounding():
    """``step`` is MultiStepLR's schedule, computed as gamma ** k (MultiStepLR multiplies in place)."""
    s = tc.Schedule(kind="step", milestones=(3, 7, 12), gamma=0.1)
    opt = _opt((1e-3,))
    ms = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 7, 12], gamma=0.1)
    for it in range(15):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * s(it), rel=1e-12)
        opt.step()
        ms.step()


@pytest.mark.parametrize("schedule", _SCHEDULES[1:], ids=lambda s: s.kind)
def test_scheduler_state_resumes_exactly_and_old_checkpoints_derive_it(schedule):
    import io

    opt = _opt()
    sched = {"opt": tc.lr_scheduler(opt, schedule)}
    for _ in range(9):
        opt.step()
        tc.step_schedulers(sched)
    buf = io.BytesIO()
    torch.save({"schedulers": {"opt": tc.scheduler_state(sched["opt"])}, "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # the checkpoint's state file is read this way

    def resumed(state):
        opt2 = _opt()
        s2 = {"opt": tc.lr_scheduler(opt2, schedule)}
        opt2.load_state_dict(saved["opt"])
        if state is None:  # a checkpoint from before schedulers were saved: its optimizer has no initial_lr
            for g in opt2.param_groups:
                g.pop("initial_lr", None)
                g["lr"] = 123.0  # and held the previous iteration's lr
        tc.restore_scheduler(s2["opt"], state, 9)
        return opt2, s2

    for state in (saved["schedulers"]["opt"], None):
        opt2, s2 = resumed(state)
        assert s2["opt"].last_epoch == 9
        ref_opt = _opt()
        ref = {"opt": tc.lr_scheduler(ref_opt, schedule)}  # the uninterrupted run
        for _ in range(9):
            ref_opt.step()
            tc.step_schedulers(ref)
        for it in range(9, 30):
            assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in ref_opt.param_groups], it
            assert s2["opt"].get_last_lr() == [3e-4 * schedule(it), 1e-4 * schedule(it)], it
            for o, sc in ((opt2, s2), (ref_opt, ref)):
                o.step()
                tc.step_schedulers(sc)
    with pytest.raises(tc.ck.CheckpointError, match="saved at iteration 9"):
        tc.restore_scheduler(tc.lr_scheduler(_opt(), schedule), saved["schedulers"]["opt"], 8)


def test_param_groups_ndim_and_parity_rule():
    m = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    g = tc.param_groups(m, weight_decay=0.05)
    decay = {id(p) for p in g[0]["params"]}
    assert decay == {id(m[0].weight), id(m[1].weight)}
    assert g[1]["weight_decay"] == 0.0 and {id(p) for p in g[1]["params"]} == {
        id(m[1].bias), id(m[2].weight), id(m[2].bias)}
    named = torch.nn.ModuleDict({"proj": torch.nn.Linear(2, 2), "norm": torch.nn.LayerNorm(2)})
    g2 = tc.param_groups(named, weight_decay=0.05, rule="name_norm")
    assert {id(p) for p in g2[0]["params"]} == {id(named["proj"].weight), id(named["proj"].bias)}


def test_schedules():
    assert tc.Schedule()(123) == 1.0
    s = tc.Schedule(kind="step", milestones=(10, 20))
    assert [s(9), s(10), s(25)] == [1.0, pytest.approx(0.1), pytest.approx(0.01)]
    c = tc.Schedule(kind="cosine", total_steps=100, end_factor=1 / 3)
    assert c(0) == pytest.approx(1.0) and c(100) == pytest.approx(1 / 3)
    assert c(50) == pytest.approx(1 / 3 + (2 / 3) * 0.5)
    # Open-MAGVIT2 lr_wd_annealing: wp_it=10, max_it=110
    w = tc.Schedule(kind="warmup_hold_linear", total_steps=110, warmup_steps=10)
    assert w(0) == pytest.approx(0.005)
    assert w(5) == pytest.approx(0.005 + 0.995 * 0.5)
    assert w(10) == 1.0 and w(14) == 1.0  # f < 0.05 holds the peak
    assert w(109) == pytest.approx(0.1)  # linear to wpe at the last iteration
    f = (60 - 10) / (110 - 1 - 10)
    assert w(60) == pytest.approx(0.1 + 0.9 * (1 - f) / 0.95)
    with pytest.raises(ValueError, match="unknown LR schedule"):
        tc.Schedule(kind="poly")


def test_resumable_sampler_matches_uninterrupted():
    full = tc.ResumableSampler(20, seed=3)
    full.set_epoch(2)
    order = list(full)
    part = tc.ResumableSampler(20, seed=3)
    part.set_epoch(2, start=7)
    assert list(part) == order[7:]
    a, b = (tc.ResumableSampler(20, seed=3, rank=r, world_size=2) for r in (0, 1))
    a.set_epoch(2)
    b.set_epoch(2)
    assert sorted(list(a) + list(b)) == sorted(order) and not set(a) & set(b)


def test_infinite_loader_resume_sees_same_batches():
    data = torch.utils.data.TensorDataset(torch.arange(10))
    ref = tc.InfiniteLoader(data, batch_size=3, seed=1)
    seq = [next(ref)[0].tolist() for _ in range(7)]  # crosses epoch boundaries (3 batches/epoch)
    first = tc.InfiniteLoader(data, batch_size=3, seed=1)
    got = [next(first)[0].tolist() for _ in range(4)]
    resumed = tc.InfiniteLoader(data, batch_size=3, seed=1)
    resumed.load_state(first.state())
    got += [next(resumed)[0].tolist() for _ in range(3)]
    assert got == seq


def test_rng_state_round_trip():
    st = tc.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    tc.set_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not math.isnan(b[2])


def _shards(tmp_path, n: int = 10):
    from PIL import Image

    from arforge.data import write_image_shards

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = tmp_path / "images" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return write_image_shards(source=tmp_path / "images", output_dir=tmp_path / "shards", max_count=3,
                              progress=False)


def test_infinite_loader_trains_on_shards_and_resumes_at_the_same_batch(tmp_path):
    """Webdataset shards are an IterableDataset: no sampler, one pass per epoch, and a resumed loader
    (re-reading the finished part of its epoch) continues with the batches and the RNG stream of an
    uninterrupted one, random crops in the main process included."""
    from arforge.data import ImageShardsDataset

    info = _shards(tmp_path)

    def loader():
        data = ImageShardsDataset(urls=info.pattern, transform="adm_train", image_size=8, shuffle_shards=True,
                                  shuffle_buffer=4, seed=5)
        return tc.InfiniteLoader(data, batch_size=3, seed=1)

    def take(lo, k):  # the images and the RNG draw that follows each batch (training consumes RNG too)
        out = []
        for _ in range(k):
            images, labels = next(lo)
            out.append((images.clone(), labels.tolist(), random.random()))
        return out

    random.seed(0)
    ref = take(loader(), 8)  # 10 samples, batches of 3: 3 per pass, so this crosses two epoch ends
    random.seed(0)
    first = loader()
    got = take(first, 4)
    state, rng = first.state(), tc.rng_state()
    assert state == {"epoch": 1, "batch_in_epoch": 1}
    resumed = loader()
    resumed.load_state(state)
    tc.set_rng_state(rng)
    got += take(resumed, 4)
    for (a, la, ra), (b, lb, rb) in zip(ref, got):
        assert torch.equal(a, b) and la == lb and ra == rb
    epoch0 = torch.cat([images for images, _, _ in ref[:3]])
    epoch1 = torch.cat([images for images, _, _ in ref[3:6]])
    assert not torch.equal(epoch0, epoch1)  # each pass is reshuffled (and re-cropped)


def test_infinite_loader_names_a_stream_shorter_than_one_batch(tmp_path):
    from arforge.data import ImageShardsDataset
    from arforge.errors import ArforgeError

    info = _shards(tmp_path, n=4)
    lo = tc.InfiniteLoader(ImageShardsDataset(urls=info.pattern, transform="adm_eval", image_size=8),
                           batch_size=5, seed=0)
    with pytest.raises(ArforgeError, match="fewer than one batch of 5"):
        next(lo)
