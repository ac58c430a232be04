"""The search space of a study: ``@space.float()``, ``@space.int()``, ``@space.categorical()``.

Each entry of ``study.space`` maps a gin parameter name to one of these classes.
The name is used verbatim everywhere: as the Optuna parameter, as the MLflow
param of the trial run and as the ``arforge compare`` column (docs/studies.md,
"The search space"). Ranges are checked by building the matching
``optuna.distributions`` object, so a range Optuna would refuse is refused
when the study file is read, with the parameter's name.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import gin
import optuna

from arforge.errors import ConfigError

_PRIMITIVES = (bool, int, float, str, type(None))
INDEXED = re.compile(r"^(?P<base>.+)\[(?P<index>\d+)\]$")
_PARAM_NAME = re.compile(r"^(?:[A-Za-z_][\w.]*/)*[A-Za-z_][\w.]*\.[A-Za-z_]\w*(?:\[\d+\])?$")


def gin_literal(value: Any) -> str:
    """``value`` as gin text: ``"@kind.name()"``/``"%MACRO"`` strings verbatim, others as literals."""
    if isinstance(value, str) and value.startswith(("@", "%")):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{value!r} cannot be written as a gin literal")
    if isinstance(value, (list, tuple)):
        inner = ", ".join(gin_literal(v) for v in value)
        if isinstance(value, list):
            return f"[{inner}]"
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{gin_literal(k)}: {gin_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, _PRIMITIVES):
        return repr(value)
    raise ConfigError(f"{value!r} ({type(value).__name__}) cannot be written as a gin literal; "
                      "use numbers, strings, tuples, or a quoted reference like \"@kind.name()\"")


def _distribution(name: str, kind: str, make: Any) -> Any:
    try:
        return make()
    except ValueError as exc:  # Optuna's own check of the range, named after the space entry
        raise ConfigError(f"study.space[{name!r}]: space.{kind}: {exc}") from None


class FloatSpace:
    """A float parameter in ``[low, high]`` (``trial.suggest_float``); gin: ``@space.float()``."""

    kind = "float"

    def __init__(self, low: float = gin.REQUIRED, high: float = gin.REQUIRED, *, log: bool = False,
                 step: float | None = None):
        self.low, self.high, self.log, self.step = low, high, bool(log), step

    def check(self, name: str) -> None:
        for field_ in ("low", "high"):
            v = getattr(self, field_)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"study.space[{name!r}]: space.float.{field_} must be a number, not {v!r}")
        if not self.low < self.high:  # Optuna allows low == high: a search of one point is a typo here
            raise ConfigError(f"study.space[{name!r}]: space.float.low ({self.low}) must be below high ({self.high})")
        _distribution(name, self.kind, self.distribution)

    def distribution(self) -> optuna.distributions.FloatDistribution:
        return optuna.distributions.FloatDistribution(
            float(self.low), float(self.high), log=self.log, step=None if self.step is None else float(self.step))

    def suggest(self, trial: Any, name: str) -> float:
        d = self.distribution()
        return trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)

    def to_gin(self, value: Any) -> str:
        return gin_literal(float(value))

    def grid(self) -> list[float] | None:
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [float(self.low + i * self.step) for i in range(n + 1)]

    def example(self) -> float:
        return float(self.low)

    def contains(self, value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and self.low <= value <= self.high

    def describe(self) -> str:
        extra = (", log=True" if self.log else "") + (f", step={self.step}" if self.step is not None else "")
        return f"float({self.low}, {self.high}{extra})"


class IntSpace:
    """An int parameter in ``[low, high]`` (``trial.suggest_int``); gin: ``@space.int()``."""

    kind = "int"

    def __init__(self, low: int = gin.REQUIRED, high: int = gin.REQUIRED, *, log: bool = False, step: int = 1):
        self.low, self.high, self.log, self.step = low, high, bool(log), step

    def check(self, name: str) -> None:
        for field_ in ("low", "high", "step"):
            v = getattr(self, field_)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"study.space[{name!r}]: space.int.{field_} must be an int, not {v!r}")
        if not self.low < self.high:
            raise ConfigError(f"study.space[{name!r}]: space.int.low ({self.low}) must be below high ({self.high})")
        _distribution(name, self.kind, self.distribution)

    def distribution(self) -> optuna.distributions.IntDistribution:
        return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: Any, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step)

    def to_gin(self, value: Any) -> str:
        return gin_literal(int(value))

    def grid(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))

    def example(self) -> int:
        return self.low

    def contains(self, value: Any) -> bool:
        return (not isinstance(value, bool) and isinstance(value, int) and self.low <= value <= self.high
                and (value - self.low) % self.step == 0)

    def describe(self) -> str:
        extra = (", log=True" if self.log else "") + (f", step={self.step}" if self.step != 1 else "")
        return f"int({self.low}, {self.high}{extra})"


class CategoricalSpace:
    """One of ``choices`` (``trial.suggest_categorical``); gin: ``@space.categorical()``.

    A string choice starting with ``@`` (``"@kind.name()"``) or ``%`` is written
    into the binding verbatim, i.e. it chooses a registered plugin or a macro.
    Tuples and lists are offered to Optuna as their gin text, because Optuna's
    categorical choices must be primitives.
    """

    kind = "categorical"

    def __init__(self, choices: Sequence[Any] = gin.REQUIRED):
        self.choices = list(choices) if isinstance(choices, (list, tuple)) else choices
        self._labels: dict[Any, str] = {}  # Optuna's choice -> gin text

    def check(self, name: str) -> None:
        if not isinstance(self.choices, list) or not self.choices:
            raise ConfigError(f"study.space[{name!r}]: space.categorical.choices must be a non-empty list, "
                              f"not {self.choices!r}")
        self._labels = {}
        for c in self.choices:
            label = c if isinstance(c, _PRIMITIVES) else gin_literal(c)
            if label in self._labels:
                raise ConfigError(f"study.space[{name!r}]: duplicate choice {c!r}")
            self._labels[label] = gin_literal(c)

    def labels(self) -> list[Any]:
        if not self._labels:
            self.check("?")
        return list(self._labels)

    def distribution(self) -> optuna.distributions.CategoricalDistribution:
        return optuna.distributions.CategoricalDistribution(self.labels())

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, self.labels())

    def to_gin(self, value: Any) -> str:
        if not self._labels:
            self.check("?")
        return self._labels[value]

    def grid(self) -> list[Any]:
        return self.labels()

    def example(self) -> Any:
        return self.labels()[0]

    def contains(self, value: Any) -> bool:
        return value in self.labels()

    def describe(self) -> str:
        return "categorical([" + ", ".join(self._labels.values() or map(repr, self.choices)) + "])"


SPACE_TYPES = (FloatSpace, IntSpace, CategoricalSpace)
for _cls in SPACE_TYPES:
    try:
        gin.external_configurable(_cls, name=_cls.kind, module="arforge.space")
    except ValueError as _exc:  # re-import (e.g. importlib.reload in a notebook)
        if "already" not in str(_exc).lower():
            raise


def check_space(space: Any) -> dict[str, Any]:
    """``space`` checked: gin parameter names, known space types, tuple elements without gaps."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("study.space must be a non-empty dict {'configurable.param': @space.float(), ...}")
    plain: set[str] = set()
    indexed: dict[str, list[int]] = {}
    for name, spec in space.items():
        if not isinstance(name, str) or not _PARAM_NAME.match(name):
            raise ConfigError(f"study.space key {name!r} is not a gin parameter name like "
                              "'jobs.sample.top_k' (or 'scope/name.param', or 'name.param[0]')")
        if not isinstance(spec, SPACE_TYPES):
            short = name.split(".")[-1].split("[")[0]
            raise ConfigError(
                f"study.space[{name!r}] = {spec!r}: use @space.float(), @space.int() or @space.categorical() "
                f"(scoped when there are several, e.g. @{short}/space.float() with {short}/space.float.low = ...)")
        spec.check(name)
        m = INDEXED.match(name)
        if m:
            indexed.setdefault(m["base"], []).append(int(m["index"]))
        else:
            plain.add(name)
    for base, idx in indexed.items():
        if base in plain:
            raise ConfigError(f"study.space names both {base!r} and {base}[i]: use one or the other")
        if sorted(idx) != list(range(len(idx))):
            raise ConfigError(f"study.space: the elements of tuple parameter {base!r} must be "
                              f"{base}[0] ... {base}[{len(idx) - 1}] without gaps (got indices {sorted(idx)})")
    return dict(space)


def space_bindings(space: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, str]:
    """``{gin_param: gin_text}`` for sampled ``values``; ``p[i]`` entries become one tuple ``p``."""
    out: dict[str, str | None] = {}
    parts: dict[str, dict[int, str]] = {}
    for name, spec in space.items():
        text = spec.to_gin(values[name])
        m = INDEXED.match(name)
        if m:
            out.setdefault(m["base"], None)  # keeps the tuple where its first element stands
            parts.setdefault(m["base"], {})[int(m["index"])] = text
        else:
            out[name] = text
    for base, elems in parts.items():
        items = [elems[i] for i in range(len(elems))]
        out[base] = f"({items[0]},)" if len(items) == 1 else "(" + ", ".join(items) + ")"
    return {k: v for k, v in out.items() if v is not None}


def space_json(space: Mapping[str, Any]) -> dict[str, Any]:
    """The search ranges as logged once on the study's parent run (``study_space.json``):
    per space entry its readable form and Optuna's own JSON of the distribution."""
    return {name: {"range": spec.describe(),
                   "distribution": optuna.distributions.distribution_to_json(spec.distribution())}
            for name, spec in space.items()}
