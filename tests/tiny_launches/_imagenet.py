"""What the ImageNet experiments (``llamagen``, ``iar2``) share at a tiny size: data, weights, checks.

Both families train a LlamaGen-style VQ tokenizer on ImageNet folders (or webdataset shards),
extract ten-crop codes, train and sample class-conditional GPTs and evaluate them with the ADM
evaluator. The family modules (``tiny_launches/llamagen.py``, ``tiny_launches/iar2.py``) only add
their model and tokenizer presets and their own checks; everything keyed on the *job kind* lives
here, so a new launch file of a known kind is covered without a line of test code.

The tiny universe:

* an ImageNet-layout folder of ``CLASSES`` x ``PER_CLASS`` PNGs (``SOURCE_PX`` square), and the same
  images as webdataset shards written by the project's own shard writer (``tools/make_shards.py``);
* tokenizers train at ``TRAIN_PX`` (the PatchGAN's five 4x4 convolutions need at least ~24 px to
  leave a patch) with the GAN switched on at ``DISC_START`` so the full recipe runs;
* codes, AR models and samples at ``IMAGE_SIZE`` (the tiny tokenizer downsamples 2x: a ``GRID`` x
  ``GRID`` token grid), resized to ``EVAL_SIZE`` as the paper's 384 -> 256;
* random-weight stand-ins for the Inception (torch-fidelity layout) and VGG16 (torchvision
  ``features.*``) files, written once per session: the code paths are the real ones, the numbers
  mean nothing;
* an ADM-layout reference batch (``arr_0``, ``arr_1`` and ``mu``/``sigma``/``mu_s``/``sigma_s``
  computed with that Inception stand-in, as the real file carries statistics of the real network).
"""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

import tiny_launches as tl
from tiny_launches import build, file_value, stage_files  # noqa: F401  (used here and by llamagen/iar2 as im.*)

CLASSES = 2
PER_CLASS = 4
SOURCE_PX = 40
TRAIN_PX = 32
IMAGE_SIZE = 12
GRID = IMAGE_SIZE // 2
EVAL_SIZE = 16
SAMPLES_PER_CLASS = 2
TOKENIZER_STEPS = 3
DISC_START = 2
AR_STEPS = 2
REFERENCE_IMAGES = 4
FIDELITY_STEPS = (2, CLASSES * SAMPLES_PER_CLASS)
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"


# ------------------------------------------------------------------------------------ data
def _class_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SOURCE_PX, 0:SOURCE_PX] / SOURCE_PX
    for c in range(CLASSES):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            # Smooth colour ramps plus noise: a tokenizer has structure to reconstruct, and the
            # random crops of adm_train see different content.
            phase = rng.uniform(0, 2 * np.pi, size=3)
            base = 0.5 + 0.4 * np.sin(2 * np.pi * (xx[..., None] * (c + 1) + yy[..., None]) + phase)
            pixels = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
            Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"n{c:08d}_{i}.PNG")
    return root


def image_folder(world: tl.World) -> Path:
    """The ImageNet-layout training folder (``IMAGENET_TRAIN``)."""
    return world.once("imagenet_train", _class_folder)


def image_shards(world: tl.World):
    """The same images as webdataset shards (3 per shard, so a pass crosses shard boundaries)."""
    from arforge.data import write_image_shards

    folder = image_folder(world)
    return world.once("imagenet_shards", lambda out: write_image_shards(
        source=folder, output_dir=out, max_count=3, progress=False))


def _random_inception(path: Path) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved under the official name.

    PyTorch's default initialisation shrinks activations at every one of the ~90 layers, so its
    pool features are all but zero and every metric degenerates (FID 0, IS 1); He-initialised
    convolutions keep their scale, so the features differ per image as real ones do.
    """
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with torch.random.fork_rng():
        torch.manual_seed(0)
        with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
                mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
            net = fe.FeatureExtractorInceptionV3("random", ["2048"])
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path.mkdir(parents=True)
    torch.save(net.state_dict(), path / INCEPTION_FILENAME)
    return path / INCEPTION_FILENAME


_SHARED: dict[Path, Any] = {}


def shared(world: tl.World, name: str, make: Callable[[Path], Any]) -> Any:
    """Like ``world.once``, but once per test session for files that do not depend on the world
    (evaluator weights, reference batches): worlds are siblings in the session's temporary folder."""
    path = world.root.parent / f"imagenet-{name}"
    if path not in _SHARED:
        _SHARED[path] = make(path)
    return _SHARED[path]


