"""Checkpoints: arforge's own (safetensors + a small state file, written
atomically) and a safe loader for foreign ``.pt/.pth/.ckpt`` files.

Layout of one arforge checkpoint (a directory)::

    step_00001000/
        model.safetensors      # weights, one file per named module (model, ema, disc, ...)
        ema.safetensors
        state.pt               # optimizer/scheduler state, step, RNG states: tensors + plain data
        meta.json              # step, config, SHA-256 and size of every file above

The directory is first written as ``.step_00001000.tmp-<pid>`` and renamed into
place only once every file is flushed, so a killed run never leaves a half
written checkpoint that looks valid; ``latest`` is then updated with an atomic
``os.replace``. ``state.pt`` is loaded with ``weights_only=True``: it holds only
tensors and plain Python data, never pickled objects.

Foreign checkpoints (LlamaGen, IAR, IAR2, Open-MAGVIT2) are loaded with
``torch.load(weights_only=True)`` inside an explicit allow-list
(``argparse.Namespace``, which the upstream trainers pickle under ``args``; see
docs/checkpoints.md#safe-deserialisation). Anything else is refused with the list of
globals the file needs, never executed.
"""

from __future__ import annotations

from arforge.errors import ArforgeError

import argparse
import hashlib
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_FORMAT = "arforge-checkpoint-v1"
STEP_DIR = re.compile(r"^step_(\d+)$")
WRAPPER_SEGMENTS = ("module", "_orig_mod", "_fsdp_wrapped_module")

#: Globals a foreign checkpoint may reference. Extend per file type, after review.
DEFAULT_ALLOWED_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)


class CheckpointError(ArforgeError):
    """A user-facing checkpoint problem: names the file and what to do."""


class NonFiniteCheckpointError(CheckpointError):
    """Weights or optimizer state hold NaN/inf: such a checkpoint is never written (nor resumed from)."""


def first_non_finite(tree: Any, prefix: str = "") -> str | None:
    """The dotted name of the first floating-point tensor in ``tree`` holding NaN/inf, or None.

    ``tree`` is a state dict, or nested dicts/lists of them (optimizer state). Integer tensors
    (RNG states, step counters) are always finite and skipped.
    """
    if isinstance(tree, torch.Tensor):
        if (tree.is_floating_point() or tree.is_complex()) and tree.numel() \
                and not bool(torch.isfinite(tree).all()):
            return prefix or "<tensor>"
        return None
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        bad = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if bad is not None:
            return bad
    return None


