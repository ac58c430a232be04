"""The Python API (arforge.load / generate / reconstruct) on a tiny trained quickstart run.

The run is made once per module: the quickstart pipeline's tokenizer, code extraction, AR and
sample stages at tests/tiny_launches/quickstart.py's sizes (about 8 s). The API is then driven
from a temporary working directory outside the repository, as a notebook would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO / "tests" / "fixtures" / "parity" / "llamagen"
plumbing = pytest.mark.plumbing  # these compare one process's computations with each other, not kernels
# tiny shapes: two OpenMP threads on a busy 2-core machine only add barrier stalls
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    """``$ARFORGE_HOME`` holding a finished quickstart pipeline run (stages 1, 2, 3 and 6)."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_launches.quickstart import TINY

    from arforge import launch

    home = tmp_path_factory.mktemp("api_home")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: one_thread (function scope) is not set up yet
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARFORGE_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        launch.run_file(REPO / "experiments/quickstart/pipeline.gin",
                        [*TINY, 'jobs.pipeline.only = ["1_tokenizer", "2_extract", "3_ar", "6_sample"]'])
    torch.set_num_threads(threads)
    return home


@pytest.fixture
def outside(tiny_home, tmp_path, monkeypatch):
    """A working directory outside the repository, with ARFORGE_HOME naming the tiny run's home."""
    cwd = tmp_path / "notebook"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("ARFORGE_HOME", str(tiny_home))
    return cwd


def _sample_npz_in_index_order(home: Path) -> tuple[np.ndarray, np.ndarray]:
    """The sample stage's images by sample index (the .npz stores them in a seeded permutation)."""
    data = np.load(home / "outputs/quickstart/pipeline/sample/samples.npz")
    perm = np.random.default_rng(0).permutation(len(data["arr_1"]))  # jobs.sample's seed 0: arr_0[j] = sample perm[j]
    images = np.empty_like(data["arr_0"])
    labels = np.empty_like(data["arr_1"])
    images[perm], labels[perm] = data["arr_0"], data["arr_1"]
    return images, labels


@plumbing
def test_api_from_a_folder_outside_the_repo(outside, tiny_home):
    """Acceptance (issue 19): load a tiny trained run, generate 2 images of given classes, reconstruct."""
    import torch

    import arforge

    assert not str(Path.cwd()).startswith(str(REPO))
    run = arforge.load("quickstart/pipeline", device="cpu")
    stages = tiny_home / "outputs/quickstart/pipeline"
    # The pipeline's sample stage: the model and tokenizer it sampled with, from the runs' own checkpoints.
    assert run.job == "sample" and run.run_dir == stages / "sample"
    assert run.checkpoints["model"].startswith(str(stages / "ar/checkpoints/step_00000003"))
    assert run.checkpoints["tokenizer"].startswith(str(stages / "tokenizer/checkpoints/step_00000003"))
    assert run.run_id == json.loads((stages / "sample/run.json").read_text())["run_id"]
    assert run.config["jobs.sample.samples_per_class"] == "2"

    samples = arforge.generate(run, classes=[3, 7], guidance=2.0, seed=0)
    assert samples.images.dtype == torch.uint8 and tuple(samples.images.shape) == (2, 16, 16, 3)
    assert samples.labels.tolist() == [3, 7] and "2.0" in samples.guidance
    again = run.generate(classes=[3, 7], guidance=2.0, seed=0)
    assert torch.equal(samples.images, again.images)  # seeded
    other = run.generate(classes=[3, 7], guidance=2.0, seed=1)
    assert not torch.equal(samples.images, other.images)

    recon = arforge.reconstruct(run, samples.images)
    assert tuple(recon.images.shape) == (2, 16, 16, 3) and recon.images.dtype == torch.uint8
    assert tuple(recon.ids.shape) == (2, 64, 1) and recon.grid_shape == (8, 8)
    assert 0 <= int(recon.ids.min()) and int(recon.ids.max()) < 256  # the 8-bit LFQ vocabulary
    assert torch.equal(recon.originals, samples.images)  # uint8 in, the same uint8 back as the originals
    assert recon.grid().size[1] > samples.grid().size[1]  # originals and reconstructions: two rows
    assert samples.pil()[0].size == (16, 16)


