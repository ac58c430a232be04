"""Strict key maps between the official tokenizer checkpoints and arforge's tokenizers.

See docs/checkpoints.md#loading-rules (loading rules), docs/checkpoints.md#llamagen-vq-tokenizer (LlamaGen VQ-16/VQ-8
and IAR's reordered VQ), docs/checkpoints.md#open-magvit2-tokenizer (Open-MAGVIT2 tokenizer, raw and EMA weights), docs/checkpoints.md#iar2-tokenizer
(IAR2 tokenizer), docs/checkpoints.md#what-each-strict-map-covers (what each map must cover); docs/checkpoints.md#safe-deserialisation, docs/checkpoints.md#strict-mapping-rules.

arforge's tokenizer modules keep the official attribute names, so the rename
rules below are identities on names; they are still written out per format so
that every official key is accounted for by a rule or an explicit drop entry,
and a load fails listing every missing, unexpected and mis-shaped key.

Every loader accepts a path (read with ``arforge.checkpoint.load_foreign``:
``weights_only=True`` plus an allow-list) or an in-memory checkpoint, and
returns a :class:`TokenizerLoadResult` recording which weights were used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from arforge.checkpoint import CheckpointError, load_foreign, strip_wrapper_prefixes, unwrap_container
from arforge.keymap import KeyMap, KeyMapError
from arforge.weights import sha256_of

from arforge_plugins.loaders.ar_checkpoints import TOKENIZER_PREFIX as AR_TOKENIZER_PREFIX
from arforge_plugins.loaders.ar_checkpoints import CheckpointArgsError

#: ``quantize.codebook_used`` / ``codebook_used2``: usage windows of 65,536 ids (docs/llamagen.md#vector-quantizer).
USAGE_BUFFER_LENGTH = 65536


@dataclass
class TokenizerLoadResult:
    """What was loaded, for the run's records (docs/checkpoints.md#containers: "the choice is recorded")."""

    format: str  #: "llamagen_vq", "iar2_vq", "open_magvit2"
    weights: str  #: "model" (raw) or "ema"
    entry: str  #: where in the container the weights were found
    dropped: list[str] = field(default_factory=list)  #: official keys skipped by the drop list
    path: str | None = None
    sha256: str | None = None  #: of the file, when loaded from a path


def _same(pattern: str) -> tuple[str, str]:
    """A rule whose arforge name equals the official name: each group maps to itself."""
    counter = iter(range(1, 100))
    template = re.sub(r"\((?!\?)[^()]*\)", lambda _: f"\\{next(counter)}", pattern)
    return pattern, template.replace("\\.", ".")


def _read(checkpoint: Any) -> tuple[Any, str | None, str | None]:
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        obj = load_foreign(path)
        return obj, str(path), sha256_of(path)
    return checkpoint, None, None


def _container_entry(obj: Any, which: str, *, entries: tuple[str, ...] = ("model", "ema")
                     ) -> tuple[dict, str, str]:
    """The weights of a LlamaGen/IAR2-style container: ``model`` or ``ema`` (or a bare state dict)."""
    if which not in entries + ("auto",):
        raise ValueError(f"which must be one of {entries + ('auto',)} (got {which!r})")
    if isinstance(obj, Mapping) and which == "auto":
        which = "ema" if isinstance(obj.get("ema"), Mapping) else "model"
    state, where = unwrap_container(obj, prefer=which)
    if where not in (which, "(bare state dict)"):
        raise CheckpointError(f"the checkpoint has no {which!r} entry (top-level keys: "
                              f"{sorted(map(str, obj))[:12]}); choose which='model' or which='ema' explicitly")
    return strip_wrapper_prefixes(state), which, where


# ====================================================== LlamaGen / IAR / IAR2 VQ
_RES = r"(norm1|conv1|norm2|conv2|nin_shortcut)\.(weight|bias)"
_ATTN = r"(norm|q|k|v|proj_out)\.(weight|bias)"

