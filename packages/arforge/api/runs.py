"""Finding a run: its output folder from a name, a path or a run id, and its ``run.json`` (docs/api.md#load).

Names are looked up under ``$ARFORGE_HOME/outputs``, then under the checkout's ``arforge_runs/``
(where the README's commands, run from the repository root, put them), so a notebook in another
folder finds the quickstart's runs. A run id is found through the ``run.json`` that names it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from arforge.errors import ArforgeError

__all__ = ["LoadError", "find_run_dir", "read_state", "run_dir_of", "home_of", "job_of"]

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class LoadError(ArforgeError):
    """What was asked for cannot be loaded: no such run, no weights, a job with no model."""


def _homes(home: str | os.PathLike | None) -> list[Path]:
    """Where runs are looked for: ``home`` if given, else ``$ARFORGE_HOME`` (or ./arforge_runs) and
    the checkout's ``arforge_runs``."""
    from arforge import tracking
    from arforge.gin_parsing import repo_root

    if home is not None:
        return [Path(home).expanduser().resolve()]
    homes = [tracking.home()]
    root = repo_root()
    if root is not None and (root / "arforge_runs").is_dir() and (root / "arforge_runs").resolve() not in homes:
        homes.append((root / "arforge_runs").resolve())
    return homes


def run_dir_of(path: Path) -> Path | None:
    """The run folder holding ``path`` (itself, or a checkpoint folder inside it), if any."""
    for p in (path, *list(path.parents)[:3]):
        if (p / "run.json").is_file():
            return p
    return None


def find_run_dir(run: str | os.PathLike, *, home: str | os.PathLike | None = None) -> Path:
    """The output folder of ``run``: a folder (or a checkpoint inside one), ``outputs:<experiment>/<run>``,
    ``<experiment>/<run>[/<stage>]`` under the home's ``outputs/``, or an MLflow run id."""
    text = str(run)
    homes = _homes(home)
    tried: list[str] = []
    candidates: list[Path] = []
    if text.startswith("outputs:"):
        candidates += [h / "outputs" / text[len("outputs:"):].lstrip("/") for h in homes]
    else:
        candidates.append(Path(text).expanduser())
        if not Path(text).is_absolute():
            candidates += [h / "outputs" / text for h in homes]
    for c in candidates:
        tried.append(str(c))
        if c.exists():
            found = run_dir_of(c.resolve())
            if found is not None:
                return found
    if _RUN_ID.match(text):  # an MLflow run id: its run.json names it
        for h in homes:
            tried.append(f"{h / 'outputs'}/**/run.json with run_id {text}")
            for state_file in sorted((h / "outputs").glob("**/run.json")):
                if read_state(state_file, strict=False).get("run_id") == text:
                    return state_file.parent
    raise LoadError(
        f"no run {text!r}: looked for " + "; ".join(tried) + ". Give a run's output folder, "
        "'<experiment>/<run name>' (as under $ARFORGE_HOME/outputs), 'outputs:<experiment>/<run name>', an MLflow "
        "run id, or a launch .gin file; set ARFORGE_HOME (or home=...) to the folder that holds the runs.")


def read_state(path: Path, *, strict: bool = True) -> dict[str, Any]:
    """The JSON object in ``path`` (a ``run.json``, a codes ``manifest.json``); ``strict=False``
    gives {} for a file that is missing or unreadable instead of a :class:`LoadError`."""
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        return state
    except (OSError, ValueError) as exc:
        if not strict:
            return {}
        raise LoadError(f"{path} is unreadable ({exc}); it is written by every launch, so this folder is not a "
                        "complete run") from None


def home_of(run_dir: Path) -> Path | None:
    """``<home>`` of ``<home>/outputs/<experiment>/<run>[/<stage>...]``."""
    for p in run_dir.parents:
        if p.name == "outputs":
            return p.parent
    return None


def job_of(bindings: Mapping[str, str]) -> str | None:
    """The job a run's recorded bindings launch (``sample`` for ``launch.job = @jobs.sample``)."""
    for k, v in bindings.items():
        if k.split("/")[-1] in ("launch.job", "arforge.launch.job"):
            m = re.match(r"@(?:\w+/)?jobs\.(\w+)", v.strip())
            return m.group(1) if m else v
    return None
