"""Strict official key maps for the AR checkpoints (docs/checkpoints.md#llamagen-and-iar-gpt, docs/checkpoints.md#open-magvit2-ar, docs/checkpoints.md#iar2-gpt, docs/checkpoints.md#what-each-strict-map-covers).

Each format is a :class:`arforge.keymap.KeyMap` from official names to
:class:`arforge.ar_model.ARModel` names; the same rules run backwards for export.
Loading (docs/checkpoints.md#loading-rules):

1. ``path_or_state`` is a file (read with :func:`arforge.checkpoint.load_foreign`:
   ``weights_only=True`` plus the allow-list), a container dict or a bare state dict;
2. the container is unwrapped (DDP ``model``/``ema``, Lightning ``state_dict``,
   FSDP consolidated bare dict) and the ``module.``/``_orig_mod.``/
   ``_fsdp_wrapped_module.`` segments are stripped;
3. the map is applied strictly: every parameter receives exactly one tensor,
   every source key is mapped or on the format's drop list, shapes match, and
   a failure lists every missing, unexpected and mis-shaped key at once.

Formats:

* **LlamaGen / IAR GPT** (docs/checkpoints.md#llamagen-and-iar-gpt): 7·n_layer + 4 keys; drops ``freqs_cis``,
  ``layers.*.attention.kv_cache.*`` and ``causal_mask``.
* **Open-MAGVIT2 AR** (docs/checkpoints.md#open-magvit2-ar): 7·(L + L_f) + 6 ``transformer.*`` keys; drops the KV caches of a
  model saved after sampling. The embedded
  tokenizer (``first_stage_model.*``) is not part of the AR model: it is returned
  with the prefix stripped (``LoadResult.tokenizer_state``) for the caller to
  load into a tokenizer, never dropped silently.
* **IAR2 GPT** (docs/checkpoints.md#iar2-gpt): 7·(n_layer + 5) + 20 keys; drops ``kv_cache`` keys; turns on
  the ``repeat_interleave`` RoPE quirk the weights were trained with (docs/iar2.md#the-repeat-interleaved-rope-table).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch

from arforge.ar_model import ARModel
from arforge.checkpoint import CheckpointError, load_foreign, strip_wrapper_prefixes, unwrap_container
from arforge.keymap import KeyMap, KeyMapReport

__all__ = [
    "CheckpointArgsError",
    "check_args",
    "LLAMAGEN_GPT",
    "OPEN_MAGVIT2_AR",
    "IAR2_GPT",
    "LoadResult",
    "load_llamagen_gpt",
    "export_llamagen_gpt",
    "load_open_magvit2_ar",
    "export_open_magvit2_ar",
    "load_iar2_gpt",
    "export_iar2_gpt",
]

#: the seven tensors of one Llama block (docs/checkpoints.md#llamagen-and-iar-gpt table), as a regex alternation
_BLOCK = r"(attention\.wqkv|attention\.wo|feed_forward\.w1|feed_forward\.w2|feed_forward\.w3|attention_norm|ffn_norm)"

LLAMAGEN_GPT = KeyMap(
    name="LlamaGen GPT",
    rules=[
        (r"cls_embedding\.embedding_table\.weight", "cls_embedding.embedding_table.weight"),
        (r"tok_embeddings\.weight", "embedder.tok_embeddings.weight"),
        (r"layers\.(\d+)\." + _BLOCK + r"\.weight", r"backbone.layers.\1.\2.weight"),
        (r"norm\.weight", "head.norm.weight"),
        (r"output\.weight", "head.output.weight"),
    ],
    drop=[r"freqs_cis", r"layers\.\d+\.attention\.kv_cache\.(k_cache|v_cache)", r"causal_mask"],
)

OPEN_MAGVIT2_AR = KeyMap(
    name="Open-MAGVIT2 AR",
    rules=[
        (r"transformer\.pre_emb\.weight", "embedder.pre_emb.weight"),
        (r"transformer\.post_emb\.weight", "embedder.post_emb.weight"),
        (r"transformer\.class_emb\.embedding_table\.weight", "cls_embedding.embedding_table.weight"),
        (r"transformer\.spatial_blocks\.(\d+)\." + _BLOCK + r"\.weight", r"backbone.layers.\1.\2.weight"),
        (r"transformer\.factorized_blocks\.(\d+)\." + _BLOCK + r"\.weight", r"head.factorized_blocks.\1.\2.weight"),
        (r"transformer\.norm\.weight", "head.norm.weight"),
        (r"transformer\.head\.(0|1)\.weight", r"head.head.\1.weight"),
    ],
    # a model saved after sampling carries its KV caches (and may carry the RoPE table and causal mask,
    # which upstream keeps as plain attributes): none of them are weights
    drop=[r"transformer\.(spatial_blocks|factorized_blocks)\.\d+\.attention\.kv_cache\.(k_cache|v_cache)",
          r"transformer\.(freqs_cis|causal_mask)"],
)

IAR2_GPT = KeyMap(
    name="IAR2 GPT",
    rules=[
        (r"cls_embedding\.embedding_table\.weight", "cls_embedding.embedding_table.weight"),
        (r"(tok_embeddings1|tok_embeddings2)\.weight", r"embedder.\1.weight"),
        (r"aggregation_layer\.(0|2)\.(weight|bias)", r"embedder.aggregation_layer.\1.\2"),
        (r"layers\.(\d+)\." + _BLOCK + r"\.weight", r"backbone.layers.\1.\2.weight"),
        (r"factorized_blocks\.(\d+)\." + _BLOCK + r"\.weight", r"head.factorized_blocks.\1.\2.weight"),
        (r"norm\.weight", "head.norm.weight"),
        (r"(output1|output2|mlp1|mlp2)\.(0\.weight|0\.bias|2\.weight)", r"head.\1.\2"),
    ],
    drop=[r"(layers|factorized_blocks)\.\d+\.attention\.kv_cache\.(k_cache|v_cache)"],
)

#: the Lightning prefix of the tokenizer embedded in Open-MAGVIT2 AR files (docs/checkpoints.md#open-magvit2-ar)
TOKENIZER_PREFIX = "first_stage_model."


@dataclass
class LoadResult:
    report: KeyMapReport  #: what was mapped/dropped
    container: str  #: which entry held the weights ("model", "ema", "state_dict", "(bare state dict)")
    tokenizer_state: dict[str, torch.Tensor] = field(default_factory=dict)  #: Open-MAGVIT2's embedded tokenizer


def _source(path_or_state: str | os.PathLike | Mapping[str, Any], prefer: str,
            model: ARModel | None = None) -> tuple[dict, str, str]:
    """-> (normalised state dict, container entry, description for errors); checks ``args`` against ``model``."""
    if isinstance(path_or_state, (str, os.PathLike)):
        what = str(path_or_state)
        obj = load_foreign(path_or_state)
    else:
        what = "state dict"
        obj = path_or_state
    if prefer == "ema" and isinstance(obj, Mapping) and "ema" not in obj:  # never fall back silently
        raise CheckpointError(f"{what} has no 'ema' entry (top-level keys: {sorted(map(str, obj))[:12]}); "
                              "load weights='model' instead")
    if model is not None and isinstance(obj, Mapping):
        check_args(model, obj.get("args"), what)
    state, where = unwrap_container(obj, prefer=prefer)
    return strip_wrapper_prefixes(state), where, what


class CheckpointArgsError(CheckpointError):
    """The checkpoint's recorded training arguments contradict the configured model."""


