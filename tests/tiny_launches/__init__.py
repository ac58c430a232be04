"""Every shipped launch file, run for real at a tiny size: the one place that knows how.

A *launch file* is an ``experiments/**/*.gin`` file that binds ``launch.job`` (run with
``arforge run``) or ``study.launch_file`` (run with ``arforge study``); the files they include
(``common.gin``, presets) are not launches. ``tests/test_launch_files.py`` runs each of them
through the CLI, in-process, and asserts what it must produce.

What makes a file tiny lives here, one module per experiment folder
(``tests/tiny_launches/<folder>.py``). Each module defines

* ``bindings(path, world) -> list[str]``: ``--bind`` values that shrink the whole file (tiny model
  and tokenizer presets, a few steps, small batches, the generated data below);
* ``expect(path, world, result)``: what the stage must have produced (files, MLflow metrics,
  shapes, values where they are known). The generic checks in :func:`expect_job` cover what every
  job of a kind produces; a module adds what is special to its files.

A new launch file in an existing folder is covered by adding nothing; a new folder without a
module here fails ``test_every_launch_file_has_tiny_overrides``.

Stages depend on each other through their output paths: a file that reads
``outputs:<experiment>/<run>/...`` or ``pipeline:<run>/...`` needs the launch file whose
``launch.run_name`` is ``<run>`` to have run first in the same ``ARFORGE_HOME``.
:class:`Runner` resolves that from the files' text, runs each file at most once per test session
and per experiment home, and hands later stages the same home.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
GIN_ROOT = REPO / "gin"

_INCLUDE = re.compile(r'^\s*include\s+"([^"]+)"', re.M)
_BINDING = re.compile(r"^\s*([A-Za-z_][\w./]*)\s*=\s*(.+?)\s*(?:#.*)?$")
_OUTPUT_REF = re.compile(r'"(outputs|pipeline):([\w.-]+)(?:/([\w.-]+))?')
_MACRO_USE = re.compile(r"%([A-Za-z_][\w./]*)")
_STAGES = re.compile(r"^\s*jobs\.pipeline\.stages\s*=\s*\[(.*?)\]", re.M | re.S)


def _resolve_include(name: str, folder: Path) -> Path:
    for base in (folder, GIN_ROOT):
        if (base / name).is_file():
            return (base / name).resolve()
    raise FileNotFoundError(f"include {name!r} from {folder}")


def flat_bindings(path: Path) -> dict[str, str]:
    """The file's top-level bindings with includes expanded in order (later wins), as raw text.

    A regex reading, good enough for the few keys the harness needs (``launch.job``,
    ``launch.run_name``, ``launch.experiment``, ``study.launch_file``, macros); gin itself parses
    the file when it runs.
    """
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        m = _INCLUDE.match(line)
        if m:
            out.update(flat_bindings(_resolve_include(m.group(1), Path(path).parent)))
            continue
        m = _BINDING.match(line)
        if m and not line.lstrip().startswith("#"):
            out[m.group(1)] = m.group(2)
    return out


def _unquote(value: str | None) -> str | None:
    return value.strip().strip('"').strip("'") if value else None


@dataclass(frozen=True)
class LaunchFile:
    path: Path
    kind: str                 # "run" | "study"
    job: str | None           # "jobs.train_ar", ... (None for studies)
    experiment: str | None    # launch.experiment
    run_name: str | None      # launch.run_name
    folder: str               # experiments/<folder>/...
    text_refs: tuple[tuple[str, str, str | None], ...] = field(default=())

    @property
    def rel(self) -> str:
        return str(self.path.relative_to(EXPERIMENTS))

    @property
    def study_launch(self) -> Path | None:
        if self.kind != "study":
            return None
        return (self.path.parent / _unquote(flat_bindings(self.path)["study.launch_file"])).resolve()


def describe(path: Path) -> LaunchFile | None:
    b = flat_bindings(path)
    refs = []
    text = path.read_text()
    # A macro's path counts only where something uses it (%NAME): a common.gin that defines every
    # stage's paths would otherwise make each stage depend on all the others, a cycle.
    used = set(_MACRO_USE.findall(text + "\n" + "\n".join(b.values())))
    bound = "\n".join(f"{k} = {v}" for k, v in b.items() if "." in k or k in used)
    for m in _OUTPUT_REF.finditer(text + "\n" + bound):
        refs.append((m.group(1), m.group(2), m.group(3)))
    folder = path.relative_to(EXPERIMENTS).parts[0]
    if "study.launch_file" in b:
        return LaunchFile(path.resolve(), "study", None, None, None, folder, tuple(refs))
    if "launch.job" not in b:
        return None
    job = b["launch.job"].lstrip("@").split("(")[0]
    return LaunchFile(path.resolve(), "run", job, _unquote(b.get("launch.experiment")),
                      _unquote(b.get("launch.run_name")), folder, tuple(refs))


def launch_files() -> list[LaunchFile]:
    files = [describe(p) for p in sorted(EXPERIMENTS.rglob("*.gin"))]
    return [f for f in files if f is not None]


def module_for(lf: LaunchFile):
    """The tiny-override module of the file's experiment folder (ImportError when there is none)."""
    return importlib.import_module(f"tiny_launches.{lf.folder}")


