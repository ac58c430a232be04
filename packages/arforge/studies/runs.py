"""A study's MLflow runs: one parent run per study, one child run per trial
(docs/studies.md, "Trials in MLflow").

The parent carries the study's settings as ``study.*`` params, its search
ranges once as ``study_space.json``, the searched gin names in the tag
``arforge.space``, and the best trial so far. A trial's run is made by
``launch.run_file`` as a child of the parent; this module only annotates it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Mapping

from arforge import tracking
from arforge.studies.config import StudyConfig
from arforge.studies.space import INDEXED, space_json
from arforge.studies.storage import mask_url


def metric_key(name: str) -> str:
    """``name`` with the characters MLflow refuses in a metric name replaced."""
    return re.sub(r"[^\w./ :-]", "_", name)


def searched_names(cfg: StudyConfig) -> list[str]:
    """The gin binding names a trial sets: a tuple's ``p[i]`` entries are one name ``p``."""
    return list(dict.fromkeys((m["base"] if (m := INDEXED.match(n)) else n) for n in cfg.space))


def open_parent_run(cfg: StudyConfig, base: Any, exp_id: str, *, study_file: Path, launch_file: Path,
                    fixed: list[str], storage_url: str) -> str:
    """The study's parent run: the one recorded in the study, else found by tag, else new."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id = base.user_attrs.get("arforge.parent_run_id")
    if run_id:
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active" and run.info.experiment_id == exp_id:
                client.update_run(run_id, status="RUNNING")
                client.set_tag(run_id, "arforge.n_trials", str(cfg.n_trials))
                return run_id
        except Exception:
            pass  # a different MLflow store than the study's first worker used
    found = client.search_runs(
        [exp_id], max_results=1, order_by=["attributes.start_time ASC"],
        filter_string=f"tags.`arforge.study` = '{cfg.study_name}' and tags.`arforge.role` = 'study'")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp_id, run_name=cfg.study_name, tags={
            "arforge.study": cfg.study_name, "arforge.role": "study", "arforge.objective": cfg.objective,
            "arforge.direction": cfg.direction, "arforge.space": json.dumps(searched_names(cfg)),
            **tracking.git_state(study_file)}).info.run_id
        tracker = tracking.MlflowTracker(run_id)
        options = {f"study.{k}": json.dumps(v, default=str)
                   for k, v in (("sampler_options", cfg.sampler_options), ("pruner_options", cfg.pruner_options)) if v}
        tracker.log_params({
            "study.launch_file": str(cfg.launch_file), "study.objective": cfg.objective,
            "study.direction": cfg.direction, "study.sampler": cfg.sampler, "study.seed": cfg.seed,
            "study.pruner": cfg.pruner, "study.n_startup_trials": cfg.n_startup_trials,
            "study.n_warmup_steps": cfg.n_warmup_steps, "study.n_trials": cfg.n_trials,
            "study.study_name": cfg.study_name, "study.storage": mask_url(storage_url),
            "study.fixed_bindings": json.dumps(fixed), **options,
            **({"study.prune_on": cfg.prune_on} if cfg.prune_on else {})})
        tracker.log_dict(space_json(cfg.space), "study_space.json")
        tracker.log_text(study_file.read_text(), f"study/{study_file.name}")
        tracker.log_text(launch_file.read_text(), f"study/{launch_file.name}")
    client.set_tag(run_id, "arforge.n_trials", str(cfg.n_trials))
    if "arforge.parent_run_id" not in base.user_attrs:
        base.set_user_attr("arforge.parent_run_id", run_id)
    return run_id


def annotate_trial_run(run_id: str, *, study_name: str, number: int, binds: Mapping[str, str], state: str,
                       error: str | None, retry_of: int | None, worker: str) -> None:
    """The trial's sampled bindings as params under their gin names, and its Optuna state as tags.

    The launch logged the bindings its job used under the same names, resolved
    (docs/tracking.md#what-a-run-logs); only those it did not log are added here (a pipeline
    trial's run uses none of its stages' bindings), as MLflow refuses a second value for a param."""
    tracker = tracking.MlflowTracker(run_id)
    logged = tracker.client.get_run(run_id).data.params
    tracker.log_params({k: v for k, v in binds.items() if k not in logged})
    tags = {"arforge.study": study_name, "arforge.role": "trial", "arforge.trial_number": str(number),
            "arforge.trial_state": state, "arforge.worker": worker}
    if retry_of is not None:
        tags["arforge.retry_of"] = str(retry_of)
    if error:
        tags["arforge.error"] = error[:5000]
    tracker.set_tags(tags)
    if state == "PRUNED":  # MLflow has no PRUNED; the tag above says which kind of KILLED
        tracker.client.set_terminated(run_id, status="KILLED")


def fail_stale_trial_run(parent_run_id: str, number: int) -> None:
    """Close the run of a trial whose worker died: it would otherwise stay RUNNING for ever."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], max_results=10,
        filter_string=(f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                       f"attributes.run_name = 'trial-{number:04d}'"))
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "arforge.trial_state", "FAIL")
            client.set_tag(run.info.run_id, "arforge.error", "stale: no heartbeat (worker died?)")
            client.set_terminated(run.info.run_id, status="FAILED")


