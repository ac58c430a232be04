"""Gin launches: parse a gin file, open an MLflow run, call the configured job.

A launch file names its root with the ``launch`` configurable::

    include "base.gin"                       # resolved against this file's folder, then gin/
    launch.experiment = "quickstart"
    launch.run_name = "tokenizer"
    launch.job = @jobs.train_tokenizer       # any registered job
    jobs.train_tokenizer.steps = 600

``arforge run FILE.gin --bind 'jobs.train_tokenizer.steps = 10'`` loads the
plugins, parses the file and runs ``launch``. The job is called as
``job(ctx)`` with a :class:`RunContext` (tracker, device, precision, output
folder, seed); components never see gin or MLflow themselves.

Gin mistakes become :class:`arforge.errors.ConfigError` with the file, the
line and, for unknown names, the closest registered name.
"""

from __future__ import annotations

import importlib.util  # noqa: F401  (gin 0.5's include error path needs importlib.util loaded)
import inspect
import json
import os
import random
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import gin

from arforge import registry as reg
from arforge.errors import ArforgeError, ConfigError

_LOCATION = re.compile(r'In (?:file "(?P<file>[^"]+)"|bindings string), line (?P<line>\d+)')


# ------------------------------------------------------------------ paths
def repo_root() -> Path | None:
    """The checkout holding this package (editable installs), if any."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "gin").is_dir() and (parent / "packages").is_dir():
            return parent
    return None


def gin_search_paths(config_file: str | os.PathLike | None = None) -> list[Path]:
    """Where ``include`` looks after the including file's own folder: the launch file's folder,
    ``$ARFORGE_GIN_PATH``, the repo's ``gin/`` and the repo root."""
    paths: list[Path] = []
    if config_file is not None:
        paths.append(Path(config_file).resolve().parent)
    for extra in filter(None, os.environ.get("ARFORGE_GIN_PATH", "").split(os.pathsep)):
        paths.append(Path(extra).resolve())
    root = repo_root()
    if root is not None:
        paths.append(root / "gin")
        paths.append(root)
    return paths


# -------------------------------------------------------------- gin errors
def _all_selectors() -> list[str]:
    out = []
    for sel in gin.config._REGISTRY.get_all_matches(""):  # noqa: SLF001  (gin has no public listing)
        out.append(sel)
    return out


def _configurable_params(selector: str) -> list[str]:
    try:
        fn = gin.config._REGISTRY.get_match(selector).wrapped  # noqa: SLF001
    except Exception:
        return []
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return [p for p in inspect.signature(target).parameters if p not in ("self", "ctx")]
    except (TypeError, ValueError):
        return []


