"""Optuna studies over gin launches, logged to MLflow; and run comparison.

A study is a gin file (parsed like a launch file, with the same file:line
errors) that names a base launch file and a search space over its gin
parameters::

    import arforge.studies                  # lets any gin parser read this file
    study.launch_file = "../iar2/sample_eval.gin"  # relative to this file
    study.objective = "fid"                 # from the job's return dict, else its MLflow metric
    study.direction = "minimize"
    study.n_trials = 32                     # the *total* target, across workers and resumes
    study.space = {
        "samplers.cfg_adaptive_attention.w_attn": @w_attn/space.float(),
        "samplers.cfg_constant.scale[0]": @pre/space.float(),   # element 0 of a tuple parameter
        "samplers.cfg_constant.scale[1]": @post/space.float(),
        "jobs.sample.sampler": @space.categorical(),           # which registered plugin
    }
    w_attn/space.float.low = 0.0
    w_attn/space.float.high = 0.2
    space.categorical.choices = ["@samplers.cfg_linear()", "@samplers.cfg_constant()"]

``arforge study FILE.gin`` runs it. Every trial is one launch of the base file
(``launch.run_file``) with the sampled values written as gin bindings
(``name = value``; a categorical choice written ``"@kind.name()"`` becomes a gin
reference, other values gin literals; ``name[i]`` entries are assembled into one
tuple binding), nested under one MLflow parent run per study. Jobs report
intermediate values with ``ctx.report(metric, value, step)``; the study's pruner
stops unpromising trials there (``optuna.TrialPruned``).

Storage and workers. Studies live in ``$ARFORGE_HOME/optuna.db`` (SQLite, next
to the MLflow store) unless ``--storage URL`` names another database (e.g.
``postgresql://user@host/db``): any number of workers, on one machine or many,
running the same command join the same study. ``n_trials`` counts trials that
*finished* (COMPLETE or PRUNED); FAILED trials do not count, so a trial that
raises is recorded (its error in the user attr ``arforge.error``) and another
one takes its place. Exactness across workers: a worker starts a trial only
while holding a per-study lock (an advisory lock on PostgreSQL/MySQL, a file
lock next to a SQLite database) and only if fewer than ``n_trials`` trials are
finished, running, waiting or awaiting a heartbeat retry; so concurrent workers
together finish exactly ``n_trials`` trials (a worker idles, re-checking every
heartbeat interval, while the last trials of other workers run, and takes over
their slot if one of them fails). Heartbeats: a worker that dies mid-trial stops
beating; after ``grace_period`` seconds another worker marks that trial FAILED
and re-runs its parameters as a new trial (``RetryHeartbeatStaleTrialCallback``,
system attr ``failed_trial``), up to ``max_retry`` times. With heartbeats off
(``--heartbeat 0``) a killed worker's trial keeps its slot until removed by hand.

``arforge compare EXPERIMENT`` prints the experiment's runs sorted by a metric
with only the parameters that differ between them, and plots the metric against
one of those parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shlex
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import gin

from arforge import launch as _launch
from arforge import registry as reg
from arforge.errors import ArforgeError, ConfigError


class StudyError(ArforgeError):
    """A user-facing study problem (storage unreachable, too many failing trials, ...)."""


# ================================================================ search space
_PRIMITIVES = (bool, int, float, str, type(None))
_INDEXED = re.compile(r"^(?P<base>.+)\[(?P<index>\d+)\]$")
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
                      "use numbers, strings, tuples, or a quoted reference like \"@samplers.cfg_linear()\"")


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
        if not self.low < self.high:
            raise ConfigError(f"study.space[{name!r}]: space.float.low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ConfigError(f"study.space[{name!r}]: a log-scale float needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ConfigError(f"study.space[{name!r}]: space.float takes log=True or a step, not both")
        if self.step is not None and not self.step > 0:
            raise ConfigError(f"study.space[{name!r}]: space.float.step must be positive (got {self.step})")

    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log,
                                   step=None if self.step is None else float(self.step))

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
        if self.step < 1:
            raise ConfigError(f"study.space[{name!r}]: space.int.step must be >= 1 (got {self.step})")
        if self.log and (self.low < 1 or self.step != 1):
            raise ConfigError(f"study.space[{name!r}]: a log-scale int needs low >= 1 and step = 1")

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

    A string choice starting with ``@`` (``"@samplers.cfg_linear()"``) or ``%`` is
    written into the binding verbatim, i.e. it chooses a registered plugin or a
    macro. Tuples/lists are offered to Optuna as their gin text.
    """

    kind = "categorical"

    def __init__(self, choices: Sequence[Any] = gin.REQUIRED):
        self.choices = list(choices) if isinstance(choices, (list, tuple)) else choices
        self._labels: dict[Any, str] = {}  # optuna label -> gin text

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

    def references(self) -> list[str]:
        """The ``@kind.name`` plugin references among the choices."""
        return [t for t in (self._labels.values() if self._labels else []) if t.startswith("@")]

    def describe(self) -> str:
        return "categorical([" + ", ".join(self._labels.values() or map(repr, self.choices)) + "])"


SPACE_TYPES = (FloatSpace, IntSpace, CategoricalSpace)
for _cls in SPACE_TYPES:
    try:
        gin.external_configurable(_cls, name=_cls.kind, module="arforge.space")
    except ValueError as _exc:  # re-import (e.g. importlib.reload in a notebook)
        if "already" not in str(_exc).lower():
            raise


def _check_space(space: Any) -> dict[str, Any]:
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("study.space must be a non-empty dict {'configurable.param': @space.float(), ...}")
    plain: set[str] = set()
    indexed: dict[str, list[int]] = {}
    for name, spec in space.items():
        if not isinstance(name, str) or not _PARAM_NAME.match(name):
            raise ConfigError(f"study.space key {name!r} is not a gin parameter name like "
                              "'samplers.cfg_constant.scale' (or 'scope/name.param', or 'name.param[0]')")
        if not isinstance(spec, SPACE_TYPES):
            raise ConfigError(
                f"study.space[{name!r}] = {spec!r}: use @space.float(), @space.int() or @space.categorical() "
                f"(scoped when there are several, e.g. @{name.split('.')[-1].split('[')[0]}/space.float() with "
                f"{name.split('.')[-1].split('[')[0]}/space.float.low = ...)")
        spec.check(name)
        m = _INDEXED.match(name)
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
        m = _INDEXED.match(name)
        if m:
            out.setdefault(m["base"], None)
            parts.setdefault(m["base"], {})[int(m["index"])] = text
        else:
            out[name] = text
    for base, elems in parts.items():
        items = [elems[i] for i in range(len(elems))]
        out[base] = f"({items[0]},)" if len(items) == 1 else "(" + ", ".join(items) + ")"
    return {k: v for k, v in out.items() if v is not None}


# ============================================================ the study config
@dataclasses.dataclass
class StudyConfig:
    """What a study gin file configures (returned by the ``study`` configurable)."""

    launch_file: str
    space: dict[str, Any]
    objective: str
    direction: str = "minimize"
    n_trials: int = 20
    study_name: str | None = None
    experiment: str | None = None
    sampler: str = "tpe"
    seed: int = 0
    sampler_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    pruner: str = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    pruner_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    fixed_bindings: list[str] = dataclasses.field(default_factory=list)
    timeout: float | None = None
    heartbeat_interval: int = 60
    grace_period: int | None = None
    max_retry: int = 3
    max_consecutive_failures: int = 5
    enqueue: list[dict[str, Any]] = dataclasses.field(default_factory=list)


SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "hyperband", "successive_halving", "none")


