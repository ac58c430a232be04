"""The tokenizer trainer on the bundled digits: learning, exact resume, NaN guard, IAR2 stage 2."""

from __future__ import annotations

import textwrap

import pytest
import torch

from arforge import checkpoint as ck
from arforge.data.digits import DigitsDataset
from arforge.data.extraction import local_context
from arforge.trainers.common import NonFiniteLossError
from arforge.tracking import Tracker
from arforge.trainers.tokenizer_trainer import evaluate_tokenizer, train_tokenizer
from arforge_plugins.tokenizers.llamagen_vq import llamagen_vq_tokenizer
from arforge_plugins.quantizers.lookup_free_quantization import LookupFreeQuantizer
from arforge_plugins.tokenizers.open_magvit2_tokenizer import open_magvit2_tokenizer
from arforge_plugins.quantizers.semantic_detail_quantization import SemanticDetailQuantizer
from arforge_plugins.losses.tokenizer_losses import tokenizer_loss
from arforge_plugins.quantizers.vector_quantization import VectorQuantizer


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset(split="train", image_size=16), DigitsDataset(split="val", image_size=16)


def _vq(seed=0, codebook=64):
    torch.manual_seed(seed)
    return llamagen_vq_tokenizer(quantizer=VectorQuantizer(codebook_size=codebook, dim=8), preset="tiny")


def _loss():
    return tokenizer_loss(recipe="llamagen", lpips_weight=0, gen_weight=0, disc_weight=0)


class RecordingTracker(Tracker):  # the base class no-ops what a test does not record
    def __init__(self):
        self.metrics, self.images, self.artifacts = [], [], []

    def log_metrics(self, m, step=None):
        self.metrics.append((step, dict(m)))

    def log_image(self, image, name):
        self.images.append(name)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(artifact_path)

    def log_curves(self, artifact_file="curves/training.png"):
        self.artifacts.append(artifact_file)

    def set_tags(self, tags):
        pass


@pytest.mark.coarse
def test_psnr_rises_well_above_untrained(tmp_path, digits):
    train, val = digits
    tok = _vq()
    before = evaluate_tokenizer(tok, val, device=torch.device("cpu"), max_images=64)
    tracker = RecordingTracker()
    ctx = local_context(tmp_path, tracker=tracker)
    after = train_tokenizer(ctx, tokenizer=tok, loss=_loss(), dataset=train, val_dataset=val, steps=60,
                            batch_size=16, lr=2e-3, eval_images=64, log_every=20, eval_every=30)
    assert before["psnr"] < 10
    assert after["psnr"] > before["psnr"] + 10, (before, after)
    assert after["ssim"] > 0.8 and 0 < after["usage"] <= 1
    # Validation at step 30 and once at the end (the last step's is the final one, not a second).
    assert [s for s, _ in tracker.metrics if s in (20, 30, 40, 60)] == [20, 30, 40, 60, 60]
    assert [s for s, m in tracker.metrics if "val/psnr" in m] == [30, 60]
    assert "train/loss" in tracker.metrics[0][1] and "data/skipped" in tracker.metrics[0][1]
    assert tracker.images == ["reconstructions/step_0000030.png", "reconstructions/final.png"]
    assert tracker.artifacts == ["checkpoint", "curves/training.png"]


def _train(out, steps, *, save_every=0, loss=None, seed=0, ema=None, digits=None):
    ctx = local_context(out, seed=seed)
    tok = _vq()
    train_tokenizer(ctx, tokenizer=tok, loss=loss or _loss(), dataset=digits[0], steps=steps, batch_size=8,
                    lr=1e-3, save_every=save_every, ema_decay=ema, log_every=1000, log_checkpoint=False)
    return ck.load_checkpoint(out / "checkpoints")