def tag_best(parent_run_id: str, best: Any, objective: str, command: str) -> None:
    """Tag the best trial's run ``arforge.best=true`` (and untag the previous one)."""
    from mlflow.tracking import MlflowClient

    run_id = best.user_attrs.get("arforge.run_id")
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    if run_id and parent.data.tags.get("arforge.best_run_id") != run_id:
        tagged = client.search_runs(
            [parent.info.experiment_id], max_results=1000,
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`arforge.best` = 'true'")
        for run in tagged:
            if run.info.run_id != run_id:
                client.delete_tag(run.info.run_id, "arforge.best")
        client.set_tag(run_id, "arforge.best", "true")
        for k, v in {"arforge.best_run_id": run_id, "arforge.best_trial": str(best.number),
                     "arforge.best_command": command}.items():
            client.set_tag(parent_run_id, k, v)
    tracking.MlflowTracker(parent_run_id).log_metrics({f"best_{metric_key(objective)}": best.value}, step=best.number)


def log_counts(parent_run_id: str, counts: Mapping[str, float]) -> None:
    """The study's trial counts, all at one timestamp so they read as one state."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    ts = int(time.time() * 1000)
    MlflowClient().log_batch(parent_run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in counts.items()])


def log_pruned(run_id: str, metric: str, value: float, step: int) -> None:
    """Where a pruned trial stopped, on its run: MLflow would otherwise show no value for it. The
    last value reported to the pruner is the metric ``last_<metric>`` (at its step), and the tags
    ``arforge.pruned_metric`` and ``arforge.pruned_step`` say which it was; ``arforge compare``
    shows it in the pruned trial's row."""
    tracker = tracking.MlflowTracker(run_id)
    tracker.log_metrics({f"last_{metric_key(metric)}": value}, step=step)
    tracker.set_tags({"arforge.pruned_metric": metric, "arforge.pruned_step": str(step)})


def _grid_run(client: Any, run_id: str) -> str | None:
    """The run holding a trial's sample grid: the trial's own, else one of its stages'."""
    def has_grid(rid: str) -> bool:
        return any(a.path == "samples/grid.png" for a in client.list_artifacts(rid, "samples"))

    if has_grid(run_id):
        return run_id
    run = client.get_run(run_id)
    stages = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
                                max_results=100)
    return next((s.info.run_id for s in stages if has_grid(s.info.run_id)), None)


def copy_trial_grid(parent_run_id: str, run_id: str, trial: Any, objective: str) -> None:
    """The trial's labelled sample grid, captioned with its searched values and objective, as the
    study run's ``trials/trial-NNNN.png``: a CFG sweep's grids side by side, one per scale."""
    import tempfile

    from mlflow.tracking import MlflowClient
    from PIL import Image

    from arforge.viz import captioned

    client = MlflowClient()
    holder = _grid_run(client, run_id)
    if holder is None:
        return
    with tempfile.TemporaryDirectory() as folder:
        grid = Image.open(client.download_artifacts(holder, "samples/grid.png", folder)).convert("RGB")
        values = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in trial.params.items())
        result = (f"{objective} = {trial.value:.4g}" if trial.value is not None
                  else trial.state.name.lower())
        image = captioned(grid, [f"trial {trial.number}: {result}", values])
        tracking.MlflowTracker(parent_run_id).log_image(image, f"trials/trial-{trial.number:04d}.png")


def summary_rows(trials: Any, objective: str) -> tuple[list[str], list[list[Any]]]:
    """The study's trials as a table: number, state, objective, each searched parameter, run."""
    names = list(dict.fromkeys(p for t in trials for p in t.params))
    header = ["number", "state", objective, *names, "seconds", "run_id"]
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        value = t.value
        if value is None and t.intermediate_values:  # a pruned trial: its last reported value
            value = t.intermediate_values[max(t.intermediate_values)]
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append([t.number, t.state.name, value, *[t.params.get(n) for n in names], seconds,
                     t.user_attrs.get("arforge.run_id", "")])
    return header, rows


def log_summary(parent_run_id: str, trials: Any, objective: str) -> None:
    """``summary/trials.csv`` (full precision) and ``summary/trials.md`` (4 significant digits) on
    the study's run: every trial with its state, objective and searched values."""
    import csv
    import io

    header, rows = summary_rows(trials, objective)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    tracker = tracking.MlflowTracker(parent_run_id)
    tracker.log_text(buf.getvalue(), "summary/trials.csv")

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    tracker.log_text("\n".join(lines) + "\n", "summary/trials.md")
