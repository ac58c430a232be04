"""A CFG scale has one name: its gin binding (``guidance.cfg_linear.start``) is the Optuna
parameter, the MLflow param of the trial run that sampled with it, and the ``arforge compare``
column; the search range is logged once, on the study's parent run (docs/studies.md).

A tiny study of two trials over ``guidance.cfg_linear.start``, each trial a real ``jobs.sample``
launch of a tiny LlamaGen model and tokenizer (random weights, declared loaded by two test
loaders)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from arforge import registry as reg
from arforge import studies
from arforge.checkpoint import mark_loaded
from test_studies import _load, _mlflow_runs, seed_mlflow_store

pytestmark = pytest.mark.plumbing  # names and params, no floating-point result compared across kernels

NAME = "guidance.cfg_linear.start"


def names_tiny_model():
    """A tiny LlamaGen GPT (32 codes, 4x4 tokens, 2 classes), weights set here."""
    from arforge_plugins.models import ar_presets

    torch.manual_seed(0)
    model = ar_presets.llamagen_gpt("tiny", vocab_size=32, block_size=16, num_classes=2)
    mark_loaded(model, "random weights set by the test")
    return model


def names_tiny_tokenizer():
    """A tiny VQ tokenizer with the model's 32 codes."""
    from arforge_plugins.quantizers.vector_quantization import VectorQuantizer
    from arforge_plugins.tokenizers import llamagen_vq

    torch.manual_seed(0)
    tokenizer = llamagen_vq.llamagen_vq_tokenizer(preset="tiny", quantizer=VectorQuantizer(codebook_size=32, dim=8))
    mark_loaded(tokenizer, "random weights set by the test")
    return tokenizer


@pytest.fixture(autouse=True)
def _test_loaders():
    reg.registry().register("loaders", "names_tiny_model", names_tiny_model)
    reg.registry().register("loaders", "names_tiny_tokenizer", names_tiny_tokenizer)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_a_cfg_scale_has_one_name_in_gin_optuna_mlflow_and_compare(tmp_path, one_thread):
    import os

    from mlflow.tracking import MlflowClient

    seed_mlflow_store(Path(os.environ["ARFORGE_HOME"]))
    _write(tmp_path / "launch" / "sample.gin", """
        launch.experiment = "not-the-study"
        launch.job = @jobs.sample
        launch.device = "cpu"
        jobs.sample.model = @loaders.names_tiny_model()
        jobs.sample.tokenizer = @loaders.names_tiny_tokenizer()
        jobs.sample.guidance = @guidance.cfg_linear()
        guidance.cfg_linear.start = 1.0
        guidance.cfg_linear.end = 2.0
        jobs.sample.num_classes = 2
        jobs.sample.samples_per_class = 1
        jobs.sample.batch_size = 2
        jobs.sample.grid_samples = 1
        jobs.sample.progress = False
    """)
    study_file = _write(tmp_path / "studies" / "cfgnames.gin", f"""
        import arforge.studies

        study.launch_file = "../launch/sample.gin"
        study.objective = "images_per_s"
        study.direction = "maximize"
        study.n_trials = 2
        study.sampler = "random"
        study.seed = 0
        study.pruner = "none"
        study.space = {{"{NAME}": @space.float()}}
        space.float.low = 1.0
        space.float.high = 3.0
    """)
    result = studies.run_study(study_file, verbose=False, plots=False)
    assert result.n_complete == 2

    optuna_trials = _load("cfgnames").trials
    assert all(set(t.params) == {NAME} for t in optuna_trials)  # Optuna: the gin name

    parents, runs = _mlflow_runs("cfgnames")
    (parent,) = parents
    # The range once, on the parent run, under the same name; no searched value there.
    ranges = json.loads(Path(MlflowClient().download_artifacts(parent.info.run_id, "study_space.json")).read_text())
    assert list(ranges) == [NAME] and ranges[NAME]["range"] == "float(1.0, 3.0)"
    assert json.loads(parent.data.tags["arforge.space"]) == [NAME]
    assert not [k for k in parent.data.params if "cfg_linear" in k or k.startswith(("space.", "cfg."))]

    trials = [r for r in runs if r.data.tags.get("arforge.role") != "study"]
    assert len(trials) == 2
    for run in trials:
        params = run.data.params
        value = optuna_trials[int(run.data.tags["arforge.trial_number"])].params[NAME]
        # MLflow: the launch's record of the bindings its job used, the trial's bind and the sample
        # job's own log agree on one name and one text.
        assert float(params[NAME]) == value and params[NAME] == repr(value)
        assert [k for k in params if k.endswith("cfg_linear.start")] == [NAME]
        assert params["guidance.cfg_linear.end"] == "2.0" and params["jobs.sample.guidance"] == "@guidance.cfg_linear()"
        assert not [k for k in params if k.startswith(("cfg.", "trial.", "space.", "samplers."))], sorted(params)
        assert run.data.tags["sample.guidance"] == f"LinearCFG(start={value}, end=2.0)"  # a description, a tag

    comparison = studies.compare_runs("cfgnames", log_plot=False, plot=tmp_path / "cmp.png")
    assert comparison.columns == [NAME]  # arforge compare: the same name
    assert sorted(row["params"][NAME] for row in comparison.rows) == sorted(repr(t.params[NAME])
                                                                             for t in optuna_trials)