LLAMAGEN_VQ_RULES: list[tuple[str, str]] = [_same(p) for p in (
    r"(encoder|decoder)\.conv_in\.(weight|bias)",
    r"(encoder|decoder)\.conv_blocks\.(\d+)\.res\.(\d+)\." + _RES,
    r"(encoder|decoder)\.conv_blocks\.(\d+)\.attn\.(\d+)\." + _ATTN,
    r"encoder\.conv_blocks\.(\d+)\.downsample\.conv\.(weight|bias)",
    r"decoder\.conv_blocks\.(\d+)\.upsample\.conv\.(weight|bias)",
    r"(encoder|decoder)\.mid\.([02])\." + _RES,
    r"(encoder|decoder)\.mid\.(1)\." + _ATTN,
    r"(encoder|decoder)\.(norm_out|conv_out)\.(weight|bias)",
    r"(quant_conv|post_quant_conv)\.(weight|bias)",
    r"quantize\.embedding\.weight",
)]


def llamagen_vq_keymap() -> KeyMap:
    """LlamaGen VQ-16/VQ-8 and IAR's reordered VQ-16; also IAR2 stage 1 (docs/checkpoints.md#llamagen-vq-tokenizer, docs/checkpoints.md#iar2-tokenizer)."""
    return KeyMap(name="LlamaGen VQ tokenizer", rules=LLAMAGEN_VQ_RULES, drop=[r"quantize\.codebook_used"])


def iar2_vq_keymap() -> KeyMap:
    """IAR2 stage-2 tokenizer: the VQ-16 layout plus the bare detail codebook (docs/checkpoints.md#iar2-tokenizer)."""
    return KeyMap(name="IAR2 semantic-detail tokenizer",
                  rules=LLAMAGEN_VQ_RULES + [_same(r"quantize\.embedding_second")],
                  drop=[r"quantize\.codebook_used", r"quantize\.codebook_used2"])


def check_vq_args(tokenizer: nn.Module, args: Any, what: str, quantizer_gin: str) -> None:
    """Cross-check the ``args`` of a LlamaGen/IAR2 VQ trainer checkpoint against the configured tokenizer.

    ``vq_model`` (``VQ-16``, ``VQ-8``) fixes the downsampling, which no weight shape
    records when only the number of levels differs; ``codebook_size`` and
    ``codebook_embed_dim`` are checked here too, so the error names the argument
    rather than a tensor shape. Every mismatch is listed at once.
    """
    if args is None:
        return
    get = args.get if isinstance(args, Mapping) else (lambda k, d=None: getattr(args, k, d))
    problems: list[str] = []
    vq_model = get("vq_model")
    m = re.fullmatch(r"VQ-(\d+)", vq_model) if isinstance(vq_model, str) else None
    down = getattr(tokenizer, "downsample", None)
    if m and down is not None and int(m.group(1)) != down:
        want = {16: "vq16", 8: "vq8"}.get(int(m.group(1)))
        fix = f"use tokenizers.llamagen_vq.preset = \"{want}\" (gin/tokenizers/llamagen_{want}.gin)" if want else \
            "use a preset with that downsampling (tokenizers.llamagen_vq.preset)"
        problems.append(f"args.vq_model = {vq_model!r} downsamples by {m.group(1)}, but the tokenizer downsamples by "
                        f"{down}: {fix}")
    size, dim = get("codebook_size"), get("codebook_embed_dim")
    sizes = tuple(getattr(tokenizer, "codebook_sizes", ()))
    if isinstance(size, int) and sizes and size != sizes[-1]:
        problems.append(f"args.codebook_size = {size}, but the quantizer has {sizes[-1]} codes: "
                        f"bind '{quantizer_gin} = {size}'")
    qdim = getattr(getattr(tokenizer, "quantize", None), "dim", None)
    if isinstance(dim, int) and qdim is not None and dim != qdim:
        problems.append(f"args.codebook_embed_dim = {dim}, but the quantizer's codes are {qdim}-dimensional: "
                        f"use a preset with codebook_dim = {dim}")
    if problems:
        raise CheckpointArgsError(f"{what} was trained with other settings than the configured tokenizer:\n  "
                                  + "\n  ".join(problems))


