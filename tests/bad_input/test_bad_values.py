"""Bad values, labels and token ids, from a user's point of view (issue 16, classes 3 and 6).

Every case runs ``arforge run FILE.gin`` (in-process, output captured) on a tiny launch
file written here and expects: exit status 2, no traceback, one message that names the
file/binding at fault and what is allowed, and no checkpoint or other output left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from arforge import cli

pytestmark = pytest.mark.plumbing  # exit codes and messages; no floating-point result compared

EXPERIMENT = "bad_values"
NUM_CLASSES, VOCAB, GRID = 10, 64, 4  # the tiny AR model below: 10 classes, 64 ids, 4 x 4 tokens

TOKENIZER_JOB = """
include "base.gin"
include "tokenizers/tiny_vq.gin"
launch.job = @jobs.train_tokenizer
jobs.train_tokenizer.dataset = @datasets.digits()
datasets.digits.image_size = 8
jobs.train_tokenizer.steps = 2
jobs.train_tokenizer.batch_size = 4
jobs.train_tokenizer.log_checkpoint = False
"""

AR_JOB = f"""
include "base.gin"
include "models/tiny_llamagen.gin"
models.llamagen_gpt.vocab_size = {VOCAB}
models.llamagen_gpt.block_size = {GRID * GRID}
models.llamagen_gpt.num_classes = {NUM_CLASSES}
launch.job = @jobs.train_ar
jobs.train_ar.model = %MODEL
jobs.train_ar.dataset = @datasets.token_codes()
datasets.token_codes.root = "{{data}}/ok"
jobs.train_ar.steps = 2
jobs.train_ar.batch_size = 4
jobs.train_ar.log_checkpoint = False
"""

SAMPLE_JOB = f"""
include "base.gin"
include "models/tiny_llamagen.gin"
include "tokenizers/tiny_vq.gin"
models.llamagen_gpt.vocab_size = {VOCAB}
models.llamagen_gpt.block_size = {GRID * GRID}
models.llamagen_gpt.num_classes = {NUM_CLASSES}
launch.job = @jobs.sample
jobs.sample.model = %MODEL
jobs.sample.tokenizer = %TOKENIZER
jobs.sample.samples_per_class = 1
"""

EXTRACT_JOB = """
include "base.gin"
include "tokenizers/tiny_vq.gin"
launch.job = @jobs.extract_codes
jobs.extract_codes.tokenizer = %TOKENIZER
jobs.extract_codes.dataset = @datasets.digits()
jobs.extract_codes.image_size = 8
"""

FEATURES_JOB = """
include "base.gin"
launch.job = @jobs.train_feature_extractor
jobs.train_feature_extractor.dataset = @datasets.digits()
jobs.train_feature_extractor.val_dataset = @datasets.digits()
datasets.digits.image_size = 8
jobs.train_feature_extractor.image_size = 8
jobs.train_feature_extractor.steps = 2
"""

EVALUATE_JOB = """
include "base.gin"
launch.job = @jobs.evaluate_samples
jobs.evaluate_samples.samples = "samples.npz"
jobs.evaluate_samples.reference = "reference.npz"
jobs.evaluate_samples.evaluator = None
"""

PIPELINE_JOB = """
include "base.gin"
launch.job = @jobs.pipeline
"""


# ------------------------------------------------------------------- data
def _write_codes(root: Path, *, labels: np.ndarray, ids: np.ndarray | None = None, manifest_max: int | None = None):
    """A token-code folder of 8 images (1 view, 4 x 4 tokens); optionally tampered after writing."""
    from arforge.data.token_codes import TokenCodeWriter

    rng = np.random.default_rng(0)
    codes = rng.integers(0, VOCAB, size=(len(labels), 1, GRID * GRID, 1))
    writer = TokenCodeWriter(root, capacity=len(labels), n_aug=1, seq_len=GRID * GRID, codebook_sizes=(VOCAB,))
    writer.write(codes, np.zeros(len(labels), dtype=np.int64))
    writer.commit(grid=(GRID, GRID), augmentations=["center"], class_names=[str(c) for c in range(NUM_CLASSES)])
    # What a hand-edited, copied or concatenated folder looks like: the arrays say one thing and
    # the manifest (written from what the extraction saw) another.
    np.save(root / "labels.npy", labels.astype(np.int64))
    if ids is not None:
        arr = np.load(root / "codes.npy")
        arr.reshape(-1)[: len(ids)] = ids
        np.save(root / "codes.npy", arr)
    if manifest_max is not None:
        m = json.loads((root / "manifest.json").read_text())
        m["max_ids"] = [manifest_max]
        (root / "manifest.json").write_text(json.dumps(m))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codes")
    ok = np.arange(8) % NUM_CLASSES
    _write_codes(root / "ok", labels=ok)
    _write_codes(root / "null_label", labels=np.where(np.arange(8) == 5, NUM_CLASSES, ok))
    _write_codes(root / "big_label", labels=np.where(np.arange(8) == 3, NUM_CLASSES + 7, ok))
    _write_codes(root / "negative_label", labels=np.where(np.arange(8) == 1, -1, ok))
    _write_codes(root / "big_id", labels=ok, ids=np.array([VOCAB + 3]), manifest_max=VOCAB - 1)
    return root


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("arforge_home")


@pytest.fixture(autouse=True)
def _shared_home(home, monkeypatch):
    """One embedded MLflow store for the module (creating one costs a second per test)."""
    monkeypatch.setenv("ARFORGE_HOME", str(home))
    monkeypatch.delenv("ARFORGE_TRACEBACK", raising=False)


# ------------------------------------------------------------------ cases
# (id, launch file body, extra lines, what the message must name)
CASES = [
    # gin values reaching a job (class 6)
    ("steps_negative", TOKENIZER_JOB, "jobs.train_tokenizer.steps = -5",
     ["{file}: jobs.train_tokenizer.steps = -5", "positive integer"]),
    ("steps_zero", TOKENIZER_JOB, "jobs.train_tokenizer.steps = 0",
     ["{file}: jobs.train_tokenizer.steps = 0", "positive integer"]),
    ("steps_string", TOKENIZER_JOB, 'jobs.train_tokenizer.steps = "600"',
     ["{file}: jobs.train_tokenizer.steps = '600' (a string)", "positive integer"]),
    ("batch_size_float", TOKENIZER_JOB, "jobs.train_tokenizer.batch_size = 4.0",
     ["{file}: jobs.train_tokenizer.batch_size = 4.0", "write 4"]),
    ("lr_negative", TOKENIZER_JOB, "jobs.train_tokenizer.lr = -1e-3",
     ["{file}: jobs.train_tokenizer.lr = -0.001", "positive finite number"]),
    ("ar_batch_size_zero", AR_JOB, "jobs.train_ar.batch_size = 0",
     ["{file}: jobs.train_ar.batch_size = 0", "positive integer"]),
    ("ar_lr_string", AR_JOB, 'jobs.train_ar.lr = "1e-4"',
     ["{file}: jobs.train_ar.lr = '1e-4' (a string)", "positive finite number"]),
    ("ar_steps_negative", AR_JOB, "jobs.train_ar.steps = -5",
     ["{file}: jobs.train_ar.steps = -5", "positive integer"]),
    ("sample_batch_size_float", SAMPLE_JOB, "jobs.sample.batch_size = 2.5",
     ["{file}: jobs.sample.batch_size = 2.5", "positive integer"]),
    ("sample_batch_size_word", SAMPLE_JOB, 'jobs.sample.batch_size = "max"',
     ["{file}: jobs.sample.batch_size = 'max'", '"auto" (from free memory)']),
    ("sample_compile_unknown", SAMPLE_JOB, 'jobs.sample.compile = "fast"',
     ["{file}: jobs.sample.compile = 'fast'", "torch.compile backend", "list_backends"]),
    ("ar_compile_unknown", AR_JOB, 'jobs.train_ar.compile = "fast"',
     ["{file}: jobs.train_ar.compile = 'fast'", "torch.compile backend", "list_backends"]),
    ("ar_fused_adamw_string", AR_JOB, 'jobs.train_ar.fused_adamw = "yes"',
     ["{file}: jobs.train_ar.fused_adamw = 'yes' (a string)", "True or False"]),
    ("extract_image_size_string", EXTRACT_JOB, 'jobs.extract_codes.image_size = "8"',
     ["{file}: jobs.extract_codes.image_size = '8' (a string)", "positive integer"]),
    ("feature_steps_negative", FEATURES_JOB, "jobs.train_feature_extractor.steps = -1",
     ["{file}: jobs.train_feature_extractor.steps = -1", "positive integer"]),
    ("evaluate_fidelity_zero", EVALUATE_JOB, "jobs.evaluate_samples.fidelity_steps = [0, 100]",
     ["{file}: jobs.evaluate_samples.fidelity_steps = [0, 100]", "list of positive integers"]),
    ("pipeline_stages_string", PIPELINE_JOB, 'jobs.pipeline.stages = "1_tokenizer.gin"',
     ["{file}: jobs.pipeline.stages = '1_tokenizer.gin' (a string)", "non-empty list"]),
    # gin structure (class 6)
    ("undefined_macro", TOKENIZER_JOB, "jobs.train_tokenizer.steps = %STEPS",
     ["STEPS", "never defined", "{where}"]),
    ("job_written_as_call", TOKENIZER_JOB, "launch.job = @jobs.train_tokenizer()",
     ["@jobs.train_tokenizer()", "no parentheses", "{where}"]),
    # labels and token ids (class 3)
    ("label_equal_to_num_classes", AR_JOB, 'datasets.token_codes.root = "{data}/null_label"',
     ["{data}/null_label", "labels go up to 10", "0..9", "null class"]),
    ("label_above_num_classes", AR_JOB, 'datasets.token_codes.root = "{data}/big_label"',
     ["{data}/big_label", "labels go up to 17", "0..9"]),
    ("label_negative", AR_JOB, 'datasets.token_codes.root = "{data}/negative_label"',
     ["{data}/negative_label", "down to -1", "0..9"]),
    ("token_id_above_vocab", AR_JOB, 'datasets.token_codes.root = "{data}/big_id"',
     ["{data}/big_id/codes.npy", "ids up to 67", "vocabulary size is 64", "manifest.json records ids"]),
    ("image_labels_above_num_classes", AR_JOB,
     "jobs.train_ar.tokenizer = %TOKENIZER\ninclude \"tokenizers/tiny_vq.gin\"\n"
     "jobs.train_ar.dataset = @datasets.digits()\ndatasets.digits.image_size = 8\n"
     "models.llamagen_gpt.num_classes = 5",
     ["load_digits", "has 10 classes", "num_classes = 5", "null class"]),
    ("sample_num_classes_above_model", SAMPLE_JOB, "jobs.sample.num_classes = 11",
     ["{file}: jobs.sample.num_classes = 11", "10 classes", "null class"]),
]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def _error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("arforge: error:")]
    assert len(lines) == 1, text
    return lines[0]


def _outputs(home: Path, run_name: str) -> list[Path]:
    """What a refused run left in its output folder besides its run bookkeeping."""
    out = home / "outputs" / EXPERIMENT / run_name
    if not out.is_dir():
        return []
    return [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(("run.", ".")) and "lock" not in p.name]


@pytest.mark.parametrize("case_id, body, extra, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_refused_with_a_clear_message(case_id, body, extra, expected, tmp_path, data, home, capsys):
    launch_file = tmp_path / f"{case_id}.gin"
    text = (body.replace("{data}", str(data)) + f'launch.experiment = "{EXPERIMENT}"\nlaunch.run_name = "{case_id}"\n'
            + 'launch.device = "cpu"\n' + extra.format(data=data) + "\n")
    launch_file.write_text(text)
    bad_line = text.splitlines().index(extra.split("\n")[0].format(data=data)) + 1

    code, output = _run(["run", str(launch_file)], capsys)

    assert code == 2, output
    assert "Traceback" not in output
    message = _error_line(output)
    for part in expected:
        part = part.format(file=launch_file, where=f"{launch_file}:{bad_line}", data=data)
        assert part in message, (part, message)
    assert not _outputs(home, case_id), _outputs(home, case_id)  # no checkpoint, no codes, no samples


def test_bad_value_given_with_bind_names_the_bind(tmp_path, capsys):
    launch_file = tmp_path / "tok.gin"
    launch_file.write_text(TOKENIZER_JOB + f'launch.experiment = "{EXPERIMENT}"\nlaunch.run_name = "bind"\n')
    code, output = _run(["run", str(launch_file), "--bind", "launch.job = @jobs.train_tokenizer()"], capsys)
    assert code == 2 and "Traceback" not in output
    message = _error_line(output)
    assert "--bind 'launch.job = @jobs.train_tokenizer()'" in message and "no parentheses" in message


def test_include_cycle_names_the_files(tmp_path, capsys):
    (tmp_path / "a.gin").write_text('include "b.gin"\nlaunch.experiment = "x"\n')
    (tmp_path / "b.gin").write_text('launch.seed = 1\ninclude "a.gin"\n')
    code, output = _run(["run", str(tmp_path / "a.gin")], capsys)
    assert code == 2 and "Traceback" not in output and "RecursionError" not in output
    message = _error_line(output)
    assert f"{tmp_path / 'b.gin'}:2" in message and "include cycle: a.gin -> b.gin -> a.gin" in message


def test_includes_resolve_against_the_including_files_folder(tmp_path, capsys):
    """sub/inner.gin's `include "values.gin"` reads sub/values.gin, not the launch file's neighbour."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.gin").write_text('include "values.gin"\n')
    (tmp_path / "sub" / "values.gin").write_text("jobs.train_tokenizer.steps = -5\n")
    (tmp_path / "values.gin").write_text("jobs.train_tokenizer.steps = 3\n")  # must not be read
    launch_file = tmp_path / "run.gin"
    launch_file.write_text(TOKENIZER_JOB + 'include "sub/inner.gin"\n'
                           + f'launch.experiment = "{EXPERIMENT}"\nlaunch.run_name = "nested_include"\n'
                           + 'launch.device = "cpu"\n')
    code, output = _run(["run", str(launch_file)], capsys)
    assert code == 2 and "Traceback" not in output
    assert "jobs.train_tokenizer.steps = -5 is not allowed" in _error_line(output)