def explain_gin_error(exc: BaseException, *, config_file: str | None = None,
                      bindings: Sequence[str] = ()) -> ConfigError:
    """Turn a gin exception into a short message with file:line and a suggestion."""
    text = str(exc)
    where = ""
    m = _LOCATION.search(text)
    if m:
        if m.group("file"):
            where = f"{m.group('file')}:{m.group('line')}"
        else:
            line = int(m.group("line"))
            binding = bindings[line - 1] if 0 < line <= len(bindings) else ""
            where = f"--bind {binding!r}" if binding else f"--bind line {line}"
    elif config_file is not None:
        where = str(config_file)
        tok = re.search(r"\((\d+), (\d+)\)", text)
        if tok:
            where += f":{tok.group(1)}"
    headline = text.split("\n")[0].strip()
    if isinstance(exc, SyntaxError) and exc.lineno:
        fname = exc.filename or config_file or ""
        if config_file and not os.path.isabs(fname):
            cand = Path(config_file).resolve().parent / fname
            fname = str(cand) if cand.exists() else str(config_file)
        where = f"{fname}:{exc.lineno}"
        headline = exc.msg or headline
    hint = ""
    if m_unknown := re.search(r"No configurable matching (?:reference )?'@?([\w./]+?)(?:\(\))?'", text):
        wanted = m_unknown.group(1).split("/")[-1]
        kind, _, name = wanted.rpartition(".")
        known = [s for s in _all_selectors()]
        if kind in reg.KINDS:
            names = reg.registry().names(kind)
            suggestion = reg.closest(name, names)
            hint = (f" Did you mean {kind}.{suggestion}?" if suggestion else "") + \
                f" Registered {kind}: {', '.join(names) or '(none)'}."
        else:
            suggestion = reg.closest(wanted, known)
            if suggestion:
                hint = f" Did you mean {suggestion}?"
        headline = f"unknown configurable {wanted!r}."
    elif m_param := re.search(r"Configurable '([\w./]+)' doesn't have a parameter named '(\w+)'", text):
        selector, param = m_param.groups()
        params = _configurable_params(selector)
        suggestion = reg.closest(param, params)
        headline = f"{selector} has no parameter {param!r}."
        hint = (f" Did you mean {selector}.{suggestion}?" if suggestion else "") + \
            (f" Its parameters: {', '.join(params)}." if params else "")
    elif isinstance(exc, SyntaxError) or "TokenError" in type(exc).__name__ or "Malformed" in text:
        headline = f"syntax error: {headline}"
    elif m_req := re.search(r"Required bindings for `([\w.]+)` not provided in config: \[(.*?)\]", text):
        fn, params = m_req.groups()
        params = [p.strip(" '\"") for p in params.split(",") if p.strip()]
        headline = f"missing required value{'s' if len(params) > 1 else ''} " + \
            ", ".join(f"{fn}.{p}" for p in params) + "."
        hint = f" Bind {'them' if len(params) > 1 else 'it'} in the gin file or with --bind '{fn}.{params[0]} = ...'."
        where = where or (str(config_file) if config_file else "")
    prefix = f"{where}: " if where else ""
    return ConfigError(f"{prefix}{headline}{hint}")


def parse(config_file: str | os.PathLike | None, bindings: Sequence[str] = (), *,
          clear: bool = True) -> None:
    """Load the plugins and parse ``config_file`` plus ``bindings`` into gin's global state."""
    global _PARSE_GENERATION
    reg.load_plugins()
    _PARSE_GENERATION += 1
    if clear:
        gin.clear_config()
    # The search path is per launch and ordered: the file's own folder first, then
    # $ARFORGE_GIN_PATH, then the repo's gin/ (gin keeps a global list: reset it).
    gin.config._LOCATION_PREFIXES[:] = [""]  # noqa: SLF001
    for p in gin_search_paths(config_file):
        gin.add_config_file_search_path(str(p))
    files = []
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"gin file {config_file} does not exist")
        files.append(str(path.resolve()))
    import logging

    class _QuietSearch(logging.Filter):  # gin logs every search-path miss of an include as an error
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.getMessage()).startswith("Path not found:")

    quiet = _QuietSearch()
    logging.getLogger().addFilter(quiet)
    resolver = _IncludeResolver(gin_search_paths(config_file))
    gin.config.parse_config_file = resolver  # gin looks this name up for every `include`
    try:
        _guarded(lambda: gin.parse_config_files_and_bindings(files, [], finalize_config=False),
                 config_file=str(config_file) if config_file else None)
        _PARSED_FILES[:] = resolver.files
        # Bindings are parsed one by one so an error names the --bind at fault.
        for binding in bindings:
            _guarded(lambda b=binding: gin.parse_config(b), binding=binding)
    finally:
        gin.config.parse_config_file = _GIN_PARSE_CONFIG_FILE
        logging.getLogger().removeFilter(quiet)


_GIN_PARSE_CONFIG_FILE = gin.config.parse_config_file
#: Every file the last :func:`parse` read (the launch file and its includes), for error locations.
_PARSED_FILES: list[Path] = []


class _IncludeError(ConfigError):
    """An include problem found while gin parses; ``clean`` is the message without gin's location lines."""

    def __init__(self, clean: str):
        super().__init__(clean)
        self.clean = clean


