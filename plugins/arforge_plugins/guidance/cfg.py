"""Classifier-free guidance schedules: the ``samplers.*`` plugins of :func:`arforge.generation.generate`.

See docs/llamagen.md#sampling, docs/llamagen.md#sampling-defaults, docs/llamagen.md#cfg-batch-layout. Each
sampler says once, from its settings, whether guidance is on (``guided``: some
scale ≠ 1 at some step) and gives the scale of sub-token k at position n,
``scale(k, n, L, info)``, as a number or a per-sample (B,) tensor. A sub-token
whose scale is 1 gets the conditional logits unchanged.

* :class:`ConstantCFG` — LlamaGen, IAR, Open-MAGVIT2 (per-sub-token scales, docs/open_magvit2.md#sampling).
* :class:`IntervalCFG` — LlamaGen's ``cfg_interval`` (docs/llamagen.md#sampling), in token indices.
* :class:`LinearCFG` — a start → end ramp over the sequence, per sub-token.
* :class:`AdaptiveAttentionCFG` — IAR2's progressive attention-guided CFG (docs/iar2.md#sampling).

Scales given as one number apply to every sub-token; a tuple gives one value
per sub-token ((pre, post) for Open-MAGVIT2, (semantic, detail) for IAR2).
In a gin file::

    jobs.sample.sampler = @samplers.cfg_adaptive_attention()
    samplers.cfg_adaptive_attention.sem_end = 3.0      # upstream cfg-scale1_2
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from arforge.ar_model import DecodeInfo
from arforge.errors import ConfigError

__all__ = ["ConstantCFG", "IntervalCFG", "LinearCFG", "AdaptiveAttentionCFG", "progress_weight"]

Scale = float | Sequence[float]


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


def _fmt(vals: tuple[float, ...]) -> float | str:
    return vals[0] if len(vals) == 1 else str(tuple(vals))


def progress_weight(n: int, L: int, attn_cls: torch.Tensor | None = None, w_attn: float = 0.0) -> Any:
    """IAR2's w(n) = n/(L − 1) + w_attn·a_n, and 0.5 + w_attn·a_n when L = 1 (docs/iar2.md#sampling).

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
        self.scales = _as_scales("ConstantCFG.scale", scale)
        self.guided = any(s != 1.0 for s in self.scales)

    def scale(self, k: int, n: int, L: int, info: DecodeInfo) -> float:
        return _pick("ConstantCFG.scale", self.scales, k)

    def params(self) -> dict[str, Any]:
        return {"cfg.sampler": "constant", "cfg.scale": _fmt(self.scales)}

    def __repr__(self) -> str:
        return f"ConstantCFG(scale={_fmt(self.scales)})"


class IntervalCFG:
    """LlamaGen's ``cfg_interval`` (docs/llamagen.md#sampling), in token indices.

    Guidance s applies to tokens 0 … ``interval`` and scale 1 (ℓ_c) afterwards;
    ``interval`` = −1 guides every token. Upstream compares its float
    ``cfg_interval`` i with the decode-loop index, which is token − 1, so it
    guides tokens 0 … i + 1: upstream i corresponds to ``interval`` = ⌊i⌋ + 1
    (and i ≤ −1 to −1), see :meth:`from_upstream`.

    After the interval the batch stays doubled (``arforge.generation``: the
    model fixes its layout per call); only the combine is skipped.
    """

    needs_cls_attention = False

    def __init__(self, *, scale: Scale = 1.5, interval: int = -1):
        """
        Args:
            scale: s, or one per sub-token (docs/llamagen.md#sampling-defaults: LlamaGen DDP default 1.5).
            interval: last guided token index; −1 = every token (upstream's default).
        """
        self.scales = _as_scales("IntervalCFG.scale", scale)
        if int(interval) != interval or interval < -1:
            raise ConfigError(f"IntervalCFG.interval must be an integer token index >= -1 (-1 = always), "
                              f"got {interval!r}; for upstream's cfg_interval use IntervalCFG.from_upstream")
        self.interval = int(interval)
        self.guided = any(s != 1.0 for s in self.scales)

    @classmethod
    def from_upstream(cls, *, cfg_scale: Scale, cfg_interval: float) -> "IntervalCFG":
        """LlamaGen's (cfg_scale, cfg_interval): guidance while decode index i ≤ cfg_interval, i.e. tokens ≤ i + 1."""
        c = float(cfg_interval)
        return cls(scale=cfg_scale, interval=-1 if c <= -1 else math.floor(c) + 1)

    def scale(self, k: int, n: int, L: int, info: DecodeInfo) -> float:
        if self.interval >= 0 and n > self.interval:
            return 1.0
        return _pick("IntervalCFG.scale", self.scales, k)

    def params(self) -> dict[str, Any]:
        return {"cfg.sampler": "interval", "cfg.scale": _fmt(self.scales), "cfg.interval": self.interval}

    def __repr__(self) -> str:
        return f"IntervalCFG(scale={_fmt(self.scales)}, interval={self.interval})"


