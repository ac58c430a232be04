"""Optuna studies over gin launch files, logged to MLflow (docs/studies.md).

A study file names a base launch file and a search space over its gin
parameters; ``arforge study FILE.gin`` runs its trials, each one launch of the
base file, nested under one MLflow parent run per study. Importing this
package registers the ``study`` and ``space.*`` configurables, which is why a
study file starts with ``import arforge.studies``.

Where things live:

- ``space``: the ``@space.float()/int()/categorical()`` entries and how sampled
  values become gin bindings;
- ``config``: the ``study`` configurable, its checks, sampler and pruner;
- ``storage``: the Optuna storage and the guarded ``ask`` that keeps
  concurrent workers to exactly ``n_trials``;
- ``usage``: which gin parameters a launch reads, so that a study searches only live ones;
- ``runner``: one worker (the trial loop, heartbeats, retries, waiting);
- ``runs``: the parent and trial MLflow runs;
- ``plots``: Optuna's plots for the parent run;
- ``results``: what a worker reports; ``cli``: the commands.

``arforge compare`` lives in :mod:`arforge.compare`; it is re-exported here
because a study's experiment is what it is most often run on.
"""

from arforge.compare import CompareResult, compare_runs, format_table
from arforge.studies.cli import add_cli
from arforge.studies.config import PRUNERS, SAMPLERS, StudyConfig, load_study_config, resolve_launch_file, \
    split_bindings, study
from arforge.studies.plots import save_study_plots
from arforge.studies.results import StudyResult, print_result
from arforge.studies.runner import StudyRunner, run_study
from arforge.studies.space import SPACE_TYPES, CategoricalSpace, FloatSpace, IntSpace, gin_literal, space_bindings
from arforge.studies.storage import HeartbeatJournalStorage, StudyError, StudyLock, default_storage_url, mask_url, \
    normalize_storage_url, open_storage, slots_used

__all__ = [
    "PRUNERS", "SAMPLERS", "SPACE_TYPES", "CategoricalSpace", "CompareResult", "FloatSpace", "IntSpace",
    "HeartbeatJournalStorage", "StudyConfig", "StudyError", "StudyLock", "StudyResult", "StudyRunner", "add_cli", "compare_runs",
    "default_storage_url", "format_table", "gin_literal", "load_study_config", "mask_url",
    "normalize_storage_url", "open_storage", "print_result", "resolve_launch_file", "run_study",
    "save_study_plots", "slots_used", "space_bindings", "split_bindings", "study",
]