class _IncludeResolver:
    """Stands in for ``gin.config.parse_config_file`` during :func:`parse`.

    gin resolves ``include "x.gin"`` against its global search path only, so an
    included file's own includes were looked up next to the top-level file. Here
    they resolve against the including file's folder first, then ``search`` (the
    launch file's folder, ``$ARFORGE_GIN_PATH``, the repo's ``gin/``); and a file
    that includes itself, directly or not, is an error instead of a RecursionError.
    """

    def __init__(self, search: Sequence[Path]):
        self.search = list(search)
        self.stack: list[Path] = []
        self.files: list[Path] = []

    def __call__(self, config_file, skip_unknown=False, print_includes_and_imports=False):
        path = self._resolve(str(config_file))
        if path in self.stack:
            chain = " -> ".join(p.name for p in [*self.stack[self.stack.index(path):], path])
            raise _IncludeError(f"include cycle: {chain} ({self.stack[-1]} includes {path}, which is already "
                                "being read); remove one of these includes")
        self.stack.append(path)
        self.files.append(path)
        try:
            return _GIN_PARSE_CONFIG_FILE(str(path), skip_unknown, print_includes_and_imports)
        finally:
            self.stack.pop()

    def _resolve(self, name: str) -> Path:
        if os.path.isabs(name):
            return Path(name).resolve()
        folders = ([self.stack[-1].parent] if self.stack else []) + self.search
        for folder in dict.fromkeys(folders):
            if (folder / name).is_file():
                return (folder / name).resolve()
        searched = [str(f) for f in dict.fromkeys(folders)]
        raise OSError(f"Unable to open file: {name}. Searched config paths: {searched}.")


def _binding_location(pattern: str) -> str:
    """``file:line`` of the first line of the parsed files matching the regex ``pattern``, or ''."""
    rx = re.compile(pattern)
    for path in _PARSED_FILES:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for i, line in enumerate(lines, 1):
            if rx.search(line.split("#", 1)[0]):
                return f"{path}:{i}"
    return ""


def check_references(config_file: str | os.PathLike | None = None, bindings: Sequence[str] = ()) -> None:
    """Catch, before anything runs, what gin would only report mid-launch with a traceback:
    a ``%MACRO`` that is never defined, and a job written as a call (``@jobs.train_ar()``),
    which gin would call without its run context while building the configuration."""
    config = gin.config._CONFIG  # noqa: SLF001  (gin has no public view of the bindings)

    def where(pattern: str) -> str:
        for b in bindings:
            if re.search(pattern, b):
                return f"--bind {b!r}"
        return _binding_location(pattern) or str(config_file or "")

    def visit(value: Any, key: str, follow: list[tuple[str, str]]) -> None:
        if isinstance(value, gin.config.ConfigurableReference):
            if value.selector == "gin.macro":
                name = value.scoped_selector.rsplit("/", 1)[0]
                if "value" not in config.get((name, "gin.macro"), {}):
                    loc = where(rf"%{re.escape(name)}\b")
                    raise ConfigError(f"{loc + ': ' if loc else ''}{key} = %{name}, but the macro {name} is never "
                                      f"defined. Define it (`{name} = ...`) in the gin file or an included one, "
                                      f"or with --bind '{name} = ...'")
                follow.append((name, "gin.macro"))
                return
            if value.evaluate and value.selector.startswith("jobs."):
                ref = value.selector.split("/")[-1]
                loc = where(rf"@{re.escape(ref)}\s*\(\s*\)")
                raise ConfigError(f"{loc + ': ' if loc else ''}{key} = @{ref}() calls the job while gin builds "
                                  f"the configuration; a job is run by launch with its run context. Write "
                                  f"@{ref} (a reference, no parentheses)")
            scopes = list(value.scopes)
            selector = value.configurable.selector
            follow.extend(("/".join(scopes[:k]), selector) for k in range(len(scopes) + 1))
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v, key, follow)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, key, follow)

    # Only what the launch can reach (launch -> its job -> the job's components -> macros ...):
    # a fragment's binding of a configurable this launch never calls may use a macro it never defines.
    todo, seen = [("", "arforge.launch")], set()
    while todo:
        scope, selector = todo.pop()
        if (scope, selector) in seen:
            continue
        seen.add((scope, selector))
        for name, value in config.get((scope, selector), {}).items():
            short = selector.removeprefix("arforge.")
            visit(value, f"{scope + '/' if scope else ''}{short}.{name}", todo)