@plumbing
def test_generate_reproduces_the_sample_job(outside, tiny_home):
    """The loaded objects are the trained ones: the run's own guidance and seed give the sample
    stage's images, sample for sample (same per-sample streams, same batch)."""
    import arforge

    want, labels = _sample_npz_in_index_order(tiny_home)
    run = arforge.load(str(tiny_home / "outputs/quickstart/pipeline/sample"), device="cpu")
    assert type(run.guidance).__name__ == "LinearCFG"
    got = run.generate(classes=labels.tolist(), guidance="run", seed=0, batch_size=len(labels))
    assert np.array_equal(got.images.numpy(), want)


@plumbing
def test_every_way_of_naming_a_run(outside, tiny_home):
    import arforge

    stages = tiny_home / "outputs/quickstart/pipeline"
    run_id = json.loads((stages / "sample/run.json").read_text())["run_id"]
    assert arforge.load(run_id, device="cpu").run_dir == stages / "sample"  # an MLflow run id
    assert arforge.find_run_dir(str(stages / "ar/checkpoints/step_00000003")) == stages / "ar"

    ar = arforge.load("outputs:quickstart/pipeline/ar", device="cpu")  # an AR run: its codes name the tokenizer
    assert ar.job == "train_ar" and ar.guidance is None
    assert ar.checkpoints["model"].startswith(str(stages / "ar/checkpoints/step_00000003"))
    assert ar.checkpoints["tokenizer"].startswith(str(stages / "tokenizer/checkpoints/step_00000003"))
    assert len(ar.generate(classes=5, guidance=None)) == 1

    # A sample launch file: its checkpoint paths resolve under home=, from this working directory.
    launch_file = arforge.load(REPO / "experiments/quickstart/6_sample.gin", home=tiny_home, device="cpu", bind=[
        'AR_CHECKPOINT = "outputs:quickstart/pipeline/ar/checkpoints"',
        'TOKENIZER_CHECKPOINT = "outputs:quickstart/pipeline/tokenizer/checkpoints"'])
    assert launch_file.job == "sample" and launch_file.run_dir is None
    assert launch_file.checkpoints["model"].startswith(str(stages / "ar/checkpoints/step_00000003"))

    tok = arforge.load("quickstart/pipeline/tokenizer", device="cpu")
    assert tok.model is None and tok.job == "train_tokenizer"
    with pytest.raises(arforge.LoadError, match="holds no AR model"):
        tok.generate(classes=[1])
    assert tuple(tok.reconstruct(np.zeros((1, 16, 16, 3), np.uint8)).ids.shape) == (1, 64, 1)


@plumbing
def test_clear_errors(outside, tiny_home):
    import arforge

    with pytest.raises(arforge.LoadError) as err:
        arforge.load("quickstart/no_such_run")
    assert "quickstart/no_such_run" in str(err.value) and str(tiny_home / "outputs") in str(err.value)
    assert "ARFORGE_HOME" in str(err.value)
    (outside / "c2i_B_384.pt").write_bytes(b"")
    with pytest.raises(arforge.LoadError, match="official_sample.gin"):
        arforge.load("c2i_B_384.pt")
    with pytest.raises(arforge.LoadError, match="extract.*trains no model"):
        arforge.load("quickstart/pipeline/extract")
    run = arforge.load("quickstart/pipeline", device="cpu")
    with pytest.raises(arforge.LoadError, match=r"\[0, 10\)"):
        run.generate(classes=[10])
    with pytest.raises(arforge.LoadError, match="give a scale"):
        run.generate(classes=[1], guidance="cfg_linear")
    with pytest.raises(arforge.LoadError, match="multiple of 2"):
        run.reconstruct(np.zeros((1, 15, 15, 3), np.uint8))


def _run_notebook(path: Path) -> list[object]:
    """Execute a notebook's code cells in one namespace, as a kernel would (nbclient and a Jupyter
    kernel are not test dependencies); returns each cell's displayed value (its last expression)."""
    import ast

    namespace: dict[str, object] = {"__name__": "__main__"}
    shown = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        tree = ast.parse("".join(cell["source"]))
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, f"{path.name}", "exec"), namespace)  # noqa: S102  (the repo's own notebook)
        shown.append(eval(compile(ast.Expression(last.value), path.name, "eval"), namespace) if last else None)
    return shown