def inception_weights(world: tl.World) -> Path:
    return shared(world, "inception", _random_inception)


def _random_vgg16_features(path: Path) -> Path:
    """torchvision VGG16's ``features.*`` only: LPIPS drops the classifier, which is 90 % of the file."""
    import torch
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(0)
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    path.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path / "vgg16.pth")
    return path / "vgg16.pth"


def vgg16_features(world: tl.World) -> Path:
    return shared(world, "vgg16", _random_vgg16_features)


def _reference(path: Path, inception: Path) -> Path:
    """An ADM-layout reference batch: images, labels and the Inception statistics of the images."""
    from arforge.evaluation.feature_extractors import InceptionV3Features
    from arforge.metrics.adm import FeatureStats

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(REFERENCE_IMAGES, EVAL_SIZE, EVAL_SIZE, 3), dtype=np.uint8)
    labels = np.arange(REFERENCE_IMAGES, dtype=np.int64) % CLASSES
    f = InceptionV3Features(weights_path=inception, verify_hash=False).features(images)
    pool, spatial = FeatureStats.of(f.pool), FeatureStats.of(f.spatial)
    path.mkdir(parents=True)
    np.savez(path / "VIRTUAL_imagenet_tiny_labeled.npz", arr_0=images, arr_1=labels, mu=pool.mu,
             sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    return path / "VIRTUAL_imagenet_tiny_labeled.npz"


def reference_batch(world: tl.World) -> Path:
    inception = inception_weights(world)
    return shared(world, "reference", lambda p: _reference(p, inception))


def _small_extractor(path: Path) -> Path:
    import torch

    from arforge_plugins.evaluators.digits_classifier import DigitsClassifier

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = DigitsClassifier(image_size=EVAL_SIZE, width=4, feature_dim=8, num_classes=CLASSES)
    path.mkdir(parents=True)
    return net.save(path / "feature_extractor.safetensors")


def small_extractor(world: tl.World) -> Path:
    """A random 8-d ``feature_extractors.digits_classifier`` for the evaluate stage of pipelines."""
    return shared(world, "small-extractor", _small_extractor)


def _small_reference(path: Path) -> Path:
    rng = np.random.default_rng(1)
    path.mkdir(parents=True)
    np.savez(path / "reference.npz",
             arr_0=rng.integers(0, 256, size=(REFERENCE_IMAGES, EVAL_SIZE, EVAL_SIZE, 3), dtype=np.uint8),
             arr_1=np.arange(REFERENCE_IMAGES, dtype=np.int64) % CLASSES)
    return path / "reference.npz"


def small_reference(world: tl.World) -> Path:
    """The reference batch of pipelines: the same layout without statistics (they belong to a network)."""
    return shared(world, "small-reference", _small_reference)


# -------------------------------------------------------------------------------- bindings
def official_files(lf: tl.LaunchFile, world: tl.World, name: str,
                   make: Callable[[tl.LaunchFile, Path], dict]) -> dict | None:
    """The family's official-layout files (``make(stage, folder)``), written once per world, for a
    launch (or pipeline) with a stage that reads ``AR_OFFICIAL``; None for any other."""
    for stage in stage_files(lf):
        if "AR_OFFICIAL" in tl.flat_bindings(stage.path):
            return world.once(name, lambda out: make(stage, out))
    return None


def official_bindings(official: dict | None) -> list[str]:
    """``AR_OFFICIAL``/``VQ_OFFICIAL`` pointing at :func:`official_files`' files (none without them)."""
    if official is None:
        return []
    return [f'AR_OFFICIAL = "{official["ar"]}"', f'VQ_OFFICIAL = "{official["vq"]}"']


def job_kinds(lf: tl.LaunchFile) -> set[str]:
    """The jobs a launch runs: its own, or its stages' for a pipeline (the pipeline forwards every
    ``--bind`` to each stage, so it needs the overrides of all of them)."""
    return {s.job for s in stage_files(lf)}


def job_bindings(world: tl.World) -> dict[str, list[str]]:
    """The family-independent tiny overrides of each job kind.

    ``launch.precision`` stays as the files set it (bf16 autocast runs on the CPU).
    """
    return {
        "jobs.train_tokenizer": [
            f"datasets.image_folder.image_size = {TRAIN_PX}",
            f"jobs.train_tokenizer.steps = {TOKENIZER_STEPS}",
            "jobs.train_tokenizer.batch_size = 2",
            "jobs.train_tokenizer.num_workers = 0",
            # The paper switches the GAN on after 20k steps; here it must run within the tiny budget.
            f"losses.tokenizer_loss.disc_start = {DISC_START}",
            f'losses.tokenizer_loss.lpips_backbone_path = "{vgg16_features(world)}"',
            "losses.tokenizer_loss.lpips_verify_hash = False",
        ],
        "jobs.extract_codes": [
            "jobs.extract_codes.batch_size = 4",
            "jobs.extract_codes.num_workers = 0",
        ],
        "jobs.train_ar": [
            f"jobs.train_ar.steps = {AR_STEPS}",
            "jobs.train_ar.batch_size = 4",
            "jobs.train_ar.num_workers = 0",
        ],
        "jobs.sample": [
            f"jobs.sample.samples_per_class = {SAMPLES_PER_CLASS}",
            f"jobs.sample.batch_size = {CLASSES * SAMPLES_PER_CLASS}",
            f"jobs.sample.eval_size = {EVAL_SIZE}",
        ],
        "jobs.evaluate_samples": [
            f"jobs.evaluate_samples.fidelity_steps = {FIDELITY_STEPS}",
            "evaluators.generation.progress = False",
        ],
    }


def evaluator_bindings(lf: tl.LaunchFile, world: tl.World) -> list[str]:
    """The evaluator of a launch that evaluates samples.

    A launch of ``jobs.evaluate_samples`` itself runs the file's Inception on the stand-in weights
    against the ADM-layout reference. The evaluate stage of a pipeline runs the same job on the
    small digits extractor: Inception costs ~2.5 s per evaluation on this machine's CPU (a 95 MB
    file read twice, 299 px inputs) and the pipelines here evaluate four times, while what a
    pipeline adds (its stages' wiring, "pipeline:" paths, nesting) does not depend on the network.
    """
    if lf.job == "jobs.pipeline":
        return [f'REFERENCE = "{small_reference(world)}"',
                "evaluators.generation.feature_extractor = @feature_extractors.digits_classifier()",
                f'feature_extractors.digits_classifier.path = "{small_extractor(world)}"']
    return [f'REFERENCE = "{reference_batch(world)}"',
            f'feature_extractors.inception.weights_path = "{inception_weights(world)}"',
            "feature_extractors.inception.verify_hash = False"]


def bindings(lf: tl.LaunchFile, world: tl.World, family: dict[str, list[str]],
             extra: Iterable[str] = ()) -> list[str]:
    """Everything a launch file of an ImageNet family needs at the tiny size.

    ``family`` maps job kinds to the family's own overrides (model and tokenizer presets).
    """
    out = [
        'launch.device = "cpu"',
        f'IMAGENET_TRAIN = "{image_folder(world)}"',
        f"IMAGE_SIZE = {IMAGE_SIZE}",
        f"NUM_CLASSES = {CLASSES}",
    ]
    kinds = job_kinds(lf)
    if "jobs.evaluate_samples" in kinds:
        out += evaluator_bindings(lf, world)
    common = job_bindings(world)
    for kind in sorted(kinds):
        out += common.get(kind, []) + family.get(kind, [])
    return out + list(extra)


def run_variant(lf: tl.LaunchFile, world: tl.World, binds: list[str]) -> tuple[str, Path]:
    """Launch ``lf`` once more with other bindings in the same home (e.g. on shards instead of folders)."""
    import gin

    from arforge import cli, launch

    argv = ["run", str(lf.path)]
    for b in binds:
        argv += ["--bind", b]
    saved = dict(os.environ)
    os.environ["ARFORGE_HOME"] = str(world.home)
    try:
        gin.clear_config()
        assert cli.main(argv) == 0, f"arforge {' '.join(argv)} failed"
        return launch.last_run()
    finally:
        gin.clear_config()
        os.environ.clear()
        os.environ.update(saved)


def parse_for_check(lf: tl.LaunchFile, binds: list[str]) -> None:
    """Parse ``lf`` with ``binds`` into gin, to build its components the way its launch did."""
    from arforge import launch

    launch.parse(lf.path, binds)


# ---------------------------------------------------------------------------------- checks
def resolve(world: tl.World, path: str) -> Path:
    """``outputs:<experiment>/<run>/...`` in ``world``'s home (a check runs outside the launch's env)."""
    assert path.startswith("outputs:"), path
    return world.home / "outputs" / path[len("outputs:"):]


def checkpoint(out: Path):
    from arforge import checkpoint as ck

    return ck.load_checkpoint(Path(out) / "checkpoints")


def metric_steps(world: tl.World, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{world.home / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifacts(world: tl.World, run_id: str, folder: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{world.home / 'mlflow.db'}")
    return {a.path for a in client.list_artifacts(run_id, folder)}


def expect_tokenizer(lf: tl.LaunchFile, world: tl.World, result, run, codebook_sizes: tuple[int, ...]):
    """A tokenizer run: the final checkpoint of the tiny budget, EMA weights exactly when the recipe
    asks for them, the GAN on once ``disc_start`` is reached, and a reconstruction grid."""
    import torch

    _, out = result
    ck = checkpoint(out)
    assert ck.step == TOKENIZER_STEPS, ck.step
    ema = file_value(lf, "jobs.train_tokenizer.ema_decay")
    assert ("ema" in ck.weights) == bool(ema), (lf.rel, ema, sorted(ck.weights))
    assert {"model", "loss"} <= set(ck.weights), sorted(ck.weights)
    assert tuple(ck.meta["config"]["codebook_sizes"]) == codebook_sizes, ck.meta["config"]
    assert ck.state["loader"] == {"epoch": 0, "batch_in_epoch": TOKENIZER_STEPS}, ck.state["loader"]
    if ema:  # the EMA is its own copy, never the live weights after more than one step
        diff = [k for k, v in ck.weights["model"].items()
                if v.is_floating_point() and not torch.equal(v, ck.weights["ema"][k])]
        assert diff, "the EMA weights equal the model's"
    # The logged total is the recipe's weighted sum of the logged (unweighted) terms: the file's
    # recipe really is the loss (IAR2 stage 1's pixel weight 0 included), and the GAN is on
    # from DISC_START, for the generator (its adversarial term) and the discriminator (its hinge).
    from arforge_plugins.losses.tokenizer_losses import TOKENIZER_LOSS_PRESETS

    m = run.data.metrics
    recipe = TOKENIZER_LOSS_PRESETS[file_value(lf, "losses.tokenizer_loss.recipe")]
    assert m["train/gan_weight"] == recipe["gen_weight"] > 0, m
    pixel = m[f"train/pixel_{recipe['pixel_loss']}"]
    total = (recipe["pixel_weight"] * pixel + recipe["lpips_weight"] * m["train/lpips"]
             + m["train/gan_weight"] * m["train/gen_adv"]
             + sum(v for k, v in m.items() if k.startswith("train/quant/")))
    assert math.isclose(m["train/loss"], total, rel_tol=1e-4, abs_tol=1e-6), (m["train/loss"], total, m)
    assert m["train/disc_loss"] == m["train/disc_hinge"] > 0, m
    assert m["data/skipped"] == 0
    return ck


def expect_extract(lf: tl.LaunchFile, world: tl.World, result, codebook_sizes: tuple[int, ...]):
    """Codes of every image, ten crops each when ``ten_crop``, in folder order with folder labels."""
    from arforge.data.token_codes import CodesManifest

    _, out = result
    codes_dir = Path(out) / "codes"
    manifest = CodesManifest.load(codes_dir / "manifest.json")
    n_aug = (10 if file_value(lf, "jobs.extract_codes.ten_crop", False) else 2)
    codes = np.load(codes_dir / "codes.npy")
    labels = np.load(codes_dir / "labels.npy")
    assert codes.shape == (CLASSES * PER_CLASS, n_aug, GRID * GRID, len(codebook_sizes)), codes.shape
    assert manifest.n_aug == n_aug and len(manifest.augmentations) == n_aug, manifest.augmentations
    assert tuple(manifest.grid) == (GRID, GRID) and tuple(manifest.codebook_sizes) == codebook_sizes
    assert labels.tolist() == sorted(list(range(CLASSES)) * PER_CLASS)
    assert np.load(codes_dir / "indices.npy").tolist() == list(range(CLASSES * PER_CLASS))
    assert codes.min() >= 0 and (codes.max(axis=(0, 1, 2)) < np.asarray(codebook_sizes)).all()
    crop = int(IMAGE_SIZE * file_value(lf, "jobs.extract_codes.crop_range", 1.0))
    if n_aug == 10 and crop > IMAGE_SIZE:  # distinct corner crops give distinct codes somewhere
        assert not (codes[:, 0] == codes[:, 3]).all()
    # the codes come from the trained tokenizer the file names, its final checkpoint
    trained = resolve(world, file_value(lf, "tokenizer/loaders.arforge_checkpoint.checkpoint"))
    assert Path(manifest.tokenizer_checkpoint) == checkpoint(trained.parent).path, manifest.tokenizer_checkpoint
    return codes


def expect_ar(lf: tl.LaunchFile, world: tl.World, result, run, codebook_sizes: tuple[int, ...],
              vocab: dict[str, int], model_weights: tuple[float, ...]):
    """An AR run: the final checkpoint at the tiny step count, grid and vocabulary; the loss is the
    weighted sum of one cross-entropy per sub-token (``vocab``: ``ce_<name>`` -> its vocabulary, in
    sub-token order), each still near ln(vocabulary) after two small steps from the initialisation.
    The weights are the model's (``model_weights``, e.g. IAR2's (w1, 1)) unless the file binds
    ``jobs.train_ar.loss_weights``."""
    _, out = result
    ck = checkpoint(out)
    assert ck.step == AR_STEPS, ck.step
    config = ck.meta["config"]
    assert config["block_size"] == GRID * GRID and tuple(config["codebook_sizes"]) == codebook_sizes, config
    m = run.data.metrics
    assert m["model/params"] == config["num_params"]
    assert ("ema" in ck.weights) == bool(file_value(lf, "jobs.train_ar.ema_decay")), sorted(ck.weights)
    ces = {k.removeprefix("train/"): v for k, v in m.items() if k.startswith("train/ce_")}
    assert sorted(ces) == sorted(vocab), sorted(ces)
    for name, size in vocab.items():
        assert abs(ces[name] - math.log(size)) < 0.25, (name, ces[name], math.log(size))
    weights = file_value(lf, "jobs.train_ar.loss_weights") or model_weights
    total = sum(w * ces[name] for w, name in zip(weights, vocab))
    assert math.isclose(m["train/loss"], total, rel_tol=1e-5), (m["train/loss"], total)
    return ck


def expect_sample(lf: tl.LaunchFile, world: tl.World, result, run):
    """``samples_per_class`` images of each class at the evaluation size, with the file's guidance."""
    _, out = result
    files = sorted(Path(out).rglob("samples.npz"))
    assert len(files) == 1, files
    data = np.load(files[0])
    images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (CLASSES * SAMPLES_PER_CLASS, EVAL_SIZE, EVAL_SIZE, 3), images.shape
    assert np.bincount(labels, minlength=CLASSES).tolist() == [SAMPLES_PER_CLASS] * CLASSES
    assert images.std() > 0, "every sample is one flat colour"
    params = run.data.params
    assert params["sample.num_samples"] == str(CLASSES * SAMPLES_PER_CLASS)
    sidecar = json.loads(files[0].with_name(files[0].name + ".json").read_text())["params"]
    assert sidecar["jobs.sample.guidance"] == params["jobs.sample.guidance"]
    guidance = str(file_value(lf, "jobs.sample.guidance", "None"))
    assert params["jobs.sample.guidance"] == guidance, (params["jobs.sample.guidance"], guidance)
    name = guidance.lstrip("@").removesuffix("()")
    for key, value in tl.flat_bindings(lf.path).items():  # every guidance setting of the file was used,
        if key.startswith(f"{name}."):                   # logged under its gin binding (one name)
            assert params[key] == value or _close(params[key], ast.literal_eval(value)), (key, value, params.get(key))
    assert not any(k.startswith("cfg.") for k in params), params
    assert "samples/grid.png" in artifacts(world, result[0], "samples")
    for what in ("model", "tokenizer"):  # trained weights: the final checkpoint of the run the file names
        named = file_value(lf, f"jobs.sample.{what}_checkpoint")
        if named is not None:
            used = Path(params[f"sample.{what}_checkpoint"])
            assert used.parent.name == "checkpoints" and used.parent.parent.name == Path(named).parent.name, used
            assert params[f"sample.{what}_step"] == str(checkpoint(used.parent.parent).step)
    return images, labels


def _close(text: str, value: Any) -> bool:
    try:
        return math.isclose(float(text), float(value))
    except (TypeError, ValueError):
        return False


def expect_evaluate(lf: tl.LaunchFile, world: tl.World, result, run):
    """ADM metrics of the tiny sample batch against the reference batch: all that the network gives,
    in range, the FID at each fidelity step, with the network's provenance and the sampler's
    settings. Which network: see :func:`evaluator_bindings` (a pipeline's stage has a parent run)."""
    metrics, params = run.data.metrics, run.data.params
    in_pipeline = "mlflow.parentRunId" in run.data.tags
    expected = {"fid", "is", "precision", "recall"} | (set() if in_pipeline else {"sfid"})
    assert set(metrics) == expected, (sorted(metrics), sorted(expected))
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    # Features that differ per image (see _random_inception) put every metric off its degenerate value.
    assert all(metrics[k] > 0 for k in expected - {"is", "precision", "recall"}), metrics
    assert metrics["is"] > 1.0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1, metrics
    assert set(metric_steps(world, result[0], "fid")) == set(FIDELITY_STEPS)
    assert params["eval.num_samples"] == str(CLASSES * SAMPLES_PER_CLASS)
    if in_pipeline:
        assert params["eval.backend"] == "digits_classifier", params["eval.backend"]
        assert params["eval.reference"] == str(small_reference(world))
        assert params["eval.reference_stats"] == f"computed from the reference arr_0 ({REFERENCE_IMAGES} images)"
    else:
        assert params["eval.backend"] == "inception-v3-torch-fidelity", params["eval.backend"]
        assert params["eval.weights_file"] == str(inception_weights(world))
        assert params["eval.reference"] == str(reference_batch(world))
        assert params["eval.reference_stats"] == "mu/sigma from the reference file"
        assert params["eval.reference_stats_s"] == "mu_s/sigma_s from the reference file"
    samples = Path(params["eval.samples"])
    assert samples.is_file() and len(np.load(samples)["arr_1"]) == CLASSES * SAMPLES_PER_CLASS
    assert "jobs.sample.guidance" in params  # the guidance settings travel with the samples to the FID run
    return metrics


def expect_pipeline(lf: tl.LaunchFile, world: tl.World, result, run,
                    expect_stage: Callable[[tl.LaunchFile, tl.World, Any], Any]) -> dict[str, Any]:
    """Each stage ran once, nested and in order, in the pipeline's own folder, and produced what the
    stage's file must produce on its own."""
    stages = stage_files(lf)
    children = {c.info.run_name: c for c in tl.child_runs(world, result[0])}
    assert sorted(children) == sorted(s.run_name for s in stages), sorted(children)
    out = Path(result[1])
    seconds = [k for k in run.data.metrics if k.startswith("pipeline/")]
    assert len(seconds) == len(stages), seconds
    done = {}
    for stage in stages:
        child = children[stage.run_name]
        done[stage.run_name] = expect_stage(stage, world, (child.info.run_id, out / stage.run_name))
    return done


def expect_same_samples(lf: tl.LaunchFile, world: tl.World, result, binds: list[str], official: dict) -> None:
    """An official-checkpoint sample run used the official files' weights for the GPT *and* the
    tokenizer that decoded its tokens: the file's own sampling, redone with modules holding the
    weights that were exported (loaded as arforge state dicts, no official key map involved), gives
    the same images bit for bit. The exported weights differ from a fresh build, so a loader that
    left either module at its initialisation could not pass."""
    import gin
    import torch

    from arforge.checkpoint import mark_loaded
    from arforge.data.extraction import local_context
    from arforge.device import Precision

    parse_for_check(lf, binds)
    model, tokenizer = build("%MODEL"), build("%TOKENIZER")
    for module, what in ((model, "model"), (tokenizer, "tokenizer")):
        fresh, state = module.state_dict(), official[what]
        assert any(v.is_floating_point() and not torch.equal(v, fresh[k]) for k, v in state.items())
        module.load_state_dict(state, strict=True)
        mark_loaded(module, f"the {what} state exported to the official file")
    check_dir = world.root / "checks" / lf.run_name
    ctx = local_context(check_dir, device="cpu", seed=gin.query_parameter("launch.seed"))
    ctx.precision = Precision(gin.query_parameter("launch.precision"))
    gin.get_configurable("jobs.sample")(ctx, model=model, tokenizer=tokenizer, output=str(check_dir / "again.npz"),
                                        progress=False)
    again = np.load(check_dir / "again.npz")
    (ran,) = sorted(Path(result[1]).rglob("samples.npz"))
    ran = np.load(ran)
    np.testing.assert_array_equal(again["arr_1"], ran["arr_1"])
    np.testing.assert_array_equal(again["arr_0"], ran["arr_0"])
