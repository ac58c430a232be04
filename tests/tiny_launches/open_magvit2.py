"""``experiments/open_magvit2``: every stage at a tiny size, and what each must produce.

The paper sizes map to tiny ones by job kind, whatever the file:

* the 2^18-code LFQ tokenizer becomes an Open-MAGVIT2-layout tokenizer with ``BITS``-bit LFQ and
  4x downsampling (``TOKENIZER_PRESET``), trained at ``TRAIN_PX`` (the PatchGAN needs ~24 px to
  leave a patch) with the paper's full loss: L1 + LPIPS (a random VGG16 in torchvision's layout)
  + NS-GAN from step 0 + LeCAM, EMA on;
* every AR size (B, L, XL) becomes the ``tiny`` Open-MAGVIT2 AR over the ``SPLIT`` bit split of
  those ``BITS`` bits (asymmetric like the paper's [6, 12]) and the ``GRID`` x ``GRID`` grid of
  ``IMAGE_SIZE`` px images;
* sampling draws ``SAMPLES_PER_CLASS`` of each of ``CLASSES`` classes with the file's guidance.

Evaluation uses the small ``feature_extractors.digits_classifier`` (random weights, 8-d features)
instead of Inception, which on one core of this machine takes ~1 s to load and ~0.3 s per image
at 299 px (plus ~25 s per 2048 x 2048 ``sqrtm`` where the FID needs one): these files evaluate five
times, seven with the CFG study, within a ~30 s budget for the folder. The Inception port is
covered by ``tests/test_feature_extractors.py``; everything after the features (reference batch,
fidelity steps, IS, precision/recall, the sampler's settings on the FID run) is the real path.

The official ``AR_256_*.ckpt`` of ``official_sample.gin`` is written here in its Lightning layout
(``state_dict`` with ``transformer.*`` and ``first_stage_model.*``) from modules built by the file's
own presets with their own seed; the checks prove the images were decoded by *that* tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

import tiny_launches as tl
from tiny_launches import build as _build, file_value as _file_value, stage_files
from tiny_launches._imagenet import vgg16_features

CLASSES = 2
PER_CLASS = 2
SOURCE_SIZE = (40, 36)  # (width, height): not square, so Resize + RandomCrop and centre crops do work
TRAIN_PX = 32
IMAGE_SIZE = 16
DOWNSAMPLE = 4
GRID = IMAGE_SIZE // DOWNSAMPLE
BITS = 6
SPLIT = (2, 4)
CODEBOOK_SIZES = (2 ** BITS,)
TOKENIZER_PRESET = {"ch": 8, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "z_channels": BITS, "num_groups": 4}
TOKENIZER_STEPS = 2
AR_STEPS = 2
SAMPLES_PER_CLASS = 2
NUM_SAMPLES = CLASSES * SAMPLES_PER_CLASS
FIDELITY_STEPS = (2, NUM_SAMPLES)
REFERENCE_IMAGES = 6
OFFICIAL_SEED = 1234

TOKENIZER = [f"tokenizers.open_magvit2.preset = {TOKENIZER_PRESET}", f"quantizers.lfq.bits = {BITS}"]
MODEL = ['models.open_magvit2_ar.size = "tiny"', f"models.open_magvit2_ar.factorized_bits = {SPLIT}",
         f"models.open_magvit2_ar.block_size = {GRID * GRID}", f"models.open_magvit2_ar.num_classes = {CLASSES}"]


# ------------------------------------------------------------------------------------ data
def _image_folder(root: Path) -> Path:
    """ImageNet layout: ``root/<wnid>/<wnid>_<i>.PNG``, colour ramps plus noise (something to reconstruct)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = SOURCE_SIZE
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    for c in range(CLASSES):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            phase = rng.uniform(0, 2 * np.pi, size=3)
            base = 0.5 + 0.4 * np.sin(2 * np.pi * (xx[..., None] * (c + 1) + yy[..., None]) + phase)
            pixels = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
            Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"n{c:08d}_{i}.PNG")
    return root


def image_folder(world: tl.World) -> Path:
    return world.once("imagenet_train", _image_folder)


def _feature_extractor(folder: Path) -> Path:
    import torch

    from arforge_plugins.evaluators.digits_classifier import DigitsClassifier

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = DigitsClassifier(image_size=IMAGE_SIZE, width=4, feature_dim=8, num_classes=CLASSES)
        with torch.no_grad():  # the default init leaves the ReLU features ~0 for any image: a blind FID
            for p in net.parameters():
                torch.nn.init.normal_(p, std=0.3)
    return net.save(folder / "feature_extractor.safetensors")


