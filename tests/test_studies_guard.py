"""`arforge study` refuses a search space naming a parameter its launch never reads
(arforge.studies.usage): before any trial, with one line naming the parameter and the launch file."""

from __future__ import annotations

import glob
from pathlib import Path

import gin
import pytest

from arforge import registry as reg
from arforge import studies
from arforge.errors import ConfigError
from arforge.studies import usage
from test_studies import REPO, _home, _study_files, _write, seed_mlflow_store, studyquad

pytestmark = pytest.mark.plumbing  # configuration only: nothing numeric


@pytest.fixture(autouse=True)
def _toy_job():
    reg.registry().register("jobs", "studyquad", studyquad)


def test_unused_searched_parameter_is_refused_before_any_trial(tmp_path):
    seed_mlflow_store(_home())
    f = _study_files(tmp_path, n_trials=2, name="dead", extra_study="""
        e/space.float.low = 0.01
        e/space.float.high = 0.5
    """)
    # quantizers.lfq is a registered configurable, so gin parses the binding; the toy launch never builds one.
    f.write_text(f.read_text().replace('"jobs.studyquad.y": @y/space.float(),',
                                       '"jobs.studyquad.y": @y/space.float(),\n'
                                       '    "quantizers.lfq.entropy_weight": @e/space.float(),'))
    with pytest.raises(ConfigError) as err:
        studies.run_study(f, verbose=False, plots=False)
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{f}: study.space searches quantizers.lfq.entropy_weight, ")
    assert "quad.gin never calls quantizers.lfq" in msg and "jobs.studyquad.x" not in msg
    # Refused before the study existed: no Optuna storage (so no trial), no MLflow run of any kind.
    assert not (_home() / "optuna.db").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{_home() / 'mlflow.db'}")
    assert client.get_experiment_by_name("dead") is None
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def _files(tmp_path: Path) -> Path:
    """A pipeline of two toy stages: the second reaches an LFQ quantizer through a macro and a
    scoped reference, the first through nothing."""
    _write(tmp_path / "a.gin", """
        launch.experiment = "x"
        launch.job = @jobs.studyquad
    """)
    _write(tmp_path / "b.gin", """
        launch.experiment = "x"
        launch.job = @jobs.studyquad
        Q = @inner/quantizers.lfq()
        jobs.studyquad.gate = %Q
        jobs.studyquad.hold = @space.int()
    """)
    return _write(tmp_path / "pipe.gin", """
        launch.experiment = "x"
        launch.job = @jobs.pipeline
        jobs.pipeline.stages = ["a.gin", "b.gin"]
        jobs.pipeline.bindings = ["jobs.studyquad.fail_marker = @space.categorical()"]
    """)


def test_reachability_follows_scopes_macros_and_pipeline_stages(tmp_path):
    pipe = _files(tmp_path)
    calls = usage.launch_calls(pipe)
    live = ["jobs.studyquad.x", "quantizers.lfq.entropy_weight", "inner/quantizers.lfq.entropy_weight",
            "space.int.low", "space.categorical.choices", "jobs.pipeline.only"]
    assert usage.unused(live, calls) == []
    # gin applies scope 'other' only inside calls made in that scope; nothing builds a semantic-detail quantizer.
    dead = ["other/quantizers.lfq.bits", "quantizers.semantic_detail.semantic_codebook_size", "space.float.low",
            "inner/other/quantizers.lfq.bits"]
    assert usage.unused(dead, calls) == dead
    # A stage the pipeline skips (jobs.pipeline.only) is not run, so it reads nothing.
    assert usage.unused(["quantizers.lfq.entropy_weight"],
                        usage.launch_calls(pipe, ['jobs.pipeline.only = ["a"]'])) == ["quantizers.lfq.entropy_weight"]
    # A trial's binding reaches the stages (the pipeline forwards it) and can make a parameter live.
    a_only = usage.launch_calls(tmp_path / "a.gin", ["jobs.studyquad.gate = @quantizers.lfq()"])
    assert usage.unused(["quantizers.lfq.bits"], a_only) == []
    assert gin.config_str().strip() == ""  # leaves gin's state as it found it: cleared


def test_every_shipped_study_searches_live_parameters():
    files = [Path(p) for p in sorted(glob.glob(str(REPO / "experiments" / "**" / "*.gin"), recursive=True))
             if "study.launch_file" in Path(p).read_text()]
    assert len(files) >= 7
    for f in files:
        runner = studies.StudyRunner(f, verbose=False)
        runner.validate_launch()  # raises ConfigError naming a dead parameter
        gin.clear_config()