def _load_vq(tokenizer: nn.Module, checkpoint: Any, which: str, keymap: KeyMap, fmt: str) -> TokenizerLoadResult:
    obj, path, sha = _read(checkpoint)
    if isinstance(obj, Mapping):
        check_vq_args(tokenizer, obj.get("args"), f"{fmt} checkpoint{f' {path}' if path else ''}",
                      "quantizers.semantic_detail.detail_codebook_size" if fmt == "iar2_vq"
                      else "quantizers.vq.codebook_size")
    state, chosen, where = _container_entry(obj, which)
    report = keymap.load_into(tokenizer, state, what=f"{fmt} checkpoint{f' {path}' if path else ''} ({chosen})")
    return TokenizerLoadResult(format=fmt, weights=chosen, entry=where, dropped=report.dropped,
                               path=path, sha256=sha)


def load_llamagen_vq(tokenizer: nn.Module, checkpoint: Any, *, which: str = "model") -> TokenizerLoadResult:
    """Strictly load ``vq_ds16_c2i.pt`` / ``vq_ds8_c2i.pt`` (or IAR2 stage 1) into a LlamaGen VQ tokenizer.

    Args:
        tokenizer: built by ``llamagen_vq_tokenizer`` with a quantizer whose codebook is
            ``embedding.weight`` of the checkpoint's shape.
        checkpoint: a path or the loaded container (``{"model": ..., "ema": ...}``) or a state dict.
        which: "model", "ema", or "auto" (ema when present; the reconstruction default).
    """
    return _load_vq(tokenizer, checkpoint, which, llamagen_vq_keymap(), "llamagen_vq")


def load_iar2_vq(tokenizer: nn.Module, checkpoint: Any, *, which: str = "model") -> TokenizerLoadResult:
    """Strictly load IAR2's stage-2 tokenizer (``0485000.pt``); ``which`` as in :func:`load_llamagen_vq`."""
    return _load_vq(tokenizer, checkpoint, which, iar2_vq_keymap(), "iar2_vq")


def _usage_buffers(names: Iterable[str], like: torch.Tensor) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(USAGE_BUFFER_LENGTH, dtype=torch.float32, device=like.device) for n in names}


def export_llamagen_vq(tokenizer: nn.Module, *, with_usage_buffers: bool = False) -> dict[str, torch.Tensor]:
    """arforge -> the official ``model`` state dict. ``with_usage_buffers`` adds a zero
    ``quantize.codebook_used`` so that upstream's strict ``load_state_dict`` accepts it."""
    out = llamagen_vq_keymap().export(tokenizer.state_dict())
    if with_usage_buffers:
        out.update(_usage_buffers(["quantize.codebook_used"], next(iter(out.values()))))
    return out


def export_iar2_vq(tokenizer: nn.Module, *, with_usage_buffers: bool = False) -> dict[str, torch.Tensor]:
    """arforge -> IAR2's stage-2 ``model`` state dict (see :func:`export_llamagen_vq`)."""
    out = iar2_vq_keymap().export(tokenizer.state_dict())
    if with_usage_buffers:
        out.update(_usage_buffers(["quantize.codebook_used", "quantize.codebook_used2"], next(iter(out.values()))))
    return out


# ==================================================== Open-MAGVIT2 tokenizer
_OMV2_RES = (r"(norm1\.weight|norm1\.bias|conv1\.weight|norm2\.weight|norm2\.bias|conv2\.weight"
             r"|nin_shortcut\.weight)")