@gin.configurable(module="arforge")
def study(
    *,
    launch_file: str = gin.REQUIRED,
    space: dict[str, Any] = gin.REQUIRED,
    objective: str = gin.REQUIRED,
    direction: str = "minimize",
    n_trials: int = 20,
    study_name: str | None = None,
    experiment: str | None = None,
    sampler: str = "tpe",
    seed: int = 0,
    sampler_options: dict[str, Any] | None = None,
    pruner: str = "median",
    n_startup_trials: int = 5,
    n_warmup_steps: int = 0,
    pruner_options: dict[str, Any] | None = None,
    fixed_bindings: Sequence[str] = (),
    timeout: float | None = None,
    heartbeat_interval: int = 60,
    grace_period: int | None = None,
    max_retry: int = 3,
    max_consecutive_failures: int = 5,
    enqueue: Sequence[Mapping[str, Any]] = (),
) -> StudyConfig:
    """An Optuna study over the gin parameters of one launch file.

    The launch file is only opened when the study runs, so a study file parses
    before its launch file exists.

    Args:
        launch_file: the base launch gin file, relative to the study file.
        space: ``{gin_param: @space.float()|@space.int()|@space.categorical()}``;
            ``param[i]`` names element ``i`` of a tuple-valued parameter.
        objective: metric to optimise: a key of the job's return dict (for
            ``jobs.pipeline``, of the last stage's dict that has it) or, failing
            that, the final value of the trial run's MLflow metric of that name.
            Intermediate values reported under this name drive pruning.
        direction: ``minimize`` or ``maximize``.
        n_trials: total number of finished (COMPLETE + PRUNED) trials wanted.
        study_name: Optuna study name (default: the study file's stem).
        experiment: MLflow experiment of the parent and trial runs (default: study_name).
        sampler: ``tpe`` (seeded; Optuna 5's multivariate, constant-liar TPE),
            ``random``, ``grid`` (every space entry categorical or stepped) or ``cmaes``.
        seed: sampler seed (worker k of a study uses seed + k, so workers differ).
        sampler_options: extra keyword arguments of the sampler class.
        pruner: ``median`` (default), ``hyperband``, ``successive_halving`` or ``none``.
        n_startup_trials, n_warmup_steps: MedianPruner settings (no pruning before
            that many finished trials / reported steps); hyperband's min_resource
            is max(1, n_warmup_steps).
        pruner_options: extra keyword arguments of the pruner class.
        fixed_bindings: gin bindings added to every trial (before the sampled ones).
        timeout: seconds after which this worker stops starting trials.
        heartbeat_interval: seconds between a running trial's heartbeats (0: off).
        grace_period: seconds without a heartbeat after which a trial is stale
            (default 2 x heartbeat_interval).
        max_retry: how often a stale trial's parameters are re-run.
        max_consecutive_failures: a worker stops with an error after this many
            failed trials in a row.
        enqueue: points the study runs first, before the sampler proposes any
            (``optuna.Study.enqueue_trial``), each ``{space name: value}``; e.g.
            ``[{"samplers.cfg_linear.start": 1.0, "samplers.cfg_linear.end": 1.0}]``
            makes trial 0 the unguided baseline that every guided setting is compared with.
            A new study enqueues them once; they count towards ``n_trials``.
    """
    return StudyConfig(
        launch_file=launch_file, space=dict(space) if isinstance(space, Mapping) else space,
        objective=objective, direction=direction, n_trials=n_trials,
        study_name=study_name, experiment=experiment, sampler=sampler, seed=seed,
        sampler_options=dict(sampler_options or {}), pruner=pruner, n_startup_trials=n_startup_trials,
        n_warmup_steps=n_warmup_steps, pruner_options=dict(pruner_options or {}),
        fixed_bindings=list(fixed_bindings), timeout=timeout, heartbeat_interval=heartbeat_interval,
        grace_period=grace_period, max_retry=max_retry, max_consecutive_failures=max_consecutive_failures,
        enqueue=[dict(p) if isinstance(p, Mapping) else p for p in enqueue])


_STUDY_SELECTOR = re.compile(r"^\s*(?:[\w./]+/)?(?:arforge\.)?(?:study|space\.\w+)\.\w+\s*=")
_MACRO = re.compile(r"^\s*[A-Za-z_]\w*\s*=")


def split_bindings(bindings: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``--bind`` values into study-file bindings (``study.*``, ``space.*``) and launch
    bindings added to every trial. A macro goes to both: the launch files name their data through
    macros (``REFERENCE``, ``IMAGENET_TRAIN``, ``NUM_CLASSES``), and a study file may use its own;
    defining a macro a file does not use changes nothing there."""
    own, trial = [], []
    for b in bindings:
        if _MACRO.match(b):
            own.append(b)
            trial.append(b)
        else:
            (own if _STUDY_SELECTOR.match(b) else trial).append(b)
    return own, trial


def load_study_config(study_file: str | os.PathLike, bindings: Sequence[str] = ()) -> StudyConfig:
    """Parse a study gin file (file:line errors) and return its checked :class:`StudyConfig`."""
    path = Path(study_file)
    _launch.parse(path, bindings)
    try:
        cfg = study()
    except ArforgeError:
        raise
    except Exception as exc:
        text = str(exc)
        if "Required bindings" in text or "No configurable matching" in text:
            raise _launch.explain_gin_error(exc, config_file=str(path), bindings=bindings) from exc
        raise ConfigError(f"{path}: {text.splitlines()[0]}") from exc
    return _check_config(cfg, path)


def _check_config(cfg: StudyConfig, path: Path) -> StudyConfig:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{path}: {msg}")

    try:
        cfg.space = _check_space(cfg.space)
    except ConfigError as exc:
        raise bad(str(exc)) from None
    if not isinstance(cfg.objective, str) or not cfg.objective:
        raise bad("study.objective must be a metric name such as 'fid'")
    if cfg.direction not in ("minimize", "maximize"):
        raise bad(f"study.direction must be 'minimize' or 'maximize', not {cfg.direction!r}")
    if cfg.sampler not in SAMPLERS:
        hint = reg.closest(str(cfg.sampler), SAMPLERS)
        raise bad(f"unknown study.sampler {cfg.sampler!r}" + (f"; did you mean {hint!r}?" if hint else "")
                  + f" Samplers: {', '.join(SAMPLERS)}.")
    if cfg.pruner not in PRUNERS:
        hint = reg.closest(str(cfg.pruner), PRUNERS)
        raise bad(f"unknown study.pruner {cfg.pruner!r}" + (f"; did you mean {hint!r}?" if hint else "")
                  + f" Pruners: {', '.join(PRUNERS)}.")
    if isinstance(cfg.n_trials, bool) or not isinstance(cfg.n_trials, int) or cfg.n_trials < 1:
        raise bad(f"study.n_trials must be a positive int, not {cfg.n_trials!r}")
    if isinstance(cfg.fixed_bindings, str) or not all(isinstance(b, str) for b in cfg.fixed_bindings):
        raise bad("study.fixed_bindings must be a list of binding strings like 'launch.device = \"cpu\"'")
    if cfg.heartbeat_interval is None or cfg.heartbeat_interval < 0 or \
            (cfg.grace_period is not None and cfg.grace_period < 1):
        raise bad("study.heartbeat_interval must be >= 0 (0: off) and grace_period >= 1")
    if cfg.max_retry is not None and cfg.max_retry < 0:
        raise bad("study.max_retry must be >= 0")
    for i, point in enumerate(cfg.enqueue):
        if not isinstance(point, dict) or not point:
            raise bad(f"study.enqueue[{i}] must be a non-empty dict {{space name: value}}, not {point!r}")
        for name, value in point.items():
            if name not in cfg.space:
                hint = reg.closest(str(name), list(cfg.space))
                raise bad(f"study.enqueue[{i}] names {name!r}, which is not in study.space"
                          + (f"; did you mean {hint!r}?" if hint else "") + f" Space: {', '.join(cfg.space)}.")
            if not cfg.space[name].contains(value):
                raise bad(f"study.enqueue[{i}][{name!r}] = {value!r} is outside study.space[{name!r}] = "
                          f"{cfg.space[name].describe()}")
    cfg.study_name = cfg.study_name or path.stem
    cfg.experiment = cfg.experiment or cfg.study_name
    return cfg


def resolve_launch_file(cfg: StudyConfig, study_file: str | os.PathLike) -> Path:
    """``study.launch_file`` against the study file's folder (then, unless it starts
    with ``..``, the repo root)."""
    raw = Path(cfg.launch_file)
    candidates = [raw] if raw.is_absolute() else [Path(study_file).resolve().parent / raw]
    root = _launch.repo_root()
    if not raw.is_absolute() and not cfg.launch_file.startswith("..") and root is not None:
        candidates.append(root / raw)
    candidates = [Path(os.path.normpath(c)) for c in candidates]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"{study_file}: study.launch_file {cfg.launch_file!r} does not exist "
                      f"(looked for {', '.join(str(c) for c in candidates)})")


# ================================================================== storage
def default_storage_url() -> str:
    from arforge import tracking

    return f"sqlite:///{tracking.home() / 'optuna.db'}"


def normalize_storage_url(url: str) -> str:
    """Pin a bare ``postgresql://`` URL to the installed driver.

    SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3 (2.0 mapped it to
    psycopg2); arforge's ``postgres`` extra installs psycopg2-binary, so take
    whichever of the two is importable. ``postgres://`` is accepted as well.
    """
    m = re.match(r"^(postgresql|postgres)://", url)
    if not m:
        return url
    import importlib.util

    rest = url[m.end():]
    for module, dialect in (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"{dialect}://{rest}"
    raise StudyError(f"study storage {mask_url(url)} needs a PostgreSQL driver: "
                     "pip install 'arforge[postgres]' (psycopg2-binary)")


def mask_url(url: str) -> str:
    """``url`` with any password hidden (safe to print and to log)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_storage(url: str | None = None, *, heartbeat_interval: int | None = None,
                 grace_period: int | None = None,
                 stale_trial_callback: Callable[[Any, Any], None] | None = None) -> Any:
    """An Optuna ``RDBStorage`` on ``url`` (default: ``$ARFORGE_HOME/optuna.db``).

    SQLite gets a 30 s busy timeout so several local workers can share the file.
    """
    import optuna

    url = normalize_storage_url(url or default_storage_url())
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}}
    elif url.startswith("sqlite:"):
        engine_kwargs = {"connect_args": {"timeout": 30}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval or None, grace_period=grace_period,
                heartbeat_stale_trial_callback=stale_trial_callback)
        except ImportError as exc:
            raise StudyError(f"study storage {mask_url(url)}: the database driver is missing ({exc}); "
                             "for PostgreSQL: pip install 'arforge[postgres]' (psycopg2-binary)") from exc
        except Exception as exc:
            if type(exc).__module__.startswith(("sqlalchemy", "optuna")):
                raise StudyError(f"cannot open study storage {mask_url(url)}: "
                                 f"{str(exc).splitlines()[0]}") from exc
            raise


