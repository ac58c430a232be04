"""A small digits classifier: the quickstart's feature extractor for FID, IS and precision/recall.

docs/evaluation.md#testing-metric-code: metric code takes its network as an injected
module, and tests and the quickstart use a small network trained on the
offline scikit-learn digits instead of Inception (whose ImageNet features mean
nothing on 16 px digits, and whose weights no package ships).

The network: three 3x3 convs (the last two with stride 2), an adaptive average
pool to 4x4, a fully connected layer whose ReLU output is the ``pool`` feature
(128-d by default, the stand-in for Inception's pool_3) and a linear head whose
output is the ``logits`` (10 classes, for the Inception Score). There are no
spatial (sFID) features.

Saved as arforge safetensors with its JSON configuration in the file's
metadata (``arforge.config``), so :meth:`DigitsClassifier.load` needs only the
path. :func:`train_feature_extractor` (``jobs.train_feature_extractor``) trains
one with small random shifts as augmentation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arforge import validation as V
from arforge.checkpoint import CheckpointError, load_weights, save_weights
from arforge.evaluation.feature_extractors import (Features, FeatureExtractorError, as_uint8_nchw,
                                                   module_device)
from arforge.metrics.adm import to_uint8
from arforge.weights import sha256_of

FORMAT = "arforge-digits-classifier-v1"


class DigitsClassifier(nn.Module):
    """A 3-conv CNN over S x S digits; penultimate ReLU features as ``pool``, class scores as ``logits``."""

    def __init__(self, *, image_size: int = 16, width: int = 32, feature_dim: int = 128,
                 num_classes: int = 10) -> None:
        """
        Args:
            image_size: the side S it is trained for (16 or 32 in the quickstart);
                :meth:`features` refuses other sizes.
            width: channels of the first conv (then 2x width).
            feature_dim: size of the ``pool`` features.
            num_classes: classes of the ``logits`` (10 digits).
        """
        super().__init__()
        self.config = {"image_size": image_size, "width": width, "feature_dim": feature_dim,
                       "num_classes": num_classes}
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # S/2
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # S/4
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Linear(2 * width * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.name = "digits_classifier"
        self.weights_sha256: str | None = None  #: of the file it was loaded from; None when fresh
        self.weights_file: str | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images (B, 3, S, S) in [-1, 1] -> (pool (B, D), logits (B, C))."""
        h = self.body(x).flatten(1)  # (B, 2w, 4, 4) -> (B, 32w)
        pool = F.relu(self.fc(h))
        return pool, self.head(pool)

    @torch.no_grad()
    def features(self, images) -> Features:
        """uint8 NHWC images -> Features(pool, logits); the input is read as u8 / 127.5 - 1."""
        x = as_uint8_nchw(images, module_device(self))
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise FeatureExtractorError(
                f"this DigitsClassifier was trained on {self.image_size} px images but got "
                f"{x.shape[-2]}x{x.shape[-1]}; train one at that size "
                f"(jobs.train_feature_extractor.image_size = {x.shape[-1]})")
        was = self.training
        self.eval()
        pool, logits = self(x.float() / 127.5 - 1.0)
        self.train(was)
        return Features(pool=pool.cpu().numpy(), spatial=None, logits=logits.cpu().numpy())

    # ------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, *, extra: dict[str, str] | None = None) -> Path:
        """Atomically write safetensors with the configuration in the metadata."""
        md = {"arforge.format": FORMAT, "arforge.config": json.dumps(self.config, sort_keys=True), **(extra or {})}
        return save_weights(path, self.state_dict(), metadata=md)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DigitsClassifier":
        """Rebuild from a file written by :meth:`save` (strict: every weight must fit)."""
        from safetensors import safe_open

        path = Path(path)
        state = load_weights(path)  # clear errors for a missing or truncated file
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
        if md.get("arforge.format") != FORMAT:
            raise CheckpointError(f"{path} is not a DigitsClassifier file (format {md.get('arforge.format')!r}, "
                                  f"expected {FORMAT!r}); train one with jobs.train_feature_extractor")
        model = cls(**json.loads(md["arforge.config"]))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not fit its configuration ({exc})") from exc
        model.eval().requires_grad_(False)
        model.weights_file, model.weights_sha256 = str(path), sha256_of(path)
        return model


def digits_classifier(*, path: str | os.PathLike) -> DigitsClassifier:
    """The digits classifier feature extractor, loaded from ``path`` (written by jobs.train_feature_extractor)."""
    from arforge.tracking import resolve_path

    path = resolve_path(path) if path is not None else None  # "outputs:<experiment>/<run>/..."
    if path is None or not Path(path).is_file():
        raise CheckpointError(f"feature_extractors.digits_classifier.path = {path!r} is not a file; train one "
                              "with jobs.train_feature_extractor (it writes feature_extractor.safetensors)")
    return DigitsClassifier.load(path)


