"""One worker of a study: it joins (or creates, or resumes) the study in its
storage and runs trials until the study has ``n_trials`` finished ones.

Each trial is one ``launch.run_file`` of the base launch file with the sampled
values as gin bindings, nested under the study's parent MLflow run
(docs/studies.md, "Trials in MLflow"). The protocol between workers is
Optuna's plus the guarded ``ask`` of :mod:`arforge.studies.storage`
(docs/studies.md, "Storage and workers").
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import gin
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from arforge import launch as _launch
from arforge.compare import safe_name
from arforge.errors import ArforgeError, ConfigError
from arforge.studies import runs, usage
from arforge.studies.config import (grid_size, load_study_config, make_pruner, make_sampler,
                                    resolve_launch_file, split_bindings)
from arforge.studies.plots import save_study_plots
from arforge.studies.results import StudyResult
from arforge.studies.space import gin_literal, space_bindings
from arforge.studies.storage import (FINISHED, CappedStudy, NoRoom, StudyError, StudyLock, check_journal,
                                     default_storage_url, journal_path, mask_url, normalize_storage_url,
                                     open_storage, slots_used)


def _no_trial_tracebacks(record: logging.LogRecord) -> bool:
    """Drop Optuna's "Trial N failed ..." warnings (and their tracebacks): the worker prints each
    failed trial in one line itself, and ARFORGE_TRACEBACK=1 keeps them."""
    if os.environ.get("ARFORGE_TRACEBACK") or not record.name.startswith("optuna"):
        return True
    msg = str(record.msg)
    return not (msg.startswith("Trial ") and " failed" in msg)


class StudyRunner:
    """Runs one worker of a study (see :func:`run_study`)."""

    def __init__(self, study_file: str | os.PathLike, bindings: Sequence[str] = (), *,
                 storage: str | None = None, n_trials: int | None = None,
                 heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = None, timeout: float | None = None, verbose: bool = True,
                 plots: bool = True):
        own, trial_binds = split_bindings(bindings)
        self.study_file = Path(study_file)
        self.cfg = load_study_config(self.study_file, own)
        if n_trials is not None and n_trials < 1:
            raise ConfigError(f"--n-trials must be >= 1, not {n_trials}")
        overrides = {"n_trials": n_trials, "heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
                     "max_retry": max_retry, "timeout": timeout}
        for key, value in overrides.items():
            if value is not None:
                setattr(self.cfg, key, value)
        self.launch_file = resolve_launch_file(self.cfg, self.study_file)
        self.fixed = [*self.cfg.fixed_bindings, *trial_binds]
        # --storage, else the study file's study.storage (relative journal paths next to it), else the default.
        self.storage_url = (normalize_storage_url(storage) if storage else
                            normalize_storage_url(self.cfg.storage, base=self.study_file.resolve().parent)
                            if self.cfg.storage else default_storage_url())
        self.verbose, self.plots = verbose, plots
        self.lock = StudyLock(self.storage_url, self.cfg.study_name)
        self.parent_run_id: str | None = None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._fatal: BaseException | None = None
        self._gave_up = False
        self._consecutive_failures = 0
        self._study: Any = None
        #: trial number -> (metric, value, step) of its last report to the pruner
        self._last_report: dict[int, tuple[str, float, int]] = {}
        # Heartbeats off: a dead worker's trial is never failed, so there is nothing to retry.
        self._retry = None
        if self.cfg.heartbeat_interval:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._retry = RetryHeartbeatStaleTrialCallback(max_retry=self.cfg.max_retry)

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
        """Fail before any trial if the launch file, a space name or a choice does not parse, or
        if a searched parameter is one the launch never reads (:mod:`arforge.studies.usage`)."""
        _launch.parse(self.launch_file)
        example = {n: s.example() for n, s in self.cfg.space.items()}
        variants = [example]
        for name, spec in self.cfg.space.items():  # every categorical choice, as it may name a plugin
            if spec.kind == "categorical":
                variants += [{**example, name: label} for label in spec.labels()[1:]]
        calls: set = set()
        for values in variants:
            lines = [f"{k} = {v}" for k, v in space_bindings(self.cfg.space, values).items()]
            try:
                # Parses the launch (and a pipeline's stages) with the trial's bindings. A parameter
                # counts as searched if some choice of the categoricals makes the launch read it
                # (guidance.linear.start is live only while guidance = @guidance.linear()).
                calls |= usage.launch_calls(self.launch_file, self._trial_bindings(lines, "trial-0000"))
            except ConfigError as exc:
                raise ConfigError(f"{self.study_file}: study.space/fixed_bindings do not fit "
                                  f"{self.launch_file}: {exc}") from None
        gin.clear_config()
        dead = usage.unused(self.cfg.space, calls)
        if dead:
            raise ConfigError(usage.describe_unused(dead, study_file=self.study_file, launch_file=self.launch_file))

    def _signature(self) -> dict[str, Any]:
        sig = {"launch_file": str(self.cfg.launch_file), "objective": self.cfg.objective,
               "space": {n: s.describe() for n, s in self.cfg.space.items()}}
        if self.cfg.prune_on and self.cfg.prune_on != self.cfg.objective:  # other intermediate values
            sig["prune_on"] = self.cfg.prune_on
        return sig

    def _grace(self) -> float:
        return float(self.cfg.grace_period or 2 * (self.cfg.heartbeat_interval or 0))

    def _has_room(self, trials: Sequence[Any]) -> bool:
        max_retry = self.cfg.max_retry if self._retry is not None else 0
        return slots_used(trials, max_retry=max_retry, grace_period=self._grace()) < self.cfg.n_trials

    # --------------------------------------------------------------- set-up
    def _on_stale_trial(self, study: Any, trial: Any) -> None:
        """Heartbeat callback: re-queue the dead worker's trial and close its MLflow run."""
        if self._retry is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._retry(study, trial)
        self.say(f"trial {trial.number} went stale (no heartbeat for the grace period): FAILED"
                 + (", re-queued" if self._retry is not None else ""))
        if self.parent_run_id is not None:
            try:
                runs.fail_stale_trial_run(self.parent_run_id, trial.number)
            except Exception as exc:  # the retry matters more than the bookkeeping
                self.say(f"could not mark trial {trial.number}'s MLflow run failed: {exc}")

    def setup(self) -> Any:
        from arforge import tracking

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Both stores are checked before the study or any run is created.
        if journal_path(self.storage_url) is not None:
            check_journal(self.storage_url)
        else:
            tracking.check_store(self.storage_url, option="study storage (--storage)", what="optuna")
        tracking.check_store()
        self.validate_launch()
        size = grid_size(self.cfg)
        if size is not None and self.cfg.n_trials > size:
            self.say(f"the grid has {size} points: n_trials lowered from {self.cfg.n_trials}")
            self.cfg.n_trials = size
        # Under the lock: a new study is created, enqueued and given its parent run by one worker.
        with self.lock():
            storage = open_storage(self.storage_url, heartbeat_interval=self.cfg.heartbeat_interval or None,
                                   grace_period=self.cfg.grace_period, stale_trial_callback=self._on_stale_trial)
            base = optuna.create_study(study_name=self.cfg.study_name, storage=storage,
                                       direction=self.cfg.direction, load_if_exists=True)
            self._check_same_study(base)
            if base.metric_names != [self.cfg.objective]:  # else optuna-dashboard says "Objective 0"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    base.set_metric_names([self.cfg.objective])
            attrs = base.user_attrs
            if self.cfg.enqueue and not attrs.get("arforge.enqueued") and not base.get_trials(deepcopy=False):
                for point in self.cfg.enqueue:
                    base.enqueue_trial(point, skip_if_exists=True)
                base.set_user_attr("arforge.enqueued", len(self.cfg.enqueue))
            worker_index = int(attrs.get("arforge.workers_started", 0))
            base.set_user_attr("arforge.workers_started", worker_index + 1)
            # MLflow's SQLite store is initialised under the lock too: two workers
            # creating the same new database at once would race on its schema.
            tracking.configure()
            exp_id = tracking.ensure_experiment(self.cfg.experiment)
            self.parent_run_id = runs.open_parent_run(
                self.cfg, base, exp_id, study_file=self.study_file, launch_file=self.launch_file,
                fixed=self.fixed, storage_url=self.storage_url)
        self._study = CappedStudy(
            lock=self.lock, room=self._has_room, study_name=self.cfg.study_name, storage=storage,
            sampler=make_sampler(self.cfg, self.cfg.seed + worker_index, self.study_file),
            pruner=make_pruner(self.cfg, self.study_file))
        return self._study

    def _check_same_study(self, base: Any) -> None:
        """A stored study of this name must be this search: resuming another would mix results."""
        where = f"{self.study_file}: study {self.cfg.study_name!r} in {mask_url(self.storage_url)}"
        if base.direction.name.lower() != self.cfg.direction:
            raise ConfigError(f"{where} {base.direction.name.lower()}s, but study.direction = {self.cfg.direction!r}")
        old, new = base.user_attrs.get("arforge.signature"), self._signature()
        if old is None:
            base.set_user_attr("arforge.signature", new)
        elif old != new:
            diffs = [k for k in new if old.get(k) != new[k]]
            raise ConfigError(
                f"{where} was created with a different {', '.join(diffs)} "
                f"(then: {json.dumps({k: old.get(k) for k in diffs})}). Give the new search its own name "
                "(--bind 'study.study_name = \"...\"') or delete the old study (optuna.delete_study).")

    # ------------------------------------------------------------ each trial
    def _objective(self, trial: Any) -> float:
        run_id = before = retry_of = error = None
        binds: dict[str, str] = {}
        state = "FAIL"
        try:
            values = {name: spec.suggest(trial, name) for name, spec in self.cfg.space.items()}
            binds = space_bindings(self.cfg.space, values)
            lines = [f"{k} = {v}" for k, v in binds.items()]
            frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
            retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
            if frozen.user_attrs.get("arforge.error"):  # copied from the trial this one retries
                trial.set_user_attr("arforge.error", None)
            trial.set_user_attr("arforge.bindings", lines)
            trial.set_user_attr("arforge.worker", self.worker)
            self.say(f"trial {trial.number} started" + (f" (retry of trial {retry_of})" if retry_of is not None
                                                         else "") + ": " + "; ".join(lines))
            before = _launch.last_run()[0]
            result = _launch.run_file(self.launch_file, self._trial_bindings(lines, f"trial-{trial.number:04d}"),
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
            if run_id is not None and trial.number in self._last_report:
                runs.log_pruned(run_id, *self._last_report[trial.number])
            raise
        except BaseException as exc:
            run_id = self._new_run(before)
            error = _launch.format_exception_short(exc)[:4000]
            if isinstance(exc, KeyboardInterrupt):
                error = "interrupted (KeyboardInterrupt)"
            # Every failure this worker sees is marked, so that slots_used() can tell it
            # from a dead worker's trial awaiting its heartbeat retry.
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
                try:
                    runs.annotate_trial_run(run_id, study_name=self.cfg.study_name, number=trial.number,
                                            binds=binds, state=state, error=error, retry_of=retry_of,
                                            worker=self.worker)
                except Exception as exc:  # the trial's result is in Optuna already
                    self.say(f"could not annotate MLflow run {run_id} of trial {trial.number}: {exc}")

    def _user_error_first(self, exc: BaseException, trial: Any) -> bool:
        """An :class:`ArforgeError` while no trial of the study has finished yet: the launch
        itself is broken (a model not trained yet, a wrong path), not this trial's values. A
        diverging loss (NaN) depends on the values and does not count."""
        if not isinstance(exc, ArforgeError) or type(exc).__name__ in ("NonFiniteLossError",
                                                                      "NonFiniteCheckpointError"):
            return False
        try:
            return not trial.study.get_trials(deepcopy=False, states=FINISHED)
        except Exception:  # the storage went away: let the usual failure counting decide
            return False

    @staticmethod
    def _new_run(before: str | None) -> str | None:
        run_id = _launch.last_run()[0]
        # run_file leaves the previous run's id in place when it fails before launching.
        return run_id if run_id and run_id != before else None

    def _reporter(self, trial: Any) -> Callable[[str, float, int], None]:
        watched = self.cfg.prune_on or self.cfg.objective

        def report(metric: str, value: float, step: int) -> None:
            if metric != watched:
                return
            trial.report(value, step)
            self._last_report[trial.number] = (metric, value, step)
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

    def _after_trial(self, study: Any, frozen: Any) -> None:
        if frozen.state == TrialState.FAIL:
            self._consecutive_failures += 1
            err = frozen.user_attrs.get("arforge.error") or "failed"
            self.say(f"trial {frozen.number} FAILED: {err.splitlines()[0][:300]}")
            if self._fatal is None and self._consecutive_failures >= self.cfg.max_consecutive_failures:
                self._gave_up = True
                study.stop()
            return
        self._consecutive_failures = 0
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        run_id = frozen.user_attrs.get("arforge.run_id")
        if self.parent_run_id and run_id:  # the trial's sample grid beside the others on the study's run
            try:
                runs.copy_trial_grid(self.parent_run_id, run_id, frozen, self.cfg.objective)
            except Exception as exc:  # a picture must not stop the study
                self.say(f"could not copy trial {frozen.number}'s sample grid: {exc}")
        if frozen.state == TrialState.PRUNED and frozen.intermediate_values:
            step = max(frozen.intermediate_values)
            self.say(f"trial {frozen.number} pruned at step {step}: {self.cfg.prune_on or self.cfg.objective} = "
                     f"{frozen.intermediate_values[step]:.6g} ({finished}/{self.cfg.n_trials} finished)")
        else:
            self.say(f"trial {frozen.number} finished: {self.cfg.objective} = {frozen.value:.6g} "
                     f"({finished}/{self.cfg.n_trials} finished)"
                     if frozen.value is not None else f"trial {frozen.number} {frozen.state.name}")
        if frozen.state == TrialState.COMPLETE:
            if self.parent_run_id:
                from arforge import tracking

                tracking.MlflowTracker(self.parent_run_id).log_metrics(
                    {f"trial_{runs.metric_key(self.cfg.objective)}": frozen.value}, step=frozen.number)
            self._update_best(study)

    def _update_best(self, study: Any) -> Any:
        if not self.parent_run_id:
            return None
        with self.lock():  # two workers retagging at once could leave the wrong run tagged best
            try:
                best = study.best_trial
            except ValueError:  # no trial completed yet
                return None
            runs.tag_best(self.parent_run_id, best, self.cfg.objective, self.reproduce_command(best))
            return best

    def reproduce_command(self, trial: Any) -> str:
        lines = [*self.fixed, *trial.user_attrs.get("arforge.bindings", [])]
        try:
            shown = os.path.relpath(self.launch_file)
        except ValueError:  # another drive (Windows)
            shown = str(self.launch_file)
        if shown.startswith(".." + os.sep + ".."):
            shown = str(self.launch_file)
        return " ".join(["arforge", "run", shlex.quote(shown)] + [f"--bind {shlex.quote(b)}" for b in lines])

    # ----------------------------------------------------------------- drive
    def run(self) -> StudyResult:
        st = self.setup()
        quiet_handlers = [*logging.getLogger("optuna").handlers, *logging.getLogger().handlers]
        for handler in quiet_handlers:
            handler.addFilter(_no_trial_tracebacks)
        done = len(st.get_trials(deepcopy=False, states=FINISHED))
        self.say(f"{done}/{self.cfg.n_trials} trials finished so far; storage {mask_url(self.storage_url)}, "
                 f"MLflow experiment {self.cfg.experiment!r} (parent run {self.parent_run_id})")
        deadline = time.monotonic() + self.cfg.timeout if self.cfg.timeout else None
        stopped, waiting_said, interrupted = "done", False, False
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    stopped = "timeout"
                    break
                with contextlib.suppress(NoRoom), warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    st.optimize(self._objective, timeout=remaining, catch=(Exception,),
                                callbacks=[self._after_trial,
                                           optuna.study.MaxTrialsCallback(self.cfg.n_trials, states=FINISHED)])
                if self._fatal is not None:
                    raise self._fatal
                if self._gave_up:
                    raise StudyError(f"{self.cfg.max_consecutive_failures} trials failed in a row; last error: "
                                     f"{self._last_error(st)}. Fix the launch or raise "
                                     "study.max_consecutive_failures.")
                trials = st.get_trials(deepcopy=False)
                if sum(t.state in FINISHED for t in trials) >= self.cfg.n_trials:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    stopped = "timeout"
                    break
                # Every slot left is held by another worker's trial. Optuna would stop here;
                # waiting instead lets this worker take over the slot of one that dies.
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

    @staticmethod
    def _last_error(st: Any) -> str:
        failed = st.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        return (failed[-1].user_attrs.get("arforge.error") or "?").splitlines()[0] if failed else "?"

    def finish(self, stopped: str = "done") -> StudyResult:
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
                           for t in trials if "fixed_params" in t.system_attrs]  # Optuna's mark of enqueue_trial
        result.dashboard_command = dashboard_command(self.storage_url)
        if not self.parent_run_id:
            return result
        try:  # the trials as a table on the study's run (docs/studies.md#trials-in-mlflow)
            runs.log_summary(self.parent_run_id, trials, self.cfg.objective)
        except Exception as exc:  # the study's result is in Optuna already
            self.say(f"could not log the trial summary: {exc}")
        finished = result.n_complete + result.n_pruned
        with self.lock():  # one worker per study state draws the plots, not every worker
            claim = f"{finished}:{result.n_failed}"
            mine = self.plots and st.user_attrs.get("arforge.plotted") != claim
            if mine:
                st.set_user_attr("arforge.plotted", claim)
        if mine:
            from mlflow.tracking import MlflowClient

            from arforge import tracking

            result.plots = save_study_plots(st, tracking.home() / "studies" / safe_name(self.cfg.study_name),
                                            objective=self.cfg.objective, names=runs.searched_names(self.cfg))
            for p in result.plots:
                MlflowClient().log_artifact(self.parent_run_id, str(p), "plots")
        runs.log_counts(self.parent_run_id, {"n_complete": result.n_complete, "n_pruned": result.n_pruned,
                                             "n_failed": result.n_failed})
        if finished >= self.cfg.n_trials and not any(t.state == TrialState.RUNNING
                                                     for t in st.get_trials(deepcopy=False)):
            from mlflow.tracking import MlflowClient

            MlflowClient().set_terminated(self.parent_run_id, status="FINISHED")
        return result


def dashboard_command(storage_url: str) -> str:
    """The ``optuna-dashboard`` command that opens the study's storage (docs/studies.md#plots);
    optuna-dashboard is the user's to install, not a dependency."""
    path = journal_path(storage_url)
    target = str(path) if path is not None else mask_url(storage_url)
    return f"optuna-dashboard {shlex.quote(target)}"


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
