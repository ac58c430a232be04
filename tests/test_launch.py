"""Gin launches: file:line errors for user mistakes, and a real run read back from MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from arforge import launch
from arforge import registry as reg
from arforge.errors import ConfigError
from plugin_fixtures import TOY_JOB_SOURCE, make_plugin_dist

pytestmark = pytest.mark.plumbing  # no floating-point result compared across kernels


class ToySign:
    """A sign quantizer registered by the test."""

    def __init__(self, *, dim: int = 4, bits: int = 2):
        self.dim, self.bits = dim, bits


def toy_job(ctx, *, quantizer=None, steps: int = 2, width: int = None):
    """A job registered by the test: records what it was given."""
    for i in range(steps):
        ctx.tracker.log_metrics({"value": float(i)}, step=i)
    return {"quantizer": quantizer, "steps": steps, "width": width, "out": ctx.output_dir}


@pytest.fixture(autouse=True)
def _toys():
    r = reg.registry()
    r.register("quantizers", "toy_sign", ToySign)
    r.register("jobs", "toy_job", toy_job)


def _write(tmp_path: Path, text: str, name: str = "exp.gin") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip())
    return p


def test_unknown_plugin_name_gives_file_line_and_closest(tmp_path):
    f = _write(tmp_path, """
        launch.experiment = "t"
        launch.job = @jobs.toy_job
        jobs.toy_job.quantizer = @quantizers.toy_sgn()
    """)
    with pytest.raises(ConfigError) as err:
        launch.parse(f)
    msg = str(err.value)
    assert msg.startswith(f"{f}:3: unknown configurable 'quantizers.toy_sgn'.")
    assert "Did you mean quantizers.toy_sign?" in msg
    assert "Registered quantizers:" in msg and "toy_sign" in msg


def test_unknown_parameter_gives_file_line_and_closest(tmp_path):
    f = _write(tmp_path, """
        launch.experiment = "t"
        launch.job = @jobs.toy_job
        quantizers.toy_sign.bitz = 3
    """)
    with pytest.raises(ConfigError) as err:
        launch.parse(f)
    msg = str(err.value)
    assert msg.startswith(f"{f}:3: quantizers.toy_sign has no parameter 'bitz'.")
    assert "Did you mean quantizers.toy_sign.bits?" in msg


def test_syntax_error_gives_file_line(tmp_path):
    f = _write(tmp_path, """
        launch.experiment = "t"
        jobs.toy_job.steps = = 3
    """)
    with pytest.raises(ConfigError) as err:
        launch.parse(f)
    assert str(err.value).startswith(f"{f}:2: syntax error")


def test_unclosed_bracket_gives_file_and_line(tmp_path):
    f = _write(tmp_path, """
        launch.experiment = "t"
        jobs.toy_job.steps = (3
    """)
    with pytest.raises(ConfigError) as err:
        launch.parse(f)
    assert str(err.value).startswith(f"{f}:")
    assert "syntax error" in str(err.value)


def test_bad_binding_names_the_binding(tmp_path):
    f = _write(tmp_path, 'launch.experiment = "t"\nlaunch.job = @jobs.toy_job\n')
    with pytest.raises(ConfigError) as err:
        launch.parse(f, ["jobs.toy_job.stepz = 3"])
    assert "--bind 'jobs.toy_job.stepz = 3'" in str(err.value)
    assert "Did you mean jobs.toy_job.steps?" in str(err.value)


def test_missing_required_value_is_named(tmp_path):
    f = _write(tmp_path, "launch.job = @jobs.toy_job\n")
    with pytest.raises(ConfigError) as err:
        launch.run_file(f)
    msg = str(err.value)
    assert "missing required value" in msg and "launch.experiment" in msg
    assert str(f) in msg


def test_missing_include_is_named(tmp_path):
    f = _write(tmp_path, 'include "does_not_exist.gin"\nlaunch.experiment = "t"\n')
    with pytest.raises(ConfigError) as err:
        launch.parse(f)
    assert str(err.value).startswith(f"{f}:1:")
    assert "does_not_exist.gin" in str(err.value)


def test_include_resolves_against_file_folder_and_repo_gin(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub", "jobs.toy_job.steps = 4\n", "base.gin")
    f = _write(tmp_path / "sub", """
        include "base.gin"
        launch.experiment = "inc"
        launch.job = @jobs.toy_job
    """)
    result = launch.run_file(f)
    assert result["steps"] == 4


def test_cli_prints_short_error_without_traceback(tmp_path, capsys):
    from arforge.cli import main

    f = _write(tmp_path, """
        launch.experiment = "t"
        launch.job = @jobs.toy_jb
    """)
    assert main(["run", str(f)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"arforge: error: {f}:2: unknown configurable 'jobs.toy_jb'.")
    assert "Did you mean jobs.toy_job?" in err


def test_bindings_override_and_resume_reuses_run(tmp_path):
    f = _write(tmp_path, """
        launch.experiment = "bind"
        launch.job = @jobs.toy_job
        jobs.toy_job.steps = 2
    """)
    result = launch.run_file(f, ["jobs.toy_job.steps = 5", "jobs.toy_job.quantizer = @quantizers.toy_sign()"])
    assert result["steps"] == 5 and isinstance(result["quantizer"], ToySign)
    run_id, out = launch.last_run()
    assert (out / "run.json").is_file()
    # A finished run is not resumed: a new launch makes a new MLflow run.
    launch.run_file(f)
    assert launch.last_run()[0] != run_id


def test_each_launch_in_one_process_uses_its_own_home(tmp_path, monkeypatch):
    """A notebook launching twice with another ARFORGE_HOME: the second run lands in the second store.

    MLflow exports the URI it is given to MLFLOW_TRACKING_URI; had arforge left it there, the
    second launch would have taken it for the user's choice and written to the first home.
    """
    from mlflow.tracking import MlflowClient

    f = _write(tmp_path, """
        launch.experiment = "homes"
        launch.job = @jobs.toy_job
        jobs.toy_job.steps = 1
    """)
    for name in ("first", "second"):
        monkeypatch.setenv("ARFORGE_HOME", str(tmp_path / name))
        launch.run_file(f)
        assert "MLFLOW_TRACKING_URI" not in os.environ
    for name in ("first", "second"):
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("homes").experiment_id])
        assert len(runs) == 1, name
    assert "ARFORGE_EXPERIMENT" not in os.environ  # nor does the experiment's folder leak into later launches


def test_arforge_run_logs_params_config_tags_metrics(tmp_path):
    """End to end through the real CLI and a third-party entry point, read back with mlflow."""
    site = make_plugin_dist(tmp_path / "site", "toy-jobs", "0.3", "toy_jobs_mod", TOY_JOB_SOURCE,
                            {"jobs.toy_fit": "toy_jobs_mod:toy_fit"})
    f = _write(tmp_path, """
        launch.experiment = "toy-experiment"
        launch.run_name = "fit"
        launch.job = @jobs.toy_fit
        launch.device = "cpu"
        jobs.toy_fit.steps = 6
        jobs.toy_fit.lr = 0.05
    """)
    home = tmp_path / "home"
    env = dict(os.environ, ARFORGE_HOME=str(home),
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", "arforge.cli", "run", str(f), "--bind", "jobs.toy_fit.width = 4"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]

    import mlflow

    # A client of its own: mlflow.set_tracking_uri would also export MLFLOW_TRACKING_URI and
    # send every later launch in this worker (a module fixture set up before the next test's
    # clean environment) to this test's store.
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("toy-experiment")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "fit"
    params = run.data.params
    # One name per binding, as a gin file writes it; only the bindings the job used.
    assert params["jobs.toy_fit.steps"] == "6"
    assert params["jobs.toy_fit.lr"] == "0.05"
    assert params["jobs.toy_fit.width"] == "4"
    assert params["launch.device"] == "'cpu'"
    # The run's name and experiment are MLflow's own, not params.
    assert "launch.experiment" not in params and "launch.run_name" not in params
    assert not [k for k in params if k.startswith(("gin.", "arforge."))], sorted(params)
    tags = run.data.tags
    for key in ("git.commit", "git.dirty", "torch.version", "arforge.device", "arforge.plugins"):
        assert key in tags, key
    assert tags["arforge.device"] == "cpu"
    assert "toy-jobs==0.3" in tags["arforge.plugins"]
    assert run.data.metrics["loss"] < 30
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(6))
    assert history[-1].value < history[0].value
    files = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert files == {"config/config.gin", "config/operative_config.gin"}
    operative = Path(client.download_artifacts(run.info.run_id, "config/operative_config.gin", str(tmp_path)))
    text = operative.read_text()
    assert "toy_fit.steps = 6" in text and "toy_fit.width = 4" in text
    # The artifacts live in the embedded store's folder.
    assert (home / "artifacts").is_dir() and (home / "mlflow.db").is_file()


def test_unreachable_tracking_server_fails_before_work(tmp_path, monkeypatch):
    from arforge import tracking

    calls = []

    def job(ctx):
        calls.append(1)

    reg.registry().register("jobs", "must_not_run", job)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    f = _write(tmp_path, 'launch.experiment = "x"\nlaunch.job = @jobs.must_not_run\n')
    with pytest.raises(tracking.TrackingError, match="unreachable"):
        launch.run_file(f)
    assert calls == []


def test_killed_launch_resumes_same_run_and_finished_one_starts_clean(tmp_path):
    attempts = []

    def flaky(ctx):
        """Dies on its first attempt after writing progress; finishes on the next."""
        marker = ctx.output_dir / "progress.txt"
        attempts.append((ctx.resume, marker.exists()))
        marker.write_text("half done")
        if len(attempts) == 1:
            raise RuntimeError("killed")
        return "done"

    reg.registry().register("jobs", "flaky", flaky)
    f = _write(tmp_path, 'launch.experiment = "res"\nlaunch.job = @jobs.flaky\n')
    with pytest.raises(RuntimeError, match="killed"):
        launch.run_file(f)
    first_id, out = launch.last_run()
    assert launch.run_file(f) == "done"
    assert launch.last_run()[0] == first_id  # the same MLflow run continues
    assert attempts[1] == (True, True)  # and it sees its earlier outputs
    launch.run_file(f)  # the run is finished: a new one starts with a clean folder
    assert launch.last_run()[0] != first_id
    assert attempts[2] == (False, False)
    assert (out.parent / f"{out.name}-{first_id[:8]}" / "progress.txt").is_file()