def _guarded(fn: Callable[[], Any], *, config_file: str | None = None, binding: str | None = None) -> None:
    try:
        fn()
    except _IncludeError as exc:
        m = _LOCATION.search(str(exc))  # gin appended where the include statement is, innermost first
        where = f"{m.group('file')}:{m.group('line')}: " if m and m.group("file") else ""
        raise ConfigError(f"{where}{exc.clean}") from None
    except Exception as exc:
        if not isinstance(exc, (ValueError, SyntaxError, KeyError, AttributeError, TypeError, OSError)) \
                and type(exc).__name__ != "TokenError":
            raise
        err = explain_gin_error(exc, config_file=config_file, bindings=[binding] if binding else ())
        if binding is not None:
            msg = str(err)
            msg = re.sub(r"^--bind line \d+: ", "", msg)
            if not msg.startswith("--bind"):
                msg = f"--bind {binding!r}: {msg}"
            err = ConfigError(msg)
        raise err from exc


def bound_parameters() -> dict[str, str]:
    """Every parameter bound in the parsed config, as ``scope/selector.param -> value``."""
    out: dict[str, str] = {}
    for (scope, selector), params in gin.config._CONFIG.items():  # noqa: SLF001
        sel = selector.split(".")[-1] if False else selector
        for name, value in params.items():
            key = f"{scope + '/' if scope else ''}{sel}.{name}"
            out[key] = _gin_repr(value)
    return dict(sorted(out.items()))


def _gin_repr(value: Any) -> str:
    try:
        return gin.config._format_value(value)  # noqa: SLF001  (same text the config file would show)
    except Exception:
        return repr(value)


