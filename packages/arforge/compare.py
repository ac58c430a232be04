"""``arforge compare EXPERIMENT``: an experiment's runs sorted by a metric, grouped by job,
with the parameters that differ between them; optionally a plot of the metric against one.

Columns are gin binding names as written in launch files: a launch logs the bindings its job
used under those names (docs/tracking.md#what-a-run-logs), a study trial adds its searched
ones, and the study's parent run lists those in its tag ``arforge.space``, so a study is
compared over its search space only (docs/studies.md#comparing-runs). Reading is all it does:
the plot is written only when asked (``--plot``), and logged to MLflow only with ``--log``.
This module reads MLflow and knows nothing of Optuna.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from arforge import registry as reg
from arforge.errors import ArforgeError

#: Differ between every pair of runs and say nothing about them.
_SKIP_PARAMS = {"launch.run_name", "arforge.launch.run_name", "launch.output_dir", "launch.resume"}
#: Metrics shown beside the sorting one when some shown run has them (the evaluation's).
EXTRA_METRICS = ("fid", "sfid", "is", "precision", "recall")
#: Widest cell of the text table; the csv/json formats keep every character.
CELL_WIDTH = 24


@dataclasses.dataclass
class CompareResult:
    experiment: str
    metric: str
    #: per run: run_name, run_id, job, status, metric, metrics{name: value}, best, params{column: value},
    #: pruned (None, or {"metric", "value", "step"}: the last value a pruned trial reported)
    rows: list[dict[str, Any]]
    columns: list[str]                  # the differing gin parameters
    plot: Path | None
    plot_param: str | None
    artifact_run_id: str | None
    metrics: list[str] = dataclasses.field(default_factory=list)  # the metric columns, sorting one first


def safe_name(name: str) -> str:
    """``name`` as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "study"


def use_agg() -> None:
    """Draw off-screen unless the caller already chose a matplotlib backend (a notebook)."""
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")


def _params(run: Any) -> dict[str, str]:
    """A run's params by binding name (runs logged before params had binding names carry them as
    ``gin.<full selector>``: read as the same column)."""
    out = {}
    for k, v in run.data.params.items():
        if k.startswith("gin."):
            k = k[len("gin."):].replace("arforge.launch.", "launch.")
            if "gin.macro" in k:
                continue
        out.setdefault(k, v)
    return {k: v for k, v in out.items() if k not in _SKIP_PARAMS}


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _pruned(run: Any) -> dict[str, Any] | None:
    """A pruned trial's last reported value (studies/runs.py: ``log_pruned``), if it has one."""
    metric = run.data.tags.get("arforge.pruned_metric")
    key = "last_" + re.sub(r"[^\w./ :-]", "_", metric) if metric else None  # runs.metric_key
    if key is None or key not in run.data.metrics:
        return None
    return {"metric": metric, "value": run.data.metrics[key], "step": int(run.data.tags.get("arforge.pruned_step", 0))}


def _job(run: Any) -> str:
    job = run.data.tags.get("arforge.job")
    return f"jobs.{job}" if job else "-"


