"""The study file: the ``study`` configurable, its checks, and where its launch file is.

A study file is a gin file parsed like a launch file (same file:line errors);
its ``study.*`` bindings become a :class:`StudyConfig` (docs/studies.md,
"A study file").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import gin

from arforge import launch as _launch
from arforge import registry as reg
from arforge.errors import ArforgeError, ConfigError
from arforge.studies.space import check_space

SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "hyperband", "successive_halving", "none")


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
    storage: str | None = None
    prune_on: str | None = None


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
    storage: str | None = None,
    prune_on: str | None = None,
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
        sampler: ``tpe`` (seeded), ``random``, ``grid`` (every space entry
            categorical, int or a stepped float) or ``cmaes``.
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
        enqueue: points the study runs first (``optuna.Study.enqueue_trial``),
            each ``{space name: value}``, e.g. a baseline every other trial is
            compared with. A new study enqueues them once; they count towards ``n_trials``.
        storage: where the study lives when ``--storage`` is not given: an RDB URL
            (``postgresql://user@host/db``) or ``journal:///path/study.log`` (Optuna's file journal;
            a relative path is taken against the study file's folder). Default:
            ``sqlite:///$ARFORGE_HOME/optuna.db``.
        prune_on: the metric whose ``ctx.report`` values go to the pruner (default: the
            objective). Set it to prune by training step on a curve the objective lacks, e.g.
            ``"val_nll"`` (the AR trainer's held-out NLL) or ``"train_nll"`` for an FID objective;
            it must fall as the objective falls (or rise with it, when maximising).
    """
    return StudyConfig(
        launch_file=launch_file, space=dict(space) if isinstance(space, Mapping) else space,
        objective=objective, direction=direction, n_trials=n_trials,
        study_name=study_name, experiment=experiment, sampler=sampler, seed=seed,
        sampler_options=dict(sampler_options or {}), pruner=pruner, n_startup_trials=n_startup_trials,
        n_warmup_steps=n_warmup_steps, pruner_options=dict(pruner_options or {}),
        fixed_bindings=list(fixed_bindings), timeout=timeout, heartbeat_interval=heartbeat_interval,
        grace_period=grace_period, max_retry=max_retry, max_consecutive_failures=max_consecutive_failures,
        enqueue=[dict(p) if isinstance(p, Mapping) else p for p in enqueue], storage=storage, prune_on=prune_on)


_STUDY_SELECTOR = re.compile(r"^\s*(?:[\w./]+/)?(?:arforge\.)?(?:study|space\.\w+)\.\w+\s*=")
_MACRO = re.compile(r"^\s*[A-Za-z_]\w*\s*=")


def split_bindings(bindings: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``--bind`` values into study-file bindings (``study.*``, ``space.*``) and launch
    bindings added to every trial. A macro goes to both: the launch files name their data through
    macros, and a study file may use its own; defining a macro a file does not use changes nothing."""
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


def _one_of(what: str, value: Any, known: Sequence[str]) -> str | None:
    if value in known:
        return None
    hint = reg.closest(str(value), known)
    return (f"unknown study.{what} {value!r}" + (f"; did you mean {hint!r}?" if hint else "")
            + f" {what.capitalize()}s: {', '.join(known)}.")


def _check_config(cfg: StudyConfig, path: Path) -> StudyConfig:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{path}: {msg}")

    try:
        cfg.space = check_space(cfg.space)
    except ConfigError as exc:
        raise bad(str(exc)) from None
    if not isinstance(cfg.objective, str) or not cfg.objective:
        raise bad("study.objective must be a metric name such as 'fid'")
    if cfg.direction not in ("minimize", "maximize"):
        raise bad(f"study.direction must be 'minimize' or 'maximize', not {cfg.direction!r}")
    for what, known in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        msg = _one_of(what, getattr(cfg, what), known)
        if msg:
            raise bad(msg)
    if isinstance(cfg.n_trials, bool) or not isinstance(cfg.n_trials, int) or cfg.n_trials < 1:
        raise bad(f"study.n_trials must be a positive int, not {cfg.n_trials!r}")
    if isinstance(cfg.fixed_bindings, str) or not all(isinstance(b, str) for b in cfg.fixed_bindings):
        raise bad("study.fixed_bindings must be a list of binding strings like 'launch.device = \"cpu\"'")
    if cfg.heartbeat_interval is None or cfg.heartbeat_interval < 0 or \
            (cfg.grace_period is not None and cfg.grace_period < 1):
        raise bad("study.heartbeat_interval must be >= 0 (0: off) and grace_period >= 1")
    if cfg.prune_on is not None and (not isinstance(cfg.prune_on, str) or not cfg.prune_on):
        raise bad(f"study.prune_on must be a metric name such as 'val_nll', not {cfg.prune_on!r}")
    if cfg.storage is not None and (not isinstance(cfg.storage, str) or "://" not in cfg.storage):
        raise bad(f"study.storage must be a storage URL such as 'journal:///path/study.log' or "
                  f"'postgresql://user@host/db', not {cfg.storage!r}")
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


def make_sampler(cfg: StudyConfig, seed: int, where: Path) -> Any:
    """The Optuna sampler ``cfg.sampler`` names, seeded with ``seed``."""
    import optuna

    opts = dict(cfg.sampler_options)
    try:
        if cfg.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **opts)
        if cfg.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed, **opts)
        if cfg.sampler == "grid":
            grid = {}
            for name, spec in cfg.space.items():
                values = spec.grid()
                if values is None:
                    raise ConfigError(f"{where}: study.sampler = 'grid' needs every space entry "
                                      f"categorical, int or a stepped float; {name!r} is {spec.describe()}")
                grid[name] = values
            return optuna.samplers.GridSampler(grid, seed=seed, **opts)
        if importlib.util.find_spec("cmaes") is None:
            raise ConfigError(f"{where}: study.sampler = 'cmaes' needs the cmaes package: pip install cmaes")
        return optuna.samplers.CmaEsSampler(seed=seed, **opts)
    except TypeError as exc:
        raise ConfigError(f"{where}: study.sampler_options do not fit the {cfg.sampler} sampler: {exc}") from None


def grid_size(cfg: StudyConfig) -> int | None:
    """How many points the grid sampler has, or None for the other samplers."""
    if cfg.sampler != "grid":
        return None
    return math.prod(len(s.grid()) for s in cfg.space.values())


def make_pruner(cfg: StudyConfig, where: Path) -> Any:
    """The Optuna pruner ``cfg.pruner`` names."""
    import optuna

    opts = dict(cfg.pruner_options)
    try:
        if cfg.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials,
                                               n_warmup_steps=cfg.n_warmup_steps, **opts)
        if cfg.pruner in ("hyperband", "successive_halving"):
            opts.setdefault("min_resource", max(1, cfg.n_warmup_steps))
            cls = optuna.pruners.HyperbandPruner if cfg.pruner == "hyperband" else \
                optuna.pruners.SuccessiveHalvingPruner
            return cls(**opts)
        return optuna.pruners.NopPruner()
    except TypeError as exc:
        raise ConfigError(f"{where}: study.pruner_options do not fit the {cfg.pruner} pruner: {exc}") from None