# ------------------------------------------------------------------- runs
@dataclass
class RunContext:
    """What a job receives: where to write, how to log, which device."""

    experiment: str
    run_name: str
    output_dir: Path
    tracker: Any
    device: Any
    precision: Any
    seed: int
    dist: Any
    resume: bool = False
    config_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    reporter: Callable[[str, float, int], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def report(self, metric: str, value: float, step: int) -> None:
        """Report an intermediate objective value (multi-fidelity studies).

        Inside an Optuna trial this records ``value`` at ``step`` and may raise
        ``optuna.TrialPruned``; outside a study it does nothing.
        """
        if self.reporter is not None:
            self.reporter(metric, float(value), int(step))

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[{self.run_name}] {msg}", flush=True)


def default_output_dir(experiment: str, run_name: str) -> Path:
    """``$ARFORGE_HOME/outputs/<experiment>/<run_name>``; inside ``jobs.pipeline``, the
    pipeline run's folder ``.../<pipeline run>/<run_name>`` (so its stages, and
    ``pipeline:<stage>/...`` paths, belong to that pipeline run alone)."""
    from arforge import tracking

    base = os.environ.get("ARFORGE_PIPELINE_DIR")
    root = Path(base) if base else tracking.home() / "outputs" / _safe_dirname(experiment)
    return root / _safe_dirname(run_name)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _safe_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


@gin.configurable(module="arforge")
def launch(
    job: Callable[..., Any] = gin.REQUIRED,
    *,
    experiment: str = gin.REQUIRED,
    run_name: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    seed: int = 0,
    output_dir: str | None = None,
    resume: str = "auto",
    tags: dict[str, str] | None = None,
) -> Any:
    """Run ``job(ctx)`` inside an MLflow run.

    Args:
        job: the registered job to call, e.g. ``@jobs.train_tokenizer``.
        experiment: MLflow experiment name (runs of one study/pipeline share it).
        run_name: MLflow run name and output sub-folder (default: the job's name).
        device: ``auto|cpu|cuda|npu``.
        precision: ``fp32|bf16|fp16`` autocast policy.
        seed: global seed; each rank adds its rank.
        output_dir: where checkpoints and exports go (default
            ``$ARFORGE_HOME/outputs/<experiment>/<run_name>``).
        resume: ``auto`` continues an unfinished run found in ``output_dir``,
            ``never`` starts over, ``must`` fails if there is nothing to resume.
            The resolved bindings are saved in ``run.json``; a resume compares them with
            this launch's: a changed architecture binding (see :func:`refused_on_resume`)
            is refused, any other change (lr, steps, log settings) is printed and tagged
            ``resume.changed.<binding> = "old -> new"`` on the MLflow run. One launch per
            run at a time (a lock ``.<run_name>.lock`` next to the output folder).
        tags: extra MLflow tags.
    """
    return _launch(job, experiment=experiment, run_name=run_name, device=device, precision=precision,
                   seed=seed, output_dir=output_dir, resume=resume, tags=tags or {})


_CURRENT: dict[str, Any] = {}
#: Bumped by every parse: a job that launches nested runs (jobs.pipeline) replaces the gin
#: state, and the outer launch must not log a stage's config as its own.
_PARSE_GENERATION = 0


class RunStateError(ArforgeError):
    """A run's output folder is unusable for this launch: locked, corrupt ``run.json``, refused change."""


#: Component kinds whose bindings decide the shapes of the weights in a checkpoint: changing one
#: and resuming would load weights of another architecture, so a resume refuses it.
ARCHITECTURE_KINDS = ("quantizers", "tokenizers", "factorizations", "heads", "backbones", "models")
#: Job/loader parameters that name the model being trained (``jobs.train_ar.model = %MODEL``).
ARCHITECTURE_PARAMS = ("preset", "model", "tokenizer", "quantizer", "factorization", "head", "backbone")
#: Bindings a resume never compares (they choose how to launch, not what is trained).
_NOT_COMPARED = ("arforge.launch.resume", "launch.resume")


def refused_on_resume(key: str, old: str | None, new: str | None) -> bool:
    """Whether changing binding ``key`` (``scope/selector.param``) from ``old`` to ``new`` refuses a resume.

    Refused: what decides the architecture whose weights the checkpoint holds (any binding of an
    architecture kind -- tokenizer/model presets, quantizer sizes, heads --, a job's
    ``model``/``tokenizer``/``preset`` argument, a macro naming an architecture component) and the
    job itself. Allowed, printed and tagged on the MLflow run: everything else (lr, steps, schedules,
    batch size, log/eval settings, data, device, precision, seed): a user recovering from a
    divergence lowers the lr and resumes.
    """
    selector = key.rsplit("/", 1)[-1]
    if selector.startswith("arforge."):
        selector = selector[len("arforge."):]
    kind = selector.split(".", 1)[0]
    param = selector.rsplit(".", 1)[-1]
    if selector == "launch.job":
        return True
    if kind in ARCHITECTURE_KINDS or (kind != "launch" and param in ARCHITECTURE_PARAMS):
        return True
    if selector.endswith("gin.macro.value"):
        refs = f"{old or ''} {new or ''}"
        return any(f"@{k}." in refs or f"/{k}." in refs for k in ARCHITECTURE_KINDS)
    return False


def _config_changes(old: dict[str, str], new: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    keys = (set(old) | set(new)) - set(_NOT_COMPARED)
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def _fmt_change(key: str, old: str | None, new: str | None) -> str:
    return f"{key}: {old if old is not None else '(unset)'} -> {new if new is not None else '(unset)'}"


def _tag_key(binding: str) -> str:
    return ("resume.changed." + re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", binding))[:250]


def write_run_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``run.json`` atomically (:func:`arforge.checkpoint.write_json_atomic`)."""
    from arforge.checkpoint import write_json_atomic

    write_json_atomic(path, state)


def read_run_state(path: Path, *, resume: str) -> dict[str, Any] | None:
    """``run.json`` of a previous launch, or None. A corrupt one is a :class:`RunStateError`
    (with ``resume = 'never'`` it is ignored: the old outputs are moved aside anyway)."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError(f"expected a JSON object, found {type(state).__name__}")
        return state
    except (ValueError, UnicodeDecodeError) as exc:
        if resume == "never":
            return None
        raise RunStateError(
            f"{path} is corrupt ({str(exc).splitlines()[0][:120]}), so this run cannot tell whether or how to "
            "resume. To start over keeping the old outputs (moved aside), run with "
            "--bind \"launch.resume = 'never'\"; to resume from its checkpoints instead, replace it with "
            "{\"run_id\": \"<the MLflow run id>\", \"status\": \"RUNNING\"}.") from None


class _RunLock:
    """One launch per output folder: an ``flock`` on ``.<run>.lock`` next to the folder (the folder
    itself may be moved aside). The kernel drops the lock when its process dies; a lock still held
    by a forked child of a dead launch (data-loader worker) is taken over."""

    def __init__(self, out: Path, run_name: str):
        self.path = out.parent / f".{out.name}.lock"
        self.fh = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows: no lock)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            text = fh.read().strip()
            pid = int(text) if text.isdigit() else None
            from arforge.checkpoint import _pid_alive

            if pid is None or _pid_alive(pid):
                fh.close()
                raise RunStateError(
                    f"run {run_name!r} ({out}) is already running" + (f" in process {pid}" if pid else "")
                    + f" (lock {self.path}). Wait for it to end, stop it, or launch this one under another "
                    "launch.run_name.") from None
            print(f"[{run_name}] taking over the lock {self.path} of dead process {pid}", flush=True)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self.fh = fh

    def release(self) -> None:
        if self.fh is None:
            return
        try:
            self.fh.seek(0)
            self.fh.truncate()
        except OSError:
            pass
        self.fh.close()  # closing the file drops the flock
        self.fh = None


def _launch(job, *, experiment, run_name, device, precision, seed, output_dir, resume, tags):
    from arforge import device as dev
    from arforge import tracking

    if resume not in ("auto", "never", "must"):
        raise ConfigError(f"launch.resume must be 'auto', 'never' or 'must', not {resume!r}")
    job_name = getattr(job, "__name__", type(job).__name__)
    run_name = run_name or job_name
    previous_experiment = os.environ.get("ARFORGE_EXPERIMENT")
    os.environ["ARFORGE_EXPERIMENT"] = experiment  # "pipeline:" paths outside a pipeline
    try:
        return _launch_in(job, job_name=job_name, experiment=experiment, run_name=run_name, device=device,
                          precision=precision, seed=seed, output_dir=output_dir, resume=resume, tags=tags)
    finally:  # a later launch in this process (a test, a notebook) must not inherit this one's folder
        if previous_experiment is None:
            os.environ.pop("ARFORGE_EXPERIMENT", None)
        else:
            os.environ["ARFORGE_EXPERIMENT"] = previous_experiment


def _launch_in(job, *, job_name, experiment, run_name, device, precision, seed, output_dir, resume, tags):
    from arforge import device as dev
    from arforge import tracking

    torch_device = dev.resolve_device(device)
    prec = dev.Precision(precision)
    dist = dev.init_distributed(torch_device)
    out = Path(output_dir) if output_dir else default_output_dir(experiment, run_name)
    lock = None
    if dist.is_main:
        # The store is checked before anything is touched: a mistyped tracking URI must not
        # move the previous run's outputs aside, nor leave a run half-created.
        with tracking.store_errors():
            tracking.configure()
        lock = _RunLock(out, run_name)
    try:
        return _launch_locked(job, job_name=job_name, experiment=experiment, run_name=run_name,
                              torch_device=torch_device, prec=prec, dist=dist, seed=seed, out=out,
                              resume=resume, tags=tags)
    finally:
        if lock is not None:
            lock.release()


def _launch_locked(job, *, job_name, experiment, run_name, torch_device, prec, dist, seed, out, resume, tags):
    import mlflow
    import torch

    from arforge import checkpoint as ck
    from arforge import device as dev
    from arforge import tracking

    state_file = out / "run.json"
    previous = read_run_state(state_file, resume=resume)
    resuming = bool(previous) and previous.get("status") != "FINISHED" and resume != "never"
    if resume == "must" and not resuming:
        raise ConfigError(f"launch.resume = 'must' but {out} holds no unfinished run to resume")
    params = bound_parameters()
    changes: dict[str, tuple[str | None, str | None]] = {}
    if resuming and isinstance(previous.get("bindings"), dict):
        changes = _config_changes(previous["bindings"], params)
        refused = {k: v for k, v in changes.items() if refused_on_resume(k, *v)}
        if refused:
            raise RunStateError(
                f"{state_file}: run {run_name!r} was started with other architecture bindings ("
                + "; ".join(_fmt_change(k, *v) for k, v in refused.items())
                + "): its checkpoints hold weights of that architecture. To train the new one, start a new run "
                "with --bind \"launch.resume = 'never'\" (the old outputs are kept, moved aside) or another "
                "launch.run_name; to resume, restore the old value"
                + ("s" if len(refused) > 1 else "") + ".")
    dev.barrier()  # every rank has read run.json before rank 0 may move the folder
    if dist.is_main and not resuming and out.is_dir() and any(out.iterdir()):
        # A finished (or abandoned, with resume='never') run keeps its outputs: they are moved
        # aside so this run starts clean and 'outputs:<experiment>/<run>' names the newest run.
        tag = str((previous or {}).get("run_id") or time.strftime("%Y%m%d-%H%M%S"))[:8]
        aside = out.with_name(f"{out.name}-{tag}")
        while aside.exists():
            aside = aside.with_name(aside.name + "_")
        out.rename(aside)
        print(f"[{run_name}] previous outputs of {out.name} kept in {aside}", flush=True)
    if dist.is_main and resuming:
        for gone in ck.remove_stale_tmp(out):
            print(f"[{run_name}] removed {gone.name}, left by a checkpoint write that was killed", flush=True)
    dev.barrier()
    seed_everything(seed + dist.rank)

    tracker: tracking.Tracker = tracking.Tracker()
    run_id = None
    if dist.is_main:
        with tracking.store_errors():
            exp_id = tracking.ensure_experiment(experiment)
            if resuming:
                run_id = previous.get("run_id")
                try:
                    mlflow.tracking.MlflowClient().get_run(run_id)
                except Exception:
                    run_id = None
            if run_id is None:
                parent = _CURRENT.get("parent_run_id")
                run = mlflow.tracking.MlflowClient().create_run(
                    exp_id, run_name=run_name, tags={"mlflow.parentRunId": parent} if parent else None)
                run_id = run.info.run_id
            else:
                mlflow.tracking.MlflowClient().update_run(run_id, status="RUNNING")
        tracker = tracking.MlflowTracker(run_id)
        out.mkdir(parents=True, exist_ok=True)
        state = {"run_id": run_id, "status": "RUNNING", "experiment": experiment, "run_name": run_name,
                 "config_file": _CURRENT.get("config_file"), "started": time.time(), "bindings": params}
        if resuming:
            state["first_started"] = previous.get("first_started", previous.get("started"))
            if changes:
                state["changes"] = list(previous.get("changes", [])) + [
                    {"time": time.time(), **{k: [o, n] for k, (o, n) in changes.items()}}]
        write_run_state(state_file, state)
        if changes:
            print(f"[{run_name}] resuming with changed bindings (tagged resume.changed.* on MLflow run "
                  f"{run_id}):", flush=True)
            for k, (o, n) in changes.items():
                print(f"[{run_name}]   {_fmt_change(k, o, n)}", flush=True)
        reg_ = reg.registry()
        config_file = _CURRENT.get("config_file")
        plugin_dists = reg_.distributions()
        tracker.set_tags({
            **tracking.git_state(config_file or Path.cwd()),
            "arforge.job": job_name,
            "arforge.config_file": str(config_file or ""),
            "arforge.device": str(torch_device),
            "arforge.precision": prec.name,
            "arforge.world_size": str(dist.world_size),
            "arforge.resumed": str(resuming).lower(),
            "torch.version": torch.__version__,
            "arforge.plugins": ", ".join(f"{k}=={v}" if v else k for k, v in sorted(plugin_dists.items())),
            **{_tag_key(k): f"{o if o is not None else '(unset)'} -> {n if n is not None else '(unset)'}"[:5000]
               for k, (o, n) in changes.items()},
            **tags,
        })
        if not resuming:
            tracker.log_params({"gin." + k: v for k, v in params.items()})
        else:
            # Bindings new in this launch have no param yet; changed ones keep their first value
            # as the param (MLflow params are immutable) and carry old -> new in the tags above.
            added = {k: n for k, (o, n) in changes.items() if o is None and n is not None}
            if added:
                tracker.log_params({"gin." + k: v for k, v in added.items()})
        tracker.log_text(gin.config_str(), "config/config.gin")
    if dist.enabled:
        obj = [out]
        torch.distributed.broadcast_object_list(obj, src=0)
        out = obj[0]
    ctx = RunContext(experiment=experiment, run_name=run_name, output_dir=out, tracker=tracker,
                     device=torch_device, precision=prec, seed=seed, dist=dist, resume=resuming,
                     config_file=_CURRENT.get("config_file"), reporter=_CURRENT.get("reporter"),
                     extra={"bindings": list(_CURRENT.get("bindings", []))})
    status = "FAILED"
    generation = _PARSE_GENERATION
    try:
        result = job(ctx)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as exc:
        if type(exc).__name__ == "TrialPruned":  # a study stopped this trial on purpose
            status = "KILLED"
        raise
    finally:
        if dist.is_main:
            if generation == _PARSE_GENERATION:
                try:
                    tracker.log_text(gin.operative_config_str(), "config/operative_config.gin")
                except Exception:  # the run's outcome matters more than this artifact
                    pass
            mlflow.tracking.MlflowClient().set_terminated(run_id, status=status)
            try:
                state = read_run_state(state_file, resume="auto") or {}
            except RunStateError:
                state = {"run_id": run_id, "experiment": experiment, "run_name": run_name, "bindings": params}
            state.update(status=status, ended=time.time())
            write_run_state(state_file, state)
            ctx.log(f"{status.lower()}: MLflow run {run_id} in experiment {experiment!r} ({tracking.tracking_uri()})")
        _CURRENT["last_run_id"] = run_id
        _CURRENT["last_output_dir"] = out


def run_file(config_file: str | os.PathLike | None, bindings: Sequence[str] = (), *,
             parent_run_id: str | None = None,
             reporter: Callable[[str, float, int], None] | None = None) -> Any:
    """Parse and run a launch file. Raises :class:`ConfigError` for gin mistakes.

    ``parent_run_id`` nests the MLflow run (a study trial, a pipeline stage);
    ``reporter`` receives intermediate values reported with ``ctx.report``.
    """
    parse(config_file, bindings)
    check_references(config_file, bindings)
    _CURRENT.clear()
    _CURRENT["config_file"] = str(Path(config_file).resolve()) if config_file else None
    _CURRENT["parent_run_id"] = parent_run_id
    _CURRENT["reporter"] = reporter
    _CURRENT["bindings"] = list(bindings)
    try:
        return launch()
    except ArforgeError:
        raise
    except Exception as exc:
        text = str(exc)
        if "Required bindings for" in text or "No configurable matching" in text:
            raise explain_gin_error(exc, config_file=str(config_file) if config_file else None,
                                    bindings=bindings) from exc
        raise


def last_run() -> tuple[str | None, Path | None]:
    """``(run_id, output_dir)`` of the most recent launch in this process."""
    return _CURRENT.get("last_run_id"), _CURRENT.get("last_output_dir")


def format_exception_short(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def iter_gin_files(roots: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for r in roots:
        files.extend(sorted(Path(r).rglob("*.gin")))
    return files