def feature_extractor(world: tl.World) -> Path:
    return world.once("feature_extractor", _feature_extractor)


def _reference(folder: Path) -> Path:
    """An ADM-layout reference batch (``arr_0`` uint8 NHWC, ``arr_1`` labels); its statistics are
    computed from the images, as for a reference made without a feature extractor."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    np.savez(folder / "VIRTUAL_imagenet16_labeled.npz",
             arr_0=rng.integers(0, 256, size=(REFERENCE_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
             arr_1=np.arange(REFERENCE_IMAGES, dtype=np.int64) % CLASSES)
    return folder / "VIRTUAL_imagenet16_labeled.npz"


def reference_batch(world: tl.World) -> Path:
    return world.once("reference", _reference)


def _official(lf: tl.LaunchFile, folder: Path) -> dict[str, Any]:
    """``AR_256_tiny.ckpt`` as the Open-MAGVIT2 release stores it, from the launch file's own presets."""
    import gin
    import torch

    from arforge import launch
    from arforge_plugins.loaders import ar_checkpoints, tokenizer_checkpoints

    launch.parse(lf.path, TOKENIZER + MODEL)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(OFFICIAL_SEED)
            model = gin.query_parameter("%MODEL").scoped_configurable_fn()
            tokenizer = gin.query_parameter("%TOKENIZER").scoped_configurable_fn()
    finally:
        gin.clear_config()
    container = ar_checkpoints.export_open_magvit2_ar(
        model, tokenizer_state=tokenizer_checkpoints.export_open_magvit2_tokenizer(tokenizer, which="model"))
    folder.mkdir(parents=True)
    path = folder / "AR_256_tiny.ckpt"
    torch.save({**container, "epoch": 299, "global_step": 500700, "pytorch-lightning_version": "2.1.0"}, path)
    return {"path": path, "model": model.state_dict(), "tokenizer": tokenizer.state_dict()}


def official(lf: tl.LaunchFile, world: tl.World) -> dict[str, Any] | None:
    """The official file, for a launch (or a pipeline) with a stage that reads ``AR_OFFICIAL``."""
    for stage in stage_files(lf):
        if "AR_OFFICIAL" in tl.flat_bindings(stage.path):
            return world.once("official_open_magvit2", lambda folder: _official(stage, folder))
    return None


# -------------------------------------------------------------------------------- bindings
def _job_bindings(world: tl.World) -> dict[str, list[str]]:
    """The tiny overrides of each job kind. ``launch.precision`` stays the files' bf16 (autocast runs
    on the CPU)."""
    return {
        "jobs.train_tokenizer": TOKENIZER + [
            f"datasets.image_folder.image_size = {TRAIN_PX}",
            f"jobs.train_tokenizer.steps = {TOKENIZER_STEPS}",
            "jobs.train_tokenizer.batch_size = 2",
            "jobs.train_tokenizer.num_workers = 0",
            "losses.tokenizer_loss.discriminator = @losses.patchgan()",
            'losses.patchgan.preset = "tiny"',
            f'losses.tokenizer_loss.lpips_backbone_path = "{vgg16_features(world)}"',
            "losses.tokenizer_loss.lpips_verify_hash = False",
        ],
        "jobs.extract_codes": TOKENIZER + ["jobs.extract_codes.batch_size = 4", "jobs.extract_codes.num_workers = 0"],
        "jobs.train_ar": TOKENIZER + MODEL + [
            f"jobs.train_ar.steps = {AR_STEPS}",
            "jobs.train_ar.warmup_steps = 1",
            "jobs.train_ar.batch_size = 2",
            "jobs.train_ar.log_every = 1",
            "jobs.train_ar.num_workers = 0",
        ],
        "jobs.sample": TOKENIZER + MODEL + [
            f"jobs.sample.samples_per_class = {SAMPLES_PER_CLASS}",
            f"jobs.sample.batch_size = {NUM_SAMPLES}",
            "jobs.sample.progress = False",
        ],
        "jobs.evaluate_samples": [
            f'REFERENCE = "{reference_batch(world)}"',
            f"jobs.evaluate_samples.fidelity_steps = {FIDELITY_STEPS}",
            # Inception would take this folder's whole time budget (module docstring).
            "evaluators.generation.feature_extractor = @feature_extractors.digits_classifier()",
            f'feature_extractors.digits_classifier.path = "{feature_extractor(world)}"',
            "evaluators.generation.progress = False",
        ],
    }


