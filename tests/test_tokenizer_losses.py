"""Tokenizer losses (docs/llamagen.md#losses): PatchGAN, GAN objectives, LeCAM, offline LPIPS, the composer."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arforge.errors import ArforgeError
from arforge.keymap import KeyMapError
from arforge.weights import WeightsHashError, WeightsNotFoundError, find_weights
from arforge_plugins.losses import tokenizer_losses as tl


# ================================================================ discriminator
def test_patchgan_parameter_count_layout_and_output_size_on_meta():
    with torch.device("meta"):
        d = tl.patchgan_discriminator()
        logits = d(torch.empty(2, 3, 256, 256))
    assert sum(p.numel() for p in d.parameters()) == 2_765_633  # docs/llamagen.md#discriminator-and-gan-loss
    assert logits.shape == (2, 1, 30, 30)
    kinds = [type(m).__name__ for m in d.main]
    assert kinds == ["Conv2d", "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d", "BatchNorm2d",
                     "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d"]
    convs = {i: d.main[i] for i in (0, 2, 5, 8, 11)}
    assert [(c.stride[0], c.in_channels, c.out_channels, c.bias is not None) for c in convs.values()] == [
        (2, 3, 64, True), (2, 64, 128, False), (2, 128, 256, False), (1, 256, 512, False), (1, 512, 1, True)]
    keys = set(d.state_dict())
    assert {"main.3.running_mean", "main.6.running_var", "main.9.num_batches_tracked"} <= keys


def test_patchgan_initialisation_rules():
    torch.manual_seed(0)
    d = tl.patchgan_discriminator()
    w = d.main[8].weight.detach()  # 2M samples: tight statistics
    assert abs(float(w.mean())) < 1e-3 and abs(float(w.std()) - 0.02) < 1e-3
    bn = d.main[9].requires_grad_(False)
    assert abs(float(bn.weight.mean()) - 1.0) < 5e-3 and abs(float(bn.weight.std()) - 0.02) < 5e-3
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    # conv biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not N(0, 0.02)
    bound = 1 / (3 * 16) ** 0.5
    b0 = d.main[0].bias.detach().abs().max()
    assert float(b0) <= bound and float(b0) > 0.05


# ============================================================= GAN objectives
def test_gan_losses_match_hand_computations():
    real = torch.tensor([[[[2.0, 0.5], [-1.0, 1.0]]]])  # relu(1 - real) = 0, 0.5, 2, 0 -> mean 0.625
    fake = torch.tensor([[[[-2.0, 0.0], [1.0, -0.5]]]])  # relu(1 + fake) = 0, 1, 2, 0.5 -> mean 0.875
    assert float(tl.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.625 + 0.875))
    assert float(tl.hinge_g_loss(fake)) == pytest.approx(-(-2 + 0 + 1 - 0.5) / 4)
    two = torch.stack([fake[0], 2 * fake[0] + 1])  # per-image means -0.375 and 0.25
    expected = (F.softplus(torch.tensor(0.375)) + F.softplus(torch.tensor(-0.25))) / 2
    assert float(tl.non_saturating_g_loss(two)) == pytest.approx(float(expected))
    # not the per-position softplus mean
    assert float(tl.non_saturating_g_loss(two)) != pytest.approx(float(F.softplus(-two).mean()))


# ====================================================================== LeCAM
def test_lecam_updates_ema_before_the_regulariser_and_only_in_training():
    lecam = tl.LeCAM(decay=0.999)
    real = torch.tensor([0.5, 2.0, -1.0])
    fake = torch.tensor([-0.5, 1.0, -3.0])
    reg = lecam(real, fake)
    r_bar, f_bar = 0.001 * float(real.mean()), 0.001 * float(fake.mean())
    assert float(lecam.ema_real) == pytest.approx(r_bar) and float(lecam.ema_fake) == pytest.approx(f_bar)
    expected = F.relu(real - f_bar).pow(2).mean() + F.relu(r_bar - fake).pow(2).mean()
    stale = F.relu(real).pow(2).mean() + F.relu(-fake).pow(2).mean()  # with the EMAs still at 0
    assert float(reg) == pytest.approx(float(expected), rel=1e-6)
    assert abs(float(expected) - float(stale)) > 1e-5
    # persistent buffers: checkpointed and restored
    sd = lecam.state_dict()
    assert set(sd) == {"ema_real", "ema_fake"}
    fresh = tl.LeCAM()
    fresh.load_state_dict(sd)
    assert float(fresh.ema_real) == pytest.approx(r_bar)
    # eval (validation) leaves them alone
    lecam.eval()
    before = lecam.state_dict()
    lecam(real + 10, fake - 10)
    assert all(torch.equal(before[k], v) for k, v in lecam.state_dict().items())
    lecam.train()
    lecam(real, fake)
    assert float(lecam.ema_real) == pytest.approx(0.999 * r_bar + 0.001 * float(real.mean()))


def _lecam_rank(rank: int, world: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    lecam = tl.LeCAM()
    lecam(torch.full((4,), float(rank + 1)), torch.full((4,), -float(rank + 1)))
    torch.save(lecam.state_dict(), f"{out}.{rank}")
    torch.distributed.barrier()  # joining is no sync point (tests/two_ranks.py): nobody leaves early
    torch.distributed.destroy_process_group()


@pytest.mark.multirank
def test_lecam_means_are_all_reduced(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "lecam")
    mp.spawn(_lecam_rank, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in range(2):
        sd = torch.load(f"{out}.{rank}", weights_only=True)
        assert float(sd["ema_real"]) == pytest.approx(0.001 * 1.5)  # mean of the ranks' means 1 and 2
        assert float(sd["ema_fake"]) == pytest.approx(-0.001 * 1.5)


# ====================================================================== LPIPS
@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random torchvision VGG16 state dict standing in for vgg16-397923af.pth (528 MB)."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "random_vgg16.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    yield path
    path.unlink()  # 528 MB: do not leave it in pytest's kept temporary directories


@pytest.fixture(scope="module")
def vgg_lpips(vgg_file):
    return tl.LPIPS(net="vgg", backbone_path=vgg_file, verify_hash=False)


def test_missing_vgg_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(WeightsNotFoundError) as info:
        tl.LPIPS(net="vgg")
    msg = str(info.value)
    assert isinstance(info.value, ArforgeError)
    assert "vgg16-397923af.pth" in msg and "$TORCH_HOME/hub/checkpoints" in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg
    assert "backbone_path" in msg and "No Python package ships" in msg
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        tl.LPIPS(net="vgg", backbone_path=tmp_path / "nope.pth")
    with pytest.raises(WeightsNotFoundError, match="alexnet-owt-7be5be79.pth"):
        tl.LPIPS(net="alex")
    # the composer needs the file only when it uses LPIPS
    with pytest.raises(WeightsNotFoundError, match="vgg16-397923af.pth"):
        tl.tokenizer_loss(recipe="llamagen", discriminator=tl.patchgan_discriminator(preset="tiny"))


def test_lpips_builds_offline_from_a_user_file(vgg_file, vgg_lpips):
    sd = torch.load(vgg_file, weights_only=True)
    net = vgg_lpips.model.net
    state = net.state_dict()
    for n, k in ((0, 1), (7, 2), (14, 3), (21, 4), (28, 5)):  # one conv per slice
        assert torch.equal(state[f"slice{k}.{n}.weight"], sd[f"features.{n}.weight"])
        assert torch.equal(state[f"slice{k}.{n}.bias"], sd[f"features.{n}.bias"])
    assert all(not p.requires_grad for p in vgg_lpips.parameters())
    vgg_lpips.train()
    assert not vgg_lpips.model.training  # frozen: stays in eval mode
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    same = vgg_lpips(x, x)
    assert same.shape == (2,) and torch.equal(same, torch.zeros(2))
    d = vgg_lpips(x, y)
    assert (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_lpips_heads_are_the_packaged_v01_heads(vgg_lpips):
    heads = torch.load(tl.lpips_heads_path("vgg"), map_location="cpu", weights_only=True)
    assert torch.equal(vgg_lpips.model.lin2.model[1].weight, heads["lin2.model.1.weight"])


def test_lpips_is_built_without_leftover_memory(vgg_file, vgg_lpips):
    """LPIPS is allocated uninitialised (meta device): every entry must come from a file or lpips'
    constants, i.e. equal lpips' own initialised build with the same files loaded."""
    import warnings

    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True,
                                model_path=str(tl.lpips_heads_path("vgg")), verbose=False)
    tl.lpips_backbone_keymap("vgg").load_into(reference.net, torch.load(vgg_file, weights_only=True))
    ours = vgg_lpips.model.state_dict()
    assert ours.keys() == reference.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items())