class LinearCFG:
    """A linear ramp s(n) = s_start + (s_end − s_start)·w(n), w(n) = n/(L − 1) (0.5 when L = 1).

    IAR2's progressive schedule without the attention term (docs/iar2.md#sampling with
    w_attn = 0); start and end may be per-sub-token tuples.
    """

    needs_cls_attention = False

    def __init__(self, *, start: Scale = 1.0, end: Scale = 2.0):
        """start, end: the scales at the first and last token (one value or one per sub-token)."""
        self.starts = _as_scales("LinearCFG.start", start)
        self.ends = _as_scales("LinearCFG.end", end)
        if len(self.starts) != len(self.ends) and 1 not in (len(self.starts), len(self.ends)):
            raise ConfigError(f"LinearCFG.start has {len(self.starts)} values and end {len(self.ends)}; "
                              "give one value or the same number per sub-token")
        self.guided = any(s != 1.0 for s in self.starts + self.ends)

    def scale(self, k: int, n: int, L: int, info: DecodeInfo) -> float:
        s1, s2 = _pick("LinearCFG.start", self.starts, k), _pick("LinearCFG.end", self.ends, k)
        return s1 + (s2 - s1) * progress_weight(n, L)  # exactly s1 when s1 = s2

    def params(self) -> dict[str, Any]:
        return {"cfg.sampler": "linear", "cfg.start": _fmt(self.starts), "cfg.end": _fmt(self.ends)}

    def __repr__(self) -> str:
        return f"LinearCFG(start={_fmt(self.starts)}, end={_fmt(self.ends)})"


class AdaptiveAttentionCFG:
    """IAR2's progressive attention-guided CFG (docs/iar2.md#sampling; defaults: the IAR2 README, docs/llamagen.md#sampling-defaults).

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
                raise ConfigError("AdaptiveAttentionCFG: give either scales=((s11, s12), (s21, s22)) or "
                                  "sem_start/sem_end/det_start/det_end, not both")
            pairs = tuple(tuple(float(v) for v in p) for p in scales)
            if not pairs or any(len(p) != 2 for p in pairs):
                raise ConfigError(f"AdaptiveAttentionCFG.scales must be (start, end) pairs, one per sub-token, "
                                  f"got {scales!r}")
        else:
            d = (1.75, 3.0, 1.75, 3.0)
            s11, s12, s21, s22 = (float(v) if v is not None else d[i] for i, v in enumerate(named))
            pairs = ((s11, s12), (s21, s22))
        for p in pairs:
            if not all(math.isfinite(v) for v in p):
                raise ConfigError(f"AdaptiveAttentionCFG scales must be finite, got {pairs}")
        if not math.isfinite(w_attn):
            raise ConfigError(f"AdaptiveAttentionCFG.w_attn must be finite, got {w_attn}")
        self.pairs = pairs
        self.w_attn = float(w_attn)
        self.guided = any(v != 1.0 for p in pairs for v in p)

    def weight(self, n: int, L: int, attn_cls: torch.Tensor) -> torch.Tensor:
        """w(n) per sample: (B,) from the (B,) class attention a_n."""
        return progress_weight(n, L) + self.w_attn * attn_cls.float()

    def scale(self, k: int, n: int, L: int, info: DecodeInfo) -> torch.Tensor:
        if info.attn_cls is None:
            raise ConfigError("AdaptiveAttentionCFG needs the class-token attention a_n: decode with "
                              "record_cls_attention (generate() does so for this sampler by default)")
        if k >= len(self.pairs):
            raise ConfigError(f"AdaptiveAttentionCFG has (start, end) scales for {len(self.pairs)} sub-tokens but "
                              f"the model asks for sub-token {k}")
        s1, s2 = self.pairs[k]
        return s1 + (s2 - s1) * self.weight(n, L, info.attn_cls)  # (B,) = s1·(1 − w) + s2·w

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cfg.sampler": "adaptive_attention", "cfg.w_attn": self.w_attn}
        for k, (s1, s2) in enumerate(self.pairs):
            out[f"cfg.scale{k + 1}_1"] = s1
            out[f"cfg.scale{k + 1}_2"] = s2
        return out

    def __repr__(self) -> str:
        return f"AdaptiveAttentionCFG(scales={self.pairs}, w_attn={self.w_attn})"