class StudyLock:
    """A cross-process lock for one study in one storage.

    PostgreSQL: ``pg_advisory_lock``; MySQL: ``GET_LOCK``; SQLite: an ``flock`` on
    ``<database>.lock``. Re-entrant within a process.
    """

    def __init__(self, url: str, study_name: str):
        self.url, self.study_name = url, study_name
        self.dialect = url.split(":", 1)[0].split("+")[0]
        digest = hashlib.blake2b(f"arforge-study:{study_name}".encode(), digest_size=8).digest()
        self.key = int.from_bytes(digest, "big", signed=True)
        self._depth = 0
        self._thread_lock = threading.RLock()
        self._engine = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with self._acquire():
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0

    def _acquire(self) -> contextlib.AbstractContextManager:
        if self.dialect == "sqlite":
            return self._file_lock()
        if self.dialect in ("postgresql", "postgres", "mysql", "mariadb"):
            return self._db_lock()
        warnings.warn(f"no cross-process study lock for {self.dialect!r} storages: concurrent workers may "
                      "finish a few more trials than n_trials", stacklevel=3)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        db = self.url.split(":///", 1)[1] if ":///" in self.url else ""
        if not db or db.startswith(":memory:"):
            yield
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows)
            yield
            return
        Path(db).parent.mkdir(parents=True, exist_ok=True)
        with open(db + ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _db_lock(self) -> Iterator[None]:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self.url, poolclass=NullPool)
        mysql = self.dialect in ("mysql", "mariadb")
        with self._engine.connect() as conn:
            if mysql:
                conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, -1)"), {"k": f"arforge-{self.key}"})
            else:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            try:
                yield
            finally:
                if mysql:
                    conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"arforge-{self.key}"})
                else:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                conn.commit()


# ======================================================= trial slot accounting
_STALE_WINDOW_S = 300.0


def slots_used(trials: Sequence[Any], *, max_retry: int | None, grace_period: float = 0.0,
               now: float | None = None) -> int:
    """Trials that finished or will: COMPLETE, PRUNED, RUNNING, WAITING, plus a
    heartbeat-failed trial whose retry is not enqueued yet (another worker is
    between failing it and re-queuing it: without this the slot would briefly
    look free)."""
    from optuna.trial import TrialState

    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    now = time.time() if now is None else now
    window = max(_STALE_WINDOW_S, 2.0 * grace_period)
    used = 0
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
            used += 1
        elif t.state == TrialState.FAIL and not t.user_attrs.get("arforge.error") and t.number not in retried:
            history = len(t.system_attrs.get("retry_history", ())) + 1
            exhausted = max_retry is not None and max_retry < history
            recent = t.datetime_complete is not None and now - t.datetime_complete.timestamp() < window
            if not exhausted and recent:
                used += 1
    return used


def _no_trial_tracebacks(record: logging.LogRecord) -> bool:
    """Drop Optuna's "Trial N failed ..." warnings (and their tracebacks): the study prints each
    failed trial in one line itself, and ARFORGE_TRACEBACK=1 keeps them."""
    if os.environ.get("ARFORGE_TRACEBACK") or not record.name.startswith("optuna"):
        return True
    msg = str(record.msg)
    return not (msg.startswith("Trial ") and " failed" in msg)


class _NoSlot(Exception):
    """Raised from ``ask`` when the study's target is already reserved."""


def _make_slot_study_class():
    import optuna

    class SlotStudy(optuna.Study):
        """An Optuna study whose ``ask`` creates a trial only if the target has room,
        atomically with respect to other arforge workers (see :class:`StudyLock`)."""

        arforge_guard: Callable[[Callable[[], Any]], Any] | None = None

        def ask(self, fixed_distributions=None):  # type: ignore[override]
            parent_ask = super().ask
            if self.arforge_guard is None:
                return parent_ask(fixed_distributions)
            return self.arforge_guard(lambda: parent_ask(fixed_distributions))

    return SlotStudy


# =================================================================== results
@dataclasses.dataclass
class StudyResult:
    """What a worker leaves behind (also printed by ``arforge study``)."""

    study_name: str
    experiment: str
    storage: str
    parent_run_id: str | None
    n_complete: int
    n_pruned: int
    n_failed: int
    n_trials: int
    best_value: float | None = None
    best_trial: int | None = None
    best_run_id: str | None = None
    best_bindings: list[str] = dataclasses.field(default_factory=list)
    reproduce_command: str | None = None
    plots: list[Path] = dataclasses.field(default_factory=list)
    stopped: str = "done"
    #: the ``study.enqueue`` points: (trial number, state, value or None, bindings)
    enqueued: list[tuple[int, str, float | None, list[str]]] = dataclasses.field(default_factory=list)


