"""Tests of surgery.cka against a pure-numpy float64 reference in the style of Kornblith et al.'s
``representation_similarity`` demo (U-centred Grams for the unbiased estimator)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery.cka import (
    CKAInputError,
    StreamingCKA,
    block_similarity,
    cka,
    gram,
    hsic_biased,
    hsic_unbiased,
)
from surgery.errors import SurgeryError

# ---------------------------------------------------------------- numpy reference (independent code)


def ref_centre_gram(k: np.ndarray, unbiased: bool) -> np.ndarray:
    """Kornblith's ``center_gram``: plain double centring, or U-centring (Székely & Rizzo 2014)."""
    k = k.astype(np.float64).copy()
    n = k.shape[0]
    if unbiased:
        np.fill_diagonal(k, 0.0)
        means = k.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        k -= means[:, None]
        k -= means[None, :]
        np.fill_diagonal(k, 0.0)
    else:
        means = k.mean(0)
        means -= means.mean() / 2
        k -= means[:, None]
        k -= means[None, :]
    return k


def ref_hsic(x: np.ndarray, y: np.ndarray, unbiased: bool) -> float:
    """HSIC_1 as the U-centred inner product / (n (n-3)); HSIC_0 as tr(KHLH) / (n-1)^2."""
    n = x.shape[0]
    kx = ref_centre_gram(x @ x.T, unbiased)
    ky = ref_centre_gram(y @ y.T, unbiased)
    scale = n * (n - 3) if unbiased else (n - 1) ** 2
    return float(kx.ravel() @ ky.ravel()) / scale


def ref_cka(x: np.ndarray, y: np.ndarray, unbiased: bool = True) -> float:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    return ref_hsic(x, y, unbiased) / np.sqrt(ref_hsic(x, x, unbiased) * ref_hsic(y, y, unbiased))


def correlated(rng: np.random.Generator, n: int, d1: int, d2: int, noise: float = 0.5):
    x = rng.standard_normal((n, d1))
    y = np.maximum(x @ rng.standard_normal((d1, d2)), 0) + noise * rng.standard_normal((n, d2))
    return x, y


# ---------------------------------------------------------------- one-shot


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("form", ["gram", "feature", "auto"])
@pytest.mark.parametrize("shape", [(40, 7, 5), (30, 90, 60)])
def test_cka_matches_reference(estimator, form, shape):
    rng = np.random.default_rng(0)
    x, y = correlated(rng, *shape)
    expected = ref_cka(x, y, unbiased=estimator == "unbiased")
    assert cka(x, y, estimator=estimator, form=form) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_hsic_unbiased_equals_song_formula_and_reference():
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((3, 12, 6))
    ys = rng.standard_normal((3, 12, 4))
    k = torch.as_tensor(xs @ xs.transpose(0, 2, 1))
    l = torch.as_tensor(ys @ ys.transpose(0, 2, 1))  # noqa: E741
    got = hsic_unbiased(k, l).numpy()
    assert got.shape == (3,)
    np.testing.assert_allclose(got, [ref_hsic(a, b, True) for a, b in zip(xs, ys, strict=True)], rtol=1e-10)
    got0 = hsic_biased(k, l).numpy()
    np.testing.assert_allclose(got0, [ref_hsic(a, b, False) for a, b in zip(xs, ys, strict=True)], rtol=1e-10)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_self_similarity_is_one(estimator):
    x = np.random.default_rng(2).standard_normal((50, 20))
    assert cka(x, x, estimator) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_invariance_to_orthogonal_transform_and_isotropic_scaling(estimator):
    rng = np.random.default_rng(3)
    x, y = correlated(rng, 60, 16, 24)
    q, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    base = cka(x, y, estimator)
    assert cka(x, y @ q, estimator) == pytest.approx(base, rel=1e-9)
    assert cka(3.7 * x, 0.01 * y, estimator) == pytest.approx(base, rel=1e-9)


def test_unbiased_near_zero_for_independent_features_where_biased_drifts():
    # d >> n: the biased estimator reports strong similarity between unrelated features.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((128, 2048))
    y = rng.standard_normal((128, 2048))
    assert abs(cka(x, y, "unbiased")) < 0.05
    assert cka(x, y, "biased") > 0.5


