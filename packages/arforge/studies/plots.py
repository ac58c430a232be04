"""Optuna's own plots of a study, saved as PNGs for the study's parent MLflow run
(docs/studies.md, "Plots")."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from optuna.trial import TrialState

from arforge.compare import use_agg


def save_study_plots(st: Any, out_dir: Path, *, objective: str = "objective",
                     names: Any = None) -> list[Path]:
    """Optimisation history, intermediate values, parameter importances, slice, a contour of
    the two leading guidance-scale (else numeric) parameters, and the objective against each
    searched numeric parameter (:func:`objective_figure`), as PNGs in ``out_dir``. Plots that do
    not apply yet (one trial, one parameter) are skipped."""
    use_agg()
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    complete = st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    params = list(dict.fromkeys(p for t in complete for p in t.params))
    numeric = [p for p in params if all(isinstance(t.params.get(p, 0.0), (int, float))
                                        and not isinstance(t.params.get(p, 0.0), bool) for t in complete)]
    # The CFG studies ask "which scales"; their contour is the picture people look for.
    cfg_like = [p for p in numeric if re.search(r"cfg|scale|guid", p)]
    contour = (cfg_like + [p for p in numeric if p not in cfg_like])[:2]
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: ovm.plot_optimization_history(st, target_name=objective),
        "slice": lambda: ovm.plot_slice(st, target_name=objective),
    }
    if any(t.intermediate_values for t in st.get_trials(deepcopy=False)):
        plots["intermediate_values"] = lambda: ovm.plot_intermediate_values(st)
    if len(complete) >= 2 and len(params) >= 2:
        plots["param_importances"] = lambda: ovm.plot_param_importances(st, target_name=objective)
    if len(contour) == 2 and len(complete) >= 2:
        plots["contour"] = lambda: ovm.plot_contour(st, params=contour, target_name=objective)
    if numeric:
        plots[f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', objective)}_vs_params"] = \
            lambda: objective_figure(st, objective=objective, params=cfg_like + [p for p in numeric if p not in cfg_like])
    written = []
    for name, draw in plots.items():
        fig = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = draw()
                fig = np.ravel(ax)[0].figure
                path = out_dir / f"{name}.png"
                fig.savefig(path, dpi=100, bbox_inches="tight")
            written.append(path)
        except Exception as exc:  # a plot that cannot be drawn must not fail the study
            print(f"[study {st.study_name}] skipped the {name} plot: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
        finally:
            plt.close(fig if fig is not None else "all")
    return written


def objective_figure(st: Any, *, objective: str, params: list[str]) -> Any:
    """The objective against each searched numeric parameter, one panel each (guidance scales
    first): what a researcher reads to choose a CFG scale, next to the trials' sample grids
    (``trials/`` on the study's run). Pruned trials are drawn at their last reported value."""
    import matplotlib.pyplot as plt

    trials = [t for t in st.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.4), squeeze=False)
    for ax, name in zip(axes[0], params):
        for state, marker, colour in ((TrialState.COMPLETE, "o", "tab:blue"), (TrialState.PRUNED, "x", "tab:grey")):
            pts = [(t.params[name], t.value if t.value is not None else t.intermediate_values[max(t.intermediate_values)],
                    t.number) for t in trials if t.state == state and name in t.params
                   and (t.value is not None or t.intermediate_values)]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, c=colour, zorder=3,
                           label=state.name.lower())
                for x, y, n in pts:
                    ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel(name, fontsize=9)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(f"{st.study_name}: {objective} by trial (numbers: trial, grids in trials/)", fontsize=10)
    fig.tight_layout()
    return axes
