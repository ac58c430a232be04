"""What a study worker reports when it stops: :class:`StudyResult` and how
``arforge study`` prints it (docs/studies.md, "Running a study")."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass
class StudyResult:
    """What a worker leaves behind (also printed by ``arforge study``)."""

    study_name: str
    experiment: str
    storage: str
    parent_run_id: str | None
    n_complete: int
    n_pruned: int
    n_failed: int
    n_trials: int
    best_value: float | None = None
    best_trial: int | None = None
    best_run_id: str | None = None
    best_bindings: list[str] = dataclasses.field(default_factory=list)
    reproduce_command: str | None = None
    plots: list[Path] = dataclasses.field(default_factory=list)
    stopped: str = "done"
    #: the ``study.enqueue`` points: (trial number, state, value or None, bindings)
    enqueued: list[tuple[int, str, float | None, list[str]]] = dataclasses.field(default_factory=list)
    #: the ``optuna-dashboard`` command that opens the study's storage
    dashboard_command: str | None = None


def print_result(result: StudyResult) -> None:
    """The counts, the best trial's bindings and the command that reproduces it."""
    print(f"study {result.study_name!r}: {result.n_complete} complete, {result.n_pruned} pruned, "
          f"{result.n_failed} failed (target {result.n_trials} finished) in {result.storage}")
    if result.stopped == "timeout":
        print("stopped by the timeout; run the same command again to continue")
    if result.best_value is None:
        print("no trial completed yet")
        _print_dashboard(result)
        return
    print(f"best value {result.best_value:.6g} (trial {result.best_trial}, MLflow run {result.best_run_id} "
          f"in experiment {result.experiment!r})")
    for line in result.best_bindings:
        print(f"  {line}")
    for number, state, value, bindings in result.enqueued:  # e.g. the unguided baseline, to compare with
        shown = f"{value:.6g}" if value is not None else state.lower()
        print(f"enqueued trial {number}: {shown}" + (f" ({'; '.join(bindings)})" if bindings else ""))
    if result.plots:
        print(f"plots: {result.plots[0].parent} ({', '.join(p.name for p in result.plots)})")
    print("reproduce the best trial with:")
    print(f"  {result.reproduce_command}")
    _print_dashboard(result)


def _print_dashboard(result: StudyResult) -> None:
    """Optuna's own view of the study (docs/studies.md#plots); the MLflow runs are in `arforge ui`."""
    if result.dashboard_command:
        print(f"browse the study with: {result.dashboard_command}   (pip install optuna-dashboard)")