def bindings(lf: tl.LaunchFile, world: tl.World) -> list[str]:
    """A pipeline forwards every ``--bind`` to each stage, so it gets the overrides of all of them."""
    out = ['launch.device = "cpu"', f'IMAGENET_TRAIN = "{image_folder(world)}"', f"IMAGE_SIZE = {IMAGE_SIZE}",
           f"NUM_CLASSES = {CLASSES}"]
    per_kind = _job_bindings(world)
    for kind in sorted({s.job for s in stage_files(lf)}):
        out += [b for b in per_kind.get(kind, []) if b not in out]
    found = official(lf, world)
    if found is not None:
        out.append(f'AR_OFFICIAL = "{found["path"]}"')
    return out


# ---------------------------------------------------------------------------------- checks
@contextlib.contextmanager
def _configured(lf: tl.LaunchFile, world: tl.World):
    """gin parsed as ``lf``'s tiny launch parses it, to build its components the same way."""
    import gin

    from arforge import launch

    launch.parse(lf.path, bindings(lf, world))
    try:
        yield gin
    finally:
        gin.clear_config()


def _checkpoint(folder: Path):
    from arforge import checkpoint as ck

    return ck.load_checkpoint(Path(folder) / "checkpoints")


def _outputs(world: tl.World, run: str) -> Path:
    return world.home / "outputs" / "open_magvit2" / run


def _metric_steps(world: tl.World, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{world.home / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _expect_tokenizer(lf: tl.LaunchFile, world: tl.World, result, run) -> None:
    """The paper's loss ran whole from step 0 (L1, LPIPS on the supplied VGG file, the 0.1-weighted
    NS-GAN, LeCAM, the LFQ entropy and commitment terms) and the final checkpoint holds the raw and
    EMA weights, the discriminator and the tiny codebook."""
    import torch

    ck = _checkpoint(result[1])
    assert ck.step == TOKENIZER_STEPS, ck.step
    assert {"model", "ema", "loss"} <= set(ck.weights), sorted(ck.weights)
    assert tuple(ck.meta["config"]["codebook_sizes"]) == CODEBOOK_SIZES, ck.meta["config"]
    moved = [k for k, v in ck.weights["model"].items()
             if v.is_floating_point() and not torch.equal(v, ck.weights["ema"][k])]
    assert moved, "the EMA weights equal the model's: no EMA of its own"
    assert any(k.startswith("discriminator.") for k in ck.weights["loss"]), sorted(ck.weights["loss"])[:5]
    metrics = run.data.metrics
    terms = ("train/pixel_l1", "train/lpips", "train/gen_adv", "train/disc_loss", "train/lecam",
             "train/quant/entropy", "train/quant/commitment")
    assert all(k in metrics and math.isfinite(metrics[k]) for k in terms), sorted(metrics)
    assert metrics["train/lpips"] > 0 and metrics["train/disc_loss"] > 0, metrics
    assert math.isclose(metrics["train/gan_weight"], 0.1, rel_tol=1e-6) and metrics["data/skipped"] == 0, metrics
    assert run.data.params["losses.tokenizer_loss.lpips_backbone_path"] == repr(str(vgg16_features(world)))


def _expect_extract(lf: tl.LaunchFile, world: tl.World, result, run) -> None:
    """Centre crop and its flip of every image, in folder order, encoded by the tokenizer's EMA
    weights: the first image's codes are re-encoded here and must match exactly."""
    import torch

    from arforge.data.token_codes import CodesManifest
    from arforge.data.transforms import ExtractionCrops
    from PIL import Image

    codes_dir = Path(result[1]) / "codes"
    manifest = CodesManifest.load(codes_dir / "manifest.json")
    codes, labels = np.load(codes_dir / "codes.npy"), np.load(codes_dir / "labels.npy")
    assert codes.shape == (CLASSES * PER_CLASS, 2, GRID * GRID, 1), codes.shape
    assert tuple(manifest.grid) == (GRID, GRID) and tuple(manifest.codebook_sizes) == CODEBOOK_SIZES
    assert manifest.augmentations == [f"center{IMAGE_SIZE}", f"hflip/center{IMAGE_SIZE}"], manifest.augmentations
    assert labels.tolist() == sorted(list(range(CLASSES)) * PER_CLASS)
    assert codes.min() >= 0 and codes.max() < 2 ** BITS
    assert manifest.tokenizer_checkpoint.startswith(str(_outputs(world, "tokenizer") / "checkpoints"))
    with _configured(lf, world):
        tokenizer = _build("%TOKENIZER").eval()
    tokenizer.load_state_dict(_checkpoint(_outputs(world, "tokenizer")).weights["ema"], strict=True)
    first = sorted((image_folder(world) / "n00000000").iterdir())[0]
    views = ExtractionCrops(image_size=IMAGE_SIZE, ten_crop=False, flips=True)(Image.open(first).convert("RGB"))
    with torch.no_grad():
        ids = tokenizer.encode(views)  # (2, L, 1)
    np.testing.assert_array_equal(ids.numpy(), codes[0])


def _expect_ar(lf: tl.LaunchFile, world: tl.World, result, run) -> None:
    """The tiny AR over the bit split of the tokenizer's ids, trained for the tiny step count on
    images tokenised on the fly, logging every step."""
    ck = _checkpoint(result[1])
    assert ck.step == AR_STEPS, ck.step
    config = ck.meta["config"]
    assert config["block_size"] == GRID * GRID and tuple(config["codebook_sizes"]) == CODEBOOK_SIZES, config
    assert tuple(config["vocab_sizes"]) == tuple(2 ** b for b in SPLIT), config
    assert run.data.metrics["model/params"] == config["num_params"]
    assert _metric_steps(world, result[0], "train/loss") == list(range(1, AR_STEPS + 1))


def _resample(lf: tl.LaunchFile, world: tl.World, model_state: dict, tokenizer_state: dict, folder: Path) -> dict:
    """The file's sampling redone with modules given ``*_state`` directly (state dicts, no loader),
    with the launch's seed: what the launch must have produced if it used these weights."""
    from arforge.checkpoint import mark_loaded
    from arforge.data.extraction import local_context
    from arforge.device import Precision

    with _configured(lf, world) as gin:
        model, tokenizer = _build("%MODEL"), _build("%TOKENIZER")
        model.load_state_dict(model_state, strict=True)
        tokenizer.load_state_dict(tokenizer_state, strict=True)
        for module in (model, tokenizer):
            mark_loaded(module, "the test's state dict")
        ctx = local_context(folder, device="cpu", seed=gin.query_parameter("launch.seed"))
        ctx.precision = Precision(gin.query_parameter("launch.precision"))
        sample = gin.get_configurable("jobs.sample")
        sample(ctx, model=model, tokenizer=tokenizer, model_checkpoint=None, tokenizer_checkpoint=None,
               output=str(folder / "again.npz"))
    with np.load(folder / "again.npz") as data:
        return {"arr_0": data["arr_0"], "arr_1": data["arr_1"]}


def _expect_sample(lf: tl.LaunchFile, world: tl.World, result, run) -> None:
    """``SAMPLES_PER_CLASS`` images of each class, the file's guidance and temperatures, and images
    that are exactly what the intended weights give: redone here from the AR run's checkpoint and
    the tokenizer's EMA weights, or from the official file's own state dicts (not through the
    official key maps). For the official file, a tokenizer at its initialisation (what the job
    decoded with before issue 15.1 was fixed) is shown to decode other images."""
    run_id, out = result
    (path,) = sorted(Path(out).rglob("samples.npz"))
    with np.load(path) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (NUM_SAMPLES, IMAGE_SIZE, IMAGE_SIZE, 3), images.shape
    assert np.bincount(labels, minlength=CLASSES).tolist() == [SAMPLES_PER_CLASS] * CLASSES
    params = run.data.params
    scale, temperature = _file_value(lf, "guidance.cfg_constant.scale"), _file_value(lf, "jobs.sample.temperature")
    assert params["guidance.cfg_constant.scale"] == str(tuple(scale)), (params["guidance.cfg_constant.scale"], scale)
    assert params["sample.temperature"] == _as_logged(temperature), (params["sample.temperature"], temperature)
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())["params"]
    assert sidecar["sample.num_samples"] == str(NUM_SAMPLES)

    found = official(lf, world)
    if found is not None:
        assert params["sample.model_checkpoint"] == str(found["path"]) == params.get("sample.tokenizer_checkpoint")
        model_state, tokenizer_state = found["model"], found["tokenizer"]
    else:
        ar_run = Path(_file_value(lf, "jobs.sample.model_checkpoint").split(":", 1)[1]).parent.name
        ar_ck, tok_ck = _checkpoint(_outputs(world, ar_run)), _checkpoint(_outputs(world, "tokenizer"))
        assert params["sample.model_checkpoint"] == str(ar_ck.path) and params["sample.model_weights"] == "model"
        assert params["sample.tokenizer_checkpoint"] == str(tok_ck.path) and params["sample.tokenizer_weights"] == "ema"
        model_state, tokenizer_state = ar_ck.weights["model"], tok_ck.weights["ema"]
    checks = world.root / "checks" / run_id
    again = _resample(lf, world, model_state, tokenizer_state, checks / "intended")
    np.testing.assert_array_equal(again["arr_1"], labels)
    np.testing.assert_array_equal(again["arr_0"], images)
    if found is not None:  # issue 15.1: the images would be these had the job's tokenizer been a fresh one
        with _configured(lf, world):
            fresh = _build("%TOKENIZER").state_dict()
        wrong = _resample(lf, world, model_state, fresh, checks / "fresh_tokenizer")
        assert not np.array_equal(wrong["arr_0"], images), "a fresh tokenizer decodes the same images"


def _as_logged(values: tuple) -> str:
    """How jobs.sample logs a per-sub-token setting: one value when all are equal, else the tuple."""
    return str(float(values[0])) if len(set(values)) == 1 else str(tuple(values))


def _expect_evaluate(lf: tl.LaunchFile, world: tl.World, result, run) -> None:
    """FID at each fidelity step, IS and precision/recall of the samples the file names, against
    the reference batch; the FID is recomputed here from the extractor's features."""
    from arforge.metrics.adm import FeatureStats, frechet_distance
    from arforge_plugins.evaluators.digits_classifier import DigitsClassifier

    metrics, params = run.data.metrics, run.data.params
    assert {"fid", "is", "precision", "recall"} <= set(metrics), metrics
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1 and metrics["is"] >= 1 - 1e-6, metrics
    assert sorted(set(_metric_steps(world, result[0], "fid"))) == list(FIDELITY_STEPS)
    assert params["eval.num_samples"] == str(NUM_SAMPLES)
    assert params["eval.weights_file"] == str(feature_extractor(world))
    assert params["eval.reference"] == str(reference_batch(world))
    assert "guidance.cfg_constant.scale" in params  # the guidance settings travel with the samples to the FID run
    net = DigitsClassifier.load(feature_extractor(world))
    with np.load(params["eval.samples"]) as s, np.load(reference_batch(world)) as r:
        fid = frechet_distance(FeatureStats.of(net.features(s["arr_0"]).pool),
                               FeatureStats.of(net.features(r["arr_0"]).pool))
    assert math.isclose(metrics["fid"], fid, rel_tol=1e-6, abs_tol=1e-9), (metrics["fid"], fid)


def _expect_pipeline(lf: tl.LaunchFile, world: tl.World, result, run) -> None:
    """Each stage ran once, nested and in order, in the pipeline's own folder, and produced what
    its file must produce on its own; the evaluation read this pipeline's samples."""
    stages = stage_files(lf)
    children = {c.info.run_name: c for c in tl.child_runs(world, result[0])}
    assert sorted(children) == sorted(s.run_name for s in stages), sorted(children)
    out = Path(result[1])
    for stage in stages:
        child = children[stage.run_name]
        _EXPECT[stage.job](stage, world, (child.info.run_id, out / stage.run_name), child)
    evaluated = [children[s.run_name].data.params["eval.samples"] for s in stages if s.job == "jobs.evaluate_samples"]
    sampled = [str(out / s.run_name / "samples.npz") for s in stages if s.job == "jobs.sample"]
    assert evaluated == sampled, (evaluated, sampled)


_EXPECT = {
    "jobs.train_tokenizer": _expect_tokenizer,
    "jobs.extract_codes": _expect_extract,
    "jobs.train_ar": _expect_ar,
    "jobs.sample": _expect_sample,
    "jobs.evaluate_samples": _expect_evaluate,
    "jobs.pipeline": _expect_pipeline,
}


def expect(lf: tl.LaunchFile, world: tl.World, result) -> None:
    run = tl.expect_job(lf, world, result)
    assert lf.job in _EXPECT, f"{lf.rel}: no checks for {lf.job} in tests/tiny_launches/open_magvit2.py"
    _EXPECT[lf.job](lf, world, result, run)
