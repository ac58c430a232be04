"""Every loader marks the module it filled, and ``jobs.sample`` refuses a module no loader filled.

The bug this guards against: gin builds a new object every time a reference is used, so a launch
that bound ``%TOKENIZER`` both as a loader's ``module`` and as ``jobs.sample.tokenizer`` loaded the
official weights into one tokenizer and decoded with another, randomly initialised one, without
an error (``experiments/open_magvit2/official_sample.gin`` did).
"""

from __future__ import annotations

from pathlib import Path

import gin
import pytest
import torch

from arforge import launch
from arforge.checkpoint import CheckpointError, loaded_from, mark_loaded, restore, save_checkpoint
from arforge.data.extraction import local_context
from arforge.sampling_job import load_module_weights, sample_images

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_SAMPLE = REPO / "experiments/open_magvit2/official_sample.gin"
BITS, SPLIT = 4, (2, 2)
TINY = {"ch": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "z_channels": BITS, "num_groups": 4}
# official_sample.gin at a test size: 8 px images, a 4 x 4 grid, 2 classes.
GIN_TINY = ['models.open_magvit2_ar.size = "tiny"', f"models.open_magvit2_ar.factorized_bits = {SPLIT}",
            "models.open_magvit2_ar.block_size = 16", "models.open_magvit2_ar.num_classes = 2",
            f"tokenizers.open_magvit2.preset = {TINY}", f"quantizers.lfq.bits = {BITS}"]

pytestmark = [pytest.mark.plumbing, pytest.mark.usefixtures("one_thread")]  # loads copy weights exactly


def _pair(seed: int):
    from arforge_plugins.models.ar_presets import open_magvit2_ar
    from arforge_plugins.quantizers.lookup_free_quantization import LookupFreeQuantizer
    from arforge_plugins.tokenizers.open_magvit2_tokenizer import open_magvit2_tokenizer

    torch.manual_seed(seed)
    model = open_magvit2_ar("tiny", factorized_bits=SPLIT, block_size=16, num_classes=2)
    tokenizer = open_magvit2_tokenizer(quantizer=LookupFreeQuantizer(bits=BITS), preset=TINY)
    return model.eval(), tokenizer.eval()


def _official_ar_file(path: Path, seed: int = 7) -> tuple[Path, dict, dict]:
    """An ``AR_256_*.ckpt`` in the Lightning layout, transformer and ``first_stage_model.*``."""
    from arforge_plugins.loaders import ar_checkpoints, tokenizer_checkpoints

    model, tokenizer = _pair(seed)
    container = ar_checkpoints.export_open_magvit2_ar(
        model, tokenizer_state=tokenizer_checkpoints.export_open_magvit2_tokenizer(tokenizer, which="model"))
    torch.save({**container, "epoch": 3, "global_step": 1200}, path)
    return path, model.state_dict(), tokenizer.state_dict()


def _same(module: torch.nn.Module, state: dict) -> bool:
    return all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


def test_sample_refuses_a_tokenizer_or_model_no_loader_filled(tmp_path):
    model, tokenizer = _pair(0)
    mark_loaded(model, tmp_path / "ar_checkpoint")
    with pytest.raises(CheckpointError) as err:
        sample_images(local_context(tmp_path), model=model, tokenizer=tokenizer, samples_per_class=1,
                      num_classes=1, progress=False)
    msg = str(err.value)
    assert msg.startswith("jobs.sample.tokenizer:") and "VQTokenizer" in msg
    assert "jobs.sample.tokenizer_checkpoint" in msg and "%TOKENIZER" in msg and "loader call itself" in msg
    assert not (tmp_path / "samples.npz").exists()  # refused before any work

    fresh_model, _ = _pair(0)
    mark_loaded(tokenizer, tmp_path / "tokenizer_checkpoint")
    with pytest.raises(CheckpointError, match=r"^jobs\.sample\.model: the ARModel") as err:
        sample_images(local_context(tmp_path), model=fresh_model, tokenizer=tokenizer, samples_per_class=1,
                      num_classes=1, progress=False)
    assert "jobs.sample.untrained_model = True" in str(err.value)
    # The untrained baseline row of a results table asks for random weights on purpose.
    out = sample_images(local_context(tmp_path / "untrained"), model=fresh_model, tokenizer=tokenizer,
                        samples_per_class=1, num_classes=1, untrained_model=True, progress=False)
    assert out["num_samples"] == 1
    out = sample_images(local_context(tmp_path), model=model, tokenizer=tokenizer, samples_per_class=1,
                        num_classes=1, progress=False)
    assert out["num_samples"] == 1


def test_arforge_checkpoints_mark_what_they_fill(tmp_path):
    trained, _ = _pair(1)
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, 5, {"model": trained.state_dict()})
    model, other = _pair(2)
    assert loaded_from(model) is None
    restore(model, checkpoint=folder)  # loaders.arforge_checkpoint
    assert loaded_from(model) == str(folder / "step_00000005") == model.checkpoint_path
    assert _same(model, trained.state_dict()) and loaded_from(other) is None
    again, _ = _pair(3)
    load_module_weights(again, folder)  # jobs.sample.model_checkpoint
    assert loaded_from(again) == str(folder / "step_00000005")


def test_official_open_magvit2_loaders_each_fill_and_mark_their_own_module(tmp_path):
    from arforge_plugins.loaders.official_loaders import official_open_magvit2_ar, official_open_magvit2_tokenizer

    path, ar_state, tok_state = _official_ar_file(tmp_path / "AR_256_tiny.ckpt")
    model, tokenizer = _pair(0)
    assert official_open_magvit2_ar(module=model, checkpoint=path) is model
    assert _same(model, ar_state) and loaded_from(model) == str(path)
    assert loaded_from(tokenizer) is None  # the AR loader fills the transformer only
    assert official_open_magvit2_tokenizer(module=tokenizer, checkpoint=path, weights="model") is tokenizer
    assert _same(tokenizer, tok_state) and loaded_from(tokenizer) == str(path)
    assert len(tokenizer.checkpoint_sha256) == 64
    _, fresh = _pair(0)
    with pytest.raises(CheckpointError, match="no EMA weights"):  # never a silent fallback to raw weights
        official_open_magvit2_tokenizer(module=fresh, checkpoint=path)
    assert loaded_from(fresh) is None


def test_official_sample_gin_gives_the_job_the_tokenizer_its_loader_filled(tmp_path):
    """The launch's own bindings, evaluated as ``jobs.sample`` receives them: the tokenizer the job
    decodes with holds the file's ``first_stage_model.*`` weights (before the fix it was a second,
    fresh ``%TOKENIZER``)."""
    path, ar_state, tok_state = _official_ar_file(tmp_path / "AR_256_tiny.ckpt")
    launch.parse(OFFICIAL_SAMPLE, [*GIN_TINY, f'AR_OFFICIAL = "{path}"'])
    model = gin.query_parameter("jobs.sample.model").scoped_configurable_fn()
    tokenizer = gin.query_parameter("jobs.sample.tokenizer").scoped_configurable_fn()
    assert _same(model, ar_state) and loaded_from(model) == str(path)
    assert _same(tokenizer, tok_state) and loaded_from(tokenizer) == str(path)
