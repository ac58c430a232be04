"""Screenshots of what a researcher looks at in MLflow, for docs/images/ (docs/tracking.md#screenshots).

    python tools/screenshots.py                       # a tiny demo study, made here (~30 s on 2 cores)
    python tools/screenshots.py --home arforge_runs --experiment quickstart-cfg   # a real study

Starts ``arforge ui`` on a free port against a store holding a study, and saves with headless
Chromium (``apt-get install chromium``; no Python browser driver needed):

- ``mlflow_compare_study.png``: MLflow's compare view of the study's trials, whose scatter plot
  shows ``fid`` against the first searched parameter (trials log both under those names);
- ``mlflow_study_run.png``: the study run's artifacts, opened on its FID-against-CFG figure;
- ``sample_grid.png``: a trial's labelled sample grid as MLflow shows it, and
  ``sample_grid_artifact.png``, the PNG itself.

Without ``--home`` the study is a demo made in a temporary folder: a tiny LlamaGen model and
tokenizer with random weights (the samples are noise; what matters is where things are shown),
sampled with ``guidance.cfg_linear`` at 4 start scales and evaluated by a tiny digits classifier.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIDE = 8  # the tiny VQ tokenizer's 4 x 4 tokens decode to 8 px


def _demo_model():
    import torch

    from arforge.checkpoint import mark_loaded
    from arforge_plugins.models import ar_presets

    torch.manual_seed(0)
    model = ar_presets.llamagen_gpt("tiny", vocab_size=32, block_size=16, num_classes=2)
    with torch.no_grad():  # LlamaGen zero-initialises its output layer: guidance would change nothing
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
    mark_loaded(model, "random weights set by tools/screenshots.py")
    return model


def _demo_tokenizer():
    import torch

    from arforge.checkpoint import mark_loaded
    from arforge_plugins.quantizers.vector_quantization import VectorQuantizer
    from arforge_plugins.tokenizers import llamagen_vq

    torch.manual_seed(0)
    tokenizer = llamagen_vq.llamagen_vq_tokenizer(preset="tiny", quantizer=VectorQuantizer(codebook_size=32, dim=8))
    mark_loaded(tokenizer, "random weights set by tools/screenshots.py")
    return tokenizer


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def make_demo_study(folder: Path) -> str:
    """A 4-trial CFG study over a sample-and-evaluate pipeline in ``folder``; its experiment name."""
    import numpy as np
    import torch

    from arforge import registry as reg
    from arforge import studies
    from arforge_plugins.evaluators.digits_classifier import DigitsClassifier

    reg.registry().register("loaders", "screenshots_model", _demo_model)
    reg.registry().register("loaders", "screenshots_tokenizer", _demo_tokenizer)
    torch.manual_seed(0)
    net = DigitsClassifier(image_size=SIDE, width=4, feature_dim=8, num_classes=4)
    with torch.no_grad():
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.3)
    extractor = net.save(folder / "feature_extractor.safetensors")
    rng = np.random.default_rng(2)
    np.savez(folder / "reference.npz", arr_0=rng.integers(0, 256, size=(16, SIDE, SIDE, 3), dtype=np.uint8),
             arr_1=np.arange(16, dtype=np.int64) % 2)
    _write(folder / "sample.gin", """
        launch.experiment = "demo"
        launch.device = "cpu"
        launch.run_name = "sample"
        launch.job = @jobs.sample
        jobs.sample.model = @loaders.screenshots_model()
        jobs.sample.tokenizer = @loaders.screenshots_tokenizer()
        jobs.sample.guidance = @guidance.cfg_linear()
        guidance.cfg_linear.start = 1.0
        guidance.cfg_linear.end = 2.0
        jobs.sample.num_classes = 2
        jobs.sample.samples_per_class = 8
        jobs.sample.batch_size = 16
        jobs.sample.grid_samples = 8
        jobs.sample.output = "pipeline:sample/samples.npz"
        jobs.sample.progress = False
    """)
    _write(folder / "evaluate.gin", f"""
        launch.experiment = "demo"
        launch.device = "cpu"
        launch.run_name = "evaluate"
        launch.job = @jobs.evaluate_samples
        jobs.evaluate_samples.samples = "pipeline:sample/samples.npz"
        jobs.evaluate_samples.reference = "{folder / 'reference.npz'}"
        jobs.evaluate_samples.evaluator = @evaluators.generation()
        evaluators.generation.feature_extractor = @feature_extractors.digits_classifier()
        evaluators.generation.is_split_size = 16
        evaluators.generation.progress = False
        feature_extractors.digits_classifier.path = "{extractor}"
    """)
    _write(folder / "pipeline.gin", """
        launch.experiment = "demo"
        launch.device = "cpu"
        launch.run_name = "pipeline"
        launch.job = @jobs.pipeline
        jobs.pipeline.stages = ["sample.gin", "evaluate.gin"]
    """)
    study = _write(folder / "cfg_study.gin", """
        import arforge.studies

        study.launch_file = "pipeline.gin"
        study.study_name = "demo-cfg"
        study.objective = "fid"
        study.direction = "minimize"
        study.n_trials = 4
        study.sampler = "grid"
        study.pruner = "none"
        study.space = {"guidance.cfg_linear.start": @space.categorical()}
        space.categorical.choices = [1.0, 2.0, 4.0, 8.0]
    """)
    studies.run_study(study, verbose=True, plots=True)
    return "demo-cfg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 400:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the MLflow UI did not answer at {url} within {timeout:.0f} s")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium found: install it (Debian: apt-get install chromium) or put it on PATH")


def screenshot(browser: str, url: str, out: Path, *, size: tuple[int, int] = (1600, 1100),
               wait_ms: int = 20000) -> None:
    """One page, rendered by headless Chromium; ``wait_ms`` of virtual time lets MLflow's
    JavaScript fetch the runs and draw its charts before the picture is taken."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed on {url}: {done.stderr[-2000:]}")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", help="an ARFORGE_HOME holding the study (default: a demo study made here)")
    p.add_argument("--experiment", help="the study's MLflow experiment (default: the demo's)")
    p.add_argument("--out", default=str(REPO / "docs" / "images"), help="where the PNGs go (default docs/images)")
    args = p.parse_args(argv)
    if bool(args.home) != bool(args.experiment):
        p.error("--home and --experiment go together")
    browser = chromium()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="arforge-screenshots-"))
    home = Path(args.home).resolve() if args.home else work / "arforge_runs"
    os.environ["ARFORGE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    experiment = args.experiment or make_demo_study(work)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in {home}")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("arforge.role") == "study"]
    trials = sorted((r for r in runs if r.data.tags.get("arforge.role") == "trial"),
                    key=lambda r: int(r.data.tags["arforge.trial_number"]))
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "arforge.cli", "ui", "--port", str(port)], env=dict(os.environ))
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(base + "/health")
        ids = urllib.parse.quote(json.dumps([r.info.run_id for r in trials]))
        view = "workflowType=machine_learning"  # MLflow 3's model-training view, as arforge ui's hint opens
        screenshot(browser, f"{base}/#/compare-runs?runs={ids}&experiments="
                            f"{urllib.parse.quote(json.dumps([exp.experiment_id]))}&{view}",
                   out / "mlflow_compare_study.png", size=(1600, 1500))
        figure = next((a.path for a in client.list_artifacts(parent.info.run_id, "plots")
                       if a.path.endswith("_vs_params.png")), "plots")
        screenshot(browser, f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts/"
                            f"{figure}?{view}", out / "mlflow_study_run.png")
        best = next((r for r in trials if r.data.tags.get("arforge.best") == "true"), trials[0])
        screenshot(browser, f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts/"
                            f"trials/trial-{int(best.data.tags['arforge.trial_number']):04d}.png?{view}",
                   out / "sample_grid.png")
        grid = client.download_artifacts(parent.info.run_id,
                                         f"trials/trial-{int(best.data.tags['arforge.trial_number']):04d}.png",
                                         str(work))
        shutil.copy(grid, out / "sample_grid_artifact.png")
        print(f"wrote {out / 'sample_grid_artifact.png'}")
    finally:
        ui.send_signal(signal.SIGTERM)  # arforge ui stops its MLflow server with it
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ui.kill()
        if not args.home:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