@plumbing
def test_quickstart_notebook_runs_outside_the_repo(outside):
    """docs/quickstart.ipynb: the quickstart's sample-and-look in under 10 lines of code."""
    notebook = REPO / "docs" / "quickstart.ipynb"
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    code = [line for c in cells for line in "".join(c["source"]).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert len(code) < 10, code
    assert all(not c["outputs"] for c in cells), "commit the notebook without outputs"
    samples, recon = _run_notebook(notebook)
    from PIL import Image

    import arforge

    assert isinstance(samples, arforge.Samples) and samples.labels.tolist() == [3] * 8
    assert isinstance(recon, arforge.Reconstruction) and len(recon.images) == 8
    import io

    grid = Image.open(io.BytesIO(samples._repr_png_()))  # what the notebook displays
    assert grid.size[0] > 8 * 16  # eight digits side by side, upscaled to be legible
    assert Image.open(io.BytesIO(recon._repr_png_())).size[1] > grid.size[1]  # two rows: originals, reconstructions


def test_official_checkpoints_load_through_their_loaders(tmp_path, monkeypatch):
    """A launch file naming loaders.official_* loads LlamaGen's release layout (the parity fixture
    files) and generates upstream's images (tests/test_parity.py's tolerance: 1 grey level)."""
    import torch
    from safetensors.torch import load_file

    import arforge

    monkeypatch.chdir(tmp_path)
    meta = json.loads((PARITY / "fixture.json").read_text())
    out = load_file(str(PARITY / "outputs.safetensors"))
    run = arforge.load(REPO / "experiments/llamagen/official_sample.gin", device="cpu", bind=[
        *meta["bindings"], f'AR_OFFICIAL = "{PARITY / "c2i_parity.pt"}"', f'VQ_OFFICIAL = "{PARITY / "vq_ds2_c2i.pt"}"'])
    assert run.job == "sample" and run.run_dir is None
    assert str(PARITY / "c2i_parity.pt") in run.checkpoints["model"]
    assert str(PARITY / "vq_ds2_c2i.pt") in run.checkpoints["tokenizer"]
    labels = out["sample.labels"].tolist()
    got = run.generate(classes=labels, guidance="run", top_k=1)  # top-1: the same tokens whatever the seed
    want = ((out["sample.images"].clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1)  # float NHWC in [0, 255]
    assert got.images.shape == want.shape
    assert (got.images.double() - want.double()).abs().max() <= 1.0


@plumbing
def test_import_arforge_is_cheap():
    """`import arforge` (the CLI imports it first) loads neither torch nor gin; the API names are lazy."""
    code = ("import sys, arforge; heavy = [m for m in ('torch', 'gin', 'mlflow') if m in sys.modules]; "
            "assert not heavy, heavy; assert callable(arforge.load) and 'load' in dir(arforge); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@plumbing
def test_load_in_a_fresh_process(outside, tiny_home):
    """A notebook's first call: nothing of arforge imported yet (this module's fixture has imported the
    launch layer, which registers the gin configurables every run.json binds)."""
    code = ("import arforge; run = arforge.load('quickstart/pipeline', device='cpu'); "
            "print(run.job, len(run.generate(classes=[1], guidance=None)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "sample 1", out.stderr[-2000:]


@plumbing
def test_runs_recorded_before_the_guidance_rename_still_load(outside, tiny_home, capsys):
    """Runs made when the guidance kind was called `samplers` (jobs.sample.sampler) load with their schedule,
    and a value recorded as null (gin could not write it as text) takes its default."""
    import shutil

    import arforge

    stages = tiny_home / "outputs/quickstart/pipeline"
    old = tiny_home / "outputs/legacy/sample"  # outside the pipeline, whose other tests load its newest sample stage
    shutil.copytree(stages / "sample", old)
    state = json.loads((old / "run.json").read_text())
    renamed = {}
    for key, value in state["bindings"].items():
        key = key.replace("guidance.", "samplers.").replace("jobs.sample.guidance", "jobs.sample.sampler")
        renamed[key] = value.replace("@guidance.", "@samplers.").replace("'pipeline:", "'outputs:quickstart/pipeline/")
    assert "jobs.sample.sampler" in renamed and "samplers.cfg_linear.end" in renamed
    renamed["samplers.cfg_linear.start"] = None
    (old / "run.json").write_text(json.dumps({**state, "bindings": renamed}))
    run = arforge.load("legacy/sample", device="cpu")
    assert type(run.guidance).__name__ == "LinearCFG" and "1.5" in repr(run.guidance)
    assert "records no gin text for guidance.cfg_linear.start" in capsys.readouterr().out
    assert run.checkpoints["model"].startswith(str(stages / "ar/checkpoints/step_00000003"))
