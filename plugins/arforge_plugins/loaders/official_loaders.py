"""Gin-facing loaders for the official upstream checkpoints (docs/checkpoints.md).

Each returns the module it was given, with the official weights loaded through
the strict, explicit key maps of ``ar_checkpoints.py`` / ``tokenizer_checkpoints.py``
(``torch.load(weights_only=True)`` plus the ``argparse.Namespace`` allow-list).
A launch names them like ``loaders.arforge_checkpoint``::

    jobs.sample.model = @model/loaders.official_llamagen_gpt()
    model/loaders.official_llamagen_gpt.module = %MODEL
    model/loaders.official_llamagen_gpt.checkpoint = "/ckpts/c2i_B_256.pt"

Each loader fills exactly the module it returns and marks it as loaded
(:func:`arforge.checkpoint.mark_loaded`: ``checkpoint_path`` is the file, and
``checkpoint_sha256`` its SHA-256, so sample metadata names the exact file);
``jobs.sample`` refuses a module no loader filled. One loader call per module:
Open-MAGVIT2's ``AR_256_*.ckpt`` holds the transformer and its tokenizer, and
each is read by its own loader from that one file::

    jobs.sample.model = @model/loaders.official_open_magvit2_ar()
    model/loaders.official_open_magvit2_ar.module = %MODEL
    model/loaders.official_open_magvit2_ar.checkpoint = %AR_OFFICIAL
    jobs.sample.tokenizer = @tokenizer/loaders.official_open_magvit2_tokenizer()
    tokenizer/loaders.official_open_magvit2_tokenizer.module = %TOKENIZER
    tokenizer/loaders.official_open_magvit2_tokenizer.checkpoint = %AR_OFFICIAL
    tokenizer/loaders.official_open_magvit2_tokenizer.weights = "model"

(A loader that filled a second module passed in as an argument would fill a
different object than the one the job is given whenever both are bound to a
macro such as ``%TOKENIZER``: gin builds a new object for each use.)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from torch import nn

from arforge.checkpoint import CheckpointError, mark_loaded

from arforge_plugins.loaders import ar_checkpoints, tokenizer_checkpoints


def _path(checkpoint: str | os.PathLike, what: str) -> Path:
    p = Path(checkpoint).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{what}: checkpoint {p} does not exist; download the official release file "
                              "and give its path (arforge never downloads weights)")
    return p


def _record(module: nn.Module, path: Path) -> nn.Module:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    mark_loaded(module, path)
    module.checkpoint_sha256 = h.hexdigest()
    return module


def official_llamagen_gpt(*, module: nn.Module, checkpoint: str | os.PathLike, weights: str = "model") -> nn.Module:
    """LlamaGen/IAR GPT: ``c2i_*.pt`` (DDP ``model``/``ema``) or FSDP ``consolidated.pth`` (docs/checkpoints.md#llamagen-and-iar-gpt)."""
    path = _path(checkpoint, "loaders.official_llamagen_gpt")
    ar_checkpoints.load_llamagen_gpt(module, path, weights=weights)
    return _record(module, path)


def official_open_magvit2_ar(*, module: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Open-MAGVIT2 ``AR_256_{B,L,XL}.ckpt`` (docs/checkpoints.md#open-magvit2-ar): the transformer. Its embedded tokenizer
    (``first_stage_model.*``) is read by ``loaders.official_open_magvit2_tokenizer`` from the same file."""
    path = _path(checkpoint, "loaders.official_open_magvit2_ar")
    ar_checkpoints.load_open_magvit2_ar(module, path)
    return _record(module, path)


def official_iar2_gpt(*, module: nn.Module, checkpoint: str | os.PathLike, weights: str = "model") -> nn.Module:
    """IAR2 GPT: ``IAR2-{B,L,XXL}.pth`` (FSDP) or ``IAR2-XL.pt`` (DDP) (docs/checkpoints.md#iar2-gpt)."""
    path = _path(checkpoint, "loaders.official_iar2_gpt")
    ar_checkpoints.load_iar2_gpt(module, path, weights=weights)
    return _record(module, path)


def official_llamagen_vq(*, module: nn.Module, checkpoint: str | os.PathLike, weights: str = "model") -> nn.Module:
    """LlamaGen VQ-16/VQ-8 ``vq_ds{16,8}_c2i.pt`` (docs/checkpoints.md#llamagen-vq-tokenizer); ``weights='ema'`` for reconstruction metrics."""
    path = _path(checkpoint, "loaders.official_llamagen_vq")
    tokenizer_checkpoints.load_llamagen_vq(module, path, which=weights)
    return _record(module, path)


def official_iar2_vq(*, module: nn.Module, checkpoint: str | os.PathLike, weights: str = "model") -> nn.Module:
    """IAR2 stage-2 tokenizer ``0485000.pt`` (docs/checkpoints.md#iar2-tokenizer)."""
    path = _path(checkpoint, "loaders.official_iar2_vq")
    tokenizer_checkpoints.load_iar2_vq(module, path, which=weights)
    return _record(module, path)


def official_open_magvit2_tokenizer(*, module: nn.Module, checkpoint: str | os.PathLike,
                                    weights: str = "ema") -> nn.Module:
    """Open-MAGVIT2 ``imagenet_{256,128}_L.ckpt`` (docs/checkpoints.md#open-magvit2-tokenizer): EMA weights by default (as rFID was reported).

    An ``AR_256_*.ckpt`` works too: its ``first_stage_model.*`` entries are the tokenizer the AR
    model was trained with (raw weights only: ``weights="model"``).
    """
    path = _path(checkpoint, "loaders.official_open_magvit2_tokenizer")
    tokenizer_checkpoints.load_open_magvit2_tokenizer(module, path, which=weights)
    return _record(module, path)