def compare_runs(experiment: str, *, metric: str | None = None, param: str | None = None,
                 ascending: bool | None = None, max_results: int = 1000,
                 plot: str | os.PathLike | bool | None = None, log_plot: bool = False) -> CompareResult:
    """Runs of ``experiment`` sorted by ``metric`` (missing last), the params that differ, and,
    when ``plot`` (a path, or True for ``$ARFORGE_HOME/compare/<experiment>-<metric>.png``) or
    ``log_plot`` asks for it, a plot; ``log_plot`` logs it to the study's run (else a ``compare``
    run of the experiment). Without them nothing is written anywhere."""
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
    # A run nested in another that is shown (a pipeline's stages, a trial's) is summarised by
    # it: a pipeline repeats its stages' evaluation, a trial is one row whatever its state.
    by_id = {r.info.run_id: r for r in runs}
    summarising = ({r.info.run_id for r in runs if metric in r.data.metrics}
                   | {r.info.run_id for r in runs if "arforge.trial_number" in r.data.tags}
                   | {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") not in by_id})
    runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") not in summarising]
    params = {r.info.run_id: _params(r) for r in runs}
    shown = [params[r.info.run_id] for r in runs if metric in r.data.metrics] or list(params.values())
    keys = sorted({k for p in shown for k in p})
    differing = [k for k in keys if len({p.get(k) for p in shown}) > 1]  # constant columns say nothing
    searched = [k for s in studies for k in json.loads(s.data.tags.get("arforge.space", "[]"))]
    if any(k in differing for k in searched):  # a study's runs differ by its search space; the rest is noise
        differing = [k for k in differing if k in searched]
    with_metric = sorted((r for r in runs if metric in r.data.metrics),
                         key=lambda r: r.data.metrics[metric], reverse=not ascending)
    pruned = {r.info.run_id: _pruned(r) for r in runs}
    # Then the pruned trials by the value they were stopped at, then the rest.
    rest = [r for r in runs if metric not in r.data.metrics]
    rest.sort(key=lambda r: (pruned[r.info.run_id] is None,
                             (pruned[r.info.run_id] or {}).get("value", 0.0) * (1 if ascending else -1)))
    ordered = with_metric + rest
    metrics = [metric] + [m for m in EXTRA_METRICS if m != metric and any(m in r.data.metrics for r in ordered)]
    rows = [{"run_name": r.info.run_name, "run_id": r.info.run_id, "job": _job(r),
             "status": r.data.tags.get("arforge.trial_state", r.info.status),  # PRUNED rather than KILLED
             "metric": r.data.metrics.get(metric), "metrics": {m: r.data.metrics.get(m) for m in metrics},
             "best": r.data.tags.get("arforge.best") == "true", "pruned": pruned[r.info.run_id],
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
    out = artifact_run = None
    if plot or log_plot:
        out = Path(plot) if plot and plot is not True else \
            tracking.home() / "compare" / f"{safe_name(experiment)}-{safe_name(metric)}.png"
        _plot_compare(rows, metric, plot_param, out, title=experiment)
    if log_plot:  # a study's plot belongs to the study; other experiments get one "compare" run
        artifact_run = studies[0].info.run_id if len(studies) == 1 else _compare_run(client, exp.experiment_id)
        client.log_artifact(artifact_run, str(out), "compare")
        if len(studies) != 1:
            client.set_terminated(artifact_run, status="FINISHED")
    return CompareResult(experiment=experiment, metric=metric, rows=rows, columns=differing, plot=out,
                         plot_param=plot_param, artifact_run_id=artifact_run, metrics=metrics)


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


def number(v: Any) -> str:
    """``v`` with 4 significant digits if it is a float (or a float's text); else as it is."""
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    f = _as_float(v)
    if f is None or (isinstance(v, str) and not re.fullmatch(r"[-+]?[\d.]+(e[-+]?\d+)?", v.strip(), re.I)):
        return str(v)
    if isinstance(v, str) and re.fullmatch(r"[-+]?\d+", v.strip()):
        return v.strip()
    return f"{f:.4g}"


def _metric_cell(row: dict[str, Any], name: str, metric: str) -> str:
    value = row["metrics"].get(name)
    if value is not None:
        return number(value)
    p = row.get("pruned")
    if name == metric and p:  # the value the trial was stopped at, and where
        shown = number(p["value"]) + f" @{p['step']}"
        return shown if p["metric"] == metric else f"{p['metric']} {shown}"
    return "-"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _grid(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(row[j]) for row in [header, *body]) for j in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]


def format_table(result: CompareResult, *, width: int = CELL_WIDTH) -> str:
    """``result`` as plain text: one block per job (pipeline runs, sampling runs, ...), each with
    the metric columns its runs have and the parameters that differ within it, cells cut to
    ``width`` characters, numbers to 4 significant digits; the best trial's run is starred."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in result.rows:
        groups.setdefault(r["job"], []).append(r)
    blocks = []
    n = 0
    for job, rows in groups.items():
        metrics = [m for m in result.metrics if m == result.metric or any(r["metrics"].get(m) is not None for r in rows)]
        columns = [c for c in result.columns if len({r["params"][c] for r in rows}) > 1 or len(groups) == 1]
        header = ["#", "run", "status", *metrics, *[_cut(c, 2 * width) for c in columns]]
        body = []
        for r in rows:
            n += 1
            body.append([str(n), _cut(r["run_name"] or r["run_id"][:8], width) + (" *" if r["best"] else ""),
                         r["status"], *[_metric_cell(r, m, result.metric) for m in metrics],
                         *[_cut(number(r["params"][c]), width) for c in columns]])
        lines = _grid(header, body)
        blocks.append("\n".join(([f"{job} ({len(rows)} run{'s' if len(rows) > 1 else ''})"] if len(groups) > 1 else [])
                                + lines))
    return "\n\n".join(blocks)


def _records(result: CompareResult) -> list[dict[str, Any]]:
    """One flat record per run, for csv and json: full precision, every character."""
    out = []
    for r in result.rows:
        rec = {"run": r["run_name"], "run_id": r["run_id"], "job": r["job"], "status": r["status"],
               "best": r["best"], **{m: r["metrics"].get(m) for m in result.metrics}}
        p = r.get("pruned")
        rec["pruned_metric"], rec["pruned_value"], rec["pruned_step"] = \
            (p["metric"], p["value"], p["step"]) if p else (None, None, None)
        rec["params"] = dict(r["params"])
        out.append(rec)
    return out


def format_csv(result: CompareResult) -> str:
    records = _records(result)
    buf = io.StringIO()
    fields = [k for k in (records[0] if records else {}) if k != "params"] + result.columns
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for rec in records:
        params = rec.pop("params")
        writer.writerow({k: "" if v is None else v for k, v in {**rec, **params}.items()})
    return buf.getvalue()


def format_json(result: CompareResult) -> str:
    return json.dumps(_records(result), indent=1)


def format_markdown(result: CompareResult) -> str:
    """A markdown table (a report, a pull request): numbers to 4 significant digits."""
    header = ["run", "job", "status", *result.metrics, *result.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result.rows:
        cells = [r["run_name"] + (" (best)" if r["best"] else ""), r["job"], r["status"],
                 *[_metric_cell(r, m, result.metric) for m in result.metrics],
                 *[number(r["params"][c]).replace("|", "\\|") for c in result.columns]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


FORMATS = {"table": format_table, "csv": format_csv, "markdown": format_markdown, "json": format_json}


def print_compare(result: CompareResult, *, fmt: str = "table") -> None:
    """What ``arforge compare`` prints: the runs in ``fmt``; for the table, then where the plot is."""
    if fmt not in FORMATS:
        raise ArforgeError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    text = FORMATS[fmt](result)
    print(text, end="" if text.endswith("\n") else "\n")
    if fmt == "table" and result.plot is not None:
        print(f"\nplot: {result.plot}" + (f" ({result.metric} vs {result.plot_param})" if result.plot_param else "")
              + (f"; logged to MLflow run {result.artifact_run_id}" if result.artifact_run_id else ""))