@pytest.mark.coarse
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, digits):
    # A GAN recipe with a discriminator exercises both optimizers and the LeCAM buffers.
    def gan_loss():
        torch.manual_seed(123)
        from arforge_plugins.losses.tokenizer_losses import patchgan_discriminator
        return tokenizer_loss(recipe="open_magvit2_256", lpips_weight=0,
                              discriminator=patchgan_discriminator(preset="tiny"))

    data32 = (DigitsDataset(split="train", image_size=32),)  # PatchGAN needs >= 32 px
    full = _train(tmp_path / "full", 6, loss=gan_loss(), ema=0.9, digits=data32)
    # "Killed" after the checkpoint at step 3: a new process resumes from it.
    part = _train(tmp_path / "part", 3, loss=gan_loss(), ema=0.9, digits=data32)
    assert part.step == 3
    resumed = _train(tmp_path / "part", 6, loss=gan_loss(), ema=0.9, digits=data32)
    assert resumed.step == 6
    for name in ("model", "ema", "loss"):
        for k, v in full.weights[name].items():
            assert torch.equal(v, resumed.weights[name][k]), (name, k)
    assert full.weights["loss"]["lecam.ema_real"].abs().sum() > 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits, monkeypatch):
    loss = _loss()
    real = loss.generator_loss
    calls = {"n": 0}

    def poisoned(**kw):
        calls["n"] += 1
        out = real(**kw)
        if calls["n"] == 5:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(loss, "generator_loss", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        _train(tmp_path, 10, save_every=2, loss=loss, digits=digits)
    assert "step 5" in str(err.value) and "step_00000004" in str(err.value)
    assert [p.name for p in ck.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002", "step_00000004"]
    good = ck.load_checkpoint(tmp_path / "checkpoints")
    assert all(torch.isfinite(v).all() for v in good.weights["model"].values())


@pytest.mark.coarse
def test_open_magvit2_lfq_tokenizer_trains(tmp_path, digits):
    torch.manual_seed(0)
    tok = open_magvit2_tokenizer(quantizer=LookupFreeQuantizer(bits=18), preset="tiny")
    ctx = local_context(tmp_path)
    loss = tokenizer_loss(recipe="open_magvit2_256", lpips_weight=0, gen_weight=0, disc_weight=0, lecam_weight=0)
    res = train_tokenizer(ctx, tokenizer=tok, loss=loss, dataset=digits[0], val_dataset=digits[1], steps=40,
                          batch_size=8, lr=2e-3, betas=(0.5, 0.9), grad_clip=None, eval_images=32,
                          log_checkpoint=False)
    assert res["psnr"] > 14 and res["usage"] > 0


def test_iar2_stage2_starts_from_stage1_and_steps_e1_every_third_iteration(tmp_path, digits, monkeypatch):
    torch.manual_seed(0)
    stage1 = llamagen_vq_tokenizer(quantizer=SemanticDetailQuantizer(semantic_codebook_size=16, detail_codebook=False),
                                   preset="tiny")
    ctx1 = local_context(tmp_path / "s1")
    loss1 = tokenizer_loss(recipe="iar2_stage1", lpips_weight=0, gen_weight=0, disc_weight=0)
    assert loss1.pixel_weight == 0.0  # IAR2 stage 1 has no pixel loss (docs/iar2.md#stage-1)
    loss1 = tokenizer_loss(recipe="iar2_stage1", lpips_weight=0, gen_weight=0, disc_weight=0, pixel_weight=1.0)
    train_tokenizer(ctx1, tokenizer=stage1, loss=loss1, dataset=digits[0], steps=4, batch_size=8, lr=1e-3,
                    log_checkpoint=False)
    s1 = ck.load_checkpoint(tmp_path / "s1" / "checkpoints").weights["model"]

    torch.manual_seed(1)
    stage2 = llamagen_vq_tokenizer(quantizer=SemanticDetailQuantizer(semantic_codebook_size=16,
                                                                     detail_codebook_size=32), preset="tiny")
    e2_init = stage2.quantize.embedding_second.detach().clone()
    snapshots = []
    orig_step = torch.optim.Adam.step

    def recording_step(self, *a, **k):
        out = orig_step(self, *a, **k)
        snapshots.append((id(self), [p.detach().clone() for g in self.param_groups for p in g["params"]]))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    loss2 = tokenizer_loss(recipe="iar2_stage2", lpips_weight=0, gen_weight=0, disc_weight=0)
    train_tokenizer(local_context(tmp_path / "s2"), tokenizer=stage2, loss=loss2, dataset=digits[0], steps=6,
                    batch_size=8, lr=1e-3, init_from=str(tmp_path / "s1" / "checkpoints"),
                    init_exclude=["quantize[.]embedding_second"], stage_cycle="iar2", log_checkpoint=False)
    monkeypatch.undo()
    steps_by_opt: dict[int, list] = {}
    for oid, params in snapshots:
        steps_by_opt.setdefault(oid, []).append(params)
    # E1's optimizer holds exactly the (16, 8) semantic codebook, E2's the (32, 8) detail codebook.
    e1_steps = [v for v in steps_by_opt.values() if len(v[0]) == 1 and v[0][0].shape == (16, 8)]
    e2_steps = [v for v in steps_by_opt.values() if len(v[0]) == 1 and v[0][0].shape == (32, 8)]
    assert len(e1_steps) == 1 and len(e2_steps) == 1
    assert len(e1_steps[0]) == 2  # iterations 2 and 5 of 0..5 are "first"
    assert len(e2_steps[0]) == 6  # E2 steps every iteration
    assert not torch.equal(e2_steps[0][0][0], e2_init)
    # Before its first step, E1 is exactly stage 1's codebook (init_from kept it).
    final = ck.load_checkpoint(tmp_path / "s2" / "checkpoints").weights["model"]
    assert final["quantize.embedding.weight"].shape == s1["quantize.embedding.weight"].shape
    # load_init carries every stage-1 weight and leaves only E2 fresh.
    from arforge.trainers.tokenizer_trainer import load_init

    fresh_model = llamagen_vq_tokenizer(quantizer=SemanticDetailQuantizer(semantic_codebook_size=16,
                                                                          detail_codebook_size=32), preset="tiny")
    fresh = load_init(fresh_model, tmp_path / "s1" / "checkpoints", exclude=["quantize[.]embedding_second"])
    assert fresh == ["quantize.embedding_second"]
    for k, v in s1.items():
        assert torch.equal(fresh_model.state_dict()[k], v), k


def test_init_from_wrong_checkpoint_is_clear(tmp_path, digits):
    _train(tmp_path / "vq", 1, digits=digits)
    tok = open_magvit2_tokenizer(quantizer=LookupFreeQuantizer(bits=18), preset="tiny")
    with pytest.raises(ck.CheckpointError, match="does not fit this tokenizer"):
        train_tokenizer(local_context(tmp_path / "x"), tokenizer=tok, loss=_loss(), dataset=digits[0], steps=1,
                        batch_size=8, init_from=str(tmp_path / "vq" / "checkpoints"))


def test_init_from_names_an_earlier_stage_by_its_outputs_path(digits):
    """IAR2's stage-2 launch file starts from "outputs:iar2/tokenizer_stage1/checkpoints"; the
    trainer resolves it in $ARFORGE_HOME like every other stage path, for the tokenizer and the
    discriminator alike."""
    from arforge import tracking

    train, _ = digits
    first = local_context(tracking.home() / "outputs" / "exp" / "stage1")
    tok1, loss1 = _vq(seed=1), tokenizer_loss(recipe="llamagen", lpips_weight=0, gen_weight=0, disc_weight=0)
    train_tokenizer(first, tokenizer=tok1, loss=loss1, dataset=train, steps=1, batch_size=8)
    tok2, loss2 = _vq(seed=2), tokenizer_loss(recipe="llamagen", lpips_weight=0, gen_weight=0, disc_weight=0)
    second = local_context(tracking.home() / "outputs" / "exp" / "stage2")
    # One step at a negligible learning rate (steps must be >= 1): stage 2 keeps stage 1's weights.
    train_tokenizer(second, tokenizer=tok2, loss=loss2, dataset=train, steps=1, batch_size=8, lr=1e-30,
                    init_from="outputs:exp/stage1/checkpoints")
    for a, b in ((tok1, tok2), (loss1, loss2)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(x.double(), y.double(), rtol=0, atol=1e-20), name


def test_gin_launch_of_tiny_tokenizer(tmp_path):
    from arforge import launch

    f = tmp_path / "tok.gin"
    f.write_text(textwrap.dedent("""
        include "base.gin"
        include "tokenizers/tiny_vq.gin"
        launch.experiment = "tok-test"
        launch.job = @jobs.train_tokenizer
        launch.device = "cpu"
        jobs.train_tokenizer.dataset = @train/datasets.digits()
        jobs.train_tokenizer.val_dataset = @val/datasets.digits()
        train/datasets.digits.split = "train"
        val/datasets.digits.split = "val"
        datasets.digits.image_size = 16
        jobs.train_tokenizer.steps = 4
        jobs.train_tokenizer.batch_size = 8
        jobs.train_tokenizer.eval_images = 16
    """))
    res = launch.run_file(f)
    assert set(res) >= {"psnr", "ssim", "usage"}
    import mlflow

    from arforge import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    run = mlflow.search_runs(experiment_names=["tok-test"], output_format="list")[0]
    assert "val/psnr" in run.data.metrics and "train/loss" in run.data.metrics
    arts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id, "reconstructions")}
    assert arts == {"reconstructions/final.png"}