# ======================================================================= own
def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write a small JSON file so that a crash leaves the old or the new file, never half of one:
    a temporary file, fsync, rename, fsync of the folder (``run.json``, sampling ledgers)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _contiguous_cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"weights entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().to("cpu").contiguous()
    return out


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses aliased tensors; store each storage once and record the aliases."""
    seen: dict[tuple[int, int, tuple, tuple], str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if v.numel() and key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            unique[k] = v
    return unique, aliases


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path
    step: int
    weights: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    state: Mapping[str, Any] | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Atomically write ``<directory>/step_<step>/`` and point ``latest`` at it.

    ``weights`` maps a module name (``model``, ``ema``, ``disc``...) to its state dict.
    ``state`` holds tensors and plain data (optimizer state dicts, RNG states, step).
    ``keep_last`` prunes older step directories after the new one is in place.
    """
    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    # A checkpoint is a promise that training can go on from it: NaN/inf weights or optimizer
    # moments never are one, and a resume from them fails again however the settings change.
    bad = first_non_finite(dict(weights)) or first_non_finite(dict(state or {}), "state")
    if bad is not None:
        raise NonFiniteCheckpointError(f"refusing to write {final}: {bad} holds NaN/inf values")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".step_{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: dict[str, dict[str, Any]] = {}
    aliases_all: dict[str, dict[str, str]] = {}
    for name, sd in weights.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise CheckpointError(f"weights name {name!r} must be alphanumeric/underscore")
        unique, aliases = _dedupe_shared(_contiguous_cpu(sd))
        save_file(unique, str(tmp / f"{name}.safetensors"))
        aliases_all[name] = aliases
    torch.save(dict(state or {}), tmp / "state.pt")
    for p in sorted(tmp.iterdir()):
        files[p.name] = {"sha256": _sha256(p), "bytes": p.stat().st_size}
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "weights": sorted(weights),
        "aliases": aliases_all,
        "files": files,
        "config": dict(config or {}),
        "finite": True,
    }
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        trash = directory / f".trash-{final.name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(directory)
    latest_tmp = directory / f".latest.tmp-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, directory / "latest")
    _fsync_dir(directory)
    if keep_last is not None and keep_last > 0:
        steps = sorted(list_checkpoints(directory))
        for old in steps[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories under ``directory`` (temporary ones are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
                  and (p / "meta.json").is_file())


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None. Falls back to scanning if ``latest`` is stale."""
    directory = Path(directory)
    pointer = directory / "latest"
    if pointer.is_file():
        cand = directory / pointer.read_text().strip()
        if (cand / "meta.json").is_file():
            return cand
    found = list_checkpoints(directory)
    return found[-1] if found else None


def checkpoint_non_finite(path: str | os.PathLike) -> str | None:
    """Load ``path`` (verifying its files) and name its first NaN/inf tensor, or None if all are finite."""
    loaded = load_checkpoint(path)
    return first_non_finite(loaded.weights) or first_non_finite(loaded.state, "state")


def last_finite_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint under ``directory`` that loads and holds only finite tensors (verified
    by reading it back, not taken from ``latest``), or None."""
    directory = Path(directory)
    newest = latest_checkpoint(directory)
    candidates = ([newest] if newest is not None else []) + \
        [p for p in reversed(list_checkpoints(directory)) if p != newest]
    for path in candidates:
        try:
            if checkpoint_non_finite(path) is None:
                return path
        except CheckpointError:
            continue
    return None


def quarantine_checkpoint(path: str | os.PathLike) -> Path:
    """Move a checkpoint out of the way (``nonfinite-step_...``): kept for inspection, never resumed."""
    path = Path(path)
    target = path.with_name(f"nonfinite-{path.name}")
    while target.exists():
        target = target.with_name(target.name + "_")
    os.rename(path, target)
    _fsync_dir(path.parent)
    return target


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory written by :func:`save_checkpoint`.

    With ``verify`` every file is checked against the size and SHA-256 recorded
    in ``meta.json``, so a truncated or altered file is reported by name.
    """
    path = Path(path)
    if path.is_dir() and not (path / "meta.json").exists() and (path / "latest").exists():
        resolved = latest_checkpoint(path)
        if resolved is None:
            raise CheckpointError(f"{path}: 'latest' points at no complete checkpoint")
        path = resolved
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(
            f"{path} is not an arforge checkpoint directory (no meta.json). For an official "
            "upstream .pt/.pth/.ckpt file use arforge.checkpoint.load_foreign or tools/convert_checkpoint.py."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is corrupt ({exc}); delete {path} and resume from an earlier step") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}")
    if verify:
        for fname, info in meta["files"].items():
            fpath = path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath} is missing; the checkpoint {path} is incomplete")
            size = fpath.stat().st_size
            if size != info["bytes"]:
                raise CheckpointError(
                    f"{fpath} is truncated or altered ({size} bytes, expected {info['bytes']}); "
                    f"delete {path} and resume from an earlier checkpoint")
            if _sha256(fpath) != info["sha256"]:
                raise CheckpointError(f"{fpath} does not match its recorded SHA-256; the checkpoint is corrupt")
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for name in meta["weights"]:
        fpath = path / f"{name}.safetensors"
        try:
            sd = load_file(str(fpath), device=str(map_location))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{fpath} could not be read: {exc}") from exc
        for alias, target in meta.get("aliases", {}).get(name, {}).items():
            sd[alias] = sd[target]
        weights[name] = sd
    try:
        state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path / 'state.pt'} could not be read: {exc}") from exc
    return Checkpoint(path=path, step=int(meta["step"]), weights=weights, state=state, meta=meta)


def save_weights(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write one safetensors file atomically (for converted/exported weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    unique, aliases = _dedupe_shared(_contiguous_cpu(state))
    md = {k: str(v) for k, v in (metadata or {}).items()}
    if aliases:
        md["arforge.aliases"] = json.dumps(aliases)
    save_file(unique, str(tmp), metadata=md)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        from safetensors import safe_open

        sd = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); "
                              "it may be truncated -- re-export or re-convert it") from exc
    for alias, target in json.loads(md.get("arforge.aliases", "{}")).items():
        sd[alias] = sd[target]
    return sd


# =================================================================== foreign
def strip_wrapper_prefixes(state: Mapping[str, Any],
                           segments: Iterable[str] = WRAPPER_SEGMENTS) -> dict[str, Any]:
    """Remove DDP/compile/FSDP wrapper segments (whole dot-separated segments, anywhere)."""
    drop = set(segments)
    out: dict[str, Any] = {}
    for k, v in state.items():
        nk = ".".join(p for p in k.split(".") if p not in drop)
        if nk in out:
            raise CheckpointError(f"keys {k!r} and another key both normalise to {nk!r}")
        out[nk] = v
    return out


def load_foreign(path: str | os.PathLike, *, allowed_globals: Iterable[Any] = DEFAULT_ALLOWED_GLOBALS) -> Any:
    """``torch.load(weights_only=True)`` with an explicit allow-list, and clear errors.

    A truncated file, a file that is not a torch checkpoint, or one that needs a
    global outside the allow-list is refused with a message naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_weights(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({exc}); download it again") from exc
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} is corrupt (member {bad!r} fails its CRC); download it again")
    elif not _looks_like_legacy_torch(path):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a legacy torch file); "
            "it may be truncated, or another format")
    allowed = list(allowed_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError from the zip reader, EOFError...
        needed = _unsafe_globals(path)
        names = {f"{g.__module__}.{g.__qualname__}" for g in allowed}
        extra = [g for g in needed if g not in names]
        if extra:
            raise CheckpointError(
                f"refusing to load {path}: it references globals outside arforge's allow-list: "
                f"{', '.join(extra)}. Loading them would execute arbitrary code. If this file comes from "
                "a trusted upstream release, convert it with tools/convert_checkpoint.py after adding "
                "these globals to that format's allow-list (after review)."
            ) from exc
        raise CheckpointError(f"could not load {path}: {type(exc).__name__}: {exc}") from exc


def _looks_like_legacy_torch(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80"  # pickle protocol marker of the legacy (pre-1.6) format


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return []


def unwrap_container(obj: Any, *, prefer: str = "model") -> tuple[dict[str, torch.Tensor], str]:
    """Find the weights inside an upstream container (docs/checkpoints.md#containers).

    Returns ``(state_dict, where)``, where ``where`` names the entry used.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict-like checkpoint, got {type(obj).__name__}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), "(bare state dict)"
    if prefer not in ("model", "state_dict", "module") and "model" in obj and prefer not in obj:
        # Asking for EMA weights and silently getting the raw ones would corrupt a comparison.
        raise CheckpointError(f"the checkpoint has no '{prefer}' entry (top-level keys: "
                              f"{sorted(map(str, obj))[:12]}); choose weights='model'")
    for key in (prefer, "state_dict", "module", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key]), key
    raise CheckpointError(
        f"no weights found: the checkpoint has top-level keys {sorted(map(str, obj))[:12]} "
        f"but none of {prefer!r}, 'state_dict', 'module', 'model'")


# ============================================================= loaded weights
#: The attribute :func:`mark_loaded` sets: where the module's weights came from.
LOADED_FROM = "arforge_weights_from"


def mark_loaded(module: Any, source: str | os.PathLike) -> Any:
    """Record on ``module`` that its weights were loaded from ``source`` (a file or checkpoint folder).

    Why: gin builds a *new* object every time a reference is evaluated, so ``%TOKENIZER`` bound in
    two places is two tokenizers. A loader can fill one of them with trained weights while a job
    receives the other, still at its random initialisation, and a sampler then decodes plausible
    looking noise without any error. The rule that makes this impossible: every loader
    (``loaders.arforge_checkpoint``, ``loaders.official_*``, a job's own ``*_checkpoint`` arguments)
    marks the very object it filled, and a job that needs trained weights (``jobs.sample``) refuses
    an unmarked one with :func:`require_loaded`. Weights set some other way (in Python, in a
    notebook) are declared with this function. The path is also kept as ``checkpoint_path`` for
    provenance (sample metadata, code manifests).
    """
    setattr(module, LOADED_FROM, str(source))
    module.checkpoint_path = str(source)
    return module


def loaded_from(module: Any) -> str | None:
    """Where :func:`mark_loaded` says ``module``'s weights came from; None if nothing loaded them."""
    return getattr(module, LOADED_FROM, None)


def require_loaded(module: Any, *, binding: str, checkpoint_binding: str | None = None,
                   on_purpose: str | None = None) -> str:
    """``module``'s weight source; a :class:`CheckpointError` naming ``binding`` if it was never loaded.

    ``on_purpose`` names the binding that accepts random weights deliberately (an untrained baseline).
    """
    source = loaded_from(module)
    if source is not None:
        return source
    ways = f"set {checkpoint_binding} to its arforge checkpoint, or " if checkpoint_binding else ""
    raise CheckpointError(
        f"{binding}: the {type(module).__name__} it received was never loaded with weights (it is at its "
        f"random initialisation). To give it weights, {ways}bind {binding} to a loader call "
        "(@<scope>/loaders.arforge_checkpoint() or @<scope>/loaders.official_*(), with .module and "
        f".checkpoint). If a loader already fills a module for this job, {binding} received another "
        "object: gin builds a new object every time a reference such as %TOKENIZER is used, so bind "
        f"{binding} to the loader call itself, not to the macro."
        + (f" To sample from random weights on purpose, bind {on_purpose}." if on_purpose else ""))


def restore(module: torch.nn.Module, *, checkpoint: str | os.PathLike, weights: str = "model") -> torch.nn.Module:
    """Load ``weights`` (``model`` or ``ema``) of an arforge checkpoint into ``module``, strictly.

    ``checkpoint`` is a checkpoint directory, or a run's ``checkpoints`` folder
    (its ``latest``). The module is marked as loaded (:func:`mark_loaded`: ``checkpoint_path``
    names the folder for code manifests and sample metadata, and ``jobs.sample`` accepts it).
    This is the gin-facing way to hand a trained component to a job::

        jobs.extract_codes.tokenizer = @tokenizer/loaders.arforge_checkpoint()
        tokenizer/loaders.arforge_checkpoint.module = %TOKENIZER
        tokenizer/loaders.arforge_checkpoint.checkpoint = "arforge_runs/outputs/quickstart/tokenizer/checkpoints"
    """
    from arforge.tracking import resolve_path

    loaded = load_checkpoint(resolve_path(checkpoint))
    if weights not in loaded.weights:
        raise CheckpointError(f"{loaded.path} has no '{weights}' weights; it has {sorted(loaded.weights)}")
    state = loaded.weights[weights]
    target = module.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{loaded.path} ({weights}) does not fit {type(module).__name__}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
            f"shape mismatches {shapes[:8]}. Was it trained with the same gin preset?")
    module.load_state_dict(state, strict=True)
    return mark_loaded(module, loaded.path)


# ============================================================ interrupted writes
_TMP_NAME = re.compile(r"^\.(?:step_\d+\.tmp|latest\.tmp|trash-step_\d+)-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return True
    return True


def remove_stale_tmp(directory: str | os.PathLike) -> list[Path]:
    """Remove ``.step_*.tmp-<pid>`` (and ``.latest.tmp-<pid>``, ``.trash-step_*-<pid>``) left under
    ``directory`` by a checkpoint write whose process died (killed mid-write). A folder of a live
    process (another rank, a concurrent writer) is left alone. Returns what was removed."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in sorted(directory.rglob(".*-*")):
        m = _TMP_NAME.match(path.name)
        if not m or _pid_alive(int(m.group("pid"))):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed
