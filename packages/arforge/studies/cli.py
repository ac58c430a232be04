"""``arforge study`` and ``arforge compare``, hooked into ``arforge.cli``
(docs/studies.md gives the commands with examples)."""

from __future__ import annotations

from typing import Any

from arforge.compare import compare_runs, print_compare
from arforge.studies.results import print_result
from arforge.studies.runner import run_study


def _cmd_study(args: Any) -> int:
    result = run_study(args.study_file, args.bind, storage=args.storage, n_trials=args.n_trials,
                       heartbeat_interval=args.heartbeat, grace_period=args.grace, max_retry=args.max_retry,
                       timeout=args.timeout, plots=not args.no_plots)
    print_result(result)
    return 0


def _cmd_compare(args: Any) -> int:
    print_compare(compare_runs(args.experiment, metric=args.metric, param=args.param, ascending=args.ascending,
                               max_results=args.max_results, plot=args.plot, log_plot=args.log),
                  fmt=args.format)
    return 0


def add_cli(subparsers: Any) -> None:
    """Add ``study`` and ``compare`` to the ``arforge`` sub-commands."""
    s = subparsers.add_parser(
        "study", help="run, join or resume an Optuna study over a gin launch file",
        description="Run an Optuna study file. Several workers running the same command (same --storage) "
                    "share one study; running it again resumes it until n_trials trials have finished.")
    s.add_argument("study_file", help="the study .gin file")
    s.add_argument("--storage", help="Optuna storage shared by all workers: a database URL, e.g. "
                                     "postgresql://user@host/db, or a file journal, journal:///path/study.log "
                                     "(default: study.storage, else sqlite:///$ARFORGE_HOME/optuna.db)")
    s.add_argument("--n-trials", type=int, help="total finished trials wanted (overrides study.n_trials)")
    s.add_argument("--bind", "-b", action="append", default=[],
                   help="a gin binding: study.*/space.* change the study, any other is added to every "
                        "trial's launch, e.g. 'launch.device = \"cuda\"' (repeatable)")
    s.add_argument("--heartbeat", type=int, help="seconds between trial heartbeats (default 60; 0: off)")
    s.add_argument("--grace", type=int, help="seconds without heartbeat before a trial is re-run "
                                             "(default 2 x heartbeat)")
    s.add_argument("--max-retry", type=int, help="re-runs of a dead worker's trial (default 3)")
    s.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    s.add_argument("--no-plots", action="store_true", help="skip the Optuna plots on the parent run")
    s.set_defaults(fn=_cmd_study)

    c = subparsers.add_parser(
        "compare", help="table (and plot) of an experiment's runs by a metric",
        description="Print the runs of an MLflow experiment (a study's trials, pipelines, any launches) sorted "
                    "by a metric, grouped by job, with the parameters that differ. Nothing is written unless "
                    "--plot or --log asks for it.")
    c.add_argument("experiment", help="MLflow experiment name (a study's experiment is its name)")
    c.add_argument("--metric", help="metric to sort by (default: the study's objective, else fid)")
    c.add_argument("--param", help="parameter for the plot's x axis (default: the first differing numeric one)")
    order = c.add_mutually_exclusive_group()
    order.add_argument("--ascending", dest="ascending", action="store_true", default=None,
                       help="smallest first (default, unless the study maximises)")
    order.add_argument("--descending", dest="ascending", action="store_false", help="largest first")
    c.add_argument("--max-results", type=int, default=1000, help="at most this many runs (default 1000)")
    c.add_argument("--plot", nargs="?", const=True, default=None, metavar="PNG",
                   help="also draw the metric against --param, into PNG (given alone: "
                        "$ARFORGE_HOME/compare/<experiment>-<metric>.png)")
    c.add_argument("--log", action="store_true",
                   help="log the plot to MLflow: to the study's run, else to a 'compare' run of the experiment")
    c.add_argument("--format", default="table", choices=("table", "csv", "markdown", "json"),
                   help="output format (default table: 4 significant digits, long values cut; csv and json "
                        "keep full precision)")
    c.set_defaults(fn=_cmd_compare)
