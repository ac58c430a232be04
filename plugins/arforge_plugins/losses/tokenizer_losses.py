"""Tokenizer training losses: PatchGAN discriminator, GAN objectives, LeCAM, LPIPS and their composer.

See docs/llamagen.md#discriminator-and-gan-loss, docs/open_magvit2.md#gan-loss-and-lecam,
docs/llamagen.md#lpips, docs/llamagen.md#loss-weights-of-the-three-tokenizers, docs/evaluation.md#lpips-weights (offline LPIPS
weights, nothing downloaded), docs/open_magvit2.md#differences-from-upstream (LeCAM
state checkpointed and synchronised) and docs/iar2.md#differences-from-upstream (IAR2
stage 1 has pixel weight 0). Sources: taming-transformers'
``NLayerDiscriminator`` (via LlamaGen ``discriminator_patchgan.py`` and
Open-MAGVIT2 ``modules/discriminator/model.py``), LlamaGen ``vq_loss.py``,
Open-MAGVIT2 ``modules/losses/vqperceptual.py``, IAR2 ``vq_loss_*_stage.py``.

``global_step`` everywhere is *iteration index + 1* (LlamaGen's
``train_steps + 1``); a GAN term is on when ``global_step >= disc_start``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from arforge.checkpoint import load_foreign, unwrap_container
from arforge.device import at_least_fp32
from arforge.interfaces import LossBreakdown
from arforge.keymap import KeyMap
from arforge.weights import find_weights


# ===================================================== 5.1 PatchGAN discriminator
class PatchGANDiscriminator(nn.Module):
    """taming-transformers' ``NLayerDiscriminator`` with BatchNorm (docs/llamagen.md#discriminator-and-gan-loss).

    ``main`` indices match the official checkpoints: convs at 0, 2, 5, 8, 11 and
    BatchNorms at 3, 6, 9 for ``n_layers`` = 3. Returns patch logits (B, 1, h', w'),
    30x30 at 256 px.
    """

    def __init__(self, *, input_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        """
        Args:
            input_channels: image channels (3).
            ndf: width of the first conv (64 in every official recipe).
            n_layers: stride-2 convs after the first (3 official); widths cap at 8*ndf.
        """
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_channels, ndf, kernel_size=4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=1, padding=1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0; conv biases keep PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


#: 2,765,633 parameters at the paper preset (docs/llamagen.md#discriminator-and-gan-loss).
DISCRIMINATOR_PRESETS: dict[str, dict[str, Any]] = {
    "patchgan": dict(input_channels=3, ndf=64, n_layers=3),
    "tiny": dict(input_channels=3, ndf=8, n_layers=3),
}


def patchgan_discriminator(*, preset: str = "patchgan") -> PatchGANDiscriminator:
    """The PatchGAN discriminator of LlamaGen, IAR2 and Open-MAGVIT2 (docs/llamagen.md#discriminator-and-gan-loss)."""
    try:
        return PatchGANDiscriminator(**DISCRIMINATOR_PRESETS[preset])
    except KeyError:
        raise ValueError(f"unknown discriminator preset {preset!r}; choose one of "
                         f"{sorted(DISCRIMINATOR_PRESETS)}") from None


# ========================================================= 5.2 GAN objectives
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = 0.5 * [mean relu(1 - D(x)) + mean relu(1 + D(x_hat))], means over batch and positions."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_adv = -mean D(x_hat) (LlamaGen, IAR2)."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_adv = mean_b softplus(-mean_hw D(x_hat)_b) (Open-MAGVIT2: BCE on spatially averaged logits)."""
    per_image = logits_fake.flatten(1).mean(dim=1)  # (B, 1, h, w) -> (B,)
    return F.softplus(-per_image).mean()


GENERATOR_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_g_loss,
    "non_saturating": non_saturating_g_loss,
}


def adopt_weight(weight: float, global_step: int, *, start: int) -> float:
    """``weight`` once ``global_step >= start``, else 0 (taming's ``adopt_weight``)."""
    return weight if global_step >= start else 0.0


# ================================================================ 5.3 LeCAM
class LeCAM(nn.Module):
    """LeCAM regulariser ("Regularizing Generative Adversarial Networks under Limited Data"), docs/open_magvit2.md#gan-loss-and-lecam.

    R = mean relu(D(x) - f_bar)^2 + mean relu(r_bar - D(x_hat))^2, where r_bar
    and f_bar are EMAs (decay 0.999, from 0) of the mean real/fake logits. In
    training mode they are updated *before* R is computed; the batch means are
    averaged over ranks when torch.distributed is initialised. They are
    persistent buffers, so they are checkpointed and resume exactly; eval mode
    (validation) does not update them. (Upstream keeps unsynchronised Python
    floats that restart at 0 and also move during validation; docs/open_magvit2.md#differences-from-upstream.)
    """

    def __init__(self, *, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCAM decay must be in [0, 1) (got {decay})")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros((), dtype=torch.float32))
        self.register_buffer("ema_fake", torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        # In the buffers' dtype or wider (fp64 when the loss is), so a 2-rank mean is the 1-rank mean.
        dtype = torch.promote_types(logits_real.dtype, self.ema_real.dtype)
        means = torch.stack([logits_real.detach().to(dtype).mean(), logits_fake.detach().to(dtype).mean()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(means)
            means /= torch.distributed.get_world_size()
        means = means.to(self.ema_real.device)
        self.ema_real.copy_(self.ema_real * self.decay + means[0] * (1.0 - self.decay))
        self.ema_fake.copy_(self.ema_fake * self.decay + means[1] * (1.0 - self.decay))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(logits_real, logits_fake)
        ema_real = self.ema_real.to(logits_fake.dtype)
        ema_fake = self.ema_fake.to(logits_real.dtype)
        return (F.relu(logits_real - ema_fake).pow(2).mean()
                + F.relu(ema_real - logits_fake).pow(2).mean())


# ================================================================= 5.4 LPIPS
@dataclass(frozen=True)
class _Backbone:
    filename: str
    sha256_prefix: str
    #: official torchvision ``features.N`` index ranges -> lpips slice k (regex on N)
    slices: tuple[tuple[str, int], ...]


#: docs/evaluation.md#lpips-weights: backbone files and lpips' slice boundaries.
LPIPS_BACKBONES: dict[str, _Backbone] = {
    # VGG16 features 0-3 | 4-8 | 9-15 | 16-22 | 23-29 -> relu1_2 ... relu5_3
    "vgg": _Backbone("vgg16-397923af.pth", "397923af",
                     (("[0-3]", 1), ("[4-8]", 2), ("9|1[0-5]", 3), ("1[6-9]|2[0-2]", 4), ("2[3-9]", 5))),
    # AlexNet features 0-1 | 2-4 | 5-7 | 8-9 | 10-11 -> relu1 ... relu5
    "alex": _Backbone("alexnet-owt-7be5be79.pth", "7be5be79",
                      (("[01]", 1), ("[2-4]", 2), ("[5-7]", 3), ("[89]", 4), ("1[01]", 5))),
}


def lpips_backbone_keymap(net: str) -> KeyMap:
    """torchvision ``features.N.{weight,bias}`` -> lpips ``sliceK.N.*``; the classifier is dropped."""
    spec = LPIPS_BACKBONES[net]
    rules = [(rf"features\.({rx})\.(weight|bias)", rf"slice{k}.\1.\2") for rx, k in spec.slices]
    return KeyMap(name=f"torchvision {net} -> lpips backbone", rules=rules, drop=[r"classifier\..*"])


def lpips_heads_path(net: str) -> Path:
    """The LPIPS v0.1 linear heads shipped inside the lpips package (``weights/v0.1/<net>.pth``)."""
    import lpips

    return Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / f"{net}.pth"


class LPIPS(nn.Module):
    """Frozen LPIPS ("The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), docs/llamagen.md#lpips.

    Built offline (docs/evaluation.md#lpips-weights): the ``lpips`` package constructs its net
    with a random backbone (``pnet_rand=True``, no download) and the v0.1 linear
    heads from its own wheel; the user's torchvision backbone file is then
    loaded strictly through a key map. Inputs are images in [-1, 1]; returns one
    value per image, shape (B,).
    """

    def __init__(self, *, net: str = "vgg", backbone_path: str | Path | None = None,
                 verify_hash: bool = True, heads_path: str | Path | None = None) -> None:
        """
        Args:
            net: "vgg" (training loss, docs/llamagen.md#lpips) or "alex" (evaluation).
            backbone_path: the torchvision ImageNet backbone (``vgg16-397923af.pth`` /
                ``alexnet-owt-7be5be79.pth``); None looks in ``$TORCH_HOME/hub/checkpoints``.
            verify_hash: check the SHA-256 prefix in the official file name; tests
                using random stand-in weights pass False.
            heads_path: LPIPS linear heads; default the lpips package's v0.1 file.
        """
        super().__init__()
        if net not in LPIPS_BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; choose one of {sorted(LPIPS_BACKBONES)}")
        spec = LPIPS_BACKBONES[net]
        path = find_weights(spec.filename, backbone_path, sha256_prefix=spec.sha256_prefix,
                            verify_hash=verify_hash, what=f"LPIPS ({net} backbone)",
                            how="LPIPS(backbone_path=...) or the tokenizer loss's lpips_backbone_path")
        heads = Path(heads_path) if heads_path is not None else lpips_heads_path(net)
        import lpips  # late: only when a perceptual loss is actually used

        with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation inside lpips
            warnings.simplefilter("ignore")
            # Built on the meta device and then allocated: every weight is loaded strictly below,
            # and torchvision would otherwise randomly initialise the whole VGG16 (its 124M-parameter
            # classifier included, which lpips drops) only to have it overwritten: ~2 s per build.
            with torch.device("meta"):
                model = lpips.LPIPS(net=net, version="0.1", pretrained=False, pnet_rand=True, verbose=False)
        model.to_empty(device="cpu")
        model.scaling_layer.load_state_dict(lpips.ScalingLayer().state_dict())  # its two constants
        # The heads, strictly (lpips would load them non-strictly), so a wrong heads file cannot
        # pass silently.
        lins = nn.ModuleDict({f"lin{i}": getattr(model, f"lin{i}") for i in range(5)})
        KeyMap(name="lpips heads", rules=[(r"lin([0-4])\.model\.1\.weight", r"lin\1.model.1.weight")]
               ).load_into(lins, torch.load(heads, map_location="cpu", weights_only=True),
                           what=f"LPIPS heads file {heads}")
        state, _ = unwrap_container(load_foreign(path))
        lpips_backbone_keymap(net).load_into(model.net, state, what=f"{net} backbone file {path}")
        model.eval()
        model.requires_grad_(False)
        self.net_name = net
        self.backbone_file = str(path)
        self.model = model

    def train(self, mode: bool = True) -> "LPIPS":
        super().train(False)  # frozen: always in eval mode (dropout in the heads stays off)
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, y).flatten()  # (B, 1, 1, 1) -> (B,)


# ============================================================ 5.5 composer
@dataclass
class TokenizerLossBreakdown(LossBreakdown):
    """``total`` = sum of the weighted ``parts``; ``stats`` are unweighted, detached diagnostics."""

    stats: dict[str, torch.Tensor] = field(default_factory=dict)


PIXEL_LOSSES = ("l1", "l2")


class TokenizerLoss(nn.Module):
    """The generator and discriminator objectives of a tokenizer (docs/llamagen.md#losses).

    Generator:  pixel_weight * pixel + lpips_weight * LPIPS
                + a(step) * gen_weight * L_adv + sum(quantizer losses, already weighted)
    Discriminator: a(step) * disc_weight * (hinge + lecam_weight * LeCAM)
    where a(step) = 1 if global_step >= disc_start else 0.

    State (``state_dict``): the discriminator and the LeCAM EMAs. The frozen
    LPIPS network is deliberately not registered as a submodule, so it is not
    checkpointed; it still follows ``.to()``.
    """

    def __init__(self, *, pixel_loss: str = "l2", pixel_weight: float = 1.0, lpips_weight: float = 1.0,
                 gen_loss: str = "hinge", gen_weight: float = 0.5, disc_weight: float = 0.5,
                 disc_start: int = 20000, lecam_weight: float = 0.0, lecam_decay: float = 0.999,
                 discriminator: nn.Module | None = None, perceptual: nn.Module | None = None,
                 lpips_net: str = "vgg", lpips_backbone_path: str | Path | None = None,
                 lpips_verify_hash: bool = True) -> None:
        """
        Args:
            pixel_loss: "l2" (MSE: LlamaGen, IAR2) or "l1" (Open-MAGVIT2), docs/llamagen.md#loss-weights-of-the-three-tokenizers.
            pixel_weight: 1.0; 0 for IAR2 stage 1 (docs/iar2.md#differences-from-upstream).
            lpips_weight: 1.0 in every recipe; 0 builds no LPIPS and needs no file.
            gen_loss: "hinge" (-mean D, LlamaGen/IAR2) or "non_saturating" (Open-MAGVIT2), docs/llamagen.md#discriminator-and-gan-loss.
            gen_weight: 0.5 (LlamaGen ``disc_weight``) or 0.1 (Open-MAGVIT2 ``gen_loss_weight``).
            disc_weight: multiplies the discriminator loss: 0.5 (LlamaGen) or 1.0 (Open-MAGVIT2 ``disc_factor``).
            disc_start: GAN terms are 0 while global_step < disc_start (20000 / 0), docs/llamagen.md#discriminator-and-gan-loss.
            lecam_weight: lambda of LeCAM, 0 = off (Open-MAGVIT2: 0.05 at 256 px, 0.01 at 128 px), docs/open_magvit2.md#gan-loss-and-lecam.
            lecam_decay: EMA decay of the LeCAM logit means (0.999).
            discriminator: default: the paper PatchGAN, built when a GAN weight is > 0.
            perceptual: an injected perceptual module ``(x, y) -> (B,)``; default: :class:`LPIPS`.
            lpips_net / lpips_backbone_path / lpips_verify_hash: how to build the default LPIPS.
        """
        super().__init__()
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES} (got {pixel_loss!r})")
        if gen_loss not in GENERATOR_LOSSES:
            raise ValueError(f"gen_loss must be one of {sorted(GENERATOR_LOSSES)} (got {gen_loss!r})")
        for name, value in (("pixel_weight", pixel_weight), ("lpips_weight", lpips_weight),
                            ("gen_weight", gen_weight), ("disc_weight", disc_weight),
                            ("lecam_weight", lecam_weight), ("disc_start", disc_start)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (got {value})")
        self.pixel_loss = pixel_loss
        self.pixel_weight = float(pixel_weight)
        self.lpips_weight = float(lpips_weight)
        self.gen_loss = gen_loss
        self.gen_weight = float(gen_weight)
        self.disc_weight = float(disc_weight)
        self.disc_start = int(disc_start)
        self.lecam_weight = float(lecam_weight)

        uses_gan = self.gen_weight > 0 or self.disc_weight > 0
        self.discriminator = (discriminator if discriminator is not None
                              else patchgan_discriminator() if uses_gan else None)
        self.lecam = LeCAM(decay=lecam_decay) if self.lecam_weight > 0 else None
        if self.lpips_weight > 0 and perceptual is None:
            perceptual = LPIPS(net=lpips_net, backbone_path=lpips_backbone_path, verify_hash=lpips_verify_hash)
        # a tuple keeps the frozen network out of state_dict()/parameters()/train()
        self._perceptual: tuple[nn.Module, ...] = (perceptual,) if perceptual is not None else ()

    @property
    def perceptual(self) -> nn.Module | None:
        return self._perceptual[0] if self._perceptual else None

    def _apply(self, fn, recurse: bool = True):  # .to()/.cuda()/.float() reach the unregistered LPIPS
        super()._apply(fn, recurse)
        for m in self._perceptual:
            m._apply(fn)
        return self

    def gan_weight(self, global_step: int) -> float:
        """1 when the GAN terms are on at ``global_step`` (= iteration index + 1), else 0."""
        return adopt_weight(1.0, global_step, start=self.disc_start)

    def _require_discriminator(self) -> nn.Module:
        if self.discriminator is None:
            raise ValueError("this TokenizerLoss has gen_weight = disc_weight = 0 and no discriminator")
        return self.discriminator

    # ---------------------------------------------------------------- G step
    def generator_loss(self, *, images: torch.Tensor, reconstruction: torch.Tensor,
                       quantizer_losses: Mapping[str, torch.Tensor] | None = None, global_step: int,
                       with_pixel_loss: bool = True) -> TokenizerLossBreakdown:
        """The generator objective. ``with_pixel_loss=False`` is IAR2 stage 2's semantic-only pass (docs/iar2.md#stage-2)."""
        parts: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        diff = at_least_fp32(reconstruction) - at_least_fp32(images)  # fp64 stays fp64
        pixel = diff.abs().mean() if self.pixel_loss == "l1" else diff.pow(2).mean()
        stats[f"pixel_{self.pixel_loss}"] = pixel.detach()
        if with_pixel_loss and self.pixel_weight > 0:
            parts[f"pixel_{self.pixel_loss}"] = self.pixel_weight * pixel
        if self.lpips_weight > 0:
            p = self.perceptual(images, reconstruction).mean()
            stats["lpips"] = p.detach()
            parts["lpips"] = self.lpips_weight * p
        a = self.gan_weight(global_step)
        if self.gen_weight > 0 and a > 0:
            # The raw discriminator, never a DDP wrapper: this pass wants gradients for the
            # generator only. The discriminator's gradients from it are thrown away (the trainer
            # zeroes them before the discriminator step), so nothing is to be all-reduced, and a
            # wrapper called here would all-reduce them needlessly in the generator's backward.
            logits_fake = self._require_discriminator()(reconstruction)
            adv = GENERATOR_LOSSES[self.gen_loss](logits_fake)
            stats["gen_adv"] = adv.detach()
            parts["gen_adv"] = (a * self.gen_weight) * adv
        stats["gan_weight"] = torch.tensor(a * self.gen_weight)
        for name, value in (quantizer_losses or {}).items():
            parts[f"quant/{name}"] = value
        total = sum(parts.values(), torch.zeros((), device=images.device))
        return TokenizerLossBreakdown(total=total, parts=parts, stats=stats)

    # ---------------------------------------------------------------- D step
    def discriminator_loss(self, *, images: torch.Tensor, reconstruction: torch.Tensor,
                           global_step: int, discriminator: nn.Module | None = None) -> TokenizerLossBreakdown:
        """The discriminator objective; inputs are detached here.

        Before ``disc_start`` the loss is 0 times the real objective, so the
        discriminator is still stepped (with zero gradient) as upstream does.

        ``discriminator``: what to call instead of ``self.discriminator``, the
        same module wrapped, e.g. in ``DistributedDataParallel``. The trainer
        passes its DDP wrapper here: only a call through the wrapper makes
        ``backward`` average the discriminator's gradients over ranks (calling
        the raw module steps every rank on its own gradients and the replicas
        drift apart from the first GAN step).
        """
        disc = discriminator if discriminator is not None else self._require_discriminator()
        logits_real = disc(images.detach())
        logits_fake = disc(reconstruction.detach())
        w = self.gan_weight(global_step) * self.disc_weight
        hinge = hinge_d_loss(logits_real, logits_fake)
        parts = {"disc_hinge": w * hinge}
        stats = {"disc_hinge": hinge.detach(), "logits_real": logits_real.detach().mean(),
                 "logits_fake": logits_fake.detach().mean()}
        if self.lecam is not None:
            reg = self.lecam(logits_real, logits_fake)
            parts["lecam"] = (w * self.lecam_weight) * reg
            stats.update(lecam=reg.detach(), lecam_ema_real=self.lecam.ema_real.detach().clone(),
                         lecam_ema_fake=self.lecam.ema_fake.detach().clone())
        total = sum(parts.values(), torch.zeros((), device=images.device))
        return TokenizerLossBreakdown(total=total, parts=parts, stats=stats)


#: docs/llamagen.md#loss-weights-of-the-three-tokenizers. The quantizer's own weights (vq + 0.25 commit for VQ;
#: 0.1 (H_sample - H_codebook) + 0.25 commit for LFQ) live in the quantizer.
TOKENIZER_LOSS_PRESETS: dict[str, dict[str, Any]] = {
    "llamagen": dict(pixel_loss="l2", pixel_weight=1.0, lpips_weight=1.0, gen_loss="hinge",
                     gen_weight=0.5, disc_weight=0.5, disc_start=20000, lecam_weight=0.0),
    # no pixel term in IAR2 stage 1, made explicit (docs/iar2.md#differences-from-upstream)
    "iar2_stage1": dict(pixel_loss="l2", pixel_weight=0.0, lpips_weight=1.0, gen_loss="hinge",
                        gen_weight=0.5, disc_weight=0.5, disc_start=20000, lecam_weight=0.0),
    # joint pass; the step counter restarts at 0 in stage 2 (docs/iar2.md#stage-2-training-schedule)
    "iar2_stage2": dict(pixel_loss="l2", pixel_weight=1.0, lpips_weight=1.0, gen_loss="hinge",
                        gen_weight=0.5, disc_weight=0.5, disc_start=20000, lecam_weight=0.0),
    "open_magvit2_256": dict(pixel_loss="l1", pixel_weight=1.0, lpips_weight=1.0, gen_loss="non_saturating",
                             gen_weight=0.1, disc_weight=1.0, disc_start=0, lecam_weight=0.05),
    "open_magvit2_128": dict(pixel_loss="l1", pixel_weight=1.0, lpips_weight=1.0, gen_loss="non_saturating",
                             gen_weight=0.1, disc_weight=1.0, disc_start=0, lecam_weight=0.01),
}


def tokenizer_loss(*, recipe: str = "llamagen", **overrides: Any) -> TokenizerLoss:
    """A :class:`TokenizerLoss` from a named recipe (docs/llamagen.md#loss-weights-of-the-three-tokenizers); keyword overrides replace single settings."""
    try:
        settings = dict(TOKENIZER_LOSS_PRESETS[recipe])
    except KeyError:
        raise ValueError(f"unknown tokenizer loss recipe {recipe!r}; choose one of "
                         f"{sorted(TOKENIZER_LOSS_PRESETS)}") from None
    settings.update(overrides)
    return TokenizerLoss(**settings)