# ================================================================ training
def _quantise(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats onto the uint8 grid the classifier sees at evaluation (to_uint8, then u8/127.5 - 1)."""
    return torch.floor((127.5 * x + 128.0).clamp(0, 255)) / 127.5 - 1.0


def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, repeating the border (digits: background)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (B, 3, H + 2m, W + 2m)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def _images_labels(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[int(i)] for i in indices]
    return torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])


@torch.no_grad()
def accuracy(model: DigitsClassifier, dataset, *, batch_size: int = 256) -> float:
    """Top-1 accuracy through the evaluation path (uint8 images, :meth:`DigitsClassifier.features`)."""
    correct = 0
    for i in range(0, len(dataset), batch_size):
        images, labels = _images_labels(dataset, range(i, min(len(dataset), i + batch_size)))
        logits = model.features(to_uint8(images)).logits
        correct += int((logits.argmax(1) == labels.numpy()).sum())
    return correct / len(dataset)


def train_feature_extractor(ctx, *, dataset, val_dataset, image_size: int = 16, steps: int = 400,
                            batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                            output: str | os.PathLike | None = None, max_shift: int | None = None,
                            width: int = 32, feature_dim: int = 128, num_classes: int | None = None,
                            log_every: int = 50) -> float:
    """Train the digits classifier that stands in for Inception on the quickstart data (docs/evaluation.md#testing-metric-code).

    Adam with a cosine decay; inputs are put on the uint8 grid the evaluator
    feeds, and shifted by up to ``max_shift`` pixels (default S/8) as light
    augmentation. Logs ``train/loss`` and ``train/accuracy`` every ``log_every``
    steps and the held-out ``val/accuracy`` at the end; writes the weights
    atomically to ``output`` (default ``<output_dir>/feature_extractor.safetensors``)
    and logs them as an artifact.

    Args:
        dataset / val_dataset: (image (3, S, S) in [-1, 1], label) datasets, e.g. ``@datasets.digits()``.
        image_size: S; the datasets' images must have it.
        steps / batch_size / lr: optimisation (400 x 64 at 2e-3 reaches ~97-98 % on digits at 16 px).
        seed: initialisation, batch order and shifts.
        output: where to write the safetensors file.
        max_shift: augmentation shift in pixels (default image_size // 8).
        width / feature_dim: network size (see :class:`DigitsClassifier`).
        num_classes: default ``len(dataset.classes)`` (10 for digits).

    Returns:
        The validation accuracy.
    """
    V.check_args("jobs.train_feature_extractor", locals(), where=ctx,
                 image_size=V.POSITIVE_INT, steps=V.POSITIVE_INT, batch_size=V.POSITIVE_INT, lr=V.POSITIVE_FLOAT,
                 seed=V.INT, output=V.optional(V.PATH), max_shift=V.optional(V.NON_NEGATIVE_INT),
                 width=V.POSITIVE_INT, feature_dim=V.POSITIVE_INT, num_classes=V.optional(V.POSITIVE_INT),
                 log_every=V.POSITIVE_INT)
    from arforge.trainers.common import Schedule

    if len(dataset) < batch_size:
        raise FeatureExtractorError(f"the training set has {len(dataset)} images, fewer than one batch of "
                                    f"{batch_size}; lower jobs.train_feature_extractor.batch_size")
    first = dataset[0][0]
    if tuple(first.shape[-2:]) != (image_size, image_size):
        raise FeatureExtractorError(f"the training images are {tuple(first.shape[-2:])} but image_size = "
                                    f"{image_size}; set the dataset's image_size to match")
    max_shift = image_size // 8 if max_shift is None else max_shift
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if num_classes is None:
        num_classes = len(getattr(dataset, "classes", range(10)))
    model = DigitsClassifier(image_size=image_size, width=width, feature_dim=feature_dim, num_classes=num_classes)
    device = ctx.device
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = Schedule(kind="cosine", total_steps=steps, end_factor=0.0)
    order, pos = torch.randperm(len(dataset), generator=g), 0
    t0, running, hits, seen = time.time(), 0.0, 0, 0
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc="feature extractor", disable=not ctx.is_main, mininterval=1.0):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(dataset), generator=g), 0
        images, labels = _images_labels(dataset, order[pos:pos + batch_size])
        pos += batch_size
        x = _random_shift(_quantise(images), max_shift, g).to(device)
        labels = labels.to(device)
        for group in opt.param_groups:
            group["lr"] = lr * schedule(step)
        _, logits = model(x)
        loss = F.cross_entropy(logits, labels)
        if not torch.isfinite(loss.detach()):
            raise FeatureExtractorError(f"the classifier loss became {float(loss)} at step {step + 1}; "
                                        "lower jobs.train_feature_extractor.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss.detach()) * len(labels)
        hits += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            ctx.tracker.log_metrics({"train/loss": running / seen, "train/accuracy": hits / seen,
                                     "train/lr": lr * schedule(step)}, step=step + 1)
            running, hits, seen = 0.0, 0, 0
    model.eval().requires_grad_(False)
    val_acc = accuracy(model, val_dataset)
    seconds = time.time() - t0
    ctx.tracker.log_metrics({"val/accuracy": val_acc, "train/seconds": seconds}, step=steps)
    path = Path(output) if output is not None else Path(ctx.output_dir) / "feature_extractor.safetensors"
    if ctx.is_main:
        model.save(path, extra={"val_accuracy": f"{val_acc:.6f}", "steps": str(steps), "seed": str(seed),
                                "dataset": str(getattr(dataset, "source", type(dataset).__name__))})
        model.weights_file, model.weights_sha256 = str(path), sha256_of(path)
        ctx.tracker.log_artifact(path, "feature_extractor")
        ctx.extra["feature_extractor"] = str(path)
        ctx.log(f"digits classifier: val accuracy {val_acc:.4f} after {steps} steps ({seconds:.1f} s); "
                f"weights in {path}")
    return val_acc