def test_lpips_backbone_map_is_strict(vgg_file, vgg_lpips):
    keymap = tl.lpips_backbone_keymap("vgg")
    sd = torch.load(vgg_file, weights_only=True)
    target = vgg_lpips.model.net.state_dict()
    _, report = keymap.convert(sd, target)
    assert report.ok and all(k.startswith("classifier.") for k in report.dropped)
    assert keymap.rename("features.16.weight") == "slice4.16.weight"
    assert keymap.rename("features.30.weight") is None
    del sd["features.21.bias"]
    sd["features.15.weight"] = torch.zeros(1)  # index 15 is a MaxPool: it has no weights
    _, report = keymap.convert(sd, target)
    assert report.missing == ["features.21.bias (arforge slice4.21.bias)"]  # named as in the torchvision file
    assert report.unexpected == ["features.15.weight (-> slice3.15.weight)"]
    with pytest.raises(KeyMapError, match="slice4.21.bias"):
        keymap.load_into(vgg_lpips.model.net, sd)


def test_lpips_found_in_torch_home_and_hash_checked(vgg_file, tmp_path, monkeypatch):
    hub = tmp_path / "th" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    os.symlink(vgg_file, hub / "vgg16-397923af.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert find_weights("vgg16-397923af.pth", verify_hash=False) == hub / "vgg16-397923af.pth"
    with pytest.raises(WeightsHashError, match="397923af"):  # the random stand-in is not the real file
        find_weights("vgg16-397923af.pth", sha256_prefix="397923af")
    small = tmp_path / "w.bin"
    small.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert find_weights("w.bin", small, sha256_prefix=digest[:8]) == small


def test_alexnet_lpips_builds_offline(tmp_path):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "alex.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    lp = tl.LPIPS(net="alex", backbone_path=path, verify_hash=False)
    sd = torch.load(path, weights_only=True)
    assert torch.equal(lp.model.net.state_dict()["slice5.10.weight"], sd["features.10.weight"])
    assert torch.equal(lp.model.net.state_dict()["slice2.3.bias"], sd["features.3.bias"])
    path.unlink()  # 233 MB
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert float(lp(x, x)) == 0.0 and float(lp(x, -x)) > 0


# =================================================================== composer
class MeanAbs(nn.Module):
    """An injected perceptual stand-in: (x, y) -> (B,)."""

    def forward(self, x, y):
        return (x - y).abs().flatten(1).mean(1)


def _batch(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)
    return x, rec


def test_weight_zero_lpips_needs_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    loss = tl.tokenizer_loss(recipe="llamagen", lpips_weight=0.0,
                             discriminator=tl.patchgan_discriminator(preset="tiny"))
    assert loss.perceptual is None
    x, rec = _batch()
    out = loss.generator_loss(images=x, reconstruction=rec, global_step=1)
    assert "lpips" not in out.parts and "lpips" not in out.stats


def test_llamagen_recipe_generator_loss_by_hand():
    torch.manual_seed(0)
    disc = tl.patchgan_discriminator(preset="tiny")
    loss = tl.tokenizer_loss(recipe="llamagen", discriminator=disc, perceptual=MeanAbs())
    x, rec = _batch()
    q = {"vq": torch.tensor(0.3), "commit": torch.tensor(0.05)}
    before = loss.generator_loss(images=x, reconstruction=rec, quantizer_losses=q, global_step=19_999)
    expected_before = F.mse_loss(rec, x) + MeanAbs()(x, rec).mean() + 0.35
    torch.testing.assert_close(before.total, expected_before)
    assert "gen_adv" not in before.parts and float(before.stats["gan_weight"]) == 0.0
    after = loss.generator_loss(images=x, reconstruction=rec, quantizer_losses=q, global_step=20_000)
    expected_after = expected_before + 0.5 * (-disc(rec).mean())
    torch.testing.assert_close(after.total, expected_after)
    torch.testing.assert_close(after.total, sum(after.parts.values()))
    assert set(after.parts) == {"pixel_l2", "lpips", "gen_adv", "quant/vq", "quant/commit"}
    after.total.backward()
    assert rec.grad is not None


def test_discriminator_loss_gating_and_weights():
    torch.manual_seed(0)
    disc = tl.patchgan_discriminator(preset="tiny")
    loss = tl.tokenizer_loss(recipe="llamagen", discriminator=disc, perceptual=MeanAbs())
    x, rec = _batch()
    before = loss.discriminator_loss(images=x, reconstruction=rec, global_step=19_999)
    assert float(before.total.detach()) == 0.0 and before.total.requires_grad  # still steppable
    after = loss.discriminator_loss(images=x, reconstruction=rec, global_step=20_000)
    with torch.no_grad():
        expected = 0.5 * tl.hinge_d_loss(disc(x), disc(rec))
    torch.testing.assert_close(after.total.detach(), expected)
    after.total.backward()
    assert rec.grad is None  # the reconstruction is detached for the D step
    assert disc.main[0].weight.grad.abs().sum() > 0


def test_open_magvit2_recipe_with_lecam():
    torch.manual_seed(0)
    disc = tl.patchgan_discriminator(preset="tiny")
    loss = tl.tokenizer_loss(recipe="open_magvit2_256", discriminator=disc, perceptual=MeanAbs())
    assert loss.disc_start == 0 and loss.lecam_weight == 0.05 and loss.pixel_loss == "l1"
    x, rec = _batch()
    g = loss.generator_loss(images=x, reconstruction=rec, quantizer_losses={"commit": torch.tensor(0.1)},
                            global_step=1)
    expected = (rec - x).abs().mean() + MeanAbs()(x, rec).mean() + 0.1 * tl.non_saturating_g_loss(disc(rec)) + 0.1
    torch.testing.assert_close(g.total, expected)
    d = loss.discriminator_loss(images=x, reconstruction=rec, global_step=1)
    with torch.no_grad():
        lr, lf = disc(x), disc(rec)
        r_bar, f_bar = 0.001 * lr.mean(), 0.001 * lf.mean()
        reg = F.relu(lr - f_bar).pow(2).mean() + F.relu(r_bar - lf).pow(2).mean()
        expected_d = tl.hinge_d_loss(lr, lf) + 0.05 * reg
    torch.testing.assert_close(d.total.detach(), expected_d)
    assert set(loss.state_dict()) >= {"lecam.ema_real", "lecam.ema_fake", "discriminator.main.0.weight"}
    assert tl.tokenizer_loss(recipe="open_magvit2_128", discriminator=disc, perceptual=MeanAbs()).lecam_weight == 0.01


def test_iar2_stage1_has_explicit_zero_pixel_weight():
    loss = tl.tokenizer_loss(recipe="iar2_stage1", discriminator=tl.patchgan_discriminator(preset="tiny"),
                             perceptual=MeanAbs())
    x, rec = _batch()
    out = loss.generator_loss(images=x, reconstruction=rec, global_step=1)
    assert loss.pixel_weight == 0.0 and "pixel_l2" not in out.parts and "pixel_l2" in out.stats
    torch.testing.assert_close(out.total, MeanAbs()(x, rec).mean())
    stage2 = tl.tokenizer_loss(recipe="iar2_stage2", discriminator=tl.patchgan_discriminator(preset="tiny"),
                               perceptual=MeanAbs())
    joint = stage2.generator_loss(images=x, reconstruction=rec, global_step=1)
    semantic_only = stage2.generator_loss(images=x, reconstruction=rec, global_step=1, with_pixel_loss=False)
    assert "pixel_l2" in joint.parts and "pixel_l2" not in semantic_only.parts


def test_composer_keeps_lpips_out_of_its_state_but_moves_it(vgg_file):
    loss = tl.tokenizer_loss(recipe="llamagen", lpips_backbone_path=vgg_file, lpips_verify_hash=False,
                             discriminator=tl.patchgan_discriminator(preset="tiny"))
    assert isinstance(loss.perceptual, tl.LPIPS)
    assert not any(k.startswith(("perceptual", "_perceptual", "model.")) for k in loss.state_dict())
    assert all(not n.startswith("_perceptual") for n, _ in loss.named_parameters())
    loss.double()
    assert loss.perceptual.model.lin0.model[1].weight.dtype == torch.float64
    x, rec = _batch()
    out = loss.double().generator_loss(images=x.double(), reconstruction=x.double(), global_step=1)
    assert float(out.parts["lpips"]) == 0.0


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="pixel_loss"):
        tl.TokenizerLoss(pixel_loss="l3", lpips_weight=0)
    with pytest.raises(ValueError, match="gen_loss"):
        tl.TokenizerLoss(gen_loss="wgan", lpips_weight=0)
    with pytest.raises(ValueError, match="unknown tokenizer loss recipe"):
        tl.tokenizer_loss(recipe="magvit3")
    with pytest.raises(ValueError, match="disc_start"):
        tl.TokenizerLoss(disc_start=-1, lpips_weight=0)
