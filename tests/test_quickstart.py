"""The quickstart pipeline end to end at a tiny budget, through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "jobs.train_tokenizer.steps = 12", "jobs.train_tokenizer.eval_images = 32",
    "jobs.train_ar.steps = 12", "jobs.train_ar.warmup_steps = 2", "jobs.train_ar.log_every = 4",
    "jobs.train_feature_extractor.steps = 30",
    "jobs.sample.samples_per_class = 4", "jobs.sample.batch_size = 20",
    "jobs.evaluate_samples.fidelity_steps = (20, 40)", "evaluators.generation.is_split_size = 40",
]


def test_quickstart_pipeline_tiny_budget(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, ARFORGE_HOME=str(home))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "arforge.cli", "run", str(REPO / "experiments/quickstart/pipeline.gin")]
    for b in TINY:
        cmd += ["--bind", b]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]

    outputs = home / "outputs" / "quickstart" / "pipeline"
    assert (outputs / "tokenizer" / "checkpoints" / "latest").is_file()
    assert (outputs / "extract" / "codes" / "manifest.json").is_file()
    assert (outputs / "ar" / "checkpoints" / "latest").is_file()
    assert (outputs / "classifier" / "feature_extractor.safetensors").is_file()
    samples = np.load(outputs / "sample" / "samples.npz")
    assert samples["arr_0"].shape == (40, 16, 16, 3) and samples["arr_0"].dtype == np.uint8
    assert np.bincount(samples["arr_1"], minlength=10).tolist() == [4] * 10
    reference = np.load(outputs / "reference" / "val_digits.npz")
    assert reference["arr_0"].shape == (300, 16, 16, 3) and "mu" in reference

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    stages = ["tokenizer", "extract", "ar", "classifier", "reference", "sample", "evaluate"]
    assert set(by_name) == {"pipeline", *stages}
    parent = by_name["pipeline"].info.run_id
    for name in stages:
        run = by_name[name]
        assert run.info.status == "FINISHED", name
        assert run.data.tags["mlflow.parentRunId"] == parent, name
    assert {f"pipeline/{i}_{s}_seconds" for i, s in enumerate(["tokenizer", "extract", "ar", "classifier",
                                                              "reference", "sample", "evaluate"], 1)
            } <= set(by_name["pipeline"].data.metrics)
    assert "val/psnr" in by_name["tokenizer"].data.metrics
    assert "train/loss" in by_name["ar"].data.metrics
    assert by_name["classifier"].data.metrics["val/accuracy"] > 0.5
    # The FID run carries the sampler's settings next to its metrics (for arforge compare).
    assert by_name["evaluate"].data.params["sample.temperature"] == by_name["sample"].data.params["sample.temperature"]
    assert any(k.startswith("cfg.") for k in by_name["evaluate"].data.params)
    metrics = by_name["evaluate"].data.metrics
    for key in ("fid", "is", "precision", "recall"):
        assert np.isfinite(metrics[key]), key
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(by_name["evaluate"].info.run_id, "fid")
    assert {m.step for m in history} == {20, 40}  # FID on growing sample counts

    def artifacts(name, folder):
        return {a.path for a in client.list_artifacts(by_name[name].info.run_id, folder)}

    assert "reconstructions/final.png" in artifacts("tokenizer", "reconstructions")
    assert "samples/grid.png" in artifacts("sample", "samples")
