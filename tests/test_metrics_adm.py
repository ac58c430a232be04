"""ADM-semantics metrics against slow float64 references and constructed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from arforge.metrics import adm


def _ref_fid(x, y):
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    y = rng.normal(loc=0.3, scale=1.2, size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.3
    got = adm.frechet_distance(adm.FeatureStats.of(x), adm.FeatureStats.of(y))
    assert got == pytest.approx(_ref_fid(x, y), rel=1e-9, abs=1e-9)
    assert got > 1


def test_frechet_distance_of_few_samples_takes_the_exact_low_rank_path():
    """N <= D samples: the trace term comes from the N x N Gram form, equal to ADM's sqrtm of the
    D x D product, with the low-rank side first, second, or both."""
    rng = np.random.default_rng(2)
    few = rng.normal(size=(6, 24)) @ rng.normal(size=(24, 24)) * 0.5
    other = rng.normal(loc=0.2, size=(5, 24))
    full = rng.normal(size=(200, 24)) @ rng.normal(size=(24, 24)) * 0.3
    a, b, c = adm.FeatureStats.of(few), adm.FeatureStats.of(other), adm.FeatureStats.of(full)
    assert a.factor.shape == (5, 24) and c.factor is None  # centring leaves rank N - 1
    np.testing.assert_allclose(a.factor.T @ a.factor, a.sigma, atol=1e-12)
    for x, y, sx, sy in ((few, full, a, c), (full, few, c, a), (few, other, a, b)):
        expected = _ref_fid(x, y)
        # sqrtm of a rank-deficient product is itself only good to ~1e-8 relative here
        assert adm.frechet_distance(sx, sy) == pytest.approx(expected, rel=1e-7)
        # the same statistics without the factor go through sqrtm and agree
        assert adm.frechet_distance(adm.FeatureStats(sx.mu, sx.sigma), adm.FeatureStats(sy.mu, sy.sigma)) == \
            pytest.approx(expected, rel=1e-7)
    assert adm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_set_against_itself_is_zero():
    x = np.random.default_rng(1).normal(size=(500, 32))
    s = adm.FeatureStats.of(x)
    assert abs(adm.frechet_distance(s, s)) < 1e-6


def test_inception_score_uniform_is_one_and_confident_is_classes():
    assert adm.inception_score(np.zeros((100, 10))) == pytest.approx(1.0)
    logits = np.full((1000, 10), -1e4)
    logits[np.arange(1000), np.arange(1000) % 10] = 0  # confident and balanced
    assert adm.inception_score(logits) == pytest.approx(10.0, rel=1e-6)
    # splits are consecutive in file order: class-sorted files lower IS
    sorted_logits = logits[np.argsort(np.arange(1000) % 10, kind="stable")]
    assert adm.inception_score(sorted_logits, split_size=100) < 2.0


@pytest.mark.parametrize("fp16", [True, False])
def test_precision_recall_constructed_sets(fp16):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(200, 8)).astype(np.float32)
    assert adm.precision_recall(a, a.copy(), fp16=fp16) == (1.0, 1.0)
    far = a + 100.0
    assert adm.precision_recall(a, far, fp16=fp16) == (0.0, 0.0)
    # samples covering only half of the reference: full precision, recall about a half
    half = a[a[:, 0] > 0]
    p, r = adm.precision_recall(a, half, fp16=fp16)
    assert p == 1.0 and 0.5 <= r < 0.95


def test_to_uint8_rounds_not_truncates():
    import torch

    x = torch.tensor([-1.0, -0.996, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    u8 = adm.to_uint8(x)
    assert u8.shape == (1, 1, 6, 3)
    assert u8[0, 0, :, 0].tolist() == [0, 1, 128, 191, 255, 255]


def test_psnr_ssim_identity_and_noise():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    noisy = np.clip(a.astype(int) + rng.integers(-10, 11, size=a.shape), 0, 255).astype(np.uint8)
    assert np.all(adm.psnr(a, a) > 150)
    p = adm.psnr(a, noisy)
    mse = ((a / 255.0 - noisy / 255.0) ** 2).reshape(4, -1).mean(1)
    assert np.allclose(p, 10 * np.log10(1 / mse))
    assert np.allclose(adm.ssim(a, a), 1.0) and np.all(adm.ssim(a, noisy) < 1.0)
