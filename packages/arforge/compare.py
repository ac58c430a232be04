"""``arforge compare EXPERIMENT``: an experiment's runs sorted by a metric, the
parameters that differ between them, and a plot of the metric against one of them.

Columns are gin parameter names as written in launch files. A launch logs every
binding as ``gin.<name>``; a study's trial run also logs each searched binding
under its bare name, and the study's parent run lists those names in its tag
``arforge.space``, so a study is compared over its search space only
(docs/studies.md, "Comparing runs"). This module reads MLflow and knows
nothing of Optuna.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from arforge import registry as reg
from arforge.errors import ArforgeError

#: Differs between every pair of runs and says nothing about them.
_SKIP_PARAMS = {"arforge.launch.run_name"}


@dataclasses.dataclass
class CompareResult:
    experiment: str
    metric: str
    rows: list[dict[str, Any]]          # run_name, run_id, status, metric, best, params{column: value}
    columns: list[str]                  # the differing gin parameters
    plot: Path | None
    plot_param: str | None
    artifact_run_id: str | None


def safe_name(name: str) -> str:
    """``name`` as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "study"


def use_agg() -> None:
    """Draw off-screen unless the caller already chose a matplotlib backend (a notebook)."""
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")


def _params(run: Any) -> dict[str, str]:
    """A run's params by gin name: ``gin.<name>`` and a study's bare ``<name>`` are one column."""
    out = {k[len("gin."):]: v for k, v in run.data.params.items() if k.startswith("gin.")}
    out.update(run.data.params)
    return {k: v for k, v in out.items() if not k.startswith("gin.") and k not in _SKIP_PARAMS}


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def compare_runs(experiment: str, *, metric: str | None = None, param: str | None = None,
                 ascending: bool | None = None, max_results: int = 1000,
                 plot: str | os.PathLike | None = None, log_plot: bool = True) -> CompareResult:
    """Runs of ``experiment`` sorted by ``metric`` (missing last), the params that differ, and a plot."""
    from mlflow.tracking import MlflowClient

    from arforge import tracking

    tracking.configure()
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments(max_results=1000)]
        hint = reg.closest(experiment, names)
        raise ArforgeError(f"no MLflow experiment {experiment!r} in {tracking.tracking_uri()}"
                           + (f"; did you mean {hint!r}?" if hint else "")
                           + f" Experiments: {', '.join(names) or '(none)'}.")
    runs = list(client.search_runs([exp.experiment_id], max_results=max_results,
                                   order_by=["attributes.start_time ASC"]))
    studies = [r for r in runs if r.data.tags.get("arforge.role") == "study"]
    runs = [r for r in runs if r.data.tags.get("arforge.role") not in ("study", "compare")]
    if metric is None:
        metric = studies[0].data.tags.get("arforge.objective", "fid") if studies else "fid"
    if ascending is None:
        ascending = not (studies and studies[0].data.tags.get("arforge.direction") == "maximize")
    if not runs:
        raise ArforgeError(f"experiment {experiment!r} has no runs to compare")
    if not any(metric in r.data.metrics for r in runs):
        known = sorted({m for r in runs for m in r.data.metrics})
        raise ArforgeError(f"no run of experiment {experiment!r} logged metric {metric!r}; "
                           f"metrics: {', '.join(known) or '(none)'} (choose one with --metric)")
    # A run whose parent (a study trial, a pipeline) logged the same metric is summarised by
    # that parent: show the parent only, so each comparison appears once. A study trial
    # summarises its stages even when it has no value (pruned, failed).
    summarising = ({r.info.run_id for r in runs if metric in r.data.metrics}
                   | {r.info.run_id for r in runs if "arforge.trial_number" in r.data.tags})
    runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") not in summarising]
    params = {r.info.run_id: _params(r) for r in runs}
    shown = [params[r.info.run_id] for r in runs if metric in r.data.metrics] or list(params.values())
    keys = sorted({k for p in shown for k in p})
    differing = [k for k in keys if len({p.get(k) for p in shown}) > 1]
    searched = [k for s in studies for k in json.loads(s.data.tags.get("arforge.space", "[]"))]
    if any(k in differing for k in searched):  # a study's runs differ by its search space; the rest is noise
        differing = [k for k in differing if k in searched]
    with_metric = sorted((r for r in runs if metric in r.data.metrics),
                         key=lambda r: r.data.metrics[metric], reverse=not ascending)
    ordered = with_metric + [r for r in runs if metric not in r.data.metrics]
    rows = [{"run_name": r.info.run_name, "run_id": r.info.run_id,
             "status": r.data.tags.get("arforge.trial_state", r.info.status),  # PRUNED rather than KILLED
             "metric": r.data.metrics.get(metric), "best": r.data.tags.get("arforge.best") == "true",
             "params": {k: params[r.info.run_id].get(k) for k in differing}} for r in ordered]
    if param is not None:
        if param not in differing:
            hint = reg.closest(param, differing)
            raise ArforgeError(f"--param {param!r} is not a parameter that differs between the runs"
                               + (f"; did you mean {hint!r}?" if hint else "")
                               + f" Differing: {', '.join(differing) or '(none)'}.")
        plot_param = param
    else:
        numeric = [c for c in differing if all(_as_float(row["params"][c]) is not None
                                               for row in rows if row["params"][c] is not None)]
        plot_param = numeric[0] if numeric else (differing[0] if differing else None)
    out = Path(plot) if plot else tracking.home() / "compare" / f"{safe_name(experiment)}-{safe_name(metric)}.png"
    _plot_compare(rows, metric, plot_param, out, title=experiment)
    artifact_run = None
    if log_plot:  # a study's plot belongs to the study; other experiments get one "compare" run
        artifact_run = studies[0].info.run_id if len(studies) == 1 else _compare_run(client, exp.experiment_id)
        client.log_artifact(artifact_run, str(out), "compare")
        if len(studies) != 1:
            client.set_terminated(artifact_run, status="FINISHED")
    return CompareResult(experiment=experiment, metric=metric, rows=rows, columns=differing, plot=out,
                         plot_param=plot_param, artifact_run_id=artifact_run)


