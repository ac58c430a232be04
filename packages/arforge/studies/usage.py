"""Which gin parameters a launch really uses: the guard that a study searches live parameters.

A study's search space names gin parameters (``quantizers.lfq.entropy_weight``). gin accepts a
binding of any registered configurable, whether or not the launch ever calls it, so a study whose
launch never builds an LFQ quantizer would happily search its entropy weight: every trial the
same run, the "best" value noise (docs/studies.md#the-search-space).

What gin calls is decided by the configuration alone: ``arforge.launch`` is the one configurable
arforge calls by name (``launch.run_file``), and everything else is called because a binding of
something already called references it (``@kind.name()``, ``%MACRO``). Walking those references
from ``arforge.launch``, with the scope each call runs in, gives exactly the configurables whose
bindings gin applies; nothing is built, loaded or trained. A ``jobs.pipeline`` launch runs its
stages as launches of their own, so each stage file is walked the same way with the bindings the
pipeline passes it (:mod:`arforge.pipeline`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import gin

from arforge import launch as _launch
from arforge.errors import ConfigError
# The walk from launch.job is the launch layer's too (a run logs the bindings of the calls it
# makes); Call and calls_from_launch stay importable from here.
from arforge.gin_parsing import Call, applied, bindings_of, calls_from_launch, full_selector  # noqa: F401
from arforge.studies.space import INDEXED

# The launch.* settings jobs.pipeline hands on to its stages (pipeline.py: _FORWARDED_LAUNCH).
_FORWARDED_LAUNCH = ("device", "precision", "seed")


def reads(name: str, calls: Iterable[Call]) -> bool:
    """Whether a call in ``calls`` applies the binding ``name`` (``scope/selector.param[i]``)."""
    m = INDEXED.match(name)
    base = m["base"] if m else name
    scope, _, rest = base.rpartition("/")
    selector = full_selector(rest.rpartition(".")[0])
    if selector is None:
        return False
    return applied(scope, selector, set(calls))


def _stage_bindings(trial_bindings: Sequence[str]) -> list[str]:
    """The trial's bindings a pipeline passes on to each stage (pipeline.py: ``_forwarded``)."""
    out = []
    for b in trial_bindings:
        key = b.split("=", 1)[0].strip().removeprefix("arforge.")
        if not key.startswith("launch.") or key.removeprefix("launch.") in _FORWARDED_LAUNCH:
            out.append(b)
    return out


def _literal(value: Any) -> Any:
    if isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
        return gin.query_parameter(f"%{value.scoped_selector.rsplit('/', 1)[0]}")
    return value


def launch_calls(launch_file: str | os.PathLike, bindings: Sequence[str] = (), *,
                 _depth: int = 0) -> set[Call]:
    """Every call of a launch of ``launch_file`` with ``bindings``, through a pipeline's stages.

    Leaves gin's config cleared (each stage is parsed on its own, as the pipeline runs it).
    """
    launch_file = Path(launch_file)
    _launch.parse(launch_file, bindings)
    calls = calls_from_launch()
    stages: list[Path] = []
    stage_binds: list[str] = []
    pipeline = full_selector("jobs.pipeline")
    job = bindings_of("", "arforge.launch").get("job")
    if pipeline is not None and isinstance(job, gin.config.ConfigurableReference) \
            and job.configurable.selector == pipeline and _depth < 8:
        own = {}
        for k in range(len(job.scopes) + 1):
            own.update(bindings_of("/".join(job.scopes[:k]), pipeline))
        names = [str(_literal(s)) for s in _literal(own.get("stages", ()))]
        only = [str(_literal(s)) for s in _literal(own.get("only", ()))]
        stages = [launch_file.parent / s for s in names if not only or Path(s).stem in only]
        # Order as jobs.pipeline applies them: the file's bindings, then the launch's (which win).
        stage_binds = [*map(str, _literal(own.get("bindings", ()))), *_stage_bindings(bindings)]
    gin.clear_config()
    for stage in stages:
        if not stage.is_file():
            raise ConfigError(f"{launch_file}: jobs.pipeline.stages names {stage}, which does not exist")
        calls |= launch_calls(stage, stage_binds, _depth=_depth + 1)
    return calls


def unused(names: Iterable[str], calls: Iterable[Call]) -> list[str]:
    """The ``names`` no call in ``calls`` reads, in order."""
    calls = set(calls)
    return [n for n in names if not reads(n, calls)]


def describe_unused(names: Sequence[str], *, study_file: str | os.PathLike, launch_file: str | os.PathLike) -> str:
    """The one-line error for searched parameters that the launch never reads."""
    what = ", ".join(names)
    owners = sorted({INDEXED.sub(r"\g<base>", n).rpartition("/")[2].rpartition(".")[0] for n in names})
    return (f"{study_file}: study.space searches {what}, but a launch of {launch_file} never calls "
            f"{', '.join(owners)} (no binding of it is reached from launch.job), so every trial would be "
            f"the same run: drop {'them' if len(names) > 1 else 'it'} from study.space, or point "
            f"study.launch_file at a launch that builds {'them' if len(owners) > 1 else 'it'}")