#: gin files of the paper presets, by family and size (gin/models/)
_GIN_NAMES = {"llamagen_gpt": "llamagen", "iar2_gpt": "iar2", "open_magvit2_ar": "open_magvit2"}


def _preset_gin(family: str, size: str) -> str:
    return f"gin/models/{_GIN_NAMES.get(family, family)}_{size.lower()}.gin"


def check_args(model: ARModel, args: Any, what: str) -> None:
    """Cross-check the ``args`` a LlamaGen/IAR/IAR2 trainer saved against the configured model.

    The shapes of most settings are caught by the strict key map, but not all:
    ``block_size`` (the token grid) changes no weight shape, so a 256 px checkpoint
    would load into a 576-token model and give wrong logits. Every mismatch is
    listed at once, naming the checkpoint's argument, the configured value, and the
    binding or gin file that fits the checkpoint. ``args`` is the ``argparse.Namespace``
    (or dict) of the container; FSDP files record none, and nothing is checked then.
    """
    if args is None:
        return
    get = args.get if isinstance(args, Mapping) else (lambda k, d=None: getattr(args, k, d))
    family = getattr(model, "preset_family", "llamagen_gpt")
    gin = f"models.{family}"
    problems: list[str] = []
    image_size, down = get("image_size"), get("downsample_size")
    if isinstance(image_size, int) and isinstance(down, int) and down > 0:
        grid = image_size // down
        if grid * grid != model.block_size:
            problems.append(f"args.image_size = {image_size} with args.downsample_size = {down} is a {grid}x{grid} "
                            f"token grid ({grid * grid} tokens), but the model has block_size = {model.block_size}: "
                            f"bind '{gin}.block_size = {grid * grid}'")
    vocab = get("vocab_size")
    if isinstance(vocab, int) and model.num_subtokens == 1 and vocab != model.vocab_sizes[0]:
        problems.append(f"args.vocab_size = {vocab}, but the model's vocabulary is {model.vocab_sizes[0]}: "
                        f"bind '{gin}.vocab_size = {vocab}'")
    classes = get("num_classes")
    if isinstance(classes, int) and classes != model.cls_embedding.num_classes:
        problems.append(f"args.num_classes = {classes}, but the model has {model.cls_embedding.num_classes} classes: "
                        f"bind '{gin}.num_classes = {classes}'")
    cls_tokens = get("cls_token_num")
    if isinstance(cls_tokens, int) and cls_tokens != 1:
        problems.append(f"args.cls_token_num = {cls_tokens}: arforge's class-conditional models use one class token")
    gpt_model, preset = get("gpt_model"), getattr(model, "preset", None)
    if isinstance(gpt_model, str) and preset:
        want = gpt_model.removeprefix("ht-").removeprefix("GPT-")
        have = preset.split("/", 1)[1]
        if want != have and want in _known_sizes(family):
            problems.append(f"args.gpt_model = {gpt_model!r}, but the model is size {have!r} ({gin}.size): "
                            f"use {_preset_gin(family, want)} (or bind '{gin}.size = \"{want}\"')")
    if problems:
        raise CheckpointArgsError(f"{what} was trained with other settings than the configured model:\n  "
                                  + "\n  ".join(problems))