def _compare_run(client: Any, exp_id: str) -> str:
    found = client.search_runs([exp_id], max_results=1, filter_string="tags.`arforge.role` = 'compare'")
    if found:
        return found[0].info.run_id
    return client.create_run(exp_id, run_name="compare", tags={"arforge.role": "compare"}).info.run_id


def _plot_compare(rows: list[dict[str, Any]], metric: str, param: str | None, out: Path, *, title: str) -> None:
    use_agg()
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["metric"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        if param is None:
            xs = list(range(len(pts)))
            ax.set_xticks(xs, [r["run_name"] for r in pts], rotation=45, ha="right", fontsize=8)
            ax.set_xlabel("run")
        else:
            values = [r["params"].get(param) for r in pts]
            if all(_as_float(v) is not None for v in values if v is not None) and any(v is not None for v in values):
                keep = [(float(v), r) for v, r in zip(values, pts) if v is not None]
                xs, pts = [k[0] for k in keep], [k[1] for k in keep]
            else:
                cats = list(dict.fromkeys(str(v) for v in values))
                xs = [cats.index(str(v)) for v in values]
                ax.set_xticks(range(len(cats)), [c if len(c) <= 24 else c[:21] + "..." for c in cats],
                              rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(param)
        ys = [r["metric"] for r in pts]
        ax.scatter(xs, ys, c="tab:blue", zorder=3)
        best = [(x, y) for x, y, r in zip(xs, ys, pts) if r["best"]]
        if best:
            ax.scatter([best[0][0]], [best[0][1]], marker="*", s=220, c="tab:red", zorder=4, label="best trial")
            ax.legend(loc="best")
        if len(pts) <= 30:  # beyond that the names hide the points
            for x, y, r in zip(xs, ys, pts):
                ax.annotate(r["run_name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric}" + (f" vs {param}" if param else ""))
        ax.grid(alpha=0.3)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def format_table(result: CompareResult, *, width: int = 32) -> str:
    """``result`` as a plain-text table; the best trial's run is starred."""
    def cut(s: str) -> str:
        return s if len(s) <= width else s[: width - 3] + "..."

    header = ["#", "run", "status", result.metric, *result.columns]
    body = []
    for i, r in enumerate(result.rows, 1):
        metric = "-" if r["metric"] is None else f"{r['metric']:.6g}"
        body.append([str(i), r["run_name"] + (" *" if r["best"] else ""), r["status"], metric,
                     *[cut("-" if r["params"][c] is None else str(r["params"][c])) for c in result.columns]])
    widths = [max(len(row[j]) for row in [header, *body]) for j in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    return "\n".join(lines)


def print_compare(result: CompareResult) -> None:
    """What ``arforge compare`` prints: the table, then where the plot is."""
    print(format_table(result))
    if result.plot is not None:
        print(f"\nplot: {result.plot}" + (f" ({result.metric} vs {result.plot_param})" if result.plot_param else "")
              + (f"; logged to MLflow run {result.artifact_run_id}" if result.artifact_run_id else ""))
