"""Finding user-supplied pretrained weights files (VGG16/AlexNet for LPIPS, Inception for FID).

arforge never downloads weights (docs/evaluation.md#weights). A file is taken from an explicit path, or from the
torch hub cache ``$TORCH_HOME/hub/checkpoints/<file name>`` where torchvision
itself would have put it; torch-hub style names ending in ``-<hex>`` are checked
against that SHA-256 prefix. A missing file is an :class:`WeightsNotFoundError`
naming the file and both ways to supply it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from arforge.errors import ArforgeError


class WeightsNotFoundError(ArforgeError):
    """A required pretrained weights file is not where arforge looks for it."""


class WeightsHashError(ArforgeError):
    """A weights file does not match the SHA-256 prefix its name promises."""


def torch_home() -> Path:
    """``$TORCH_HOME``, else ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch`` (torch.hub's rule)."""
    env = os.environ.get("TORCH_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "torch"


def hub_checkpoints_dir() -> Path:
    """Where torch hub keeps downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return torch_home() / "hub" / "checkpoints"


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_weights(filename: str, explicit_path: str | os.PathLike | None = None, *,
                 sha256_prefix: str | None = None, verify_hash: bool = True,
                 what: str = "pretrained weights", how: str = "the component's weights path option") -> Path:
    """Locate ``filename``: ``explicit_path`` if given, else ``$TORCH_HOME/hub/checkpoints/<filename>``.

    Args:
        filename: the canonical file name (e.g. ``vgg16-397923af.pth``).
        explicit_path: a user-supplied path; when given it must exist (no silent fallback).
        sha256_prefix: the expected prefix of the file's SHA-256 (torch hub naming).
        verify_hash: check ``sha256_prefix`` (tests use random stand-in files and pass False).
        what: what the file is, for the error message ("the VGG16 backbone of LPIPS").
        how: how to pass an explicit path, for the error message (an option name).

    Raises:
        WeightsNotFoundError: naming the file, both ways to supply it, and that no
            package ships it.
        WeightsHashError: if the hash prefix does not match.
    """
    hub = hub_checkpoints_dir()
    ways = (f"Supply it either (1) as an explicit path via {how}, or (2) by placing the file "
            f"as $TORCH_HOME/hub/checkpoints/{filename} (currently {hub / filename}; "
            "TORCH_HOME defaults to ~/.cache/torch). No Python package ships this file and "
            "arforge never downloads weights.")
    if explicit_path is not None:
        path = Path(explicit_path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"{what}: the file {path} given for '{filename}' does not exist. {ways}")
    else:
        path = hub / filename
        if not path.is_file():
            raise WeightsNotFoundError(f"{what} needs the weights file '{filename}', which was not found "
                                       f"at {path}. {ways}")
    if sha256_prefix and verify_hash:
        digest = sha256_of(path)
        if not digest.startswith(sha256_prefix.lower()):
            raise WeightsHashError(
                f"{what}: {path} has SHA-256 {digest[:16]}..., but '{filename}' must start with "
                f"{sha256_prefix}; the file is corrupt, truncated or a different file. Replace it "
                "with the official one.")
    return path
