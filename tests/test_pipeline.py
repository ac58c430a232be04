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
