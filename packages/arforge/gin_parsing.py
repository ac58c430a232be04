"""Gin files for a launch: parsing, include resolution, and gin's errors made readable.

:func:`parse` reads a launch file and ``--bind`` lines into gin's configuration (docs/gin.md);
``include`` resolves against the including file's folder first (docs/gin.md#layering). Gin's
exceptions become one :class:`arforge.errors.ConfigError` naming ``FILE:LINE`` (or the ``--bind``
at fault) and, for unknown names, the closest registered one. :func:`check_references` catches
what gin would only report halfway through a launch; :func:`bound_parameters` is the flat view of
the bindings that ``run.json`` and the MLflow params keep.
"""

from __future__ import annotations

import importlib.util  # noqa: F401  (gin 0.5's include error path needs importlib.util loaded)
import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import gin

from arforge import registry as reg
from arforge.errors import ConfigError

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
    """Every configurable gin knows, to suggest the closest to a mistyped one that is no component.

    gin has no public listing of its configurables (``gin.get_configurable`` needs a name), and
    besides the registry's components there are arforge's own (``arforge.launch``, the study's)
    and those a gin file imports, so this one read of gin's registry stays.
    """
    # items(), not get_all_matches(""): that returns the configurables, not their names, and
    # matches no selector for "", so no suggestion was ever made (samplers.x -> guidance.x).
    return [selector for selector, _ in gin.config._REGISTRY.items()]  # noqa: SLF001


#: Parameters no gin file binds: a job's run context, and what :func:`arforge.launch.run_file`
#: hands ``launch`` itself.
_NOT_BINDABLE = ("self", "ctx", "invocation")


def _configurable_params(selector: str) -> list[str]:
    kind, _, name = selector.split("/")[-1].rpartition(".")
    try:
        # A component's own signature: gin's stand-in for an external class takes (*args, **kwargs).
        fn = reg.registry().get(kind, name) if kind in reg.KINDS else gin.get_configurable(selector)
    except Exception:
        return []
    try:
        return [p for p in inspect.signature(fn).parameters if p not in _NOT_BINDABLE]
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


@dataclass(frozen=True)
class ParsedConfig:
    """What :func:`parse` read: the launch file, every file it included, and the ``--bind`` lines."""

    config_file: Path | None
    files: tuple[Path, ...] = ()
    bindings: tuple[str, ...] = field(default=())


def parse(config_file: str | os.PathLike | None, bindings: Sequence[str] = (), *,
          clear: bool = True) -> ParsedConfig:
    """Load the plugins and parse ``config_file`` plus ``bindings`` into gin's global state."""
    reg.load_plugins()
    if clear:
        gin.clear_config()
    files = []
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"gin file {config_file} does not exist")
        files.append(str(path.resolve()))
    # gin resolves an `include` against one process-wide search list only and offers no hook for
    # it, so during this parse its module-level `parse_config_file` (which gin looks up for the
    # launch file and every include) is the resolver, which hands gin absolute paths: gin's own
    # search list is never consulted.
    resolver = _IncludeResolver(gin_search_paths(config_file))
    gin.config.parse_config_file = resolver
    try:
        _guarded(lambda: gin.parse_config_files_and_bindings(files, [], finalize_config=False),
                 config_file=str(config_file) if config_file else None)
        # Bindings are parsed one by one so an error names the --bind at fault.
        for binding in bindings:
            _guarded(lambda b=binding: gin.parse_config(b), binding=binding)
    finally:
        gin.config.parse_config_file = _GIN_PARSE_CONFIG_FILE
    return ParsedConfig(config_file=Path(config_file).resolve() if config_file is not None else None,
                        files=tuple(resolver.files), bindings=tuple(bindings))


#: gin's own reader, captured once at import: the resolver delegates to it, and parse puts it back.
_GIN_PARSE_CONFIG_FILE = gin.config.parse_config_file


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