def test_an_unused_fragments_macro_is_not_an_error(tmp_path, capsys):
    """gin/ar/llamagen.gin binds jobs.train_ar.model = %MODEL; a tokenizer launch that includes it
    for its other settings never calls jobs.train_ar, so only its own bad value is reported."""
    launch_file = tmp_path / "tok.gin"
    launch_file.write_text(TOKENIZER_JOB + 'include "ar/llamagen.gin"\nlaunch.precision = "fp32"\n'
                           + f'launch.experiment = "{EXPERIMENT}"\nlaunch.run_name = "unused_macro"\n'
                           + 'launch.device = "cpu"\njobs.train_tokenizer.steps = 0\n')
    code, output = _run(["run", str(launch_file)], capsys)
    assert code == 2 and "Traceback" not in output
    message = _error_line(output)
    assert "jobs.train_tokenizer.steps = 0 is not allowed" in message and "MODEL" not in message


def test_the_model_names_a_bad_id_or_label_instead_of_an_index_error():
    """Data that bypasses the datasets' checks (a custom dataset, a notebook) still gets a clear error."""
    import torch

    from arforge.ar_model import TokenRangeError
    from arforge_plugins.models.ar_presets import llamagen_gpt

    model = llamagen_gpt("tiny", vocab_size=VOCAB, block_size=GRID * GRID, num_classes=NUM_CLASSES).eval()
    ids = torch.zeros(2, GRID * GRID, 1, dtype=torch.long)
    labels = torch.tensor([0, NUM_CLASSES])  # the null class is a valid model input (unconditional logits)
    model(ids, labels)
    ids[1, 5, 0] = VOCAB
    with pytest.raises(TokenRangeError, match=f"holds id {VOCAB}, outside the model's vocabulary 0..{VOCAB - 1}"):
        model(ids, labels)
    with pytest.raises(TokenRangeError, match=f"class label {NUM_CLASSES + 1} is outside 0..{NUM_CLASSES - 1}"):
        model(torch.zeros_like(ids), torch.tensor([0, NUM_CLASSES + 1]))
