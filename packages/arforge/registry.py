"""The central registry: the single source of truth for every arforge component.

One registry per *kind* (quantizers, factorizations, heads, guidance, ...).
Components are discovered through the ``arforge.plugins`` entry-point group,
whose entry names are ``"<kind>.<name>"``; the built-in plugins ship through the
very same mechanism a third-party distribution would use (timm-style).

Registering a component also registers it with gin under its kind, so a gin
file writes ``@quantizers.lfq`` and ``arforge plugins`` prints
``quantizers.lfq``: the two always name the same object. Components themselves
never import gin; only this module (the launch layer) does.
"""

from __future__ import annotations

from arforge.errors import ArforgeError

import difflib
import inspect
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

ENTRY_POINT_GROUP = "arforge.plugins"

#: The kinds arforge knows about, with what each one is for. A plugin may not
#: invent a kind: a typo in an entry-point name would otherwise silently create
#: a new, unused registry.
KINDS: dict[str, str] = {
    "quantizers": "features -> discrete ids and back (VQ, LFQ, semantic-detail)",
    "tokenizers": "image tokenizers: encoder/decoder backbones around a quantizer",
    "factorizations": "how a token splits into sub-tokens and how their embeddings combine",
    "heads": "AR output heads (linear, next-sub-token, semantic-detail local)",
    "backbones": "AR sequence backbones (Llama-style decoder)",
    "models": "complete AR models: presets over ARModel for each family",
    "guidance": "classifier-free guidance schedules (constant, interval, linear, adaptive attention)",
    "evaluators": "metrics over samples or reconstructions (FID, IS, PSNR, ...)",
    "feature_extractors": "networks whose features the evaluators compare",
    "datasets": "image and token-code datasets",
    "losses": "training losses and discriminators",
    "schedules": "learning-rate schedules",
    "loaders": "give a component its weights: arforge checkpoints and official upstream files",
    "jobs": "runnable roots of a gin launch (trainers, samplers, evaluators, tools)",
}


class RegistryError(ArforgeError):
    """A user-facing registry problem; the CLI prints it without a traceback."""


class DuplicateComponentError(RegistryError):
    pass


class UnknownComponentError(RegistryError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    obj: Any
    distribution: str
    source: str  # "module:attr" (or the object's qualname for programmatic registrations)

    @property
    def qualified_name(self) -> str:
        return f"{self.kind}.{self.name}"

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.obj) or ""
        return doc.strip().splitlines()[0] if doc.strip() else "(no description)"


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to ``name`` (difflib ratio), or None if nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


@dataclass
class Registry:
    """All registered components, by kind and name."""

    components: dict[str, dict[str, Component]] = field(
        default_factory=lambda: {k: {} for k in KINDS}
    )
    _loaded_entry_points: bool = False
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # ------------------------------------------------------------------ register
    def register(
        self,
        kind: str,
        name: str,
        obj: Any,
        *,
        distribution: str = "(local)",
        source: str | None = None,
    ) -> Component:
        if kind not in KINDS:
            hint = closest(kind, KINDS)
            raise RegistryError(
                f"unknown component kind {kind!r} for {name!r}"
                + (f"; did you mean {hint!r}?" if hint else "")
                + f" Known kinds: {', '.join(KINDS)}."
            )
        if not name.isidentifier():
            raise RegistryError(
                f"component name {kind}.{name!r} must be a Python identifier "
                "(letters, digits and underscores) so that gin can name it"
            )
        source = source or f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"
        with self._lock:
            existing = self.components[kind].get(name)
            if existing is not None:
                if existing.obj is obj:
                    return existing
                raise DuplicateComponentError(
                    f"duplicate component {kind}.{name}: registered by "
                    f"{existing.distribution} ({existing.source}) and again by "
                    f"{distribution} ({source}). Rename one of the entry points."
                )
            comp = Component(kind, name, obj, distribution, source)
            self.components[kind][name] = comp
            _register_with_gin(comp)
            return comp

    # -------------------------------------------------------------- discovery
    def load_entry_points(self, *, force: bool = False) -> None:
        """Import and register every ``arforge.plugins`` entry point (once)."""
        with self._lock:
            if self._loaded_entry_points and not force:
                return
            eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
            for ep in eps:
                dist = _dist_label(ep)
                kind, _, name = ep.name.partition(".")
                if not name:
                    raise RegistryError(
                        f"entry point {ep.name!r} = {ep.value!r} of {dist}: names in the "
                        f"{ENTRY_POINT_GROUP!r} group must be '<kind>.<name>', e.g. 'quantizers.lfq'"
                    )
                try:
                    obj = ep.load()
                except Exception as exc:  # a broken plugin must say which one
                    raise RegistryError(
                        f"could not import plugin {ep.name} = {ep.value} from {dist}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                self.register(kind, name, obj, distribution=dist, source=ep.value)
            self._loaded_entry_points = True

    # ----------------------------------------------------------------- lookup
    def get(self, kind: str, name: str) -> Any:
        return self.component(kind, name).obj

    def component(self, kind: str, name: str) -> Component:
        self.load_entry_points()
        if kind not in KINDS:
            hint = closest(kind, KINDS)
            raise UnknownComponentError(
                f"unknown component kind {kind!r}" + (f"; did you mean {hint!r}?" if hint else "")
            )
        try:
            return self.components[kind][name]
        except KeyError:
            raise UnknownComponentError(unknown_message(kind, name, self.names(kind))) from None

    def names(self, kind: str) -> list[str]:
        self.load_entry_points()
        return sorted(self.components.get(kind, {}))

    def all(self) -> list[Component]:
        self.load_entry_points()
        return [c for kind in KINDS for c in sorted(self.components[kind].values(), key=lambda c: c.name)]

    def distributions(self) -> dict[str, str]:
        """``{distribution: version}`` of every distribution that contributed a component."""
        out: dict[str, str] = {}
        for c in self.all():
            name = c.distribution.split("==")[0]
            out[name] = c.distribution.split("==")[1] if "==" in c.distribution else ""
        return out


def unknown_message(kind: str, name: str, known: list[str]) -> str:
    hint = closest(name, known)
    msg = f"unknown {kind[:-1] if kind.endswith('s') else kind} {name!r}"
    if hint:
        msg += f"; did you mean {kind}.{hint}?"
    msg += f" Registered {kind}: {', '.join(known) if known else '(none)'}."
    return msg


def _dist_label(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "(unknown distribution)"
    return f"{dist.metadata['Name']}=={dist.version}"


# ---------------------------------------------------------------------- gin
def _register_with_gin(comp: Component) -> None:
    import gin

    obj = comp.obj
    if not callable(obj):
        return
    try:
        gin.external_configurable(obj, name=comp.name, module=comp.kind)
    except ValueError as exc:
        # gin refuses a second registration of the same selector (e.g. after
        # gin.clear_config(clear_constants=True) in tests); that is not a conflict.
        if "already" not in str(exc).lower():
            raise


_REGISTRY: Registry | None = None
_REGISTRY_LOCK = threading.Lock()


def registry() -> Registry:
    """The process-wide registry (entry points are loaded on first lookup)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        if _REGISTRY is None:
            _REGISTRY = Registry()
        return _REGISTRY


def get(kind: str, name: str) -> Any:
    return registry().get(kind, name)


def names(kind: str) -> list[str]:
    return registry().names(kind)


def load_plugins() -> Registry:
    reg = registry()
    reg.load_entry_points()
    return reg