# ================================================================== the runner
class StudyRunner:
    """Runs one worker of a study: see the module docstring for the protocol."""

    def __init__(self, study_file: str | os.PathLike, bindings: Sequence[str] = (), *,
                 storage: str | None = None, n_trials: int | None = None,
                 heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = None, timeout: float | None = None, verbose: bool = True,
                 plots: bool = True):
        own, trial_binds = split_bindings(bindings)
        self.study_file = Path(study_file)
        self.cfg = load_study_config(self.study_file, own)
        self.cli_bindings = trial_binds
        if n_trials is not None:
            if n_trials < 1:
                raise ConfigError(f"--n-trials must be >= 1, not {n_trials}")
            self.cfg.n_trials = n_trials
        if heartbeat_interval is not None:
            self.cfg.heartbeat_interval = heartbeat_interval
        if grace_period is not None:
            self.cfg.grace_period = grace_period
        if max_retry is not None:
            self.cfg.max_retry = max_retry
        if timeout is not None:
            self.cfg.timeout = timeout
        self.launch_file = resolve_launch_file(self.cfg, self.study_file)
        self.fixed = [*self.cfg.fixed_bindings, *self.cli_bindings]
        self.storage_url = normalize_storage_url(storage or default_storage_url())
        self.verbose = verbose
        self.plots = plots
        self.lock = StudyLock(self.storage_url, self.cfg.study_name)
        self.parent_run_id: str | None = None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._fatal: BaseException | None = None
        self._gave_up = False
        self._consecutive_failures = 0
        self._study = None
        self._retry_cb = None

    # ---------------------------------------------------------------- helpers
    def say(self, msg: str) -> None:
        if self.verbose:
            print(f"[study {self.cfg.study_name}] {msg}", flush=True)

    def _trial_bindings(self, trial_lines: Sequence[str], run_name: str) -> list[str]:
        # The study owns experiment, run name and resume: every trial is a fresh
        # run of the study's experiment, whatever the launch file says.
        return [*self.fixed, *trial_lines,
                f"arforge.launch.experiment = {gin_literal(self.cfg.experiment)}",
                f"arforge.launch.run_name = {gin_literal(run_name)}",
                'arforge.launch.resume = "never"']

    def validate_launch(self) -> None:
        """Fail before any trial if the launch file or a binding does not parse."""
        _launch.parse(self.launch_file)
        example = {n: (s.labels()[0] if isinstance(s, CategoricalSpace) else s.example())
                   for n, s in self.cfg.space.items()}
        variants = [example]
        for name, spec in self.cfg.space.items():
            if isinstance(spec, CategoricalSpace):
                variants += [{**example, name: label} for label in spec.labels()[1:]]
        for values in variants:
            lines = [f"{k} = {v}" for k, v in space_bindings(self.cfg.space, values).items()]
            try:
                _launch.parse(self.launch_file, self._trial_bindings(lines, "trial-0000"))
            except ConfigError as exc:
                raise ConfigError(f"{self.study_file}: study.space/fixed_bindings do not fit "
                                  f"{self.launch_file}: {exc}") from None
        gin.clear_config()

    def _signature(self) -> dict[str, Any]:
        return {"launch_file": str(self.cfg.launch_file), "objective": self.cfg.objective,
                "space": {n: s.describe() for n, s in self.cfg.space.items()}}

    # ------------------------------------------------------------ the sampler
    def _sampler(self, seed: int) -> Any:
        import optuna

        opts = dict(self.cfg.sampler_options)
        kind = self.cfg.sampler
        try:
            if kind == "tpe":
                return optuna.samplers.TPESampler(seed=seed, **opts)
            if kind == "random":
                return optuna.samplers.RandomSampler(seed=seed, **opts)
            if kind == "grid":
                grid = {}
                for name, spec in self.cfg.space.items():
                    values = spec.grid()
                    if values is None:
                        raise ConfigError(f"{self.study_file}: study.sampler = 'grid' needs every space entry "
                                          f"categorical, int or a stepped float; {name!r} is {spec.describe()}")
                    grid[name] = values
                return optuna.samplers.GridSampler(grid, seed=seed, **opts)
            if kind == "cmaes":
                try:
                    import cmaes  # noqa: F401
                except ImportError:
                    raise ConfigError(f"{self.study_file}: study.sampler = 'cmaes' needs the cmaes package: "
                                      "pip install cmaes") from None
                return optuna.samplers.CmaEsSampler(seed=seed, **opts)
        except TypeError as exc:
            raise ConfigError(f"{self.study_file}: study.sampler_options do not fit the {kind} sampler: {exc}") \
                from None
        raise AssertionError(kind)

    def _grid_size(self) -> int | None:
        if self.cfg.sampler != "grid":
            return None
        return math.prod(len(s.grid()) for s in self.cfg.space.values())

    def _pruner(self) -> Any:
        import optuna

        opts = dict(self.cfg.pruner_options)
        kind = self.cfg.pruner
        try:
            if kind == "median":
                return optuna.pruners.MedianPruner(n_startup_trials=self.cfg.n_startup_trials,
                                                   n_warmup_steps=self.cfg.n_warmup_steps, **opts)
            if kind == "hyperband":
                opts.setdefault("min_resource", max(1, self.cfg.n_warmup_steps))
                return optuna.pruners.HyperbandPruner(**opts)
            if kind == "successive_halving":
                opts.setdefault("min_resource", max(1, self.cfg.n_warmup_steps))
                return optuna.pruners.SuccessiveHalvingPruner(**opts)
            return optuna.pruners.NopPruner()
        except TypeError as exc:
            raise ConfigError(f"{self.study_file}: study.pruner_options do not fit the {kind} pruner: {exc}") \
                from None

    # --------------------------------------------------------------- set-up
    def _on_stale_trial(self, study: Any, trial: Any) -> None:
        """Heartbeat callback: re-queue the stale trial and fail its MLflow run."""
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self._retry_cb is not None:
                self._retry_cb(study, trial)
        self.say(f"trial {trial.number} went stale (no heartbeat for the grace period): FAILED"
                 + (", re-queued" if self._retry_cb is not None else ""))
        if self.parent_run_id is None:
            return
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            parent = client.get_run(self.parent_run_id)
            runs = client.search_runs(
                [parent.info.experiment_id], max_results=10,
                filter_string=(f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and "
                               f"attributes.run_name = 'trial-{trial.number:04d}'"))
            for run in runs:
                if run.info.status == "RUNNING":
                    client.set_tag(run.info.run_id, "arforge.trial_state", "FAIL")
                    client.set_tag(run.info.run_id, "arforge.error", "stale: no heartbeat (worker died?)")
                    client.set_terminated(run.info.run_id, status="FAILED")
        except Exception as exc:  # the retry matters more than the bookkeeping
            self.say(f"could not mark trial {trial.number}'s MLflow run failed: {exc}")

    def setup(self) -> Any:
        import optuna
        from mlflow.tracking import MlflowClient

        from arforge import tracking

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Both stores are checked before the study or any run is created.
        tracking.check_store(self.storage_url, option="study storage (--storage)", what="optuna")
        tracking.check_store()
        self.validate_launch()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry_cb = (optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.cfg.max_retry)
                              if self.cfg.heartbeat_interval else None)
        grid_size = self._grid_size()
        if grid_size is not None and self.cfg.n_trials > grid_size:
            self.say(f"the grid has {grid_size} points: n_trials lowered from {self.cfg.n_trials}")
            self.cfg.n_trials = grid_size
        with self.lock():
            storage = open_storage(self.storage_url, heartbeat_interval=self.cfg.heartbeat_interval or None,
                                   grace_period=self.cfg.grace_period, stale_trial_callback=self._on_stale_trial)
            base = optuna.create_study(study_name=self.cfg.study_name, storage=storage,
                                       direction=self.cfg.direction, load_if_exists=True)
            if base.direction.name.lower() != self.cfg.direction:
                raise ConfigError(
                    f"{self.study_file}: study {self.cfg.study_name!r} in {mask_url(self.storage_url)} "
                    f"{base.direction.name.lower()}s, but study.direction = {self.cfg.direction!r}")
            attrs = base.user_attrs
            signature = self._signature()
            if "arforge.signature" in attrs and attrs["arforge.signature"] != signature:
                old = attrs["arforge.signature"]
                diffs = [k for k in signature if old.get(k) != signature[k]]
                then = json.dumps({k: old.get(k) for k in diffs})
                raise ConfigError(
                    f"{self.study_file}: study {self.cfg.study_name!r} in {mask_url(self.storage_url)} was "
                    f"created with a different {', '.join(diffs)} (then: {then}). "
                    "Give the new search its own name (--bind 'study.study_name = \"...\"') or delete the old "
                    "study (optuna.delete_study).")
            if "arforge.signature" not in attrs:
                base.set_user_attr("arforge.signature", signature)
            if self.cfg.enqueue and not attrs.get("arforge.enqueued") and not base.get_trials(deepcopy=False):
                for point in self.cfg.enqueue:  # a new study: its first trials are these points, once
                    base.enqueue_trial(point, skip_if_exists=True)
                base.set_user_attr("arforge.enqueued", len(self.cfg.enqueue))
            worker_index = int(attrs.get("arforge.workers_started", 0))
            base.set_user_attr("arforge.workers_started", worker_index + 1)
            # MLflow's SQLite store is initialised under the lock too: two workers
            # creating the same new database at once would race on its schema.
            tracking.configure()
            exp_id = tracking.ensure_experiment(self.cfg.experiment)
            self.parent_run_id = self._parent_run(base, exp_id, MlflowClient())
        cls = _make_slot_study_class()
        st = cls(study_name=self.cfg.study_name, storage=storage,
                 sampler=self._sampler(self.cfg.seed + worker_index), pruner=self._pruner())
        st.arforge_guard = self._guarded_ask
        self._study = st
        self.worker_index = worker_index
        return st

    def _parent_run(self, base: Any, exp_id: str, client: Any) -> str:
        cfg = self.cfg
        run_id = base.user_attrs.get("arforge.parent_run_id")
        if run_id:
            try:
                run = client.get_run(run_id)
                if run.info.lifecycle_stage == "active" and run.info.experiment_id == exp_id:
                    client.update_run(run_id, status="RUNNING")
                    client.set_tag(run_id, "arforge.n_trials", str(cfg.n_trials))
                    return run_id
            except Exception:
                pass  # a different MLflow store than the study's first worker used
        found = client.search_runs(
            [exp_id], max_results=1, order_by=["attributes.start_time ASC"],
            filter_string=f"tags.`arforge.study` = '{cfg.study_name}' and tags.`arforge.role` = 'study'")
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            from arforge import tracking

            run = client.create_run(exp_id, run_name=cfg.study_name, tags={
                "arforge.study": cfg.study_name, "arforge.role": "study", "arforge.objective": cfg.objective,
                "arforge.direction": cfg.direction, **tracking.git_state(self.study_file)})
            run_id = run.info.run_id
            tracker = tracking.MlflowTracker(run_id)
            tracker.log_params({
                "study.launch_file": str(cfg.launch_file), "study.objective": cfg.objective,
                "study.direction": cfg.direction, "study.sampler": cfg.sampler, "study.seed": cfg.seed,
                "study.pruner": cfg.pruner, "study.n_startup_trials": cfg.n_startup_trials,
                "study.n_warmup_steps": cfg.n_warmup_steps, "study.n_trials": cfg.n_trials,
                "study.study_name": cfg.study_name, "study.storage": mask_url(self.storage_url),
                "study.fixed_bindings": json.dumps(self.fixed),
                **{f"space.{n}".replace("[", ".").replace("]", ""): s.describe() for n, s in cfg.space.items()},
                **({"study.sampler_options": json.dumps(cfg.sampler_options, default=str)}
                   if cfg.sampler_options else {}),
                **({"study.pruner_options": json.dumps(cfg.pruner_options, default=str)}
                   if cfg.pruner_options else {}),
            })
            tracker.log_text(self.study_file.read_text(), f"study/{self.study_file.name}")
            tracker.log_text(self.launch_file.read_text(), f"study/{self.launch_file.name}")
        client.set_tag(run_id, "arforge.n_trials", str(cfg.n_trials))
        if "arforge.parent_run_id" not in base.user_attrs:
            base.set_user_attr("arforge.parent_run_id", run_id)
        return run_id

    # ------------------------------------------------------------ each trial
    def _guarded_ask(self, ask: Callable[[], Any]) -> Any:
        from optuna.trial import TrialState

        with self.lock():
            trials = self._study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            used = slots_used(trials, max_retry=self._retry_max(), grace_period=self._grace())
            if not waiting and used >= self.cfg.n_trials:
                raise _NoSlot()
            return ask()

    def _retry_max(self) -> int | None:
        return self.cfg.max_retry if self._retry_cb is not None else 0

    def _grace(self) -> float:
        hb = self.cfg.heartbeat_interval or 0
        return float(self.cfg.grace_period or 2 * hb)

    def _objective(self, trial: Any) -> float:
        import optuna

        run_id = before = None
        binds: dict[str, str] = {}
        retry_of = None
        state, error = "FAIL", None
        try:
            values = {name: spec.suggest(trial, name) for name, spec in self.cfg.space.items()}
            binds = space_bindings(self.cfg.space, values)
            lines = [f"{k} = {v}" for k, v in binds.items()]
            run_name = f"trial-{trial.number:04d}"
            frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
            retry_of = frozen.system_attrs.get("failed_trial")
            if frozen.user_attrs.get("arforge.error"):  # inherited by a retried trial
                trial.set_user_attr("arforge.error", None)
            trial.set_user_attr("arforge.bindings", lines)
            trial.set_user_attr("arforge.worker", self.worker)
            self.say(f"trial {trial.number} started" + (f" (retry of trial {retry_of})" if retry_of is not None
                                                         else "") + ": " + "; ".join(lines))
            before = _launch.last_run()[0]
            result = _launch.run_file(self.launch_file, self._trial_bindings(lines, run_name),
                                      parent_run_id=self.parent_run_id, reporter=self._reporter(trial))
            run_id = self._new_run(before)
            value = self._objective_value(result, run_id)
            if run_id is not None:  # the trial's own run carries its objective (a pipeline's stages log it below)
                from mlflow.tracking import MlflowClient

                MlflowClient().log_metric(run_id, self.cfg.objective, float(value))
            state = "COMPLETE"
            return value
        except optuna.TrialPruned:
            run_id = self._new_run(before)
            state = "PRUNED"
            raise
        except BaseException as exc:
            run_id = self._new_run(before)
            error = _launch.format_exception_short(exc)[:4000]
            if isinstance(exc, KeyboardInterrupt):
                error = "interrupted (KeyboardInterrupt)"
            # Every failure the worker sees is marked, so that slots_used() can
            # tell it from a dead worker's trial awaiting its heartbeat retry.
            trial.set_user_attr("arforge.error", error)
            if isinstance(exc, ConfigError) or self._user_error_first(exc, trial):
                # A gin mistake repeats in every trial, and so does a user error (a missing
                # checkpoint, a wrong path) before any trial has succeeded: stop after this one.
                self._fatal = exc
                trial.study.stop()
            raise
        finally:
            if run_id is not None:
                trial.set_user_attr("arforge.run_id", run_id)
                self._annotate_run(run_id, trial, binds, state, error, retry_of)

    def _user_error_first(self, exc: BaseException, trial: Any) -> bool:
        """An :class:`ArforgeError` while no trial of the study has finished yet: the launch
        itself is broken (a model not trained yet, a wrong path), not this trial's values. A
        diverging loss (NaN) depends on the values and does not count."""
        from optuna.trial import TrialState

        if not isinstance(exc, ArforgeError) or type(exc).__name__ in ("NonFiniteLossError",
                                                                      "NonFiniteCheckpointError"):
            return False
        try:
            done = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        except Exception:  # the storage went away: let the usual failure counting decide
            return False
        return not done

    def _new_run(self, before: str | None) -> str | None:
        run_id = _launch.last_run()[0]
        # run_file leaves the previous run's id in place when it fails before launching.
        return run_id if run_id and run_id != before else None

    def _reporter(self, trial: Any) -> Callable[[str, float, int], None]:
        import optuna

        objective = self.cfg.objective

        def report(metric: str, value: float, step: int) -> None:
            if metric != objective:
                return
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}: {metric} = {value:.6g}")

        return report

    def _objective_value(self, result: Any, run_id: str | None) -> float:
        name = self.cfg.objective
        # A pipeline (jobs.pipeline) returns {stage: result}: take the last stage that has it.
        stages = [r for r in result.values() if isinstance(r, Mapping) and name in r] \
            if isinstance(result, Mapping) else []
        if isinstance(result, Mapping) and name in result:
            raw = result[name]
        elif stages:
            raw = stages[-1][name]
        else:
            metrics: dict[str, float] = {}
            if run_id is not None:
                from mlflow.tracking import MlflowClient

                metrics = MlflowClient().get_run(run_id).data.metrics
            if name not in metrics:
                keys = sorted(result) if isinstance(result, Mapping) else []
                raise ConfigError(
                    f"{self.study_file}: study.objective = {name!r}, but the job returned "
                    + (f"a dict with {', '.join(map(repr, keys))}" if isinstance(result, Mapping)
                       else f"{type(result).__name__}")
                    + " and its MLflow run has " + (f"metrics {', '.join(sorted(metrics))}" if metrics
                                                   else "no metrics")
                    + f". Set study.objective to one of those, or make {self.launch_file.name}'s job "
                      f"return or log {name!r}.")
            raw = metrics[name]
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.study_file}: the job's {name!r} is {raw!r}, not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"objective {name!r} is {value}")
        return value

    def _annotate_run(self, run_id: str, trial: Any, binds: Mapping[str, str], state: str,
                      error: str | None, retry_of: int | None) -> None:
        from arforge import tracking

        try:
            tracker = tracking.MlflowTracker(run_id)
            tracker.log_params({f"trial.{k}": v for k, v in binds.items()})
            tags = {"arforge.study": self.cfg.study_name, "arforge.role": "trial",
                    "arforge.trial_number": str(trial.number), "arforge.trial_state": state,
                    "arforge.worker": self.worker}
            if retry_of is not None:
                tags["arforge.retry_of"] = str(retry_of)
            if error:
                tags["arforge.error"] = error[:5000]
            tracker.set_tags(tags)
            if state == "PRUNED":
                tracker.client.set_terminated(run_id, status="KILLED")
        except Exception as exc:
            self.say(f"could not annotate MLflow run {run_id} of trial {trial.number}: {exc}")

    def _after_trial(self, study: Any, frozen: Any) -> None:
        from optuna.trial import TrialState

        if frozen.state == TrialState.FAIL:
            self._consecutive_failures += 1
            err = frozen.user_attrs.get("arforge.error") or "failed"
            self.say(f"trial {frozen.number} FAILED: {err.splitlines()[0][:300]}")
            if self._fatal is None and self._consecutive_failures >= self.cfg.max_consecutive_failures:
                self._gave_up = True
                study.stop()
        else:
            self._consecutive_failures = 0
            finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
            what = "pruned at" if frozen.state == TrialState.PRUNED else "finished:"
            self.say(f"trial {frozen.number} {what} {self.cfg.objective} = {frozen.value:.6g} "
                     f"({finished}/{self.cfg.n_trials} finished)"
                     if frozen.value is not None else f"trial {frozen.number} {frozen.state.name}")
            if frozen.state == TrialState.COMPLETE and self.parent_run_id:
                from arforge import tracking

                tracking.MlflowTracker(self.parent_run_id).log_metrics(
                    {f"trial_{_metric_key(self.cfg.objective)}": frozen.value}, step=frozen.number)
        if frozen.state == TrialState.COMPLETE:
            self._update_best(study)

    def _update_best(self, study: Any) -> Any:
        """Tag the best trial's run ``arforge.best=true`` (and untag the previous one)."""
        from mlflow.tracking import MlflowClient

        if not self.parent_run_id:
            return None
        with self.lock():
            try:
                best = study.best_trial
            except ValueError:
                return None
            run_id = best.user_attrs.get("arforge.run_id")
            client = MlflowClient()
            parent = client.get_run(self.parent_run_id)
            if run_id and parent.data.tags.get("arforge.best_run_id") != run_id:
                tagged = client.search_runs(
                    [parent.info.experiment_id], max_results=1000,
                    filter_string=(f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and "
                                   "tags.`arforge.best` = 'true'"))
                for run in tagged:
                    if run.info.run_id != run_id:
                        client.delete_tag(run.info.run_id, "arforge.best")
                client.set_tag(run_id, "arforge.best", "true")
                for k, v in {"arforge.best_run_id": run_id, "arforge.best_trial": str(best.number),
                             "arforge.best_command": self.reproduce_command(best)}.items():
                    client.set_tag(self.parent_run_id, k, v)
            from arforge import tracking

            tracking.MlflowTracker(self.parent_run_id).log_metrics(
                {f"best_{_metric_key(self.cfg.objective)}": best.value}, step=best.number)
            return best

    def reproduce_command(self, trial: Any) -> str:
        lines = [*self.fixed, *trial.user_attrs.get("arforge.bindings", [])]
        try:
            shown = os.path.relpath(self.launch_file)
        except ValueError:
            shown = str(self.launch_file)
        if shown.startswith(".." + os.sep + ".."):
            shown = str(self.launch_file)
        return " ".join(["arforge", "run", shlex.quote(shown)] + [f"--bind {shlex.quote(b)}" for b in lines])

    # ----------------------------------------------------------------- drive
    def run(self) -> StudyResult:
        import optuna
        from optuna.trial import TrialState

        st = self.setup()
        # Each failed trial is reported in one line by _after_trial: Optuna's own warning of it
        # would add the Python traceback of every failure.
        quiet_handlers = [*logging.getLogger("optuna").handlers, *logging.getLogger().handlers]
        for handler in quiet_handlers:
            handler.addFilter(_no_trial_tracebacks)
        finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
        done = len(st.get_trials(deepcopy=False, states=finished_states))
        self.say(f"{done}/{self.cfg.n_trials} trials finished so far; storage {mask_url(self.storage_url)}, "
                 f"MLflow experiment {self.cfg.experiment!r} (parent run {self.parent_run_id})")
        deadline = time.monotonic() + self.cfg.timeout if self.cfg.timeout else None
        stopped = "done"
        waiting_said = False
        interrupted = False
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    stopped = "timeout"
                    break
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        st.optimize(self._objective, timeout=remaining, catch=(Exception,),
                                    callbacks=[self._after_trial,
                                               optuna.study.MaxTrialsCallback(self.cfg.n_trials,
                                                                              states=finished_states)])
                except _NoSlot:
                    pass
                if self._fatal is not None:
                    raise self._fatal
                if self._gave_up:
                    raise StudyError(f"{self.cfg.max_consecutive_failures} trials failed in a row; last error: "
                                     f"{self._last_error(st)}. Fix the launch or raise "
                                     "study.max_consecutive_failures.")
                trials = st.get_trials(deepcopy=False)
                if sum(t.state in finished_states for t in trials) >= self.cfg.n_trials:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    stopped = "timeout"
                    break
                running = [t.number for t in trials if t.state == TrialState.RUNNING]
                if not self.cfg.heartbeat_interval:
                    stopped = "others running"
                    self.say(f"trials {running} are running in other workers; they complete the study")
                    break
                if not waiting_said:
                    self.say(f"waiting for trials {running} of other workers (a dead worker's trial is "
                             f"re-run after {self._grace():g} s without heartbeat)")
                    waiting_said = True
                time.sleep(self.cfg.heartbeat_interval)
                with self.lock(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(st)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            for handler in quiet_handlers:
                handler.removeFilter(_no_trial_tracebacks)
            if interrupted and self.parent_run_id:
                with contextlib.suppress(Exception):
                    from mlflow.tracking import MlflowClient

                    MlflowClient().set_terminated(self.parent_run_id, status="KILLED")
        return self.finish(stopped)

    def _last_error(self, st: Any) -> str:
        from optuna.trial import TrialState

        failed = st.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        return (failed[-1].user_attrs.get("arforge.error") or "?").splitlines()[0] if failed else "?"

    def finish(self, stopped: str = "done") -> StudyResult:
        from mlflow.tracking import MlflowClient
        from optuna.trial import TrialState

        st = self._study
        trials = st.get_trials(deepcopy=False)
        count = {s: sum(t.state == s for t in trials) for s in TrialState}
        result = StudyResult(study_name=self.cfg.study_name, experiment=self.cfg.experiment,
                             storage=mask_url(self.storage_url), parent_run_id=self.parent_run_id,
                             n_complete=count[TrialState.COMPLETE], n_pruned=count[TrialState.PRUNED],
                             n_failed=count[TrialState.FAIL], n_trials=self.cfg.n_trials, stopped=stopped)
        best = self._update_best(st)
        if best is not None:
            result.best_value, result.best_trial = best.value, best.number
            result.best_run_id = best.user_attrs.get("arforge.run_id")
            result.best_bindings = list(best.user_attrs.get("arforge.bindings", []))
            result.reproduce_command = self.reproduce_command(best)
        result.enqueued = [(t.number, t.state.name, t.value, list(t.user_attrs.get("arforge.bindings", [])))
                           for t in trials if "fixed_params" in t.system_attrs]
        finished = result.n_complete + result.n_pruned
        if self.parent_run_id:
            client = MlflowClient()
            mine = False
            # Plots are drawn by one worker per study state, not by every worker.
            with self.lock():
                claim = f"{finished}:{result.n_failed}"
                mine = self.plots and st.user_attrs.get("arforge.plotted") != claim
                if mine:
                    st.set_user_attr("arforge.plotted", claim)
            if mine:
                from arforge import tracking

                out = tracking.home() / "studies" / _safe(self.cfg.study_name)
                result.plots = save_study_plots(st, out, objective=self.cfg.objective)
                for p in result.plots:
                    client.log_artifact(self.parent_run_id, str(p), "plots")
            client.log_batch(self.parent_run_id, metrics=_metrics({
                "n_complete": result.n_complete, "n_pruned": result.n_pruned, "n_failed": result.n_failed}))
            if finished >= self.cfg.n_trials:
                running = any(t.state == TrialState.RUNNING for t in st.get_trials(deepcopy=False))
                if not running:
                    client.set_terminated(self.parent_run_id, status="FINISHED")
        return result


def _metric_key(name: str) -> str:
    return re.sub(r"[^\w./ :-]", "_", name)


def _metrics(values: Mapping[str, float]) -> list[Any]:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, 0) for k, v in values.items()]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "study"