def dependencies(lf: LaunchFile, index: list[LaunchFile]) -> list[LaunchFile]:
    """The launch files whose outputs ``lf`` reads (by ``outputs:``/``pipeline:`` paths)."""
    if lf.kind == "study":
        return [describe(lf.study_launch)]
    deps: list[LaunchFile] = []
    for scheme, first, second in lf.text_refs:
        if scheme == "outputs":
            exp, run = first, second
        elif lf.job == "jobs.pipeline":
            continue  # its own stages write its "pipeline:" folder; what they read elsewhere is below
        else:  # pipeline:<run>/...: the enclosing pipeline's folder, or the experiment's when run alone
            exp, run = lf.experiment, first
        if run == lf.run_name and exp == lf.experiment:
            continue  # its own output
        for other in index:
            if other.kind == "run" and other.experiment == exp and other.run_name == run and other not in deps:
                deps.append(other)
    own = pipeline_stages(lf)
    for stage in own:
        for other in dependencies(stage, index):
            if other not in deps and other not in own:
                deps.append(other)
    return deps


def pipeline_stages(lf: LaunchFile) -> list[LaunchFile]:
    """The stage files a ``jobs.pipeline`` launch runs (``jobs.pipeline.stages``); none for other jobs."""
    m = _STAGES.search(lf.path.read_text()) if lf.job == "jobs.pipeline" else None
    if m is None:
        return []
    found = [describe((lf.path.parent / name).resolve()) for name in re.findall(r'"([^"]+)"', m.group(1))]
    return [f for f in found if f is not None]


@dataclass
class World:
    """One experiment family's tiny universe: its ``ARFORGE_HOME`` and the data the files read.

    ``root`` is a session-scoped temporary folder; ``cache`` memoises generated data (image folders,
    shards, official-layout checkpoints) by name, so each is written once per session.
    """

    root: Path
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.root / "arforge_runs"

    def once(self, name: str, make) -> Any:
        if name not in self.cache:
            self.cache[name] = make(self.root / name)
        return self.cache[name]


def world_key(lf: LaunchFile) -> str:
    """The world ``lf`` runs in: its module's ``WORLD``, else its folder's; a study's (without its
    own ``WORLD``) is the world of the launch file it studies, whose stages' outputs its trials read."""
    mod = module_for(lf)
    if hasattr(mod, "WORLD"):
        return mod.WORLD
    if lf.kind == "study":
        return world_key(describe(lf.study_launch))
    return lf.folder


def _no_fsync_in_worlds(dbapi_connection, _record) -> None:
    """``PRAGMA synchronous = OFF`` for the SQLite stores (MLflow, Optuna) of the worlds and of
    their MLflow template.

    Every MLflow call commits, and a commit's fsync costs ~10 ms on this disk: the quickstart's
    ~60 runs spent about a third of their time there, and the template's schema migrations took
    3x longer. Both are thrown away after the session, so what the pragma risks (losing commits
    to a power cut) costs nothing; other databases are left as they are.
    """
    import sqlite3

    if isinstance(dbapi_connection, sqlite3.Connection):
        path = dbapi_connection.execute("PRAGMA database_list").fetchone()[2]
        if "/world-" in path or "/mlflow-template" in path:
            dbapi_connection.execute("PRAGMA synchronous = OFF")


class Runner:
    """Runs launch files through the CLI in-process, each at most once per world, dependencies first."""

    def __init__(self, tmp_factory) -> None:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        if not event.contains(Engine, "connect", _no_fsync_in_worlds):
            event.listen(Engine, "connect", _no_fsync_in_worlds)
        self._tmp = tmp_factory
        self._worlds: dict[str, World] = {}
        self._done: dict[Path, Any] = {}
        self._mlflow_template: Path | None = None
        self.index = launch_files()

    def world(self, lf: LaunchFile) -> World:
        key = world_key(lf)
        if key not in self._worlds:
            self._worlds[key] = World(self._tmp.mktemp(f"world-{key}"))
            self._seed_mlflow_store(self._worlds[key].home)
        return self._worlds[key]

    def _seed_mlflow_store(self, home: Path) -> None:
        """Start ``home`` from a copy of an initialised, empty MLflow store: creating one runs its
        ~100 schema migrations (~8 s here), once per session instead of once per world."""
        import shutil

        if self._mlflow_template is None:
            from mlflow.tracking import MlflowClient

            template = self._tmp.mktemp("mlflow-template") / "mlflow.db"
            MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
            self._mlflow_template = template
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy(self._mlflow_template, home / "mlflow.db")

    def run(self, lf: LaunchFile) -> Any:
        if lf.path in self._done:
            return self._done[lf.path]
        for dep in dependencies(lf, self.index):
            self.run(dep)
        world = self.world(lf)
        mod = module_for(lf)
        binds = list(mod.bindings(lf, world))
        result = self._invoke(lf, world, binds)
        self._done[lf.path] = result
        return result

    def _invoke(self, lf: LaunchFile, world: World, binds: list[str]) -> Any:
        import gin

        from arforge import cli, launch

        argv = ["study" if lf.kind == "study" else "run", str(lf.path)]
        for b in binds:
            argv += ["--bind", b]
        if lf.kind == "study":
            argv += ["--n-trials", "2", "--no-plots"]
        saved = dict(os.environ)  # launch and pipeline leave variables behind (ARFORGE_EXPERIMENT, ...)
        os.environ["ARFORGE_HOME"] = str(world.home)
        try:
            gin.clear_config()
            code = cli.main(argv)
            assert code == 0, f"arforge {' '.join(argv)} exited {code}"
            return launch.last_run()
        finally:
            gin.clear_config()
            os.environ.clear()
            os.environ.update(saved)


