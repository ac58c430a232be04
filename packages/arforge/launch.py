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
line and, for unknown names, the closest registered name (:mod:`arforge.gin_parsing`);
``run.json``, resume rules and the run lock are :mod:`arforge.run_state`.
"""

from __future__ import annotations

import os
import random
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import gin

from arforge import registry as reg
from arforge.errors import ArforgeError, ConfigError
# The gin layer and the run state live in their own modules; their public names stay importable
# from here, where callers (the CLI, studies, tools, tests) have always found them.
from arforge.gin_parsing import (ParsedConfig, bound_parameters, check_references, explain_gin_error,  # noqa: F401
                                 gin_search_paths, parse, repo_root, used_parameters)
from arforge.run_state import (ARCHITECTURE_KINDS, ARCHITECTURE_PARAMS, RunLock, RunStateError,  # noqa: F401
                               config_changes, format_change, read_run_state, refused_on_resume, tag_key,
                               write_run_state)


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

    base = tracking.pipeline_dir()
    root = base if base is not None else tracking.home() / "outputs" / _safe_dirname(experiment)
    return root / _safe_dirname(run_name)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _safe_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


@dataclass
class Invocation:
    """What :func:`run_file` hands :func:`launch` besides its gin bindings (gin binds none of it):
    the launch file and ``--bind`` lines, the MLflow run to nest under and the study's reporter;
    the launch fills in the run it made, for :func:`last_run`."""

    config_file: str | None = None
    bindings: tuple[str, ...] = ()
    parent_run_id: str | None = None
    reporter: Callable[[str, float, int], None] | None = None
    run_id: str | None = None
    output_dir: Path | None = None


@gin.configurable(module="arforge", denylist=["invocation"])
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
    invocation: Invocation | None = None,
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
        invocation: passed by :func:`run_file`, never bound in gin.
    """
    return _launch(job, experiment=experiment, run_name=run_name, device=device, precision=precision,
                   seed=seed, output_dir=output_dir, resume=resume, tags=tags or {},
                   invocation=invocation or Invocation())


def _launch(job, *, experiment, run_name, device, precision, seed, output_dir, resume, tags, invocation):
    from arforge import tracking

    if resume not in ("auto", "never", "must"):
        raise ConfigError(f"launch.resume must be 'auto', 'never' or 'must', not {resume!r}")
    job_name = getattr(job, "__name__", type(job).__name__)
    run_name = run_name or job_name
    # "pipeline:" paths outside a pipeline name the experiment's folder, for this launch only.
    with tracking.path_scope(experiment=experiment):
        return _launch_in(job, job_name=job_name, experiment=experiment, run_name=run_name, device=device,
                          precision=precision, seed=seed, output_dir=output_dir, resume=resume, tags=tags,
                          invocation=invocation)


def _launch_in(job, *, job_name, experiment, run_name, device, precision, seed, output_dir, resume, tags,
               invocation):
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
        lock = RunLock(out, run_name)
    try:
        return _launch_locked(job, job_name=job_name, experiment=experiment, run_name=run_name,
                              torch_device=torch_device, prec=prec, dist=dist, seed=seed, out=out,
                              resume=resume, tags=tags, invocation=invocation)
    finally:
        if lock is not None:
            lock.release()