def _use_agg() -> None:
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")


def save_study_plots(st: Any, out_dir: Path, *, objective: str = "objective") -> list[Path]:
    """Optuna's matplotlib plots as PNGs in ``out_dir``: optimisation history,
    intermediate values, parameter importances, slice, and a contour of the two
    leading CFG-scale (else numeric) parameters. Plots that do not apply are skipped."""
    from optuna.trial import TrialState

    _use_agg()
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    complete = st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    params = list(dict.fromkeys(p for t in complete for p in t.params))
    numeric = [p for p in params if all(isinstance(t.params.get(p, 0.0), (int, float))
                                        and not isinstance(t.params.get(p, 0.0), bool) for t in complete)]
    cfg_like = [p for p in numeric if re.search(r"cfg|scale|guid", p)]
    contour = (cfg_like + [p for p in numeric if p not in cfg_like])[:2]
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: ovm.plot_optimization_history(st, target_name=objective),
        "slice": lambda: ovm.plot_slice(st, target_name=objective),
    }
    if any(t.intermediate_values for t in st.get_trials(deepcopy=False)):
        plots["intermediate_values"] = lambda: ovm.plot_intermediate_values(st)
    if len(complete) >= 2 and len(params) >= 2:
        plots["param_importances"] = lambda: ovm.plot_param_importances(st, target_name=objective)
    if len(contour) == 2 and len(complete) >= 2:
        plots["contour"] = lambda: ovm.plot_contour(st, params=contour, target_name=objective)
    written = []
    for name, draw in plots.items():
        fig = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
                fig = np.ravel(ax)[0].figure
                path = out_dir / f"{name}.png"
                fig.savefig(path, dpi=100, bbox_inches="tight")
            written.append(path)
        except Exception as exc:  # a plot that cannot be drawn must not fail the study
            print(f"[study {st.study_name}] skipped the {name} plot: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
        finally:
            if fig is not None:
                plt.close(fig)
            else:
                plt.close("all")
    return written


def run_study(study_file: str | os.PathLike, bindings: Sequence[str] = (), *, storage: str | None = None,
              n_trials: int | None = None, heartbeat_interval: int | None = None,
              grace_period: int | None = None, max_retry: int | None = None, timeout: float | None = None,
              verbose: bool = True, plots: bool = True) -> StudyResult:
    """Run (or join, or resume) the study of ``study_file`` until it has its trials.

    ``bindings`` that target the study (``study.*``, ``space.*``) change the study
    file; any other binding is added to every trial's launch, a macro to both.
    ``plots=False`` skips the Optuna plots (they take a few seconds).
    """
    return StudyRunner(study_file, bindings, storage=storage, n_trials=n_trials,
                       heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                       max_retry=max_retry, timeout=timeout, verbose=verbose, plots=plots).run()


def print_result(result: StudyResult) -> None:
    print(f"study {result.study_name!r}: {result.n_complete} complete, {result.n_pruned} pruned, "
          f"{result.n_failed} failed (target {result.n_trials} finished) in {result.storage}")
    if result.stopped == "timeout":
        print("stopped by the timeout; run the same command again to continue")
    if result.best_value is None:
        print("no trial completed yet")
        return
    print(f"best value {result.best_value:.6g} (trial {result.best_trial}, MLflow run {result.best_run_id} "
          f"in experiment {result.experiment!r})")
    for line in result.best_bindings:
        print(f"  {line}")
    for number, state, value, bindings in result.enqueued:  # e.g. the unguided baseline, to compare with
        shown = f"{value:.6g}" if value is not None else state.lower()
        print(f"enqueued trial {number}: {shown}" + (f" ({'; '.join(bindings)})" if bindings else ""))
    if result.plots:
        print(f"plots: {result.plots[0].parent} ({', '.join(p.name for p in result.plots)})")
    print("reproduce the best trial with:")
    print(f"  {result.reproduce_command}")


# =================================================================== compare
@dataclasses.dataclass
class CompareResult:
    experiment: str
    metric: str
    rows: list[dict[str, Any]]          # run_name, run_id, status, metric, params{}
    columns: list[str]                  # differing params (display names)
    plot: Path | None
    plot_param: str | None
    artifact_run_id: str | None


_SKIP_PARAMS = {"gin.arforge.launch.run_name"}


def _display(key: str) -> str:
    for prefix in ("trial.", "gin."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def compare_runs(experiment: str, *, metric: str | None = None, param: str | None = None,
                 ascending: bool | None = None, max_results: int = 1000,
                 plot: str | os.PathLike | None = None, log_plot: bool = True) -> CompareResult:
    """Runs of ``experiment`` sorted by ``metric`` (missing last), the params that differ, and a plot."""
    from mlflow.tracking import MlflowClient

    from arforge import tracking

    tracking.configure()
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments(max_results=1000)]
        hint = reg.closest(experiment, names)
        raise ArforgeError(f"no MLflow experiment {experiment!r} in {tracking.tracking_uri()}"
                           + (f"; did you mean {hint!r}?" if hint else "")
                           + f" Experiments: {', '.join(names) or '(none)'}.")
    runs = list(client.search_runs([exp.experiment_id], max_results=max_results,
                                   order_by=["attributes.start_time ASC"]))
    studies = [r for r in runs if r.data.tags.get("arforge.role") == "study"]
    runs = [r for r in runs if r.data.tags.get("arforge.role") not in ("study", "compare")]
    if metric is None:
        metric = studies[0].data.tags.get("arforge.objective", "fid") if studies else "fid"
    if ascending is None:
        ascending = not (studies and studies[0].data.tags.get("arforge.direction") == "maximize")
    if not runs:
        raise ArforgeError(f"experiment {experiment!r} has no runs to compare")
    if not any(metric in r.data.metrics for r in runs):
        known = sorted({m for r in runs for m in r.data.metrics})
        raise ArforgeError(f"no run of experiment {experiment!r} logged metric {metric!r}; "
                           f"metrics: {', '.join(known) or '(none)'} (choose one with --metric)")
    # A run whose parent (a study trial, a pipeline) logged the same metric is summarised by
    # that parent: show the parent only, so each comparison appears once.
    # A study trial summarises its stages even when it has no value (pruned, failed).
    summarising = ({r.info.run_id for r in runs if metric in r.data.metrics}
                   | {r.info.run_id for r in runs if "arforge.trial_number" in r.data.tags})
    runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") not in summarising]
    shown = [r for r in runs if metric in r.data.metrics] or runs
    keys = sorted({k for r in shown for k in r.data.params} - _SKIP_PARAMS)
    differing = [k for k in keys if len({r.data.params.get(k) for r in shown}) > 1]
    trial_keys = {k[len("trial."):] for k in differing if k.startswith("trial.")}
    if trial_keys:  # a study's runs differ by its search space; everything else is noise
        differing = [k for k in differing if k.startswith("trial.")]
    differing = [k for k in differing if not (k.startswith("gin.") and k[len("gin."):] in trial_keys)]
    with_metric = [r for r in runs if metric in r.data.metrics]
    with_metric.sort(key=lambda r: r.data.metrics[metric], reverse=not ascending)
    ordered = with_metric + [r for r in runs if metric not in r.data.metrics]
    rows = [{"run_name": r.info.run_name, "run_id": r.info.run_id,
             "status": r.data.tags.get("arforge.trial_state", r.info.status),  # PRUNED rather than KILLED
             "metric": r.data.metrics.get(metric), "best": r.data.tags.get("arforge.best") == "true",
             "params": {_display(k): r.data.params.get(k) for k in differing}} for r in ordered]
    columns = [_display(k) for k in differing]
    if param is not None:
        wanted = _display(param)
        if wanted not in columns:
            hint = reg.closest(wanted, columns)
            raise ArforgeError(f"--param {param!r} is not a parameter that differs between the runs"
                               + (f"; did you mean {hint!r}?" if hint else "")
                               + f" Differing: {', '.join(columns) or '(none)'}.")
        plot_param = wanted
    else:
        numeric = [c for c in columns if all(_as_float(row["params"][c]) is not None
                                             for row in rows if row["params"][c] is not None)]
        plot_param = numeric[0] if numeric else (columns[0] if columns else None)
    out = Path(plot) if plot else tracking.home() / "compare" / f"{_safe(experiment)}-{_safe(metric)}.png"
    _plot_compare(rows, metric, plot_param, out, title=experiment)
    artifact_run = None
    if log_plot:
        artifact_run = studies[0].info.run_id if len(studies) == 1 else _compare_run(client, exp.experiment_id)
        client.log_artifact(artifact_run, str(out), "compare")
        if len(studies) != 1:
            client.set_terminated(artifact_run, status="FINISHED")
    return CompareResult(experiment=experiment, metric=metric, rows=rows, columns=columns, plot=out,
                         plot_param=plot_param, artifact_run_id=artifact_run)


def _compare_run(client: Any, exp_id: str) -> str:
    found = client.search_runs([exp_id], max_results=1, filter_string="tags.`arforge.role` = 'compare'")
    if found:
        return found[0].info.run_id
    return client.create_run(exp_id, run_name="compare", tags={"arforge.role": "compare"}).info.run_id


def _plot_compare(rows: list[dict[str, Any]], metric: str, param: str | None, out: Path, *, title: str) -> None:
    _use_agg()
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["metric"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        if param is None:
            xs = list(range(len(pts)))
            ax.set_xticks(xs, [r["run_name"] for r in pts], rotation=45, ha="right", fontsize=8)
            ax.set_xlabel("run")
        else:
            values = [r["params"].get(param) for r in pts]
            if all(_as_float(v) is not None for v in values if v is not None) and any(v is not None for v in values):
                keep = [(float(v), r) for v, r in zip(values, pts) if v is not None]
                xs, pts = [k[0] for k in keep], [k[1] for k in keep]
            else:
                cats = list(dict.fromkeys(str(v) for v in values))
                xs = [cats.index(str(v)) for v in values]
                ax.set_xticks(range(len(cats)), [c if len(c) <= 24 else c[:21] + "..." for c in cats],
                              rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(param)
        ys = [r["metric"] for r in pts]
        ax.scatter(xs, ys, c="tab:blue", zorder=3)
        best = [(x, y) for x, y, r in zip(xs, ys, pts) if r["best"]]
        if best:
            ax.scatter([best[0][0]], [best[0][1]], marker="*", s=220, c="tab:red", zorder=4, label="best trial")
            ax.legend(loc="best")
        if len(pts) <= 30:
            for x, y, r in zip(xs, ys, pts):
                ax.annotate(r["run_name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric}" + (f" vs {param}" if param else ""))
        ax.grid(alpha=0.3)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def format_table(result: CompareResult, *, width: int = 32) -> str:
    def cut(s: str) -> str:
        return s if len(s) <= width else s[: width - 3] + "..."

    header = ["#", "run", "status", result.metric, *result.columns]
    body = []
    for i, r in enumerate(result.rows, 1):
        metric = "-" if r["metric"] is None else f"{r['metric']:.6g}"
        body.append([str(i), r["run_name"] + (" *" if r["best"] else ""), r["status"], metric,
                     *[cut("-" if r["params"][c] is None else str(r["params"][c])) for c in result.columns]])
    widths = [max(len(row[j]) for row in [header, *body]) for j in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    return "\n".join(lines)


# ======================================================================= CLI
def _cmd_study(args: Any) -> int:
    result = run_study(args.study_file, args.bind, storage=args.storage, n_trials=args.n_trials,
                       heartbeat_interval=args.heartbeat, grace_period=args.grace, max_retry=args.max_retry,
                       timeout=args.timeout, plots=not args.no_plots)
    print_result(result)
    return 0


def _cmd_compare(args: Any) -> int:
    result = compare_runs(args.experiment, metric=args.metric, param=args.param, ascending=args.ascending,
                          max_results=args.max_results, plot=args.plot)
    print(format_table(result))
    if result.plot is not None:
        print(f"\nplot: {result.plot}" + (f" ({result.metric} vs {result.plot_param})" if result.plot_param else "")
              + (f"; logged to MLflow run {result.artifact_run_id}" if result.artifact_run_id else ""))
    return 0


def add_cli(subparsers: Any) -> None:
    """``arforge study`` and ``arforge compare`` (hooked in by ``arforge.cli``)."""
    s = subparsers.add_parser(
        "study", help="run, join or resume an Optuna study over a gin launch file",
        description="Run an Optuna study file. Several workers running the same command (same --storage) "
                    "share one study; running it again resumes it until n_trials trials have finished.")
    s.add_argument("study_file", help="the study .gin file")
    s.add_argument("--storage", help="Optuna storage URL shared by all workers, e.g. postgresql://user@host/db "
                                     "(default: sqlite:///$ARFORGE_HOME/optuna.db)")
    s.add_argument("--n-trials", type=int, help="total finished trials wanted (overrides study.n_trials)")
    s.add_argument("--bind", "-b", action="append", default=[],
                   help="a gin binding: study.*/space.* change the study, any other is added to every "
                        "trial's launch, e.g. 'launch.device = \"cuda\"' (repeatable)")
    s.add_argument("--heartbeat", type=int, help="seconds between trial heartbeats (default 60; 0: off)")
    s.add_argument("--grace", type=int, help="seconds without heartbeat before a trial is re-run "
                                             "(default 2 x heartbeat)")
    s.add_argument("--max-retry", type=int, help="re-runs of a dead worker's trial (default 3)")
    s.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    s.add_argument("--no-plots", action="store_true", help="skip the Optuna plots on the parent run")
    s.set_defaults(fn=_cmd_study)

    c = subparsers.add_parser("compare", help="table and plot of an experiment's runs by a metric")
    c.add_argument("experiment", help="MLflow experiment name (a study's experiment is its name)")
    c.add_argument("--metric", help="metric to sort by (default: the study's objective, else fid)")
    c.add_argument("--param", help="parameter for the plot's x axis (default: the first differing numeric one)")
    order = c.add_mutually_exclusive_group()
    order.add_argument("--ascending", dest="ascending", action="store_true", default=None,
                       help="smallest first (default, unless the study maximises)")
    order.add_argument("--descending", dest="ascending", action="store_false", help="largest first")
    c.add_argument("--max-results", type=int, default=1000, help="at most this many runs (default 1000)")
    c.add_argument("--plot", help="PNG path (default $ARFORGE_HOME/compare/<experiment>-<metric>.png)")
    c.set_defaults(fn=_cmd_compare)
