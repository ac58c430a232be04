"""Evaluation on the bundled digits: sample/reference batches, ADM-semantics evaluators, jobs, the classifier job."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from arforge.data.digits import DigitsDataset
from arforge.data.extraction import LocalContext, local_context
from arforge.evaluation import (BatchFileError, Features, ImageBatchReader, ImageBatchWriter, evaluate_reconstructions,
                                evaluate_samples, make_reference, write_image_batch)
from arforge.interfaces import TokenizerOutput
from arforge.metrics import adm
from arforge.metrics.adm import FeatureStats, MetricError
from arforge.weights import WeightsNotFoundError
from arforge_plugins.evaluators.digits_classifier import DigitsClassifier, train_feature_extractor
from arforge_plugins.evaluators.metric_evaluators import GenerationEvaluator, ReconstructionEvaluator

S = 16
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingTracker:
    def __init__(self) -> None:
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.dicts: dict[str, Any] = {}

    def log_metrics(self, m, step=None):
        self.metrics.append((step, dict(m)))

    def log_params(self, p):
        self.params.update(p)

    def set_tags(self, t):
        self.tags.update(t)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((str(path), artifact_path))

    def log_dict(self, data, artifact_file):
        self.dicts[artifact_file] = data

    def series(self, name):
        return [(step, m[name]) for step, m in self.metrics if name in m]


@dataclass
class ReportingContext(LocalContext):
    """A local context whose ``report`` records, and may raise like an Optuna pruner."""

    reports: list[tuple[str, float, int]] = field(default_factory=list)
    prune_at: int | None = None

    def report(self, metric, value, step):
        self.reports.append((metric, value, step))
        if self.prune_at is not None and step >= self.prune_at:
            raise RuntimeError(f"pruned at {step}")


def _ctx(out, tracker=None, cls=LocalContext, **kw):
    base = local_context(out, tracker=tracker or RecordingTracker())
    return cls(**{**base.__dict__, **kw})


class CountingExtractor:
    """Wraps an extractor and counts the images it saw."""

    def __init__(self, inner):
        self.inner, self.seen = inner, 0
        self.name, self.weights_sha256 = inner.name, inner.weights_sha256

    def features(self, images):
        self.seen += len(images)
        return self.inner.features(images)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def digits():
    return DigitsDataset(split="train", image_size=S), DigitsDataset(split="val", image_size=S)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """The classifier job with a CI budget (120 steps): (accuracy, weights path, tracker)."""
    out = tmp_path_factory.mktemp("feature_extractor")
    tracker = RecordingTracker()
    acc = train_feature_extractor(_ctx(out, tracker), dataset=digits[0], val_dataset=digits[1], image_size=S,
                                  steps=120, batch_size=64, lr=2e-3, seed=0, log_every=40)
    return acc, out / "feature_extractor.safetensors", tracker


@pytest.fixture(scope="module")
def classifier(trained):
    return DigitsClassifier.load(trained[1])


@pytest.fixture(scope="module")
def batches(digits, classifier, tmp_path_factory):
    """A 300-image reference made by make_reference (no statistics) and sample files built from it."""
    d = tmp_path_factory.mktemp("batches")
    make_reference(_ctx(d), dataset=digits[1], output=d / "ref.npz", seed=0, progress=False)
    images = np.load(d / "ref.npz")["arr_0"]
    rng = np.random.default_rng(1)
    write_image_batch(d / "same.npz", images[rng.permutation(len(images))])  # same set, other order
    noise = rng.integers(0, 256, size=images.shape, dtype=np.uint8)
    write_image_batch(d / "noise.npz", noise)
    flat = images.reshape(len(images), -1, 3)  # (N, H*W, 3)
    shuffled = np.stack([im[rng.permutation(len(im))] for im in flat]).reshape(images.shape)
    write_image_batch(d / "shuffled.npz", shuffled)
    return d, images


# ---------------------------------------------------------- classifier job
def test_classifier_job_reaches_high_accuracy_and_reloads_exactly(trained, digits):
    acc, path, tracker = trained
    assert acc >= 0.9, f"val accuracy {acc:.3f} after 120 steps"
    assert [s for s, _ in tracker.series("train/loss")] == [40, 80, 120]
    losses = [v for _, v in tracker.series("train/loss")]
    assert losses[-1] < losses[0]
    assert tracker.series("val/accuracy") == [(120, acc)]
    assert tracker.artifacts == [(str(path), "feature_extractor")] and path.is_file()
    trained_again = DigitsClassifier.load(path)
    val = adm.to_uint8(torch.stack([digits[1][i][0] for i in range(32)]))
    a, b = DigitsClassifier.load(path).features(val), trained_again.features(val)
    np.testing.assert_array_equal(a.logits, b.logits)
    labels = np.array([digits[1][i][1] for i in range(32)])
    assert (a.logits.argmax(1) == labels).mean() >= 0.8


# ------------------------------------------------------------- evaluator
def test_fid_is_zero_for_the_reference_images_and_large_for_noise(batches, classifier):
    d, _ = batches
    ev = GenerationEvaluator(feature_extractor=classifier, is_split_size=100, progress=False)
    same = ev.evaluate_detailed(d / "same.npz", d / "ref.npz")
    assert abs(same.metrics["fid"]) < 1e-6
    assert same.metrics["precision"] == 1.0 and same.metrics["recall"] == 1.0
    assert 3.0 < same.metrics["is"] <= 10.0  # a confident classifier on 10 balanced classes
    assert same.info["reference_stats"].startswith("computed from the reference arr_0 (300")
    assert "sfid" not in same.metrics  # no spatial features in the digits classifier
    for name in ("noise.npz", "shuffled.npz"):
        bad = ev(d / name, d / "ref.npz")
        assert bad["fid"] > 100 * max(1.0, same.metrics["fid"]), (name, bad)
        assert bad["precision"] < 0.2
    # the reference is read from arr_0 in batches and gives the same numbers at any batch size
    other = GenerationEvaluator(feature_extractor=classifier, batch_size=7, is_split_size=100, progress=False)
    assert other(d / "noise.npz", d / "ref.npz")["fid"] == pytest.approx(ev(d / "noise.npz", d / "ref.npz")["fid"],
                                                                           rel=1e-6)


def test_reference_mu_sigma_are_used_when_present(batches, classifier, tmp_path):
    d, images = batches
    feats = classifier.features(images).pool
    true = FeatureStats.of(feats)
    shift = np.zeros_like(true.mu)
    shift[:3] = (1.5, -2.0, 0.5)
    write_image_batch(tmp_path / "planted.npz", images, extra={"mu": true.mu + shift, "sigma": true.sigma})
    ev = GenerationEvaluator(feature_extractor=classifier, precision_recall=False, progress=False)
    res = ev.evaluate_detailed(d / "same.npz", tmp_path / "planted.npz")
    assert res.metrics["fid"] == pytest.approx(float(shift @ shift), rel=1e-6)  # ||d||^2, not ~0
    assert res.info["reference_stats"] == "mu/sigma from the reference file"
    # statistics only (no arr_0): FID still works, precision/recall is skipped and says so
    np.savez(tmp_path / "stats_only.npz", mu=true.mu, sigma=true.sigma)
    full = GenerationEvaluator(feature_extractor=classifier, progress=False)
    res = full.evaluate_detailed(d / "same.npz", tmp_path / "stats_only.npz")
    assert abs(res.metrics["fid"]) < 1e-6 and "precision" not in res.metrics
    assert res.info["precision_recall"].startswith("skipped")
    # statistics of another network (Inception's 2048-d) are refused by name
    np.savez(tmp_path / "inception_stats.npz", arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(MetricError, match="mu/sigma.*2048"):
        ev(d / "same.npz", tmp_path / "inception_stats.npz")


class PixelExtractor:
    """A fixed 'network' with spatial features: pool = 2x2 block means (48-d), spatial = 4x4 means (48-d)."""

    name, weights_sha256 = "pixels", None
    spatial_description = "4x4 block means"

    def features(self, images):
        x = torch.from_numpy(np.asarray(images)).float().permute(0, 3, 1, 2) / 255  # (N, 3, 16, 16)
        pool = torch.nn.functional.avg_pool2d(x, 4).flatten(1)  # (N, 48)
        spatial = torch.nn.functional.avg_pool2d(x[:, :, :8, :8], 2).flatten(1)  # (N, 48)
        return Features(pool=pool.numpy(), spatial=spatial.numpy(), logits=None)


def test_sfid_from_spatial_features_and_mu_s_sigma_s(batches, tmp_path):
    d, images = batches
    ex = PixelExtractor()
    ev = GenerationEvaluator(feature_extractor=ex, precision_recall=False, progress=False)
    res = ev.evaluate_detailed(d / "noise.npz", d / "ref.npz")
    assert set(res.metrics) == {"fid", "sfid"}  # no logits: no IS
    f_ref, f_noise = ex.features(images), ex.features(np.load(d / "noise.npz")["arr_0"])
    assert res.metrics["sfid"] == pytest.approx(adm.frechet_distance(
        FeatureStats.of(f_noise.spatial), FeatureStats.of(f_ref.spatial)), rel=1e-9)
    assert res.info["sfid_verified"] == "false" and res.info["reference_stats_s"].startswith("computed")
    planted = FeatureStats.of(f_ref.spatial)
    shift = np.full(48, 0.1)
    write_image_batch(tmp_path / "planted.npz", images, extra={"mu_s": planted.mu + shift, "sigma_s": planted.sigma})
    res = ev.evaluate_detailed(d / "same.npz", tmp_path / "planted.npz")
    assert res.metrics["sfid"] == pytest.approx(float(shift @ shift), rel=1e-6)
    assert abs(res.metrics["fid"]) < 1e-6 and res.info["reference_stats_s"].startswith("mu_s/sigma_s")
    write_image_batch(tmp_path / "bad.npz", images, extra={"mu_s": np.zeros(5), "sigma_s": np.eye(5)})
    with pytest.raises(MetricError, match="mu_s/sigma_s"):
        ev(d / "same.npz", tmp_path / "bad.npz")


def test_num_samples_uses_the_prefix_in_file_order(batches, classifier):
    d, _ = batches
    ev = GenerationEvaluator(feature_extractor=classifier, num_samples=120, precision_recall=False,
                             is_split_size=50, progress=False)
    res = ev.evaluate_detailed(d / "noise.npz", d / "ref.npz")
    with ImageBatchReader(d / "noise.npz") as r:
        prefix = classifier.features(r.read(120))
    ref = FeatureStats.of(classifier.features(np.load(d / "ref.npz")["arr_0"]).pool)
    assert res.metrics["fid"] == pytest.approx(adm.frechet_distance(FeatureStats.of(prefix.pool), ref), rel=1e-9)
    assert res.metrics["is"] == pytest.approx(adm.inception_score(prefix.logits, split_size=50), rel=1e-9)
    assert res.info["num_samples"] == "120"
    too_many = GenerationEvaluator(feature_extractor=classifier, num_samples=301, progress=False)
    with pytest.raises(BatchFileError, match="num_samples = 301"):
        too_many(d / "noise.npz", d / "ref.npz")


def test_reference_from_another_network_is_refused(batches, classifier, digits, tmp_path):
    d, _ = batches
    make_reference(_ctx(tmp_path), dataset=digits[1], output=tmp_path / "ref_stats.npz", num_images=50,
                   feature_extractor=classifier, progress=False)
    torch.manual_seed(5)
    other = DigitsClassifier.load(DigitsClassifier(image_size=S).save(tmp_path / "other.safetensors"))
    with pytest.raises(MetricError, match="SHA-256"):
        GenerationEvaluator(feature_extractor=other, progress=False)(d / "same.npz", tmp_path / "ref_stats.npz")


# ------------------------------------------------------------------- jobs
def test_evaluate_samples_reports_fid_at_the_requested_counts(batches, classifier, tmp_path):
    d, _ = batches
    tracker = RecordingTracker()
    ctx = _ctx(tmp_path, tracker, ReportingContext)
    ev = GenerationEvaluator(feature_extractor=classifier, is_split_size=100, batch_size=64, progress=False)
    metrics = evaluate_samples(ctx, samples=d / "noise.npz", reference=d / "ref.npz", evaluator=ev,
                               fidelity_steps=(50, 130, 300), sample_seed=7)
    assert [(m, n) for m, _, n in ctx.reports] == [("fid", 50), ("fid", 130), ("fid", 300)]
    assert ctx.reports[-1][1] == metrics["fid"]
    fid_log = tracker.series("fid")
    assert [s for s, _ in fid_log] == [50, 130, 300, 300] and fid_log[-1][1] == metrics["fid"]
    assert set(metrics) == {"fid", "is", "precision", "recall"}
    assert tracker.params["eval.backend"] == "digits_classifier"
    assert tracker.params["eval.weights_sha256"] == classifier.weights_sha256
    assert tracker.params["eval.num_samples"] == "300" and tracker.params["eval.seed"] == "7"
    assert tracker.tags["arforge.eval.weights_sha256"] == classifier.weights_sha256
    assert tracker.dicts["eval/results.json"]["metrics"] == metrics
    with pytest.raises(MetricError, match="fidelity_steps"):
        evaluate_samples(ctx, samples=d / "noise.npz", reference=d / "ref.npz", evaluator=ev,
                         fidelity_steps=(100, 50))
    with pytest.raises(MetricError, match="fidelity_steps"):
        evaluate_samples(ctx, samples=d / "noise.npz", reference=d / "ref.npz", evaluator=ev,
                         fidelity_steps=(100, 1000))


def test_a_pruned_trial_stops_reading_samples(batches, classifier, tmp_path):
    d, _ = batches
    counting = CountingExtractor(classifier)
    ctx = _ctx(tmp_path, cls=ReportingContext, prune_at=50)
    ev = GenerationEvaluator(feature_extractor=counting, batch_size=32, progress=False)
    with pytest.raises(RuntimeError, match="pruned at 50"):
        evaluate_samples(ctx, samples=d / "noise.npz", reference=d / "ref.npz", evaluator=ev,
                         fidelity_steps=(50, 300))
    assert counting.seen == 300 + 50  # the reference arr_0, then exactly the first 50 samples


def test_make_reference_writes_seeded_order_labels_and_stats(digits, classifier, tmp_path):
    val = digits[1]
    info = make_reference(_ctx(tmp_path), dataset=val, output=tmp_path / "a.npz", num_images=40, seed=3,
                          progress=False, batch_size=16)
    with np.load(tmp_path / "a.npz") as z:
        assert set(z.files) == {"arr_0", "arr_1"}
        arr, labels = z["arr_0"], z["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (40, S, S, 3) and arr.flags.c_contiguous
    order = np.random.default_rng(3).permutation(len(val))[:40]
    expected = adm.to_uint8(torch.stack([val[int(i)][0] for i in order]))
    np.testing.assert_array_equal(arr, expected)
    np.testing.assert_array_equal(labels, [val.targets[int(i)] for i in order])
    assert info.num_images == 40 and info.seed == 3 and not info.with_stats
    make_reference(_ctx(tmp_path), dataset=val, output=tmp_path / "b.npz", num_images=40, seed=3, progress=False)
    make_reference(_ctx(tmp_path), dataset=val, output=tmp_path / "c.npz", num_images=40, seed=4, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["arr_0"], arr)
    assert not np.array_equal(np.load(tmp_path / "c.npz")["arr_0"], arr)
    # with statistics from a feature extractor, over exactly these uint8 images
    tracker = RecordingTracker()
    make_reference(_ctx(tmp_path, tracker), dataset=val, output=tmp_path / "s.npz", num_images=40, seed=3,
                   feature_extractor=classifier, progress=False)
    with np.load(tmp_path / "s.npz") as z:
        stats = FeatureStats.of(classifier.features(arr).pool)
        np.testing.assert_allclose(z["mu"], stats.mu, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(z["sigma"], stats.sigma, rtol=1e-6, atol=1e-9)
        assert z["sigma"].dtype == np.float64 and "mu_s" not in z.files
        assert str(z["feature_extractor"]) == "digits_classifier"
        assert str(z["feature_extractor_sha256"]) == classifier.weights_sha256
    assert tracker.params["reference.seed"] == "3" and tracker.params["reference.num_images"] == "40"
    # resizing (bicubic, no antialiasing) before rounding
    big = make_reference(_ctx(tmp_path), dataset=val, output=tmp_path / "r.npz", num_images=4, image_size=32,
                         progress=False)
    assert big.image_size == (32, 32) and np.load(tmp_path / "r.npz")["arr_0"].shape == (4, 32, 32, 3)


def test_make_reference_is_atomic(digits, tmp_path):
    class Breaks(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, i):
            if i == 77:
                raise OSError("disk on fire")
            return digits[1][i]

    with pytest.raises(OSError, match="disk on fire"):
        make_reference(_ctx(tmp_path), dataset=Breaks(), output=tmp_path / "ref.npz", seed=0, progress=False)
    assert list(tmp_path.glob("*ref.npz*")) == []


# ----------------------------------------------------------- batch files
def test_batch_files_stream_and_bad_files_are_clear(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(23, 8, 6, 3), dtype=np.uint8)
    write_image_batch(tmp_path / "a.npz", images, extra={"arr_1": np.arange(23)})
    with np.load(tmp_path / "a.npz") as z:  # numpy reads what the streaming writer wrote
        np.testing.assert_array_equal(z["arr_0"], images)
    with ImageBatchReader(tmp_path / "a.npz") as r:
        parts = list(r.batches(5))
    assert [len(p) for p in parts] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(parts), images)
    np.savez(tmp_path / "numpy.npz", images)  # np.savez's own file
    np.save(tmp_path / "plain.npy", images)
    for name in ("numpy.npz", "plain.npy"):
        with ImageBatchReader(tmp_path / name) as r:
            np.testing.assert_array_equal(np.concatenate(list(r.batches(4, limit=10))), images[:10])
    np.savez(tmp_path / "float.npz", images.astype(np.float32).transpose(0, 3, 1, 2))
    with pytest.raises(BatchFileError, match="uint8 images of shape.*to_uint8"):
        ImageBatchReader(tmp_path / "float.npz")
    np.savez(tmp_path / "named.npz", images=images)
    with pytest.raises(BatchFileError, match=r"no 'arr_0'.*\['images'\]"):
        ImageBatchReader(tmp_path / "named.npz")
    data = (tmp_path / "numpy.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(BatchFileError, match="cut.npz"):
        with ImageBatchReader(tmp_path / "cut.npz") as r:
            r.read(23)
    with pytest.raises(BatchFileError, match="3 of the announced 4"):
        with ImageBatchWriter(tmp_path / "short.npz", num_images=4, image_shape=(8, 6, 3)) as w:
            w.write(images[:3])
    assert list(tmp_path.glob("*short*")) == []


# -------------------------------------------------------- reconstruction
class BlockTokenizer(torch.nn.Module):
    """A toy tokenizer: 4x4 block means quantised to 8 grey levels (ids), painted back."""

    codebook_sizes = (8,)
    downsample = 4

    def __init__(self, exact: bool = False):
        super().__init__()
        self.exact = exact

    def forward(self, images):
        b = images.shape[0]
        means = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 4)  # (B, 1, h, w)
        ids = ((means + 1) / 2 * 7).round().clamp(0, 7).long()
        rec = images if self.exact else (ids.float() / 7 * 2 - 1).repeat_interleave(4, 2).repeat_interleave(4, 3)
        return TokenizerOutput(rec.expand_as(images), ids.reshape(b, -1, 1), {}, {})


def test_reconstruction_evaluator_one_pass(digits, classifier, tmp_path, monkeypatch):
    val = digits[1]
    images = torch.stack([val[i][0] for i in range(40)])
    tok = BlockTokenizer()
    mean_abs = lambda x, y: (x - y).abs().flatten(1).mean(1)  # noqa: E731  (an LPIPS stand-in)
    ev = ReconstructionEvaluator(feature_extractor=classifier, perceptual={"lpips_alex": mean_abs},
                                 batch_size=16, max_images=40, progress=False)
    res = ev.evaluate_detailed(tok, val)
    rec = tok(images).reconstruction.clamp(-1, 1)
    a, b = adm.to_uint8(images), adm.to_uint8(rec)
    assert res.metrics["psnr"] == pytest.approx(adm.psnr(a, b).mean(), rel=1e-9)  # mean over images
    assert res.metrics["ssim"] == pytest.approx(adm.ssim(a, b).mean(), rel=1e-9)
    assert res.metrics["lpips_alex"] == pytest.approx(float(mean_abs(images, rec).mean()), rel=1e-6)
    ids = tok(images).ids
    assert res.metrics["usage"] == len(torch.unique(ids)) / 8
    fa, fb = classifier.features(a).pool, classifier.features(b).pool
    # The evaluator extracts features in batches of 16, this line in one batch of 40: fp32 convs and
    # matmuls of another batch shape may block their sums differently (kernel- and CPU-dependent,
    # ~1e-7 relative per feature); the float64 Frechet distance passes that on at about the same
    # relative size. A wrong aggregation (a batch dropped or counted twice) moves rFID by percents.
    assert res.metrics["rfid"] == pytest.approx(
        adm.frechet_distance(FeatureStats.of(fa), FeatureStats.of(fb)), rel=1e-5)
    assert res.metrics["rfid"] > 1 and res.info["rfid_backend"] == "digits_classifier"
    exact = ReconstructionEvaluator(feature_extractor=classifier, perceptual={}, max_images=40, progress=False)
    assert abs(exact(BlockTokenizer(exact=True), val)["rfid"]) < 1e-3  # sqrtm noise: 40 images, 128-d
    # LPIPS backbones: an absent hub file is skipped and noted, an explicit missing path is an error
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    ev = ReconstructionEvaluator(lpips=("alex",), max_images=8, progress=False)
    res = ev.evaluate_detailed(tok, val)
    assert "lpips_alex" not in res.metrics and "alexnet-owt-7be5be79.pth" in res.info["lpips_alex"]
    with pytest.raises(WeightsNotFoundError):
        ReconstructionEvaluator(lpips=("vgg",), lpips_vgg_path=tmp_path / "vgg.pth", progress=False)(tok, val)


def test_evaluate_reconstructions_job_records_which_weights(digits, tmp_path):
    from arforge import checkpoint as ck

    tracker = RecordingTracker()
    tok = BlockTokenizer()
    ck.save_checkpoint(tmp_path / "ckpt", 5, {"model": tok.state_dict()})
    ev = ReconstructionEvaluator(perceptual={}, max_images=8, progress=False)
    metrics = evaluate_reconstructions(_ctx(tmp_path, tracker), tokenizer=tok, dataset=digits[1], evaluator=ev,
                                       checkpoint=tmp_path / "ckpt" / "step_00000005")
    assert {"psnr", "ssim", "usage"} <= set(metrics)
    assert tracker.params["eval.tokenizer_weights"].endswith("[model]")  # auto: no EMA in this checkpoint
    with pytest.raises(ck.CheckpointError, match="no 'ema' weights"):
        evaluate_reconstructions(_ctx(tmp_path), tokenizer=tok, dataset=digits[1], evaluator=ev,
                                 checkpoint=tmp_path / "ckpt" / "step_00000005", weights="ema")


# ------------------------------------------------------------------ tool
def test_make_reference_tool_runs_the_job_from_gin_bindings(tmp_path, capsys):
    from arforge import registry as reg

    r = reg.load_plugins()
    if "make_reference" not in r.names("jobs"):  # until pyproject.toml lists the entry point
        r.register("jobs", "make_reference", make_reference)
    spec = importlib.util.spec_from_file_location("make_reference_tool", REPO / "tools" / "make_reference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "digits_ref.npz"
    assert tool.main([str(out), "--dataset", "@datasets.digits()", "--bind", 'datasets.digits.split = "val"',
                      "--bind", f"datasets.digits.image_size = {S}", "--num-images", "20", "--seed", "2",
                      "--device", "cpu", "--quiet"]) == 0
    arr = np.load(out)["arr_0"]
    val = DigitsDataset(split="val", image_size=S)
    order = np.random.default_rng(2).permutation(len(val))[:20]
    np.testing.assert_array_equal(arr, adm.to_uint8(torch.stack([val[int(i)][0] for i in order])))
    assert "wrote 20 images of 16x16" in capsys.readouterr().out
    assert tool.main([str(tmp_path / "x.npz"), "--dataset", "@datasets.digitz()", "--quiet"]) == 2
    assert "datasets.digits" in capsys.readouterr().err  # the closest registered name


def test_reconstruction_metrics_agree_with_the_trainers_evaluate_tokenizer(digits):
    """One definition of PSNR/SSIM/LPIPS/usage: the evaluator's pass matches the trainer's validation."""
    from arforge.evaluation import reconstruction_metrics
    from arforge.trainers.tokenizer_trainer import evaluate_tokenizer

    class MeanAbs(torch.nn.Module):
        def forward(self, x, y):
            return (x - y).abs().flatten(1).mean(1)

    tok = BlockTokenizer()
    ours = reconstruction_metrics(tok, digits[1], batch_size=16, max_images=40, perceptual={"lpips": MeanAbs()})
    theirs = evaluate_tokenizer(tok, digits[1], device=torch.device("cpu"), batch_size=16, max_images=40,
                                perceptual=MeanAbs())
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], rel=1e-12), k
