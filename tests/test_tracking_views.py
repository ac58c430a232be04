"""What MLflow shows of a tiny pipeline and a 2-trial CFG study, read back from the store
(docs/tracking.md#what-a-run-logs, docs/studies.md#trials-in-mlflow): one name per parameter
(the binding name, value resolved), only the bindings a run's job used, a top-level ``fid`` on
every run that evaluates and on each trial, a labelled sample grid per trial, the study's summary
table and its FID-against-CFG figure, and ``arforge compare`` writing nothing unless asked.

A pipeline samples from a tiny LlamaGen model and tokenizer (random weights, declared loaded by
test loaders) and evaluates FID on a tiny digits classifier (random weights) against random
reference images: the numbers mean nothing, their names and places are what is checked.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from arforge import registry as reg
from test_guidance_names import names_tiny_model, names_tiny_tokenizer
from test_studies import seed_mlflow_store

pytestmark = [pytest.mark.plumbing, pytest.mark.usefixtures("one_thread")]  # names and places, not values

NAME = "guidance.cfg_linear.start"
SIDE = 8  # the tiny VQ tokenizer's 4 x 4 tokens decode to 8 px


def views_tiny_model():
    """A tiny LlamaGen GPT (32 codes, 4x4 tokens, 2 classes), weights set here."""
    return names_tiny_model()


def views_tiny_tokenizer():
    """A tiny VQ tokenizer with the model's 32 codes."""
    return names_tiny_tokenizer()


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def _files(folder: Path) -> dict[str, Path]:
    from arforge_plugins.evaluators.digits_classifier import DigitsClassifier

    torch.manual_seed(0)
    net = DigitsClassifier(image_size=SIDE, width=4, feature_dim=8, num_classes=4)
    with torch.no_grad():  # the default init leaves the ReLU features ~0: a blind FID
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.3)
    extractor = net.save(folder / "feature_extractor.safetensors")
    rng = np.random.default_rng(2)
    np.savez(folder / "reference.npz", arr_0=rng.integers(0, 256, size=(6, SIDE, SIDE, 3), dtype=np.uint8),
             arr_1=np.arange(6, dtype=np.int64) % 2)
    _write(folder / "common.gin", f"""
        launch.experiment = "views"
        launch.device = "cpu"
        SAMPLES = "pipeline:sample/samples.npz"
        REFERENCE = "{folder / 'reference.npz'}"
    """)
    _write(folder / "sample.gin", """
        include "common.gin"
        launch.run_name = "sample"
        launch.job = @jobs.sample
        jobs.sample.model = @loaders.views_tiny_model()
        jobs.sample.tokenizer = @loaders.views_tiny_tokenizer()
        jobs.sample.guidance = @guidance.cfg_linear()
        guidance.cfg_linear.start = 1.0
        guidance.cfg_linear.end = 2.0
        jobs.sample.num_classes = 2
        jobs.sample.samples_per_class = 3
        jobs.sample.batch_size = 6
        jobs.sample.grid_samples = 3
        jobs.sample.output = %SAMPLES
        jobs.sample.progress = False
    """)
    _write(folder / "evaluate.gin", f"""
        include "common.gin"
        launch.run_name = "evaluate"
        launch.job = @jobs.evaluate_samples
        jobs.evaluate_samples.samples = %SAMPLES
        jobs.evaluate_samples.reference = %REFERENCE
        jobs.evaluate_samples.evaluator = @evaluators.generation()
        evaluators.generation.feature_extractor = @feature_extractors.digits_classifier()
        evaluators.generation.is_split_size = 6
        evaluators.generation.progress = False
        feature_extractors.digits_classifier.path = "{extractor}"
    """)
    pipeline = _write(folder / "pipeline.gin", """
        include "common.gin"
        launch.run_name = "pipeline"
        launch.job = @jobs.pipeline
        jobs.pipeline.stages = ["sample.gin", "evaluate.gin"]
    """)
    study = _write(folder / "cfg_study.gin", f"""
        import arforge.studies

        study.launch_file = "pipeline.gin"
        study.study_name = "views-cfg"
        study.objective = "fid"
        study.direction = "minimize"
        study.n_trials = 2
        study.sampler = "random"
        study.seed = 0
        study.pruner = "none"
        study.space = {{"{NAME}": @space.float()}}
        space.float.low = 1.0
        space.float.high = 3.0
    """)
    return {"pipeline": pipeline, "study": study}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One pipeline launch and one 2-trial study in a store of their own, read by every test."""
    from arforge import launch, studies

    folder = tmp_path_factory.mktemp("views")
    home = folder / "arforge_runs"
    seed_mlflow_store(home)
    reg.registry().register("loaders", "views_tiny_model", views_tiny_model)
    reg.registry().register("loaders", "views_tiny_tokenizer", views_tiny_tokenizer)
    files = _files(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARFORGE_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        launch.run_file(files["pipeline"], ["jobs.sample.temperature = 0.9"])
        pipeline_id = launch.last_run()[0]
        result = studies.run_study(files["study"], verbose=False, plots=True)
    import gin

    gin.clear_config()
    return {"home": home, "pipeline": pipeline_id, "study": result, "folder": folder}


def _client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store['home'] / 'mlflow.db'}")


def _children(client, run) -> dict[str, object]:
    found = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    return {r.info.run_name: r for r in found}


def test_params_are_resolved_bindings_of_the_stage_own_job(store):
    client = _client(store)
    pipeline = client.get_run(store["pipeline"])
    stages = _children(client, pipeline)
    sample, evaluate = stages["sample"].data.params, stages["evaluate"].data.params
    for params in (pipeline.data.params, sample, evaluate):
        # One name per parameter: the binding name, never gin.*, arforge.* or a macro's definition.
        assert not [k for k in params if k.startswith(("gin.", "arforge.")) or "gin.macro" in k], sorted(params)
        assert not [v for v in params.values() if v.startswith("%") or "pipeline:" in v], params
    # The binding handed to the pipeline lands on the stage that samples, and only there.
    assert sample["jobs.sample.temperature"] == "0.9"
    assert "jobs.sample.temperature" not in evaluate and "jobs.sample.temperature" not in pipeline.data.params
    # A macro resolved to its value, a pipeline: path to the pipeline's folder.
    out = store["home"] / "outputs" / "views" / "pipeline"
    assert sample["jobs.sample.output"] == repr(str(out / "sample" / "samples.npz"))
    assert evaluate["jobs.evaluate_samples.samples"] == sample["jobs.sample.output"]
    assert sample["jobs.sample.model"] == "@loaders.views_tiny_model()" and sample["launch.job"] == "@jobs.sample"
    assert "launch.run_name" not in sample  # the run's own name, not a param
    # Only the job's own: the evaluation stage never built the sampler's model (the guidance
    # settings it carries come with the samples, on purpose: FID beside what produced it).
    assert not [k for k in evaluate if k.startswith(("jobs.sample.model", "jobs.sample.batch", "loaders."))], \
        sorted(evaluate)
    assert not [k for k in sample if k.startswith(("jobs.evaluate_samples.", "evaluators."))], sorted(sample)


def test_every_run_that_evaluates_and_each_trial_has_a_top_level_fid(store):
    client = _client(store)
    pipeline = client.get_run(store["pipeline"])
    evaluate = _children(client, pipeline)["evaluate"]
    for key in ("fid", "is", "precision", "recall"):
        assert pipeline.data.metrics[key] == evaluate.data.metrics[key], key
    # fid first: MLflow's compare view preselects a run's first-logged metric (the stage times go last).
    history = {k: client.get_metric_history(pipeline.info.run_id, k)[0].timestamp for k in pipeline.data.metrics}
    assert min(history, key=lambda k: (history[k], k != "fid")) == "fid"
    exp = client.get_experiment_by_name("views-cfg")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("arforge.role") == "study"]
    trials = [r for r in runs if r.data.tags.get("arforge.role") == "trial"]
    assert len(trials) == 2
    for trial in trials:
        assert np.isfinite(trial.data.metrics["fid"]) and "is" in trial.data.metrics
        # The searched value: one param under its binding name, on the trial and on the stage that used it.
        assert [k for k in trial.data.params if k.endswith("cfg_linear.start")] == [NAME]
        stages = _children(client, trial)
        assert stages["sample"].data.params[NAME] == trial.data.params[NAME]
        assert "jobs.sample.temperature" not in trial.data.params  # the trial's pipeline job used none
    # Optuna names its objective (optuna-dashboard shows "fid", not "Objective 0").
    import optuna

    st = optuna.load_study(study_name="views-cfg", storage=f"sqlite:///{store['home'] / 'optuna.db'}")
    assert st.metric_names == ["fid"]
    assert store["study"].dashboard_command == f"optuna-dashboard sqlite:///{store['home'] / 'optuna.db'}"


def test_the_study_run_carries_its_summary_figure_and_one_labelled_grid_per_trial(store):
    from PIL import Image

    client = _client(store)
    exp = client.get_experiment_by_name("views-cfg")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`arforge.role` = 'study'")
    rid = parent.info.run_id
    table = Path(client.download_artifacts(rid, "summary/trials.csv", str(store["folder"] / "dl")))
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert [r["number"] for r in rows] == ["0", "1"] and {r["state"] for r in rows} == {"COMPLETE"}
    assert all(1.0 <= float(r[NAME]) <= 3.0 and float(r["fid"]) >= 0 for r in rows)
    markdown = Path(client.download_artifacts(rid, "summary/trials.md", str(store["folder"] / "dl"))).read_text()
    assert markdown.splitlines()[0] == f"| number | state | fid | {NAME} | seconds | run_id |"
    plots = {a.path for a in client.list_artifacts(rid, "plots")}
    assert "plots/fid_vs_params.png" in plots, plots
    grids = sorted(a.path for a in client.list_artifacts(rid, "trials"))
    assert grids == ["trials/trial-0000.png", "trials/trial-0001.png"]
    trial_grid = Image.open(client.download_artifacts(rid, grids[0], str(store["folder"] / "dl")))
    # The sample grid: 2 classes x 3 samples, a label strip left of the rows.
    pipeline = client.get_run(store["pipeline"])
    sample = _children(client, pipeline)["sample"]
    grid = Image.open(client.download_artifacts(sample.info.run_id, "samples/grid.png", str(store["folder"] / "g")))
    plain = 3 * 64 + 4 * 2  # three cells (8 px upscaled to 64) and their padding
    assert grid.width > plain + 20 and grid.height > 2 * 64 + 3 * 2  # the label strip and the title line
    strip = np.asarray(grid.convert("L"))[:, : grid.width - plain]
    assert (strip < 128).any()  # the labels are drawn there
    assert trial_grid.width >= grid.width and trial_grid.height > grid.height  # the caption above


def test_compare_writes_nothing_unless_asked_and_formats(store, capsys):
    from arforge import cli

    client = _client(store)
    exps = [client.get_experiment_by_name(n).experiment_id for n in ("views", "views-cfg")]

    def state():
        return {r.info.run_id: (r.info.status, sorted(a.path for a in client.list_artifacts(r.info.run_id)))
                for r in client.search_runs(exps)}

    before = state()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARFORGE_HOME", str(store["home"]))
        capsys.readouterr()
        assert cli.main(["compare", "views-cfg", "--format", "json"]) == 0
        records = json.loads(capsys.readouterr().out)
        assert cli.main(["compare", "views"]) == 0
        table = capsys.readouterr().out
    assert state() == before and not (store["home"] / "compare").exists()  # no run, artifact or file written
    # The study: its trials, by FID, each with its searched value and evaluation metrics.
    assert [r["status"] for r in records] == ["COMPLETE", "COMPLETE"]
    assert all(set(r["params"]) == {NAME} and r["is"] is not None for r in records)
    assert records[0]["fid"] <= records[1]["fid"]
    # Not a study: the pipeline run stands for its stages; metrics that exist, 4 significant digits.
    lines = table.splitlines()
    assert lines[0].split() == ["#", "run", "status", "fid", "is", "precision", "recall"], table
    assert len(lines) == 2 and lines[1].split()[1] == "pipeline"
    fid = client.get_run(store["pipeline"]).data.metrics["fid"]
    assert lines[1].split()[3] == f"{fid:.4g}"


def test_training_curves_are_one_picture(store):
    """A training run's curves, read back from its metric history, as one PNG with a panel per
    train/val metric (throughputs and one-point metrics left out)."""
    from PIL import Image

    from arforge import tracking

    client = _client(store)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARFORGE_HOME", str(store["home"]))
        tracking.configure()
        run_id = client.create_run(tracking.ensure_experiment("curves")).info.run_id
        tracker = tracking.MlflowTracker(run_id)
        for step in (10, 20, 30):
            tracker.log_metrics({"train/loss": 1.0 / step, "train/tokens_per_s": 5.0, "val/nll": 2.0 / step},
                                step=step)
        tracker.log_metrics({"model/params": 3.0}, step=0)
        tracker.log_curves()
    assert [a.path for a in client.list_artifacts(run_id, "curves")] == ["curves/training.png"]
    image = Image.open(client.download_artifacts(run_id, "curves/training.png", str(store["folder"] / "c")))
    assert image.width > 1.5 * image.height  # two panels side by side: train/loss and val/nll