OPEN_MAGVIT2_RULES: list[tuple[str, str]] = [_same(p) for p in (
    r"encoder\.conv_in\.weight",
    r"encoder\.down\.(\d+)\.block\.(\d+)\." + _OMV2_RES,
    r"encoder\.down\.(\d+)\.downsample\.(weight|bias)",
    r"(encoder|decoder)\.mid_block\.(\d+)\." + _OMV2_RES,
    r"(encoder|decoder)\.(norm_out|conv_out)\.(weight|bias)",
    r"decoder\.conv_in\.(weight|bias)",
    r"decoder\.adaptive\.(\d+)\.(gamma|beta)\.(weight|bias)",
    r"decoder\.up\.(\d+)\.block\.(\d+)\." + _OMV2_RES,
    r"decoder\.up\.(\d+)\.upsample\.conv1\.(weight|bias)",
)]

#: Lightning entries that are never generator weights (docs/checkpoints.md#open-magvit2-tokenizer).
_OMV2_TRAINING_ONLY = [r"loss\..*"]
_OMV2_EMA_META = [r"model_ema\.decay", r"model_ema\.num_updates", r"model_ema\.loss.*"]


def open_magvit2_keymap() -> KeyMap:
    """Raw generator weights of ``imagenet_{256,128}_L.ckpt``; EMA entries and ``loss.*`` dropped."""
    return KeyMap(name="Open-MAGVIT2 tokenizer (raw weights)", rules=OPEN_MAGVIT2_RULES,
                  drop=_OMV2_TRAINING_ONLY + [r"model_ema\..*"])


def ema_name_map(module: nn.Module, *, prefix: str = "model_ema.") -> dict[str, str]:
    """``prefix + name.replace(".", "")`` -> name over ``module``'s parameters (upstream ``LitEma``).

    Raises ``KeyMapError`` if two parameter names collapse to the same EMA name,
    since the map would then be ambiguous.
    """
    out: dict[str, str] = {}
    clashes: list[str] = []
    for name, _ in module.named_parameters():
        flat = prefix + name.replace(".", "")
        if flat in out:
            clashes.append(f"{out[flat]} and {name} -> {flat}")
        out[flat] = name
    if clashes:
        raise KeyMapError("the EMA name map is not injective: " + "; ".join(clashes))
    return out


def open_magvit2_ema_keymap(tokenizer: nn.Module) -> KeyMap:
    """EMA weights ``model_ema.<name without dots>``, resolved against the live module's names.

    Raw ``encoder.*``/``decoder.*``, ``loss.*``, ``model_ema.{decay,num_updates}`` and the
    discriminator's EMA entries are dropped (docs/checkpoints.md#open-magvit2-tokenizer, docs/checkpoints.md#what-each-strict-map-covers).
    """
    names = ema_name_map(tokenizer)
    rules = [(re.escape(flat), name) for flat, name in names.items()]
    return KeyMap(name="Open-MAGVIT2 tokenizer (EMA weights)", rules=rules,
                  drop=_OMV2_TRAINING_ONLY + _OMV2_EMA_META + [r"encoder\..*", r"decoder\..*"])