# ----------------------------------------------------------------------------- generic checks
def mlflow_run(world: World, run_id: str):
    """The finished MLflow run ``run_id`` of ``world``'s embedded store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{world.home / 'mlflow.db'}")
    return client.get_run(run_id)


def child_runs(world: World, run_id: str) -> list:
    """The runs nested directly under ``run_id`` (pipeline stages, study trials)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{world.home / 'mlflow.db'}")
    parent = client.get_run(run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'",
                              max_results=1000)


def _finite_checkpoint(folder: Path) -> dict:
    import torch

    from arforge import checkpoint as ck

    loaded = ck.load_checkpoint(folder)
    for group, weights in loaded.weights.items():
        for key, value in weights.items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), f"{folder}: non-finite {group}.{key}"
    return loaded.weights


def expect_job(lf: LaunchFile, world: World, result) -> Any:
    """What every job of ``lf.job``'s kind must leave behind; returns the MLflow run.

    ``result`` is ``launch.last_run()`` after the launch: ``(run_id, output_dir)``.
    """
    import math

    import numpy as np

    run_id, out = result
    assert run_id is not None and out is not None, f"{lf.rel}: no run was recorded"
    run = mlflow_run(world, run_id)
    assert run.info.status == "FINISHED", (lf.rel, run.info.status)
    metrics = run.data.metrics
    out = Path(out)
    if lf.job in ("jobs.train_tokenizer", "jobs.train_ar", "jobs.train_feature_extractor"):
        if lf.job != "jobs.train_feature_extractor":
            _finite_checkpoint(out / "checkpoints")
        losses = {k: v for k, v in metrics.items() if k.startswith("train/") and "loss" in k}
        assert losses and all(math.isfinite(v) for v in losses.values()), (lf.rel, metrics)
    elif lf.job == "jobs.extract_codes":
        assert list(out.rglob("manifest.json")), f"{lf.rel}: no codes manifest under {out}"
    elif lf.job == "jobs.sample":
        files = sorted(out.rglob("*.npz"))
        assert files, f"{lf.rel}: no samples under {out}"
        data = np.load(files[0])
        images, labels = data["arr_0"], data["arr_1"]
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, images.shape
        assert len(labels) == len(images) and len(images) > 0
    elif lf.job in ("jobs.evaluate_samples", "jobs.evaluate_reconstructions"):
        assert metrics and all(math.isfinite(v) for v in metrics.values()), (lf.rel, metrics)
    elif lf.job == "jobs.pipeline":
        stages = child_runs(world, run_id)
        assert stages and all(s.info.status == "FINISHED" for s in stages), (lf.rel, [
            (s.info.run_name, s.info.status) for s in stages])
    return run


# ----------------------------------------------------------------------------- helpers for modules
def stage_files(lf: LaunchFile) -> list[LaunchFile]:
    """The launch files a pipeline runs (the file itself for any other job)."""
    if lf.job != "jobs.pipeline":
        return [lf]
    stages = ast.literal_eval(flat_bindings(lf.path)["jobs.pipeline.stages"])
    return [describe((lf.path.parent / s).resolve()) for s in stages]


def file_value(lf: LaunchFile, key: str, default: Any = None) -> Any:
    """A binding of the file (includes expanded, macros followed) as a Python value, ``default`` when unbound."""
    found = flat_bindings(lf.path)
    raw = found.get(key)
    while raw is not None and raw.startswith("%"):  # a macro: its value
        raw = found.get(raw[1:])
    if raw is None:
        return default
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw.strip('"')


def build(macro_or_param: str):
    """Call the configurable bound to ``%MACRO`` or ``selector.param`` in the parsed config."""
    import gin

    return gin.query_parameter(macro_or_param).scoped_configurable_fn()