def _known_sizes(family: str) -> set[str]:
    from arforge_plugins.models import ar_presets

    table = {"llamagen_gpt": ar_presets.LLAMAGEN_SIZES, "iar2_gpt": ar_presets.IAR2_SIZES,
             "open_magvit2_ar": ar_presets.OPEN_MAGVIT2_SIZES}.get(family, {})
    return set(table)


def _load(keymap: KeyMap, model: ARModel, state: Mapping[str, torch.Tensor], what: str) -> KeyMapReport:
    return keymap.load_into(model, state, what=f"{what} ({keymap.name})")


def _container(state: dict[str, torch.Tensor], container: str, entry: str) -> dict:
    if container == "bare":
        return state
    if container == entry:
        return {entry: state}
    raise ValueError(f"unknown container {container!r}; use 'bare' or {entry!r}")


# ==================================================================== LlamaGen
def load_llamagen_gpt(model: ARModel, path_or_state: str | os.PathLike | Mapping[str, Any], *,
                      weights: Literal["model", "ema"] = "model") -> LoadResult:
    """Load a LlamaGen/IAR GPT (DDP dict, FSDP ``consolidated.pth`` or a state dict) strictly (docs/checkpoints.md#llamagen-and-iar-gpt).

    ``weights`` picks the DDP entry (``model`` by default, docs/checkpoints.md#containers).
    """
    state, where, what = _source(path_or_state, weights, model)
    return LoadResult(_load(LLAMAGEN_GPT, model, state, what), where)


def export_llamagen_gpt(model: ARModel, *, container: Literal["bare", "model"] = "bare") -> dict:
    """The official layout: a bare (FSDP-style) state dict, or ``{"model": ...}`` like the DDP trainer."""
    return _container(LLAMAGEN_GPT.export(model.state_dict()), container, "model")


# ================================================================ Open-MAGVIT2
def load_open_magvit2_ar(model: ARModel, path_or_state: str | os.PathLike | Mapping[str, Any]) -> LoadResult:
    """Load an Open-MAGVIT2 ``AR_256_*.ckpt`` (Lightning ``state_dict``) strictly (docs/checkpoints.md#open-magvit2-ar).

    The ``first_stage_model.*`` tokenizer weights come back in
    ``tokenizer_state`` (prefix stripped); an AR file without them loads too.
    """
    state, where, what = _source(path_or_state, "state_dict")
    tokenizer = {k[len(TOKENIZER_PREFIX):]: v for k, v in state.items() if k.startswith(TOKENIZER_PREFIX)}
    ar = {k: v for k, v in state.items() if not k.startswith(TOKENIZER_PREFIX)}
    return LoadResult(_load(OPEN_MAGVIT2_AR, model, ar, what), where, tokenizer)


def export_open_magvit2_ar(model: ARModel, *, tokenizer_state: Mapping[str, torch.Tensor] | None = None,
                           container: Literal["bare", "state_dict"] = "state_dict") -> dict:
    """The Lightning layout ``{"state_dict": {transformer.*, first_stage_model.*}}`` (or the bare dict)."""
    state = OPEN_MAGVIT2_AR.export(model.state_dict())
    for k, v in (tokenizer_state or {}).items():
        state[TOKENIZER_PREFIX + k] = v
    return _container(state, container, "state_dict")


# ======================================================================== IAR2
def load_iar2_gpt(model: ARModel, path_or_state: str | os.PathLike | Mapping[str, Any], *,
                  weights: Literal["model", "ema"] = "model") -> LoadResult:
    """Load an IAR2 GPT (FSDP ``.pth`` bare dict or DDP ``.pt`` dict) strictly (docs/checkpoints.md#iar2-gpt).

    Sets the ``repeat_interleave`` RoPE flag on the model: the official weights
    were trained with it (docs/iar2.md#the-repeat-interleaved-rope-table).
    """
    state, where, what = _source(path_or_state, weights, model)
    report = _load(IAR2_GPT, model, state, what)
    if not model.backbone.rope_repeat_interleave:
        model.configure_rope(repeat_interleave=True)
    return LoadResult(report, where)


def export_iar2_gpt(model: ARModel, *, container: Literal["bare", "model"] = "bare") -> dict:
    """The official layout: a bare (FSDP-style) state dict, or ``{"model": ...}`` like the DDP trainer."""
    return _container(IAR2_GPT.export(model.state_dict()), container, "model")
