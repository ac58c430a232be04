"""A run's recorded gin bindings, parsed back into gin and built as its job received them.

``run.json`` keeps every resolved binding as ``selector.param -> gin text``
(docs/tracking.md#resuming-and-runjson). Parsing those lines again, inside the run's own path
scope, rebuilds the run's components without its launch file.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from arforge.api.runs import LoadError, home_of

__all__ = ["run_scope", "binding_line", "modernised", "parse_bindings", "has", "build"]


@contextlib.contextmanager
def run_scope(run_dir: Path | None, experiment: str | None, *,
              home: str | os.PathLike | None = None) -> Iterator[None]:
    """``outputs:``/``pipeline:`` paths resolve as they did for the run: against its home and its
    pipeline folder (the run folder's parent: a pipeline's, or the experiment's for a lone stage).
    Without a run folder (a launch file), against ``home`` and the experiment's folder, as a launch would."""
    from arforge import tracking

    # tracking.home() has no scope of its own: every store and "outputs:" path reads $ARFORGE_HOME,
    # so it is set for the block and put back after.
    saved = os.environ.get("ARFORGE_HOME")
    home = home_of(run_dir) if run_dir is not None else home
    try:
        if home is not None:
            os.environ["ARFORGE_HOME"] = str(home)
        with tracking.path_scope(experiment=experiment,
                                 pipeline_dir=run_dir.parent if run_dir is not None else None):
            yield
    finally:
        if saved is None:
            os.environ.pop("ARFORGE_HOME", None)
        else:
            os.environ["ARFORGE_HOME"] = saved


def binding_line(key: str) -> str:
    """``MODEL/gin.macro.value`` (how gin stores a macro) -> ``MODEL``."""
    return key[: -len("/gin.macro.value")] if key.endswith("/gin.macro.value") else key


def modernised(bindings: Mapping[str, str]) -> dict[str, str]:
    """Recorded bindings in today's names: runs made before the guidance kind was called
    ``guidance`` name ``samplers.*`` and ``jobs.sample.sampler``."""
    out = {}
    for k, v in bindings.items():
        k = re.sub(r"(^|/)samplers\.", r"\1guidance.", k)
        if k == "jobs.sample.sampler":
            k = "jobs.sample.guidance"
        out[k] = re.sub(r"@(\w+/)?samplers\.", r"@\1guidance.", v) if v is not None else None
    return out


def parse_bindings(bindings: Mapping[str, str], *, where: Path) -> None:
    """Parse recorded bindings into gin's global configuration (replacing what it held)."""
    from arforge import launch  # importing it registers the `arforge.launch` configurable every run binds
    from arforge.errors import ConfigError

    # A value gin could not write back as text is recorded as null: it cannot be rebuilt from
    # run.json, and the component's default is all a later parse could give it.
    lines = [f"{binding_line(k)} = {v}" for k, v in bindings.items() if v is not None]
    unwritable = [k for k, v in bindings.items() if v is None]
    if unwritable:
        print(f"arforge.load: {where} records no gin text for {', '.join(unwritable)}; "
              "they take their defaults", flush=True)
    try:
        launch.parse(None, lines)
    except ConfigError as exc:
        raise LoadError(f"{where}: a recorded binding does not parse with the installed arforge and plugins "
                        f"({exc}). Install the plugins the run was made with (its MLflow tag arforge.plugins "
                        "lists them), or load it with the arforge version that made it.") from None


def has(binding: str) -> bool:
    """Whether gin's configuration binds ``binding`` (``jobs.sample.top_k``)."""
    import gin

    try:
        gin.query_parameter(binding)
        return True
    except ValueError:
        return False


def build(binding: str) -> Any:
    """The value of ``binding`` as the job would have received it (references called, macros expanded)."""
    import gin

    return _evaluate(gin.query_parameter(binding))


def _evaluate(value: Any) -> Any:
    import gin

    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    if isinstance(value, (list, tuple)):
        return type(value)(_evaluate(v) for v in value)
    if isinstance(value, dict):
        return {k: _evaluate(v) for k, v in value.items()}
    return value