def _binding_location(files: Sequence[Path], pattern: str) -> str:
    """``file:line`` of the first line of ``files`` matching the regex ``pattern``, or ''."""
    rx = re.compile(pattern)
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for i, line in enumerate(lines, 1):
            if rx.search(line.split("#", 1)[0]):
                return f"{path}:{i}"
    return ""


def bindings_of(scope: str, selector: str) -> dict[str, Any]:
    """The parameters bound to exactly ``scope/selector`` (no inherited scopes), references unbuilt."""
    return gin.get_bindings(f"{scope}/{selector}" if scope else selector, resolve_references=False,
                            inherit_scopes=False)


def full_selector(selector: str) -> str | None:
    """The complete selector gin resolves ``selector`` to (``pipeline`` -> ``jobs.pipeline``), as
    it resolves ``@selector`` in a gin file; None when it names no configurable, or more than one."""
    try:
        return gin.config.ConfigurableReference(selector, evaluate=False).configurable.selector
    except (ValueError, KeyError):  # unknown; ambiguous
        return None


def _macro_defined(name: str) -> bool:
    try:
        return "value" in bindings_of(name, "gin.macro")
    except (ValueError, KeyError):
        return False


def check_references(parsed: ParsedConfig) -> None:
    """Catch, before anything runs, what gin would only report mid-launch with a traceback:
    a ``%MACRO`` that is never defined, and a job written as a call (``@jobs.train_ar()``),
    which gin would call without its run context while building the configuration."""

    def where(pattern: str) -> str:
        for b in parsed.bindings:
            if re.search(pattern, b):
                return f"--bind {b!r}"
        return _binding_location(parsed.files, pattern) or str(parsed.config_file or "")

    def visit(value: Any, key: str, follow: list[tuple[str, str]]) -> None:
        if isinstance(value, gin.config.ConfigurableReference):
            if value.selector == "gin.macro":
                name = value.scoped_selector.rsplit("/", 1)[0]
                if not _macro_defined(name):
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
        for name, value in bindings_of(scope, selector).items():
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


def bound_configurables() -> list[tuple[str, str]]:
    """``(scope, full selector)`` of every configurable with a binding in gin's config (a macro is
    ``(name, "gin.macro")``); :func:`bindings_of` gives each one's bindings.

    gin's public API lists bindings per configurable (``gin.get_bindings``) and prints the whole
    config with the shortest selectors (``gin.config_str``), but has no list of the bound
    configurables, so this is the one read of gin's configuration.
    """
    return list(gin.config._CONFIG)  # noqa: SLF001


def bound_parameters() -> dict[str, str]:
    """Every parameter bound in the parsed config, as ``scope/selector.param -> value``.

    The keys name each configurable by its full selector (``arforge.launch.experiment``), as
    ``run.json`` has always kept them, so that a resume compares like with like.
    """
    out: dict[str, str | None] = {}
    for scope, selector in bound_configurables():
        for name, value in bindings_of(scope, selector).items():
            out[f"{scope + '/' if scope else ''}{selector}.{name}"] = _gin_repr(value)
    return dict(sorted(out.items()))


def _gin_repr(value: Any) -> str | None:
    """The text a gin file would hold for ``value`` (None if gin cannot write it back)."""
    try:
        literal = repr(value)
        try:
            return literal if gin.config.parse_value(literal) == value else None
        except SyntaxError:
            return None
    except Exception:
        return repr(value)


# ------------------------------------------------------- what a launch uses
#: (active scope components, configurable selector): a call gin makes while the launch runs.
Call = tuple[tuple[str, ...], str]