def load_open_magvit2_tokenizer(tokenizer: nn.Module, checkpoint: Any, *, which: str = "model"
                                ) -> TokenizerLoadResult:
    """Strictly load an Open-MAGVIT2 tokenizer checkpoint (Lightning ``state_dict``).

    Args:
        tokenizer: built by ``open_magvit2_tokenizer`` (the LFQ holds no persistent state).
        checkpoint: a path, the Lightning container (``{"state_dict": ...}``) or its state dict;
            also an ``AR_256_*.ckpt``, whose ``first_stage_model.*`` entries are the tokenizer
            (docs/checkpoints.md#open-magvit2-ar; the transformer's entries are the AR loader's).
        which: "model" (raw weights), "ema", or "auto" (EMA when the file has it: the
            tokenizer-evaluation default, docs/checkpoints.md#open-magvit2-tokenizer).
    """
    if which not in ("model", "ema", "auto"):
        raise ValueError(f"which must be 'model', 'ema' or 'auto' (got {which!r})")
    obj, path, sha = _read(checkpoint)
    state, entry = unwrap_container(obj, prefer="state_dict")
    state = strip_wrapper_prefixes(state)
    embedded = {k[len(AR_TOKENIZER_PREFIX):]: v for k, v in state.items() if k.startswith(AR_TOKENIZER_PREFIX)}
    if embedded:  # an AR file: only its tokenizer part is ours, strictly mapped like a tokenizer file
        state, entry = embedded, f"{entry}/{AR_TOKENIZER_PREFIX}*"
    has_ema = any(k.startswith("model_ema.") for k in state)
    if which == "auto":
        which = "ema" if has_ema else "model"
    if which == "ema" and not has_ema:
        raise CheckpointError(f"the Open-MAGVIT2 checkpoint{f' {path}' if path else ''} has no EMA weights "
                              "(no model_ema.* keys); load which='model'")
    keymap = open_magvit2_keymap() if which == "model" else open_magvit2_ema_keymap(tokenizer)
    report = keymap.load_into(tokenizer, state,
                              what=f"Open-MAGVIT2 checkpoint{f' {path}' if path else ''} ({which} weights)")
    return TokenizerLoadResult(format="open_magvit2", weights=which, entry=entry, dropped=report.dropped,
                               path=path, sha256=sha)


def export_open_magvit2_tokenizer(tokenizer: nn.Module, *, which: str = "model") -> dict[str, torch.Tensor]:
    """arforge -> the official Lightning ``state_dict`` entries: raw ``encoder.*``/``decoder.*``
    (``which="model"``) or the flattened ``model_ema.*`` names (``which="ema"``)."""
    state = tokenizer.state_dict()
    if which == "model":
        return open_magvit2_keymap().export(state)
    if which == "ema":
        names = ema_name_map(tokenizer)
        return open_magvit2_ema_keymap(tokenizer).export(state, official_keys=names)
    raise ValueError(f"which must be 'model' or 'ema' (got {which!r})")


# ============================================================ discriminator
_DISC_RULE = r"main\.(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)"


def load_patchgan_discriminator(discriminator: nn.Module, checkpoint: Any, *, layout: str = "llamagen"
                                ) -> TokenizerLoadResult:
    """Load the PatchGAN weights needed to resume training (docs/checkpoints.md#llamagen-vq-tokenizer, docs/checkpoints.md#open-magvit2-tokenizer).

    ``layout="llamagen"``: the ``discriminator`` entry of a LlamaGen/IAR/IAR2 VQ
    container (``main.*``). ``layout="open_magvit2"``: ``loss.discriminator.main.*``
    of a Lightning ``state_dict``; every other entry is dropped.
    """
    obj, path, sha = _read(checkpoint)
    if layout == "llamagen":
        if not isinstance(obj, Mapping) or not isinstance(obj.get("discriminator"), Mapping):
            raise CheckpointError(f"the checkpoint{f' {path}' if path else ''} has no 'discriminator' entry")
        state, entry = strip_wrapper_prefixes(obj["discriminator"]), "discriminator"
        keymap = KeyMap(name="PatchGAN discriminator (LlamaGen)", rules=[_same(_DISC_RULE)])
    elif layout == "open_magvit2":
        state, entry = unwrap_container(obj, prefer="state_dict")
        state = strip_wrapper_prefixes(state)
        keymap = KeyMap(name="PatchGAN discriminator (Open-MAGVIT2)",
                        rules=[(r"loss\.discriminator\." + _DISC_RULE, r"main.\1.\2")],
                        drop=[r"encoder\..*", r"decoder\..*", r"loss\.perceptual_loss\..*", r"model_ema\..*"])
    else:
        raise ValueError(f"layout must be 'llamagen' or 'open_magvit2' (got {layout!r})")
    report = keymap.load_into(discriminator, state, what=f"discriminator in {path or 'checkpoint'}")
    return TokenizerLoadResult(format=f"patchgan_{layout}", weights="model", entry=entry,
                               dropped=report.dropped, path=path, sha256=sha)
