"""`arforge study`: Optuna over gin launches, nested MLflow runs, pruning, failures,
concurrent workers on SQLite and PostgreSQL, and heartbeat retry of a killed worker."""

from __future__ import annotations

import atexit
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import gin
import numpy as np
import pytest

from arforge import launch
from arforge import registry as reg
from arforge import studies
from arforge.errors import ConfigError
from plugin_fixtures import make_plugin_dist

pytestmark = pytest.mark.plumbing  # no floating-point result compared across kernels

# The toy job, as the source of a plugin distribution: worker subprocesses find it
# through the real entry point; in-process tests register the very same function.
TOY_SOURCE = '''
"""A toy objective for study tests: a quadratic reported on growing 'sample counts'."""
import os
import time
from pathlib import Path


def studyquad(ctx, *, x=0.0, y=0.0, steps=4, started_dir=None, gate=None, hold=None, fail_marker=None):
    """(x - 1)^2 + (y + 0.5)^2; intermediate values converge to it from above."""
    if started_dir:
        Path(started_dir, f"{ctx.run_name}.{os.getpid()}").touch()
    if hold:
        open(hold).read()  # a FIFO nobody writes: blocks until the worker is killed
    if gate:
        deadline = time.monotonic() + 120
        while not Path(gate).exists():  # all workers wait here until the test opens the gate
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {gate} never opened")
            time.sleep(0.02)
    if fail_marker and not Path(fail_marker).exists():
        Path(fail_marker).touch()
        raise RuntimeError("toy failure in the first trial")
    f = (x - 1.0) ** 2 + (y + 0.5) ** 2
    for i in range(steps):
        ctx.report("loss", f * (1.0 + 2.0 / (i + 1)), i)
    ctx.tracker.log_metrics({"loss": f}, step=steps)
    return {"loss": f}
'''
_ns: dict = {}
exec(compile(TOY_SOURCE, "toy_study_jobs.py", "exec"), _ns)  # noqa: S102  (our own test source)
studyquad = _ns["studyquad"]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _toy_job():
    reg.registry().register("jobs", "studyquad", studyquad)


# ------------------------------------------------------------------- helpers
_TEMPLATE: list[Path] = []


def seed_mlflow_store(home: Path) -> None:
    """Copy an initialised, empty MLflow SQLite store into ``home``.

    Creating a new MLflow store runs its ~100 schema migrations (8 s here); every
    test has its own ARFORGE_HOME, so they start from a copy made once per session.
    """
    if not _TEMPLATE:
        from mlflow.tracking import MlflowClient

        d = Path(tempfile.mkdtemp(prefix="arforge-mlflow-template-"))
        atexit.register(shutil.rmtree, d, True)
        MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}").search_experiments()
        _TEMPLATE.append(d / "mlflow.db")
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(_TEMPLATE[0], home / "mlflow.db")


def _home() -> Path:
    return Path(os.environ["ARFORGE_HOME"])


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def _study_files(tmp_path: Path, *, n_trials: int, name: str, pruner: str = "none", sampler: str = "tpe",
                 extra_launch: str = "", extra_study: str = "") -> Path:
    _write(tmp_path / "launch" / "quad.gin", f"""
        launch.experiment = "not-the-study"
        launch.job = @jobs.studyquad
        launch.device = "cpu"
        jobs.studyquad.steps = 4
        {extra_launch}
    """)
    return _write(tmp_path / "studies" / f"{name}.gin", f"""
        import arforge.studies

        study.launch_file = "../launch/quad.gin"
        study.objective = "loss"
        study.direction = "minimize"
        study.n_trials = {n_trials}
        study.sampler = "{sampler}"
        study.seed = 1
        study.pruner = "{pruner}"
        study.space = {{
            "jobs.studyquad.x": @x/space.float(),
            "jobs.studyquad.y": @y/space.float(),
        }}
        x/space.float.low = -3.0
        x/space.float.high = 3.0
        y/space.float.low = -2.0
        y/space.float.high = 2.0
        {extra_study}
    """)