def test_float32_inputs_agree_with_float64_reference():
    rng = np.random.default_rng(5)
    x, y = correlated(rng, 64, 32, 48)
    x32 = torch.as_tensor(x, dtype=torch.float32)
    y32 = torch.as_tensor(y, dtype=torch.float32)
    # The reference sees the same float32-rounded numbers; only the arithmetic precision differs.
    expected = ref_cka(x32.double().numpy(), y32.double().numpy())
    assert cka(x32, y32) == pytest.approx(expected, rel=1e-6)
    acc = StreamingCKA()
    acc.update([x32, y32])
    assert acc.compute()[0, 1] == pytest.approx(expected, rel=1e-6)


def test_higher_dimensional_features_are_flattened_per_sample():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((20, 3, 4, 4))
    y = rng.standard_normal((20, 5, 2))
    assert cka(x, y) == pytest.approx(ref_cka(x.reshape(20, -1), y.reshape(20, -1)), rel=1e-9)
    assert gram(torch.as_tensor(x)).shape == (20, 20)


def test_errors_are_clear():
    x = np.ones((3, 5))
    with pytest.raises(CKAInputError, match="at least 4 samples"):
        cka(x, x)
    assert issubclass(CKAInputError, SurgeryError)
    with pytest.raises(CKAInputError, match="same number of samples"):
        cka(np.ones((8, 2)), np.ones((9, 2)))
    with pytest.raises(CKAInputError, match="unknown CKA estimator"):
        cka(np.ones((8, 2)), np.ones((8, 2)), estimator="rbf")
    assert np.isnan(cka(np.ones((8, 2)), np.random.default_rng(0).standard_normal((8, 2))))


# ---------------------------------------------------------------- streaming


def make_feature_sets(seed: int, n: int):
    rng = np.random.default_rng(seed)
    x, y = correlated(rng, n, 24, 40)
    z = rng.standard_normal((n, 300))  # independent, high-dimensional
    w = np.tanh(x[:, :10]) + 0.1 * rng.standard_normal((n, 10))
    return [x, y, z, w]


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_streaming_equals_sum_of_reference_batch_hsics(estimator):
    unbiased = estimator == "unbiased"
    batches = [make_feature_sets(s, n) for s, n in [(10, 32), (11, 48), (12, 32), (13, 5)]]
    acc = StreamingCKA(estimator)
    for feats in batches:
        acc.update([torch.as_tensor(f) for f in feats])
    p = len(batches[0])
    h = np.zeros((p, p))
    for feats in batches:
        h += [[ref_hsic(a, b, unbiased) for b in feats] for a in feats]
    np.testing.assert_allclose(acc.hsic(), h, rtol=1e-9, atol=1e-9)
    expected = h / np.sqrt(np.outer(np.diag(h), np.diag(h)))
    np.testing.assert_allclose(acc.compute(), expected, rtol=1e-9, atol=1e-12)
    assert acc.num_batches == 4 and acc.num_samples == 32 + 48 + 32 + 5


