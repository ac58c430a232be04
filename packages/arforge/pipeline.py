"""``jobs.pipeline``: run several launch files in order, as nested runs of one pipeline run.

A pipeline file lists stage launch files (paths relative to it)::

    launch.experiment = "quickstart"
    launch.run_name = "pipeline"
    launch.job = @jobs.pipeline
    jobs.pipeline.stages = ["1_tokenizer.gin", "2_extract.gin", "3_ar.gin"]

Each stage is parsed on its own (its gin config replaces the pipeline's; the
pipeline's operative config is logged first) and runs as an MLflow run nested
under the pipeline run, in the pipeline's experiment. Bindings given to the
pipeline launch (``--bind``, a study trial's suggestions) are applied to every
stage, so a CFG study can run a sample-then-evaluate pipeline; of the ``launch.*``
settings only ``device``, ``precision`` and ``seed`` are passed on (the others name
each stage's own run). Stages pass results on
through their output folders (``outputs:<experiment>/<run_name>/...``). The
evaluation metrics a stage returns (``fid``, ``sfid``, ``is``, ``precision``, ``recall``) are
logged as the pipeline run's own, and when the pipeline ends (or fails) the time of each stage
that ran as ``pipeline/<stage>_seconds``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import gin

from arforge import validation as V
from arforge.errors import ConfigError


def pipeline(ctx, *, stages: Sequence[str], bindings: Sequence[str] = (), only: Sequence[str] = ()) -> dict[str, Any]:
    """Run stage launch files in order, each as a nested run.

    Args:
        stages: launch files, relative to the pipeline file.
        bindings: extra gin bindings applied to every stage (e.g. a shorter budget).
        only: run just these stages (file stems), e.g. to redo sampling and evaluation.
    """
    V.check_args("jobs.pipeline", locals(), where=ctx, stages=V.sequence_of(V.TEXT, non_empty=True),
                 bindings=V.sequence_of(V.TEXT), only=V.sequence_of(V.TEXT))
    if ctx.config_file is None:
        raise ConfigError("jobs.pipeline must be launched from a gin file (its stages are relative to it)")
    base = Path(ctx.config_file).parent
    paths = [base / s for s in stages]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"{ctx.config_file}: jobs.pipeline.stages names missing files: {', '.join(missing)}")
    ctx.tracker.log_text(gin.operative_config_str(), "config/pipeline_operative_config.gin")
    own_bindings = [f'launch.experiment = "{ctx.experiment}"']
    # Bindings given to the pipeline launch (--bind, a study trial's suggestions) reach every
    # stage. Of launch.*, only device, precision and seed do (`--bind 'launch.seed = 1'` reseeds
    # every stage); experiment, run_name, job, output_dir and resume are each stage's own.
    forwarded = [b for b in ctx.extra.get("bindings", []) if _forwarded(b)]
    results: dict[str, Any] = {}
    from arforge import tracking

    times: dict[str, tuple[float, int]] = {}
    try:
        with tracking.path_scope(pipeline_dir=ctx.output_dir):  # "pipeline:<file>" paths and stage folders
            _run_stages(ctx, paths, own_bindings, forwarded, bindings, only, results, times)
    finally:
        # The stage times go last: MLflow's compare view preselects a run's first-logged metric,
        # which should be the evaluation's fid, not the first stage's time.
        for key, (seconds, step) in times.items():
            ctx.tracker.log_metrics({key: seconds}, step=step)

    ctx.log(f"outputs (checkpoints, codes, samples) in {ctx.output_dir}")
    from arforge.cli import ui_hint

    hint = ui_hint(ctx.experiment)  # once per process: not again for every study trial
    if hint:
        ctx.log(hint)
    return results


_FORWARDED_LAUNCH = ("device", "precision", "seed")


def _forwarded(binding: str) -> bool:
    """Whether a pipeline launch's binding is passed on to its stages (see :func:`pipeline`)."""
    name = binding.split("=", 1)[0].strip().removeprefix("arforge.")
    if not name.startswith("launch."):
        return True
    return name.removeprefix("launch.") in _FORWARDED_LAUNCH


def _run_stages(ctx, paths, own_bindings, forwarded, bindings, only, results, times) -> None:
    from arforge import launch

    for i, path in enumerate(paths):
        if only and path.stem not in only:
            continue
        done = _finished_stage(ctx, path)
        if done is not None:  # a resumed pipeline keeps the stages it already finished
            ctx.log(f"stage {path.name} already finished in {done}; skipped")
            continue
        ctx.log(f"stage {i + 1}/{len(paths)}: {path.name}")
        t0 = time.time()
        # Order matters: the pipeline file's bindings, then the pipeline's experiment (an include
        # there, e.g. a variant's common file, must not move the nested runs to another
        # experiment, where MLflow no longer shows them under the pipeline run), then the
        # launch's (--bind, a trial's suggestions), which therefore win.
        results[path.stem] = launch.run_file(path, [*bindings, *own_bindings, *forwarded],
                                             parent_run_id=ctx.tracker.run_id,
                                             reporter=ctx.reporter)
        seconds = time.time() - t0
        evaluation = _evaluation(results[path.stem])
        if evaluation:
            ctx.tracker.log_metrics(evaluation, step=i)
        times[f"pipeline/{path.stem}_seconds"] = (seconds, i)
        ctx.log(f"stage {path.name} took {seconds:.1f} s")


#: What a stage that evaluates returns and the pipeline run repeats at its top level: MLflow's
#: run lists and compare view, and a study trial that runs a pipeline, show them without opening
#: the stage (docs/tracking.md#what-a-run-logs).
EVALUATION_METRICS = ("fid", "sfid", "is", "precision", "recall")


def _evaluation(result: Any) -> dict[str, float]:
    """The evaluation metrics among a stage's results (jobs.evaluate_samples returns them)."""
    if not isinstance(result, dict):
        return {}
    out = {}
    for key in EVALUATION_METRICS:
        try:
            out[key] = float(result[key])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _finished_stage(ctx, path: Path) -> Path | None:
    """The output folder of ``path``'s stage if this (resumed) pipeline run already finished it."""
    import json

    if not ctx.resume:
        return None
    for run_json in Path(ctx.output_dir).glob("*/run.json"):
        try:
            state = json.loads(run_json.read_text())
        except (OSError, ValueError):
            continue
        if state.get("status") == "FINISHED" and state.get("config_file") == str(path.resolve()):
            return run_json.parent
    return None