def _load(name: str, storage: str | None = None):
    import optuna

    return optuna.load_study(study_name=name, storage=studies.open_storage(storage))


def _mlflow_runs(experiment: str, home: Path | None = None):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{(home or _home()) / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list", max_results=1000)
    parents = [r for r in runs if r.data.tags.get("arforge.role") == "study"]
    return parents, runs


def _states(st) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in st.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


# ------------------------------------------------------------ study files
def test_study_file_parses_without_its_launch_file_and_checks_the_space(tmp_path):
    f = _write(tmp_path / "s.gin", """
        import arforge.studies
        study.launch_file = "does/not/exist/yet.gin"
        study.objective = "fid"
        study.space = {
            "guidance.cfg_constant.scale[0]": @pre/space.float(),
            "guidance.cfg_constant.scale[1]": @post/space.float(),
            "launch.job": @space.categorical(),
        }
        pre/space.float.low = 1.0
        pre/space.float.high = 3.0
        post/space.float.low = 1.0
        post/space.float.high = 3.0
        space.categorical.choices = ["@jobs.studyquad", "plain", 2]
    """)
    cfg = studies.load_study_config(f)
    assert cfg.study_name == "s" and cfg.experiment == "s" and cfg.n_trials == 20
    # Tuple elements are assembled into one binding; '@' choices are references.
    binds = studies.space_bindings(cfg.space, {"guidance.cfg_constant.scale[0]": 1.5,
                                               "guidance.cfg_constant.scale[1]": 2.25,
                                               "launch.job": "@jobs.studyquad"})
    assert binds == {"guidance.cfg_constant.scale": "(1.5, 2.25)", "launch.job": "@jobs.studyquad"}
    assert studies.space_bindings(cfg.space, {**dict.fromkeys(cfg.space, 1.0), "launch.job": "plain"}
                                  )["launch.job"] == "'plain'"
    with pytest.raises(ConfigError, match="does not exist"):
        studies.resolve_launch_file(cfg, f)

    bad = _write(tmp_path / "bad.gin", """
        import arforge.studies
        study.launch_file = "x.gin"
        study.objective = "fid"
        study.space = {"a.b[0]": @space.float(), "a.b[2]": @space.float()}
        space.float.low = 1.0
        space.float.high = 2.0
    """)
    with pytest.raises(ConfigError, match=r"bad.gin: .*a\.b\[0\] \.\.\. a\.b\[1\] without gaps"):
        studies.load_study_config(bad)
    typo = _write(tmp_path / "typo.gin", """
        import arforge.studies
        study.launch_file = "x.gin"
        study.objective = "fid"
        study.sampler = "tpee"
        study.space = {"a.b": @space.int()}
        space.int.low = 1
        space.int.high = 3
    """)
    with pytest.raises(ConfigError, match="unknown study.sampler 'tpee'; did you mean 'tpe'"):
        studies.load_study_config(typo)
    line = _write(tmp_path / "line.gin", 'import arforge.studies\nstudy.launch_file = "x.gin"\nstudy.objectiv = "f"\n')
    with pytest.raises(ConfigError) as err:
        studies.load_study_config(line)
    assert str(err.value).startswith(f"{line}:3:") and "Did you mean study.objective?" in str(err.value)


def test_bind_splits_between_the_study_and_every_trial():
    own, trial = studies.split_bindings([
        "study.n_trials = 3", "x/space.float.low = 0.5", "arforge.study.seed = 2", "SCALE = 2.0",
        'launch.device = "cuda"', "jobs.studyquad.steps = 2", "jobs.study.x = 1"])
    assert own == ["study.n_trials = 3", "x/space.float.low = 0.5", "arforge.study.seed = 2", "SCALE = 2.0"]
    # a macro also reaches the trials: the launch files name their data through macros
    assert trial == ["SCALE = 2.0", 'launch.device = "cuda"', "jobs.studyquad.steps = 2", "jobs.study.x = 1"]


def test_bad_space_binding_fails_before_any_trial(tmp_path):
    seed_mlflow_store(_home())
    f = _study_files(tmp_path, n_trials=2, name="typo", extra_study="")
    f.write_text(f.read_text().replace('"jobs.studyquad.y"', '"jobs.studyquad.yy"'))
    with pytest.raises(ConfigError) as err:
        studies.run_study(f, verbose=False)
    assert "jobs.studyquad has no parameter 'yy'" in str(err.value)
    assert "Did you mean jobs.studyquad.y?" in str(err.value)
    assert not (_home() / "optuna.db").exists()


# ------------------------------------------------------------ one worker
def test_study_of_8_trials_logs_nested_runs_tags_best_and_reproduces(tmp_path, capsys):
    seed_mlflow_store(_home())
    f = _study_files(tmp_path, n_trials=8, name="quad8")
    result = studies.run_study(f)
    studies.print_result(result)
    out = capsys.readouterr().out

    st = _load("quad8")
    assert _states(st) == {"COMPLETE": 8}
    assert result.n_complete == 8 and result.best_value == pytest.approx(st.best_value)

    parents, runs = _mlflow_runs("quad8")
    assert len(parents) == 1
    parent = parents[0]
    from mlflow.tracking import MlflowClient

    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(nested) == 8 and len(runs) == 9
    assert sorted(r.info.run_name for r in nested) == [f"trial-{i:04d}" for i in range(8)]
    assert {r.data.tags["arforge.trial_number"] for r in nested} == {str(i) for i in range(8)}
    assert all(r.info.status == "FINISHED" and r.data.tags["arforge.trial_state"] == "COMPLETE" for r in nested)
    # Parent run: the study's settings as params, best value metric, plots.
    assert parent.data.params["study.objective"] == "loss"
    assert parent.data.params["study.n_trials"] == "8"
    # The search ranges, once, on the parent; each searched gin parameter under one name everywhere.
    space = MlflowClient().download_artifacts(parent.info.run_id, "study_space.json")
    ranges = json.loads(Path(space).read_text())
    assert {n: r["range"] for n, r in ranges.items()} == {"jobs.studyquad.x": "float(-3.0, 3.0)",
                                                          "jobs.studyquad.y": "float(-2.0, 2.0)"}
    assert json.loads(parent.data.tags["arforge.space"]) == ["jobs.studyquad.x", "jobs.studyquad.y"]
    assert not [k for k in parent.data.params if k.startswith("space.")]
    for r in nested:
        number = int(r.data.tags["arforge.trial_number"])
        assert set(st.trials[number].params) == {"jobs.studyquad.x", "jobs.studyquad.y"}
        assert float(r.data.params["jobs.studyquad.x"]) == st.trials[number].params["jobs.studyquad.x"]
        assert not [k for k in r.data.params if k.startswith(("trial.", "space."))]
    assert parent.data.metrics["best_loss"] == pytest.approx(st.best_value)
    assert parent.info.status == "FINISHED"
    plots = {Path(a.path).name for a in MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert {"optimization_history.png", "slice.png", "param_importances.png", "contour.png"} <= plots

    # Exactly one nested run is tagged best, and it is the study's best trial.
    best = [r for r in nested if r.data.tags.get("arforge.best") == "true"]
    assert len(best) == 1
    best = best[0]
    assert best.data.tags["arforge.trial_number"] == str(st.best_trial.number)
    assert best.data.metrics["loss"] == pytest.approx(st.best_value)
    assert parent.data.tags["arforge.best_run_id"] == best.info.run_id

    # Reproduce the best trial from its logged params alone.
    bindings = [f"{k} = {best.data.params[k]}" for k in json.loads(parent.data.tags["arforge.space"])]
    assert len(bindings) == 2
    again = launch.run_file(tmp_path / "launch" / "quad.gin", bindings)
    assert again["loss"] == pytest.approx(st.best_value, rel=1e-12)
    # ... and the printed command names the same bindings.
    assert "reproduce the best trial with:" in out
    command = out.split("reproduce the best trial with:")[1].strip()
    assert command.startswith("arforge run ") and all(f"--bind '{b}'" in command for b in bindings)

    # compare on the study's experiment: trial params only, plot logged on the parent run.
    cmp = studies.compare_runs("quad8", log_plot=True)
    assert cmp.metric == "loss" and cmp.columns == ["jobs.studyquad.x", "jobs.studyquad.y"]
    assert [r["metric"] for r in cmp.rows] == sorted(r["metric"] for r in cmp.rows)
    assert cmp.rows[0]["best"] and cmp.artifact_run_id == parent.info.run_id
    assert cmp.plot.is_file()

    # Resuming a finished study runs nothing more.
    again = studies.run_study(f, verbose=False, plots=False)
    assert again.n_complete == 8 and len(_load("quad8").trials) == 8
    # A larger target on the same study continues it (n_trials is the total).
    more = studies.run_study(f, n_trials=10, verbose=False, plots=False)
    assert more.n_complete == 10 and len(_load("quad8").trials) == 10
    _, runs = _mlflow_runs("quad8")
    assert len([r for r in runs if r.data.tags.get("arforge.role") == "study"]) == 1
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 10
    assert len([r for r in runs if r.data.tags.get("arforge.best") == "true"]) == 1


def test_enqueued_baseline_runs_first_once_and_is_printed(tmp_path, capsys):
    seed_mlflow_store(_home())
    f = _study_files(tmp_path, n_trials=4, name="quadq", extra_study="""
        study.enqueue = [{"jobs.studyquad.x": 0.0, "jobs.studyquad.y": 0.0}, {"jobs.studyquad.x": 1.0}]
    """)
    result = studies.run_study(f, verbose=False, plots=False)
    studies.print_result(result)
    out = capsys.readouterr().out
    st = _load("quadq")
    trials = sorted(st.trials, key=lambda t: t.number)
    assert trials[0].params == {"jobs.studyquad.x": 0.0, "jobs.studyquad.y": 0.0}
    assert trials[0].value == pytest.approx(1.25)  # (0 - 1)^2 + (0 + 0.5)^2
    assert trials[1].params["jobs.studyquad.x"] == 1.0  # y left to the sampler
    assert [n for n, *_ in result.enqueued] == [0, 1]
    assert "enqueued trial 0: 1.25 (jobs.studyquad.x = 0.0; jobs.studyquad.y = 0.0)" in out
    # Continuing the study does not enqueue the points again.
    more = studies.run_study(f, n_trials=6, verbose=False, plots=False)
    assert more.n_complete == 6
    assert sum("fixed_params" in t.system_attrs for t in _load("quadq").trials) == 2


@pytest.mark.parametrize("point, message", [
    ('{"jobs.studyquad.z": 0.0}', r"study.enqueue\[0\] names 'jobs.studyquad.z', which is not in study.space"),
    ('{"jobs.studyquad.x": 9.0}', r"study.enqueue\[0\]\['jobs.studyquad.x'\] = 9.0 is outside .*float\(-3.0, 3.0\)"),
    ('{}', r"study.enqueue\[0\] must be a non-empty dict"),
])
def test_bad_enqueue_point_is_named(tmp_path, point, message):
    f = _study_files(tmp_path, n_trials=2, name="badq", extra_study=f"study.enqueue = [{point}]")
    with pytest.raises(ConfigError, match=message):
        studies.load_study_config(f)


def test_pruning_stops_bad_trials_early(tmp_path):
    seed_mlflow_store(_home())
    f = _study_files(tmp_path, n_trials=12, name="prune", pruner="median", sampler="random",
                     extra_study="study.n_startup_trials = 2")
    result = studies.run_study(f, verbose=False, plots=False)
    st = _load("prune")
    pruned = [t for t in st.trials if t.state.name == "PRUNED"]
    complete = [t for t in st.trials if t.state.name == "COMPLETE"]
    assert pruned, "no trial was pruned"
    assert len(pruned) + len(complete) == 12 == result.n_complete + result.n_pruned
    for t in pruned:
        assert len(t.intermediate_values) < 4  # stopped before the last report
        # MedianPruner: worse than the median of the earlier completed trials at that step.
        last = max(t.intermediate_values)
        earlier = [c.intermediate_values[last] for c in complete if c.number < t.number]
        assert len(earlier) >= 2 and t.intermediate_values[last] > float(np.median(earlier))
    for t in complete:
        assert len(t.intermediate_values) == 4
    _, runs = _mlflow_runs("prune")
    by_number = {r.data.tags.get("arforge.trial_number"): r for r in runs}
    for t in pruned:
        run = by_number[str(t.number)]
        assert run.data.tags["arforge.trial_state"] == "PRUNED" and run.info.status == "KILLED"
    # compare shows one row per trial, a pruned one as PRUNED (not as MLflow's KILLED).
    cmp = studies.compare_runs("prune", log_plot=False, plot=tmp_path / "cmp.png")
    status = {row["run_name"]: row["status"] for row in cmp.rows}
    assert sorted(status) == [f"trial-{i:04d}" for i in range(12)]
    assert {status[f"trial-{t.number:04d}"] for t in pruned} == {"PRUNED"}
    assert {status[f"trial-{t.number:04d}"] for t in complete} == {"COMPLETE"}
    # ... with the value it was stopped at, and where (its run's last_<metric>).
    shown = {row["run_name"]: row["pruned"] for row in cmp.rows}
    for t in pruned:
        last = max(t.intermediate_values)
        assert shown[f"trial-{t.number:04d}"] == {"metric": "loss", "value": t.intermediate_values[last], "step": last}
    assert f" @{max(pruned[0].intermediate_values)}" in studies.format_table(cmp)


def test_failed_trial_is_recorded_and_the_study_goes_on(tmp_path):
    seed_mlflow_store(_home())
    f = _study_files(tmp_path, n_trials=4, name="fails",
                     extra_launch=f'jobs.studyquad.fail_marker = "{tmp_path / "failed-once"}"')
    result = studies.run_study(f, verbose=False, plots=False)
    st = _load("fails")
    assert _states(st) == {"FAIL": 1, "COMPLETE": 4}
    failed = st.trials[0]
    assert failed.state.name == "FAIL"
    assert "RuntimeError: toy failure in the first trial" in failed.user_attrs["arforge.error"]
    assert result.n_failed == 1 and result.n_complete == 4
    _, runs = _mlflow_runs("fails")
    run = next(r for r in runs if r.info.run_name == "trial-0000")
    assert run.info.status == "FAILED" and run.data.tags["arforge.trial_state"] == "FAIL"
    assert "toy failure" in run.data.tags["arforge.error"]
    # The stored study remembers its space: a changed space must get its own name.
    f.write_text(f.read_text().replace("x/space.float.high = 3.0", "x/space.float.high = 4.0"))
    with pytest.raises(ConfigError, match=r"created with a different space .*study\.study_name"):
        studies.run_study(f, verbose=False, plots=False)


def test_objective_missing_stops_the_study_with_a_clear_error(tmp_path):
    seed_mlflow_store(_home())
    f = _study_files(tmp_path, n_trials=3, name="noobj", extra_study='study.objective = "fid"')
    with pytest.raises(ConfigError) as err:
        studies.run_study(f, verbose=False, plots=False)
    msg = str(err.value)
    assert "study.objective = 'fid'" in msg and "'loss'" in msg
    assert _states(_load("noobj")) == {"FAIL": 1}


def test_slot_accounting_counts_a_trial_between_heartbeat_failure_and_retry():
    import datetime

    import optuna
    from optuna.trial import TrialState, create_trial

    dist = optuna.distributions.FloatDistribution(0, 1)
    now = datetime.datetime.now()

    def t(number, state, user=None, system=None):
        tr = create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None,
                          params={"x": 0.5}, distributions={"x": dist}, user_attrs=user or {},
                          system_attrs=system or {})
        tr.number = number
        tr.datetime_complete = now if state == TrialState.FAIL else tr.datetime_complete
        return tr

    done = [t(0, TrialState.COMPLETE), t(1, TrialState.PRUNED)]
    stale = t(2, TrialState.FAIL)  # failed by heartbeat: no arforge.error
    assert studies.slots_used(done + [stale], max_retry=3) == 3
    retry = t(3, TrialState.WAITING, system={"failed_trial": 2, "retry_history": [2]})
    assert studies.slots_used(done + [stale, retry], max_retry=3) == 3
    assert studies.slots_used(done + [stale], max_retry=0) == 2  # no retry coming
    raised = t(2, TrialState.FAIL, user={"arforge.error": "RuntimeError: boom"})
    assert studies.slots_used(done + [raised], max_retry=3) == 2


# ----------------------------------------------------- concurrent workers
@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 for the session (skipped if not installed)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    bindir = next((Path(b) for b in bins if (Path(b) / "initdb").exists() and (Path(b) / "pg_ctl").exists()), None)
    if bindir is None and shutil.which("initdb") and shutil.which("pg_ctl"):
        bindir = Path(shutil.which("initdb")).resolve().parent
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql")
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary (arforge[postgres])")
    import psycopg2

    root = Path(tempfile.mkdtemp(prefix="arforge-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None or not shutil.which("runuser"):
            pytest.skip("running as root without a 'postgres'/'nobody' user and runuser to start PostgreSQL")
        shutil.chown(root, user=user)
        prefix = ["runuser", "-u", user, "--"]
    data, sock, log = root / "data", root / "sock", root / "server.log"
    subprocess.run(prefix + [str(bindir / "initdb"), "-D", str(data), "-U", "arforge", "--auth=trust",
                             "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    subprocess.run(prefix + ["mkdir", str(sock)], check=True)
    port = _free_port()
    start = subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                                     "-o", f"-h 127.0.0.1 -p {port} -k {sock} -F", "start"],
                           capture_output=True, text=True, timeout=120)
    if start.returncode != 0:
        text = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {start.stderr}\n{text[-2000:]}")
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="arforge", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE arforge_studies")
        conn.close()
        yield f"postgresql://arforge@127.0.0.1:{port}/arforge_studies"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    if not site.exists():
        make_plugin_dist(site, "toy-study-jobs", "0.1", "toy_study_jobs", TOY_SOURCE,
                         {"jobs.studyquad": "toy_study_jobs:studyquad"})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _start_worker(tmp_path: Path, study_file: Path, log_name: str, *args: str) -> subprocess.Popen:
    log = open(tmp_path / log_name, "w")
    cmd = [sys.executable, "-m", "arforge.cli", "study", str(study_file), "--no-plots", *args]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_worker_env(tmp_path), cwd=tmp_path)


def _poll(predicate, what: str, procs=(), timeout: float = 180.0, tmp_path: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                logs = "".join(f.read_text()[-3000:] for f in (tmp_path or Path(".")).glob("*.log"))
                raise AssertionError(f"a worker exited ({p.returncode}) while waiting for {what}:\n{logs}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _wait_ok(tmp_path: Path, procs, timeout: float = 240.0) -> None:
    for p in procs:
        p.wait(timeout=timeout)
    for p, log in zip(procs, sorted(tmp_path.glob("worker*.log"))):
        assert p.returncode == 0, log.read_text()[-4000:]


def _run_two_workers(tmp_path: Path, name: str, storage: str | None) -> None:
    n = 6
    home = tmp_path / "home"
    seed_mlflow_store(home)
    started, gate = tmp_path / "started", tmp_path / "gate"
    started.mkdir()
    f = _study_files(tmp_path, n_trials=n, name=name, sampler="tpe", extra_launch=f"""
        jobs.studyquad.started_dir = "{started}"
        jobs.studyquad.gate = "{gate}"
    """)
    args = ["--heartbeat", "1", "--grace", "30"] + (["--storage", storage] if storage else [])
    procs = [_start_worker(tmp_path, f, f"worker{i}.log", *args) for i in range(2)]
    try:
        # Both workers inside a trial before any trial may finish: they race for every slot left.
        _poll(lambda: len({p.name.split(".")[1] for p in started.iterdir()}) == 2, "both workers to start a trial",
              procs, tmp_path=tmp_path)
        gate.touch()
        _wait_ok(tmp_path, procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    st = _load(name, storage or f"sqlite:///{home / 'optuna.db'}")
    trials = st.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * n  # none lost, none extra
    assert sorted(t.number for t in trials) == list(range(n))
    assert len({t.user_attrs["arforge.worker"] for t in trials}) == 2
    assert len({tuple(sorted(t.params.items())) for t in trials}) == n  # different seeds per worker
    parents, runs = _mlflow_runs(name, home)
    assert len(parents) == 1
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(int(r.data.tags["arforge.trial_number"]) for r in nested) == list(range(n))
    assert len([r for r in nested if r.data.tags.get("arforge.best") == "true"]) == 1


def test_two_workers_share_a_sqlite_study_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("ARFORGE_HOME", str(tmp_path / "home"))
    _run_two_workers(tmp_path, "pair-sqlite", None)


@pytest.mark.postgres
def test_two_workers_share_a_postgres_study_exactly(tmp_path, monkeypatch, postgres_url):
    monkeypatch.setenv("ARFORGE_HOME", str(tmp_path / "home"))
    _run_two_workers(tmp_path, "pair-postgres", postgres_url)


def test_killed_workers_trial_is_failed_by_heartbeat_and_retried(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ARFORGE_HOME", str(home))
    seed_mlflow_store(home)
    started, fifo = tmp_path / "started", tmp_path / "hold.fifo"
    started.mkdir()
    os.mkfifo(fifo)
    f = _study_files(tmp_path, n_trials=3, name="killed", extra_launch=f'jobs.studyquad.started_dir = "{started}"')
    hb = ["--heartbeat", "1", "--grace", "2"]
    doomed = _start_worker(tmp_path, f, "worker0.log", *hb, "--bind", f'jobs.studyquad.hold = "{fifo}"')
    try:
        _poll(lambda: list(started.iterdir()), "the first worker to start its trial", [doomed], tmp_path=tmp_path)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(timeout=60)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    st = _load("killed")
    assert [t.state.name for t in st.get_trials()] == ["RUNNING"]
    victim_params = st.trials[0].params

    rescuer = _start_worker(tmp_path, f, "worker1.log", *hb)
    try:
        rescuer.wait(timeout=240)
    finally:
        if rescuer.poll() is None:
            rescuer.kill()
    assert rescuer.returncode == 0, (tmp_path / "worker1.log").read_text()[-4000:]

    st = _load("killed")
    trials = st.get_trials()
    assert trials[0].state.name == "FAIL" and not trials[0].user_attrs.get("arforge.error")
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state.name == "COMPLETE" and retry.params == victim_params
    assert retry.system_attrs["retry_history"] == [0]
    assert sum(t.state.name == "COMPLETE" for t in trials) == 3 and len(trials) == 4
    _, runs = _mlflow_runs("killed", home)
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["trial-0000"].info.status == "FAILED"  # the dead worker's run is closed, not left RUNNING
    assert by_name["trial-0000"].data.tags["arforge.trial_state"] == "FAIL"
    assert by_name[f"trial-{retry.number:04d}"].data.tags["arforge.retry_of"] == "0"
    assert "retry of trial 0" in (tmp_path / "worker1.log").read_text()


# --------------------------------------------------------------- examples
@pytest.mark.parametrize("name", ["iar2_cfg", "open_magvit2_cfg", "loss_weights"])
def test_example_studies_parse(name):
    cfg = studies.load_study_config(REPO / "experiments" / "studies" / f"{name}.gin")
    assert cfg.objective and cfg.space and cfg.launch_file.endswith(".gin")
    gin.clear_config()