def test_streaming_single_batch_equals_pairwise_calls():
    feats = make_feature_sets(20, 64)
    acc = StreamingCKA()
    acc.update(feats)
    sim = acc.compute()
    pairwise = np.array([[cka(a, b) for b in feats] for a in feats])
    np.testing.assert_allclose(sim, pairwise, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(sim, sim.T)
    np.testing.assert_array_equal(np.diag(sim), np.ones(len(feats)))


def test_streaming_minibatch_close_to_full_batch_and_independent_near_zero():
    rng = np.random.default_rng(21)
    x, y = correlated(rng, 1024, 32, 64)
    z = rng.standard_normal((1024, 512))
    acc = StreamingCKA()
    for i in range(0, 1024, 128):
        acc.update([x[i : i + 128], y[i : i + 128], z[i : i + 128]])
    sim = acc.compute()
    assert sim[0, 1] == pytest.approx(cka(x, y), abs=0.03)
    assert abs(sim[0, 2]) < 0.05 and abs(sim[1, 2]) < 0.05


def test_streaming_rejects_bad_batches():
    acc = StreamingCKA()
    with pytest.raises(CKAInputError, match="at least 4 samples.*64 or more"):
        acc.update([np.ones((3, 2)), np.ones((3, 4))])
    with pytest.raises(CKAInputError, match="same samples"):
        acc.update([np.ones((8, 2)), np.ones((9, 4))])
    with pytest.raises(CKAInputError, match="no batches"):
        acc.compute()
    acc.update(make_feature_sets(0, 8))
    with pytest.raises(CKAInputError, match="expected 4"):
        acc.update(make_feature_sets(0, 8)[:3])
    acc.reset()
    assert acc.num_batches == 0
    StreamingCKA("biased").update([np.random.default_rng(0).standard_normal((2, 3))])  # n=2 is fine biased


def test_streaming_constant_feature_set_gives_nan_not_crash():
    rng = np.random.default_rng(22)
    acc = StreamingCKA()
    acc.update([rng.standard_normal((16, 4)), np.zeros((16, 3))])
    sim = acc.compute()
    assert sim[0, 0] == 1.0 and np.isnan(sim[1, 1]) and np.isnan(sim[0, 1])


def test_block_similarity_sums_input_and_output_similarity():
    assert block_similarity(0.25, 0.5) == 0.75
    a = np.array([[1.0, 0.2], [0.2, 1.0]])
    np.testing.assert_allclose(block_similarity(a, a.T), 2 * a)


# ---------------------------------------------------------------- offsets and scales (issue 9)


def offset_input():
    """The issue's input: 200 x 64 unit-variance float32 features (torch seed 7), y = x + noise."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 64, generator=g)
    return x, x + 0.5 * torch.randn(200, 64, generator=g)


def test_common_offset_of_150_gives_the_offset_free_cka():
    x, y = offset_input()
    free = cka(x, y)  # about 0.797 on this input
    assert np.isfinite(free)
    xo, yo = x + 150.0, y + 150.0  # float32: the offset input is rounded to 1.5e-5 at 150
    # The exact answer on the rounded numbers, and the offset-free one up to that rounding.
    expected = ref_cka(xo.double().numpy() - 150.0, yo.double().numpy() - 150.0)
    for form in ("gram", "feature"):
        got = cka(xo, yo, form=form)
        assert got == pytest.approx(expected, rel=1e-9)
        assert got == pytest.approx(free, abs=1e-4)
    acc = StreamingCKA()
    acc.update([xo, yo])
    assert acc.compute()[0, 1] == pytest.approx(expected, rel=1e-9)


SHIFTS = {
    "common 150": lambda a: a + 150.0,
    "common 1e6": lambda a: a + 1e6,
    "one channel 1e3": lambda a: a + np.eye(1, a.shape[1]) * 1e3,
    "one channel 1e6": lambda a: a + np.eye(1, a.shape[1]) * 1e6,
    "scale 1e6": lambda a: a * 1e6,
    "scale 1e-6": lambda a: a * 1e-6,
    "scale 1e-6, offset 1": lambda a: a * 1e-6 + 1.0,
    "scale 1e6, offset 1e9": lambda a: a * 1e6 + 1e9,
}


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("shift", list(SHIFTS))
def test_offsets_and_scales_match_the_float64_reference(shift, estimator):
    # float64 features: the shifted numbers keep the offset-free information, so every form must
    # give the offset-free reference value (the reference itself sees unshifted data).
    rng = np.random.default_rng(30)
    x, y = correlated(rng, 120, 24, 40)
    unbiased = estimator == "unbiased"
    expected = ref_cka(x, y, unbiased)
    f = SHIFTS[shift]
    xs, ys = f(x), f(y)
    for form in ("gram", "feature"):
        assert cka(xs, ys, estimator, form=form) == pytest.approx(expected, rel=1e-9), form
    # Streaming over minibatches equals the sum of per-batch reference HSICs of the unshifted data.
    acc = StreamingCKA(estimator)
    h = np.zeros((2, 2))
    for i in range(0, 120, 40):
        acc.update([torch.as_tensor(xs[i : i + 40]), torch.as_tensor(ys[i : i + 40])])
        a, b = x[i : i + 40], y[i : i + 40]
        h += [[ref_hsic(u, v, unbiased) for v in (a, b)] for u in (a, b)]
    assert acc.compute()[0, 1] == pytest.approx(h[0, 1] / np.sqrt(h[0, 0] * h[1, 1]), rel=1e-9)


def test_features_constant_up_to_rounding_stay_nan():
    # A set that is constant in exact arithmetic but differs by an ulp here and there (as a dead
    # network's outputs do after normalisation) has no variance: centring must not turn its
    # rounding noise into a "similarity".
    rng = np.random.default_rng(31)
    x = rng.standard_normal((50, 6))
    const = np.full((50, 3), [0.1, 1e3, 1e6])
    flip = rng.random(const.shape) < 0.5
    const[flip] = np.nextafter(const[flip], np.inf)
    assert np.isnan(cka(x, const)) and np.isnan(cka(const, x, form="feature"))
    acc = StreamingCKA()
    acc.update([x, const])
    assert np.isnan(acc.compute()[0, 1])
