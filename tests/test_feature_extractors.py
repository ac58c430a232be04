"""Feature extractors (docs/evaluation.md#adm-evaluator-semantics, docs/evaluation.md#testing-metric-code, docs/evaluation.md#weights): Inception wiring without real weights, the digits classifier."""

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
from arforge_plugins.evaluators.digits_classifier import DigitsClassifier, digits_classifier


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
    # IS logits: pool_3 @ W with no bias (docs/evaluation.md#inception-score); the random fc bias is non-zero
    w, b = net.net.fc.weight.double().numpy(), net.net.fc.bias.double().numpy()
    np.testing.assert_allclose(f.logits, f.pool.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)
    assert np.abs(f.logits - (f.pool @ w.T + b)).max() > 1e-2
    # sFID: the first 7 channels of the 17x17 map, flattened NHWC
    expected = captured["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    assert captured["out"].shape == (2, 192, 17, 17)
    np.testing.assert_array_equal(f.spatial, expected)
    # a tensor input gives the same features; the description names the layer and its TF tensor, and
    # sfid_verified stays false (no numerical comparison with TF has been run)
    again = net.features(torch.from_numpy(images))
    np.testing.assert_array_equal(again.pool, f.pool)
    info = describe(net)
    assert info["sfid_verified"] == "false" and "not yet compared numerically" in info["sfid_features"]
    assert "Mixed_6d.branch1x1" in info["sfid_features"] and "mixed_6/conv:0" in info["sfid_features"]
    assert info["weights_sha256"] == net.weights_sha256


# TF 2015 graph block -> torch-fidelity module -> output (C, H, W) at 299x299 (docs/evaluation.md, "sFID: which
# layer"); the name map is torch-fidelity's utils/util_convert_inception_weights.py
TF_BLOCKS = [("mixed", "Mixed_5b", (256, 35, 35)), ("mixed_1", "Mixed_5c", (288, 35, 35)),
             ("mixed_2", "Mixed_5d", (288, 35, 35)), ("mixed_3", "Mixed_6a", (768, 17, 17)),
             ("mixed_4", "Mixed_6b", (768, 17, 17)), ("mixed_5", "Mixed_6c", (768, 17, 17)),
             ("mixed_6", "Mixed_6d", (768, 17, 17)), ("mixed_7", "Mixed_6e", (768, 17, 17)),
             ("mixed_8", "Mixed_7a", (1280, 8, 8)), ("mixed_9", "Mixed_7b", (2048, 8, 8)),
             ("mixed_10", "Mixed_7c", (2048, 8, 8))]


def test_sfid_layer_is_tf_mixed_6_conv_in_the_documented_block_table():
    """The table in docs/evaluation.md, checked on torch-fidelity's network (random weights, one 299x299 image)."""
    net = _random_fidelity_inception().eval()
    assert InceptionV3Features.SFID_MODULE == "Mixed_6d.branch1x1"
    assert InceptionV3Features.SFID_TF_TENSOR == "mixed_6/conv:0" and InceptionV3Features.SFID_CHANNELS == 7
    shapes = {}
    for _, module, _ in TF_BLOCKS + [(None, "Mixed_6d.branch1x1", None)]:
        net.get_submodule(module).register_forward_hook(
            lambda m, i, o, name=module: shapes.__setitem__(name, tuple(o.shape[1:])))
    with torch.no_grad():
        net(torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8))
    assert {module: shapes[module] for _, module, _ in TF_BLOCKS} == {module: s for _, module, s in TF_BLOCKS}
    # the 17x17 blocks that have a 1x1 `conv` branch are mixed_4..mixed_7 (InceptionC); the 7x7 tower width
    # (tower/conv's output channels in TF) is 128, 160, 160, 192: mixed_6 is the second 160 block, after mixed_5
    assert [type(net.get_submodule(m)).__name__ for _, m, _ in TF_BLOCKS[3:9]] == \
        ["InceptionB", "InceptionC", "InceptionC", "InceptionC", "InceptionC", "InceptionD"]
    assert [net.get_submodule(m).branch7x7_1.conv.out_channels for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d",
                                                                          "Mixed_6e")] == [128, 160, 160, 192]
    # mixed_6/conv: a 1x1 conv 768 -> 192 without bias, BatchNorm with TF's epsilon, then ReLU
    branch = net.Mixed_6d.branch1x1
    assert tuple(branch.conv.weight.shape) == (192, 768, 1, 1) and branch.conv.bias is None
    assert branch.bn.eps == pytest.approx(1e-3) and shapes["Mixed_6d.branch1x1"] == (192, 17, 17)
    x = torch.randn(2, 768, 17, 17)
    with torch.no_grad():
        expected = torch.relu(branch.bn(branch.conv(x)))
        np.testing.assert_array_equal(branch(x.clone()).numpy(), expected.numpy())


def test_sfid_features_are_the_hooked_module_first_7_channels_nhwc(inception_file):
    net = InceptionV3Features(weights_path=inception_file, verify_hash=False)
    module = net.net.get_submodule(InceptionV3Features.SFID_MODULE)
    assert module is net.net.Mixed_6d.branch1x1
    # the extractor's hook sits on that module and on no other
    hooked = [name for name, m in net.net.named_modules()
              if any(getattr(h, "__self__", None) is net for h in m._forward_hooks.values())]
    assert hooked == ["Mixed_6d.branch1x1"]
    captured = {}
    module.register_forward_hook(lambda m, i, o: captured.update(out=o.clone()))
    images = np.random.default_rng(2).integers(0, 256, size=(3, 24, 20, 3), dtype=np.uint8)
    f = net.features(images)
    out = captured["out"]
    assert out.shape == (3, 192, 17, 17) and f.spatial.shape == (3, 2023) and f.spatial.dtype == np.float32
    assert (out >= 0).all()  # after the ReLU
    # feature index (h * 17 + w) * 7 + c holds channel c < 7 at (h, w): TF's NHWC spatial[..., :7].reshape([N, -1])
    nhwc = out.permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(f.spatial.reshape(3, 17, 17, 7), nhwc[..., :7])
    np.testing.assert_array_equal(f.spatial, nhwc[..., :7].reshape(3, -1))
    # ... not channels 7..13, and not the NCHW flattening of the same 7 channels
    assert not np.array_equal(f.spatial, nhwc[..., 7:14].reshape(3, -1))
    assert not np.array_equal(f.spatial, out[:, :7].reshape(3, -1).numpy())


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