def _launch_locked(job, *, job_name, experiment, run_name, torch_device, prec, dist, seed, out, resume, tags,
                   invocation):
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
    # What MLflow shows: the bindings this launch's job uses, by binding name, values resolved
    # (docs/tracking.md#what-a-run-logs); run.json's "bindings" stay the resume's comparison.
    logged = used_parameters()
    changes: dict[str, tuple[str | None, str | None]] = {}
    if resuming and isinstance(previous.get("bindings"), dict):
        changes = config_changes(previous["bindings"], params)
        refused = {k: v for k, v in changes.items() if refused_on_resume(k, *v)}
        if refused:
            raise RunStateError(
                f"{state_file}: run {run_name!r} was started with other architecture bindings ("
                + "; ".join(format_change(k, *v) for k, v in refused.items())
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
    run_id = config_text = None
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
                parent = invocation.parent_run_id
                run = mlflow.tracking.MlflowClient().create_run(
                    exp_id, run_name=run_name, tags={"mlflow.parentRunId": parent} if parent else None)
                run_id = run.info.run_id
            else:
                mlflow.tracking.MlflowClient().update_run(run_id, status="RUNNING")
        tracker = tracking.MlflowTracker(run_id)
        out.mkdir(parents=True, exist_ok=True)
        state = {"run_id": run_id, "status": "RUNNING", "experiment": experiment, "run_name": run_name,
                 "config_file": invocation.config_file, "started": time.time(), "bindings": params,
                 "params": logged}
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
                print(f"[{run_name}]   {format_change(k, o, n)}", flush=True)
        # The tags name what MLflow shows: the params, resolved (a run.json of a launch before
        # params were kept there has only the bindings to compare).
        param_changes = (config_changes(previous.get("params") or {}, logged) if resuming and "params" in previous
                         else changes)
        reg_ = reg.registry()
        config_file = invocation.config_file
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
            **{tag_key(k): f"{o if o is not None else '(unset)'} -> {n if n is not None else '(unset)'}"[:5000]
               for k, (o, n) in param_changes.items()},
            **tags,
        })
        if not resuming:
            tracker.log_params(logged)
        else:
            # Params new in this launch are logged; changed ones keep their first value as the
            # param (MLflow params are immutable) and carry old -> new in the tags above.
            added = {k: n for k, (o, n) in param_changes.items() if o is None and n is not None}
            if added:
                tracker.log_params(added)
        config_text = gin.config_str()
        tracker.log_text(config_text, "config/config.gin")
    if dist.enabled:
        obj = [out]
        torch.distributed.broadcast_object_list(obj, src=0)
        out = obj[0]
    ctx = RunContext(experiment=experiment, run_name=run_name, output_dir=out, tracker=tracker,
                     device=torch_device, precision=prec, seed=seed, dist=dist, resume=resuming,
                     config_file=invocation.config_file, reporter=invocation.reporter,
                     extra={"bindings": list(invocation.bindings)})
    status = "FAILED"
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
            # A job that launches nested runs (jobs.pipeline) re-parses gin for each stage: the
            # outer run must not log a stage's operative config as its own.
            if config_text is not None and gin.config_str() == config_text:
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
        invocation.run_id, invocation.output_dir = run_id, out


def run_file(config_file: str | os.PathLike | None, bindings: Sequence[str] = (), *,
             parent_run_id: str | None = None,
             reporter: Callable[[str, float, int], None] | None = None) -> Any:
    """Parse and run a launch file. Raises :class:`ConfigError` for gin mistakes.

    ``parent_run_id`` nests the MLflow run (a study trial, a pipeline stage);
    ``reporter`` receives intermediate values reported with ``ctx.report``.
    """
    check_references(parse(config_file, bindings))
    invocation = Invocation(config_file=str(Path(config_file).resolve()) if config_file else None,
                            bindings=tuple(bindings), parent_run_id=parent_run_id, reporter=reporter)
    try:
        return launch(invocation=invocation)
    except ArforgeError:
        raise
    except Exception as exc:
        text = str(exc)
        if "Required bindings for" in text or "No configurable matching" in text:
            raise explain_gin_error(exc, config_file=str(config_file) if config_file else None,
                                    bindings=bindings) from exc
        raise
    finally:
        _LAST_RUN[:] = [invocation.run_id, invocation.output_dir]


#: ``(run_id, output_dir)`` of the last launch, for :func:`last_run`: a study or test asks after
#: run_file has returned or raised (a job's result does not carry its run).
_LAST_RUN: list[Any] = [None, None]


def last_run() -> tuple[str | None, Path | None]:
    """``(run_id, output_dir)`` of the most recent launch in this process."""
    return _LAST_RUN[0], _LAST_RUN[1]


def format_exception_short(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()

