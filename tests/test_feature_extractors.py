"""Feature extractors (evaluation.md §2, §6, §7): Inception wiring without real weights, the digits classifier."""

from __future__ import annotations

import sys
from unittest import mock

import numpy as np
import pytest
import torch

from arforge.checkpoint import CheckpointError
from arforge.evaluation.feature_extractors import (INCEPTION_FILENAME, FeatureExtractor, FeatureExtractorError,
                                                   InceptionV3Features, describe)
from arforge.weights import WeightsHashError, WeightsNotFoundError, sha256_of
from arforge_plugins.digits_classifier import DigitsClassifier, digits_classifier


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_fidelity_inception():
    """torch-fidelity's network with its random initialisation (no download, no weights file)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        return fe.FeatureExtractorInceptionV3("random", ["2048"])


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random stand-in for weights-inception-2015-12-05-6726825d.pth, in a hub-cache layout."""
    home = tmp_path_factory.mktemp("torch_home")
    path = home / "hub" / "checkpoints" / INCEPTION_FILENAME
    path.parent.mkdir(parents=True)
    torch.save(_random_fidelity_inception().state_dict(), path)
    yield path
    path.unlink()  # 95 MB


def test_missing_inception_weights_error_names_file_and_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(WeightsNotFoundError) as err:
        InceptionV3Features()
    msg = str(err.value)
    assert INCEPTION_FILENAME in msg and "$TORCH_HOME/hub/checkpoints" in msg
    assert "feature_extractors.inception.weights_path" in msg and "No Python package ships" in msg
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        InceptionV3Features(weights_path=tmp_path / "nope.pth")


def test_missing_torch_fidelity_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(FeatureExtractorError, match=r"pip install 'arforge\[fid\]'"):
        InceptionV3Features(weights_path="irrelevant.pth")


def test_random_inception_builds_offline_with_adm_feature_shapes(inception_file, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(inception_file.parents[2]))
    with pytest.raises(WeightsHashError, match="6726825d"):  # the random file is not the official one
        InceptionV3Features()
    net = InceptionV3Features(verify_hash=False)  # found in $TORCH_HOME/hub/checkpoints
    assert net.weights_file == str(inception_file) and net.weights_sha256 == sha256_of(inception_file)
    assert isinstance(net, FeatureExtractor)
    captured = {}
    net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(out=o.clone()))
    images = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    f = net.features(images)
    assert f.pool.shape == (2, 2048) and f.logits.shape == (2, 1008) and f.spatial.shape == (2, 2023)
    # IS logits: pool_3 @ W with no bias (evaluation.md §2.5); the random fc bias is non-zero
    w, b = net.net.fc.weight.double().numpy(), net.net.fc.bias.double().numpy()
    np.testing.assert_allclose(f.logits, f.pool.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)
    assert np.abs(f.logits - (f.pool @ w.T + b)).max() > 1e-2
    # sFID: the first 7 channels of the 17x17 map, flattened NHWC
    expected = captured["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    assert captured["out"].shape == (2, 192, 17, 17)
    np.testing.assert_array_equal(f.spatial, expected)
    # a tensor input gives the same features; the description flags sFID as unverified
    again = net.features(torch.from_numpy(images))
    np.testing.assert_array_equal(again.pool, f.pool)
    info = describe(net)
    assert info["sfid_verified"] == "false" and "unverified" in info["sfid_features"]
    assert info["weights_sha256"] == net.weights_sha256


def test_wrong_inception_file_is_refused_by_name(tmp_path):
    path = tmp_path / INCEPTION_FILENAME
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(FeatureExtractorError, match=INCEPTION_FILENAME.replace(".", r"\.")):
        InceptionV3Features(weights_path=path, verify_hash=False)


def test_extractors_take_uint8_nhwc_only():
    clf = DigitsClassifier(image_size=16)
    with pytest.raises(FeatureExtractorError, match="to_uint8"):
        clf.features(np.zeros((2, 3, 16, 16), dtype=np.uint8))  # NCHW
    with pytest.raises(FeatureExtractorError, match="to_uint8"):
        clf.features(np.zeros((2, 16, 16, 3), dtype=np.float32))
    with pytest.raises(FeatureExtractorError, match="image_size = 32"):
        clf.features(np.zeros((2, 32, 32, 3), dtype=np.uint8))


def test_digits_classifier_file_round_trip(tmp_path):
    torch.manual_seed(0)
    clf = DigitsClassifier(image_size=16, width=8, feature_dim=64)
    assert isinstance(clf, FeatureExtractor) and clf.weights_sha256 is None
    images = np.random.default_rng(1).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    before = clf.features(images)
    assert before.pool.shape == (5, 64) and before.logits.shape == (5, 10) and before.spatial is None
    assert (before.pool >= 0).all()  # post-ReLU, like pool_3
    path = clf.save(tmp_path / "clf.safetensors")
    loaded = digits_classifier(path=path)
    assert loaded.config == clf.config and loaded.weights_sha256 == sha256_of(path)
    after = loaded.features(images)
    np.testing.assert_array_equal(after.pool, before.pool)
    np.testing.assert_array_equal(after.logits, before.logits)
    assert describe(loaded)["weights_sha256"] == sha256_of(path) and "sfid_features" not in describe(loaded)


def test_digits_classifier_bad_files_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="jobs.train_feature_extractor"):
        digits_classifier(path=tmp_path / "missing.safetensors")
    from arforge.checkpoint import save_weights

    other = save_weights(tmp_path / "other.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not a DigitsClassifier file"):
        DigitsClassifier.load(other)
