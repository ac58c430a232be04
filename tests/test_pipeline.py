"""``jobs.pipeline``: which of the pipeline launch's bindings reach its stages."""

from __future__ import annotations

import pytest

import textwrap

from arforge import launch
from arforge import registry as reg

pytestmark = pytest.mark.plumbing  # no floating-point result compared across kernels


def echo_stage(ctx, *, value: int = 0) -> dict:
    """A stage that returns what it was launched with."""
    return {"seed": ctx.seed, "device": str(ctx.device), "run_name": ctx.run_name, "value": value}


def test_pipeline_forwards_seed_device_and_job_bindings_but_not_run_names(tmp_path):
    reg.registry().register("jobs", "echo_stage", echo_stage)
    for name in ("a", "b"):
        (tmp_path / f"{name}.gin").write_text(textwrap.dedent(f"""
            launch.run_name = "{name}"
            launch.job = @jobs.echo_stage
            launch.seed = 0
            jobs.echo_stage.value = 1
        """))
    (tmp_path / "pipe.gin").write_text(textwrap.dedent("""
        launch.experiment = "pipe"
        launch.run_name = "pipeline"
        launch.job = @jobs.pipeline
        jobs.pipeline.stages = ["a.gin", "b.gin"]
    """))
    out = launch.run_file(tmp_path / "pipe.gin", ["launch.seed = 7", 'launch.device = "cpu"',
                                                  'launch.run_name = "renamed"', "jobs.echo_stage.value = 3"])
    assert out == {"a": {"seed": 7, "device": "cpu", "run_name": "a", "value": 3},
                   "b": {"seed": 7, "device": "cpu", "run_name": "b", "value": 3}}
    plain = launch.run_file(tmp_path / "pipe.gin", [])
    assert [plain[s]["seed"] for s in ("a", "b")] == [0, 0] and plain["a"]["value"] == 1


def test_stages_stay_in_the_pipeline_experiment_when_its_bindings_include_a_file_that_sets_one(tmp_path):
    """A study runs a variant's pipeline (``jobs.pipeline.bindings = ['include "iar2.gin"']``) in the
    study's experiment; the include's ``launch.experiment`` must not take the stage runs away from
    their trial run (MLflow shows nested runs only within one experiment)."""
    from mlflow.tracking import MlflowClient

    from arforge import tracking

    reg.registry().register("jobs", "echo_stage", echo_stage)
    (tmp_path / "variant.gin").write_text('launch.experiment = "variant"\njobs.echo_stage.value = 5\n')
    (tmp_path / "a.gin").write_text('launch.experiment = "base"\nlaunch.run_name = "a"\nlaunch.job = @jobs.echo_stage\n')
    (tmp_path / "pipe.gin").write_text(textwrap.dedent("""
        launch.experiment = "variant"
        launch.run_name = "pipeline"
        launch.job = @jobs.pipeline
        jobs.pipeline.stages = ["a.gin"]
        jobs.pipeline.bindings = ['include "variant.gin"']
    """))
    out = launch.run_file(tmp_path / "pipe.gin", ['arforge.launch.experiment = "study"'])
    assert out["a"]["value"] == 5  # the include still applies to the stage
    pipeline_id = launch.last_run()[0]
    client = MlflowClient(tracking.tracking_uri())
    study = client.get_experiment_by_name("study")
    stages = client.search_runs([study.experiment_id], f"tags.`mlflow.parentRunId` = '{pipeline_id}'")
    assert [r.info.run_name for r in stages] == ["a"]
    assert client.get_experiment_by_name("variant") is None