def calls_from_launch() -> set[Call]:
    """The configurables gin calls for the launch in its current config, each with its scope.

    What gin calls is decided by the configuration alone: ``arforge.launch`` is the one
    configurable arforge calls by name, and everything else is called because a binding of
    something already called references it (``@kind.name()``, ``%MACRO``). A scoped reference
    ``@a/b/x()`` runs ``x`` in exactly the scope ``a/b`` (gin replaces the active scope with the
    reference's), an unscoped one in its caller's scope; a macro ``%M`` is the scoped reference
    ``@M/gin.macro()``. Inside a call in scope ``a/b``, gin applies the bindings of scopes ``''``,
    ``a`` and ``a/b``. Nothing is built.
    """
    seen: set[Call] = set()
    todo: list[Call] = [((), "arforge.launch")]
    while todo:
        call = todo.pop()
        if call in seen:
            continue
        seen.add(call)
        scopes, selector = call
        for k in range(len(scopes) + 1):
            try:
                bound = bindings_of("/".join(scopes[:k]), selector)
            except (ValueError, KeyError):  # a configurable gin does not know: nothing bound to it
                continue
            for value in bound.values():
                _references(value, scopes, todo)
    return seen


def _references(value: Any, scopes: tuple[str, ...], out: list[Call]) -> None:
    if isinstance(value, gin.config.ConfigurableReference):
        own = tuple(value.scopes)
        out.append((own if own else scopes, value.configurable.selector))
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            _references(v, scopes, out)
    elif isinstance(value, dict):
        for v in value.values():
            _references(v, scopes, out)


def applied(scope: str, selector: str, calls: set[Call]) -> bool:
    """Whether the bindings of ``scope/selector`` (full selector) apply in one of ``calls``:
    binding scope ``s`` applies inside a call in scope ``c`` when ``s`` is a prefix of ``c``."""
    want = tuple(scope.split("/")) if scope else ()
    return any(sel == selector and c[:len(want)] == want for c, sel in calls)


#: ``launch`` bindings that name the MLflow run itself rather than configure it (see used_parameters).
_RUN_IDENTITY = ("run_name", "experiment")


def used_parameters() -> dict[str, str]:
    """The bindings the launch in gin's config applies, by binding name, values resolved.

    What a run logs as its MLflow params (docs/tracking.md#what-a-run-logs): only the bindings of
    configurables a launch of this config calls (:func:`calls_from_launch`), so a binding handed to
    every stage of a pipeline lands on the stages that use it; each under the name a gin file
    writes (``jobs.train_ar.steps``, ``launch.seed``, ``train/datasets.digits.split``); macros
    replaced by their values and ``outputs:``/``pipeline:`` paths by the folders they name (call
    this inside the launch's :func:`arforge.tracking.path_scope`), written as gin writes values.
    Macro definitions themselves are not listed: their values appear where they are used; nor are
    ``launch.run_name`` and ``launch.experiment``, which are the MLflow run's own name and
    experiment (as params they would differ between every pair of runs and be what MLflow's
    compare view selects first).
    """
    calls = calls_from_launch()
    out: dict[str, str] = {}
    for scope, selector in bound_configurables():
        if selector == "gin.macro" or not applied(scope, selector, calls):
            continue
        params = bindings_of(scope, selector)
        name = f"{scope + '/' if scope else ''}{selector.removeprefix('arforge.')}"
        for param, value in params.items():
            if name == "launch" and param in _RUN_IDENTITY:
                continue
            text = _gin_repr(_resolved(value))
            if text is not None:
                out[f"{name}.{param}"] = text
    return dict(sorted(out.items()))


def _resolved(value: Any, depth: int = 0) -> Any:
    """``value`` with macros replaced by their values and ``outputs:``/``pipeline:`` paths by folders."""
    if depth > 32:  # a macro cycle: gin reports it when the launch builds it
        return value
    if isinstance(value, gin.config.ConfigurableReference) and value.configurable.selector == "gin.macro":
        macro = value.scoped_selector.rsplit("/", 1)[0]
        try:
            return _resolved(gin.query_parameter(f"%{macro}"), depth + 1)
        except (ValueError, KeyError):
            return value
    if isinstance(value, str) and value.startswith(("outputs:", "pipeline:")):
        from arforge import tracking

        return str(tracking.resolve_path(value))
    if isinstance(value, list):
        return [_resolved(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolved(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return {k: _resolved(v, depth + 1) for k, v in value.items()}
    return value
