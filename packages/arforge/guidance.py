"""Classifier-free guidance, all of it: the schedules (the ``guidance.*`` components), the
[conditional; unconditional] batch layout and the combine ℓ = ℓ_u + s·(ℓ_c − ℓ_u).

See docs/llamagen.md#sampling, docs/llamagen.md#cfg-batch-layout, docs/llamagen.md#logit-processing,
docs/open_magvit2.md#sampling, docs/iar2.md#sampling and docs/iar2.md#adaptive-cfg.

Why one framework module. The schedule decides *whether* guidance is on and *which scale*
each sub-token gets; the layout and the combine are what that decision means for the batch.
Kept apart, they drifted: the combine in the decode loop, the doubling in the AR model, the
schedules in a plugin, and the same scale logged under several names. Here they are one
contract, and :class:`~arforge.ar_model.ARModel` decodes rows without knowing about guidance
(``setup_caches(batch=rows)``, ``decode_step`` over those rows with the labels it is given).
The framework needs :class:`NoGuidance` (the default of :func:`arforge.generation.generate`)
and the combine, and packages never import plugins; so the schedules live here too and are
registered by ``arforge`` itself (root ``pyproject.toml``), like the jobs and the backbone.
Another distribution may still register its own ``guidance.*`` schedule: it only has to
follow :class:`Guidance`.

A schedule (:class:`Guidance`)
    ``guided``: decided once, from the settings alone (some scale ≠ 1 at some step), so the
    layout is fixed for the whole call (docs/llamagen.md#cfg-batch-layout);
    ``scale(k, n, L, info)``: the scale of sub-token k at position n, a number or a per-sample
    (B,) tensor; ``needs_cls_attention``: record the class-token attention into
    ``info.attn_cls`` (IAR2). A sub-token whose scale is 1 gets ℓ_c unchanged. Optionally
    ``last_guided_position(L)``: the last position where some scale can differ from 1 (None:
    up to the end), which lets the decode stop computing the unconditional rows after it.

The layout (:class:`GuidedBatch`)
    For B images the model decodes ``rows`` = 2B rows [y; null] when guided, else B rows y.
    Each chosen sub-token is written into both halves, and the class attention and the returned
    sub-tokens are read from the conditional half. The logits of each sub-token are combined
    with the schedule's scale by :func:`combine_cfg`, step 1 of
    :func:`arforge.generation.process_logits`. Once the schedule's guidance has ended for good
    (LlamaGen's ``cfg_interval``), :meth:`GuidedBatch.end_guidance` drops the unconditional
    half: the conditional rows come first, so the caches keep serving them as they are.

The schedules
    * :class:`ConstantCFG` — LlamaGen, IAR, Open-MAGVIT2 (per-sub-token scales, docs/open_magvit2.md#sampling).
    * :class:`IntervalCFG` — LlamaGen's ``cfg_interval`` (docs/llamagen.md#sampling), in token indices.
    * :class:`LinearCFG` — a start → end ramp over the sequence, per sub-token.
    * :class:`AdaptiveAttentionCFG` — IAR2's progressive attention-guided CFG (docs/iar2.md#adaptive-cfg).

    Scales given as one number apply to every sub-token; a tuple gives one value per sub-token
    ((pre, post) for Open-MAGVIT2, (semantic, detail) for IAR2).

Names. A schedule's settings are logged under their gin bindings only
(``guidance.cfg_linear.start``): the same name in the gin file, the MLflow param, the Optuna
parameter and the ``arforge compare`` column (docs/studies.md). The sample job adds the
schedule's ``repr`` as the tag ``sample.guidance``, a description, not a second name. In a gin
file::

    jobs.sample.guidance = @guidance.cfg_adaptive_attention()
    guidance.cfg_adaptive_attention.sem_end = 3.0      # upstream cfg-scale1_2
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from arforge.ar_model import DecodeInfo
from arforge.errors import ArforgeError, ConfigError

__all__ = [
    "GuidanceError",
    "Guidance",
    "NoGuidance",
    "GuidedBatch",
    "combine_cfg",
    "ConstantCFG",
    "IntervalCFG",
    "LinearCFG",
    "AdaptiveAttentionCFG",
    "progress_weight",
    "guidance_params",
    "last_guided_position",
]

Scale = float | Sequence[float]


class GuidanceError(ArforgeError, ValueError):
    """Guidance applied to logits or rows that do not have the guided layout."""


@runtime_checkable
class Guidance(Protocol):
    """A guidance schedule (``guidance.*`` components); see the module docstring."""

    guided: bool
    needs_cls_attention: bool

    def scale(self, k: int, n: int, L: int, info: DecodeInfo) -> float | torch.Tensor: ...


def last_guided_position(guidance: Guidance, L: int) -> int | None:
    """The last of positions 0 … L−1 where ``guidance`` may give a scale ≠ 1, or None when
    guidance can last to the end (also for a schedule that does not say)."""
    fn = getattr(guidance, "last_guided_position", None)
    last = fn(L) if callable(fn) else None
    return None if last is None or int(last) >= L - 1 else int(last)


class NoGuidance:
    """Unguided sampling: ℓ = ℓ_c, one row per image."""

    guided = False
    needs_cls_attention = False
    settings: dict[str, Any] = {}

    def scale(self, k: int, n: int, L: int, info: DecodeInfo) -> float:
        return 1.0

    def __repr__(self) -> str:
        return "NoGuidance()"


# ================================================================ the combine
def combine_cfg(logits: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """(2B, V) [cond; uncond] -> (B, V): ℓ_u + s·(ℓ_c − ℓ_u), and exactly ℓ_c where s = 1.

    ``scale`` is a number or a (B,) tensor (per-sample scales, IAR2's adaptive CFG).
    docs/llamagen.md#logit-processing step 1, docs/llamagen.md#cfg-batch-layout.
    """
    if logits.dim() != 2 or logits.shape[0] % 2:
        raise GuidanceError(f"guided logits must be (2B, V) in the [conditional; unconditional] layout "
                            f"(docs/llamagen.md#cfg-batch-layout), got {tuple(logits.shape)}")
    cond, uncond = logits.chunk(2)  # (B, V) each: conditional half first
    if not isinstance(scale, torch.Tensor):
        s = float(scale)
        return cond if s == 1.0 else uncond + s * (cond - uncond)
    s = scale.to(device=logits.device, dtype=logits.dtype)
    if s.dim() == 0:
        s = s.expand(cond.shape[0])
    if s.shape != (cond.shape[0],):
        raise GuidanceError(f"a per-sample CFG scale must have shape ({cond.shape[0]},), got {tuple(scale.shape)}")
    s = s[:, None]  # (B, 1)
    return torch.where(s == 1, cond, uncond + s * (cond - uncond))


# ================================================================= the layout
class GuidedBatch:
    """The rows that one generate call decodes for ``batch`` images under ``guidance``.

    Guided: 2B rows, [conditional; unconditional] (docs/llamagen.md#cfg-batch-layout); both
    halves see the same image tokens and differ only in the label. Unguided: the B rows
    themselves. Whether guidance is on is decided once per call. A schedule whose guidance ends
    for good (LlamaGen's ``cfg_interval``: :func:`last_guided_position`) no longer needs the
    unconditional half: :meth:`ends_after` says when, and :meth:`end_guidance` turns the batch
    into the unguided B rows. Upstream keeps computing the doubled rows to the end and ignores
    the unconditional half; the tokens are the same (the conditional logits are those of the
    same rows, up to the matmul kernels' rounding for another row count).
    """

    def __init__(self, guidance: Guidance | None, *, batch: int):
        """
        Args:
            guidance: the schedule (None: :class:`NoGuidance`).
            batch: B, the images decoded together.
        """
        self.guidance = guidance if guidance is not None else NoGuidance()
        self.guided = bool(self.guidance.guided)  # decided once per call
        self.batch = int(batch)
        self.rows = 2 * self.batch if self.guided else self.batch

    def ends_after(self, n: int, L: int) -> bool:
        """True when the rows are doubled and position n is the schedule's last guided one."""
        return self.guided and last_guided_position(self.guidance, L) == n

    def end_guidance(self) -> None:
        """From now on decode the B conditional rows only (scale 1 everywhere, nothing combined).

        The conditional half is the first B rows, so the caller keeps the first ``rows`` rows of
        its labels, tokens and caches (``ARModel.keep_rows``): their history is already there.
        """
        self.guided = False
        self.rows = self.batch

    def labels(self, labels: torch.Tensor, *, null_class: int) -> torch.Tensor:
        """(B,) -> (rows,): [y; null] when guided, else y."""
        if not self.guided:
            return labels
        return torch.cat([labels, torch.full_like(labels, null_class)])  # (2B,)

    def tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, ...) chosen tokens -> (rows, ...): the same tokens in both halves."""
        return torch.cat([tokens, tokens]) if self.guided else tokens

    def conditional(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, ...) -> (B, ...): the conditional half (all rows when unguided)."""
        if rows.shape[0] != self.rows:
            raise GuidanceError(f"expected {self.rows} rows ({self.batch} images, guided={self.guided}), "
                                f"got {rows.shape[0]}")
        return rows[:self.batch]

    def info(self, info: DecodeInfo) -> DecodeInfo:
        """The model's per-row :class:`DecodeInfo` as the schedule sees it: the (B,) ``attn_cls``
        of the conditional half."""
        if info.attn_cls is None:
            return info
        return dataclasses.replace(info, attn_cls=self.conditional(info.attn_cls))

    def scale(self, k: int, info: DecodeInfo) -> float | torch.Tensor:
        """The schedule's scale for sub-token k (1 when unguided); ``info`` as from :meth:`info`."""
        return self.guidance.scale(k, info.n, info.L, info) if self.guided else 1.0

    def __repr__(self) -> str:
        return f"GuidedBatch({self.guidance!r}, batch={self.batch}, rows={self.rows})"


# ============================================================== the schedules
def _as_scales(name: str, value: Scale) -> tuple[float, ...]:
    vals = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)
    if not vals:
        raise ConfigError(f"{name} needs at least one scale")
    for v in vals:
        if not math.isfinite(v):
            raise ConfigError(f"{name} must be finite, got {value!r}")
    return vals


def _pick(name: str, vals: tuple[float, ...], k: int) -> float:
    """Scale of sub-token k: a single value applies to all."""
    if len(vals) == 1:
        return vals[0]
    if k >= len(vals):
        raise ConfigError(f"{name} has {len(vals)} per-sub-token values but the model asks for sub-token {k}; "
                          "give one value or one per sub-token")
    return vals[k]


def _fmt(vals: tuple[float, ...]) -> float | tuple[float, ...]:
    return vals[0] if len(vals) == 1 else tuple(vals)


def progress_weight(n: int, L: int, attn_cls: torch.Tensor | None = None, w_attn: float = 0.0) -> Any:
    """IAR2's w(n) = n/(L − 1) + w_attn·a_n, and 0.5 + w_attn·a_n when L = 1 (docs/iar2.md#adaptive-cfg).

    Returns a float without ``attn_cls`` (w_attn·a_n omitted), else a (B,) tensor.
    """
    base = n / (L - 1) if L > 1 else 0.5
    if attn_cls is None or w_attn == 0.0:
        return base
    return base + w_attn * attn_cls.float()


class ConstantCFG:
    """Constant guidance ℓ = ℓ_u + s·(ℓ_c − ℓ_u) at every position (docs/llamagen.md#logit-processing, docs/llamagen.md#sampling, docs/open_magvit2.md#sampling).

    Defaults: LlamaGen ``sample_c2i_ddp.py`` 1.5; Open-MAGVIT2-B (1.9, 2.0) as
    (pre, post); IAR 2.25 (docs/llamagen.md#sampling-defaults).
    """

    needs_cls_attention = False

    def __init__(self, *, scale: Scale = 1.5):
        """scale: s, or one s per sub-token (Open-MAGVIT2's per-sub-token ``cfg_scale``, docs/open_magvit2.md#sampling)."""
        self.scales = _as_scales("guidance.cfg_constant.scale", scale)
        self.guided = any(s != 1.0 for s in self.scales)
        self.settings = {"scale": scale}

    def scale(self, k: int, n: int, L: int, info: DecodeInfo) -> float:
        return _pick("guidance.cfg_constant.scale", self.scales, k)

    def __repr__(self) -> str:
        return f"ConstantCFG(scale={_fmt(self.scales)})"


class IntervalCFG:
    """LlamaGen's ``cfg_interval`` (docs/llamagen.md#sampling), in token indices.

    Guidance s applies to tokens 0 … ``interval`` and scale 1 (ℓ_c) afterwards;
    ``interval`` = −1 guides every token. Upstream compares its float
    ``cfg_interval`` i with the decode-loop index, which is token − 1, so it
    guides tokens 0 … i + 1: upstream i corresponds to ``interval`` = ⌊i⌋ + 1
    (and i ≤ −1 to −1), see :meth:`from_upstream`.

    After the interval the decode drops the unconditional rows (:meth:`last_guided_position`,
    :meth:`GuidedBatch.end_guidance`): upstream keeps computing them and skips the combine.
    """

    needs_cls_attention = False

    def __init__(self, *, scale: Scale = 1.5, interval: int = -1):
        """
        Args:
            scale: s, or one per sub-token (docs/llamagen.md#sampling-defaults: LlamaGen DDP default 1.5).
            interval: last guided token index; −1 = every token (upstream's default).
        """
        self.scales = _as_scales("guidance.cfg_interval.scale", scale)
        if int(interval) != interval or interval < -1:
            raise ConfigError(f"guidance.cfg_interval.interval must be an integer token index >= -1 (-1 = always), "
                              f"got {interval!r}; for upstream's cfg_interval use IntervalCFG.from_upstream")
        self.interval = int(interval)
        self.guided = any(s != 1.0 for s in self.scales)
        self.settings = {"scale": scale, "interval": interval}

    @classmethod
    def from_upstream(cls, *, cfg_scale: Scale, cfg_interval: float) -> "IntervalCFG":
        """LlamaGen's (cfg_scale, cfg_interval): guidance while decode index i ≤ cfg_interval, i.e. tokens ≤ i + 1."""
        c = float(cfg_interval)
        return cls(scale=cfg_scale, interval=-1 if c <= -1 else math.floor(c) + 1)

    def scale(self, k: int, n: int, L: int, info: DecodeInfo) -> float:
        if self.interval >= 0 and n > self.interval:
            return 1.0
        return _pick("guidance.cfg_interval.scale", self.scales, k)

    def last_guided_position(self, L: int) -> int | None:
        return None if self.interval < 0 else self.interval

    def __repr__(self) -> str:
        return f"IntervalCFG(scale={_fmt(self.scales)}, interval={self.interval})"


class LinearCFG:
    """A linear ramp s(n) = s_start + (s_end − s_start)·w(n), w(n) = n/(L − 1) (0.5 when L = 1).

    IAR2's progressive schedule without the attention term (docs/iar2.md#adaptive-cfg with
    w_attn = 0); start and end may be per-sub-token tuples.
    """

    needs_cls_attention = False

    def __init__(self, *, start: Scale = 1.0, end: Scale = 2.0):
        """start, end: the scales at the first and last token (one value or one per sub-token)."""
        self.starts = _as_scales("guidance.cfg_linear.start", start)
        self.ends = _as_scales("guidance.cfg_linear.end", end)
        if len(self.starts) != len(self.ends) and 1 not in (len(self.starts), len(self.ends)):
            raise ConfigError(f"guidance.cfg_linear.start has {len(self.starts)} values and end {len(self.ends)}; "
                              "give one value or the same number per sub-token")
        self.guided = any(s != 1.0 for s in self.starts + self.ends)
        self.settings = {"start": start, "end": end}

    def scale(self, k: int, n: int, L: int, info: DecodeInfo) -> float:
        s1 = _pick("guidance.cfg_linear.start", self.starts, k)
        s2 = _pick("guidance.cfg_linear.end", self.ends, k)
        return s1 + (s2 - s1) * progress_weight(n, L)  # exactly s1 when s1 = s2

    def __repr__(self) -> str:
        return f"LinearCFG(start={_fmt(self.starts)}, end={_fmt(self.ends)})"


class AdaptiveAttentionCFG:
    """IAR2's progressive attention-guided CFG (docs/iar2.md#adaptive-cfg; defaults: the IAR2 README, docs/llamagen.md#sampling-defaults).

    For sub-token head k with start and end scales (s_k1, s_k2):
    w(n) = n/(L − 1) + w_attn·a_n (0.5 + w_attn·a_n if L = 1), with a_n the last
    backbone layer's head-averaged attention of the conditional half to the
    class token, per sample; s_k(n) = s_k1·(1 − w) + s_k2·w, a (B,) tensor. w may
    exceed 1 (w(L − 1) = 1 + w_attn·a_n), extrapolating past s_k2; w(0) = w_attn
    because a_0 = 1. Guidance is on iff any of the scales ≠ 1 (decided once,
    docs/llamagen.md#cfg-batch-layout; upstream looks at s_k1 alone).

    Upstream's ``cfg-scale1_1``, ``cfg-scale1_2``, ``cfg-scale2_1`` and
    ``cfg-scale2_2`` are ``sem_start``, ``sem_end``, ``det_start`` and
    ``det_end``: each is bindable on its own (Optuna studies). ``scales`` gives
    the same as ((s11, s12), (s21, s22), …) for heads with other sub-token counts.
    """

    needs_cls_attention = True

    def __init__(self, *, sem_start: float | None = None, sem_end: float | None = None,
                 det_start: float | None = None, det_end: float | None = None, w_attn: float = 0.05,
                 scales: Sequence[Sequence[float]] | None = None):
        """
        Args:
            sem_start, sem_end: s_11, s_12 of the semantic head, sub-token 0 (README: 1.75 → 3.0).
            det_start, det_end: s_21, s_22 of the detail head, sub-token 1 (README: 1.75 → 3.0).
            w_attn: weight of the class attention in w(n) (README 0.05; argparse default 0.1).
            scales: ((start, end) per sub-token) instead of the four names above.
        """
        named = (sem_start, sem_end, det_start, det_end)
        if scales is not None:
            if any(v is not None for v in named):
                raise ConfigError("guidance.cfg_adaptive_attention: give either scales=((s11, s12), (s21, s22)) or "
                                  "sem_start/sem_end/det_start/det_end, not both")
            pairs = tuple(tuple(float(v) for v in p) for p in scales)
            if not pairs or any(len(p) != 2 for p in pairs):
                raise ConfigError(f"guidance.cfg_adaptive_attention.scales must be (start, end) pairs, one per "
                                  f"sub-token, got {scales!r}")
        else:
            d = (1.75, 3.0, 1.75, 3.0)
            s11, s12, s21, s22 = (float(v) if v is not None else d[i] for i, v in enumerate(named))
            pairs = ((s11, s12), (s21, s22))
        for p in pairs:
            if not all(math.isfinite(v) for v in p):
                raise ConfigError(f"guidance.cfg_adaptive_attention scales must be finite, got {pairs}")
        if not math.isfinite(w_attn):
            raise ConfigError(f"guidance.cfg_adaptive_attention.w_attn must be finite, got {w_attn}")
        self.pairs = pairs
        self.w_attn = float(w_attn)
        self.guided = any(v != 1.0 for p in pairs for v in p)
        if scales is not None:
            self.settings = {"scales": scales, "w_attn": w_attn}
        else:  # the four names, defaults filled in
            self.settings = {**{k: v if v is not None else d[i] for i, (k, v) in
                                enumerate(zip(("sem_start", "sem_end", "det_start", "det_end"), named))},
                             "w_attn": w_attn}

    def weight(self, n: int, L: int, attn_cls: torch.Tensor) -> torch.Tensor:
        """w(n) per sample: (B,) from the (B,) class attention a_n."""
        return progress_weight(n, L) + self.w_attn * attn_cls.float()

    def scale(self, k: int, n: int, L: int, info: DecodeInfo) -> torch.Tensor:
        if info.attn_cls is None:
            raise ConfigError("AdaptiveAttentionCFG needs the class-token attention a_n: decode with "
                              "record_cls_attention (generate() does so for this schedule by default)")
        if k >= len(self.pairs):
            raise ConfigError(f"AdaptiveAttentionCFG has (start, end) scales for {len(self.pairs)} sub-tokens but "
                              f"the model asks for sub-token {k}")
        s1, s2 = self.pairs[k]
        return s1 + (s2 - s1) * self.weight(n, L, info.attn_cls)  # (B,) = s1·(1 − w) + s2·w

    def __repr__(self) -> str:
        return f"AdaptiveAttentionCFG(scales={self.pairs}, w_attn={self.w_attn})"


# ==================================================================== logging
def _gin_text(value: Any) -> str:
    """``value`` as a gin file writes it (what a study's trial binds), so the two logs agree."""
    if isinstance(value, tuple):
        inner = ", ".join(_gin_text(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(_gin_text(v) for v in value) + "]"
    return repr(value)


def guidance_params(guidance: Guidance, name: str | None) -> dict[str, str]:
    """MLflow params of a schedule registered as ``name`` (``"guidance.cfg_linear"``).

    ``jobs.sample.guidance`` names the schedule, and each setting appears under its gin
    binding (``guidance.cfg_linear.start``), defaults included: one name per parameter in gin,
    MLflow, Optuna and ``arforge compare`` (docs/studies.md). A schedule that is not registered
    (built in code) has no gin names and gets none; the sample job's ``sample.guidance`` tag
    still describes it.
    """
    if isinstance(guidance, NoGuidance):
        return {"jobs.sample.guidance": "None"}
    if name is None:
        return {}
    out = {"jobs.sample.guidance": f"@{name}()"}
    out.update({f"{name}.{k}": _gin_text(v) for k, v in getattr(guidance, "settings", {}).items()})
    return out
