"""Strict, explicit key mappings between official checkpoint layouts and arforge modules.

A load succeeds only if every arforge
parameter/persistent buffer receives exactly one source tensor, every source
key is mapped or on the format's drop list, shapes match (after documented
transforms), and a failure lists *all* missing, unexpected and mis-shaped keys
at once, each under the name it has in the official file (the one the user
can look up). ``strict=False`` is never used.

A :class:`KeyMap` is a list of ``(official_pattern, arforge_template)`` regex
rules plus a drop list; the same rules run in reverse for export, so a mapping
is checked in both directions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from arforge.errors import ArforgeError

Transform = Callable[[torch.Tensor], torch.Tensor]


class KeyMapError(ArforgeError):
    """A strict mapping failed; the message lists every problem."""


@dataclass
class KeyMapReport:
    missing: list[str] = field(default_factory=list)  #: official keys the file lacks (with the arforge name)
    unexpected: list[str] = field(default_factory=list)  #: source keys neither mapped nor dropped
    mismatched: list[str] = field(default_factory=list)  #: "official key: source shape vs arforge key target shape"
    duplicated: list[str] = field(default_factory=list)  #: source keys mapped onto an arforge key already filled
    dropped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.duplicated)

    def format(self, what: str, limit: int = 80) -> str:
        lines = [f"{what} does not match the expected layout:"]
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatch", self.mismatched), ("mapped twice", self.duplicated)):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... (+{len(items) - limit})" if len(items) > limit else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        return "\n".join(lines)


@dataclass
class KeyMap:
    """Regex rename rules (official -> arforge), a drop list and per-key transforms.

    ``rules`` are tried in order; the first whose pattern fully matches wins.
    Templates use ``\\1``-style groups. ``transforms`` map an *arforge* key
    pattern to a function applied on load (``inverse_transforms`` on export),
    e.g. the Open-MAGVIT2 DCR -> CRD upsampler channel permutation.
    """

    name: str
    rules: Sequence[tuple[str, str]]
    drop: Sequence[str] = ()
    transforms: Mapping[str, Transform] = field(default_factory=dict)
    inverse_transforms: Mapping[str, Transform] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rules = [(re.compile(p), t) for p, t in self.rules]
        self._drop = [re.compile(p) for p in self.drop]
        self._tf = [(re.compile(p), f) for p, f in self.transforms.items()]
        self._itf = [(re.compile(p), f) for p, f in self.inverse_transforms.items()]

    # ----------------------------------------------------------------- load
    def rename(self, key: str) -> str | None:
        for pat, tmpl in self._rules:
            m = pat.fullmatch(key)
            if m:
                return m.expand(tmpl)
        return None

    def is_dropped(self, key: str) -> bool:
        return any(p.fullmatch(key) for p in self._drop)

    def convert(self, source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                *, dtype_from_target: bool = True) -> tuple[dict[str, torch.Tensor], KeyMapReport]:
        """Map ``source`` onto the keys/shapes of ``target`` (a state dict)."""
        report = KeyMapReport()
        out: dict[str, torch.Tensor] = {}
        for key, value in source.items():
            new = self.rename(key)
            if new is None:
                if self.is_dropped(key):
                    report.dropped.append(key)
                else:
                    report.unexpected.append(key)
                continue
            if new in out:
                report.duplicated.append(f"{key} (-> {new}, already filled)")
                continue
            if not isinstance(value, torch.Tensor):
                report.mismatched.append(f"{key}: not a tensor ({type(value).__name__})")
                continue
            for pat, fn in self._tf:
                if pat.fullmatch(new):
                    value = fn(value)
            if new not in target:
                report.unexpected.append(f"{key} (-> {new})")
                continue
            want = target[new]
            if tuple(value.shape) != tuple(want.shape):
                report.mismatched.append(f"{key}: {tuple(value.shape)} vs {new} {tuple(want.shape)}")
                continue
            out[new] = value.to(want.dtype) if dtype_from_target else value
        # the user holds the official file, so a missing tensor is named by the key that file should have had
        report.missing = sorted(self._official_name(k) for k in target if k not in out)
        return out, report

    def _official_name(self, key: str) -> str:
        official = self._invert(key)
        return key if official is None or official == key else f"{official} (arforge {key})"

    def load_into(self, module: torch.nn.Module, source: Mapping[str, torch.Tensor], *,
                  what: str | None = None) -> KeyMapReport:
        """Strictly load ``source`` (official layout) into ``module``; raise listing every problem."""
        target = module.state_dict()
        mapped, report = self.convert(source, target)
        if not report.ok:
            raise KeyMapError(report.format(what or f"checkpoint for {self.name}"))
        module.load_state_dict(mapped, strict=True)
        return report

    # --------------------------------------------------------------- export
    def export(self, state: Mapping[str, torch.Tensor], official_keys: Iterable[str] | None = None
               ) -> dict[str, torch.Tensor]:
        """arforge state dict -> official layout (the inverse of the rules).

        The inverse is found by searching, for each arforge key, the official key
        the rules map onto it; ``official_keys`` (e.g. from a reference file) makes
        this exact, otherwise each rule's pattern must be invertible.
        """
        inverse: dict[str, str] = {}
        if official_keys is not None:
            for ok in official_keys:
                new = self.rename(ok)
                if new is not None:
                    inverse[new] = ok
        out: dict[str, torch.Tensor] = {}
        missing = []
        for key, value in state.items():
            ok = inverse.get(key) or self._invert(key)
            if ok is None:
                missing.append(key)
                continue
            for pat, fn in self._itf:
                if pat.fullmatch(key):
                    value = fn(value)
            out[ok] = value
        if missing:
            raise KeyMapError(f"{self.name}: no official key for arforge keys {missing[:20]}")
        return out

    def _invert(self, key: str) -> str | None:
        for pat, tmpl in self._rules:
            inv = _invert_rule(pat.pattern, tmpl)
            if inv is None:
                continue
            ipat, itmpl = inv
            m = re.fullmatch(ipat, key)
            if m:
                cand = m.expand(itmpl)
                if self.rename(cand) == key:
                    return cand
        return None


def _invert_rule(pattern: str, template: str) -> tuple[str, str] | None:
    """Invert a rule whose groups are simple ``(\\d+)``/``(.*)``-style captures used once each."""
    groups = re.findall(r"\((?!\?)([^()]*)\)", pattern)
    refs = [int(g) for g in re.findall(r"\\(\d+)", template)]
    if sorted(refs) != list(range(1, len(groups) + 1)):
        return None
    # new pattern: the template with each \k replaced by group k's regex
    ipat_parts = re.split(r"(\\\d+)", template)
    order = []
    ipat = ""
    for part in ipat_parts:
        m = re.fullmatch(r"\\(\d+)", part)
        if m:
            k = int(m.group(1))
            order.append(k)
            ipat += f"({groups[k - 1]})"
        else:
            ipat += re.escape(part)
    # new template: the pattern with each group replaced by a back-reference in the new order
    counter = iter(range(1, len(groups) + 1))
    pieces = re.split(r"(\((?!\?)[^()]*\))", pattern)
    itmpl = ""
    for piece in pieces:
        if re.fullmatch(r"\((?!\?)[^()]*\)", piece):
            k = next(counter)
            itmpl += f"\\{order.index(k) + 1}"
        else:
            itmpl += piece.replace("\\.", ".").replace("\\", "")
    return ipat, itmpl


def identity_rules(keys: Iterable[str]) -> list[tuple[str, str]]:
    """One exact rule per key, for layouts where arforge keeps the upstream names."""
    return [(re.escape(k), k.replace("\\", "\\\\")) for k in keys]
