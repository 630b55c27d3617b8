"""Histogram collection and the range methods (percentile, entropy, minmax) on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from latentrt.calibration.histogram import Histogram, entropy_amax, percentile_amax


def _filled(chunks, bins=2048) -> Histogram:
    hist = Histogram(bins)
    for chunk in chunks:
        hist.update(chunk)
    return hist


def test_growing_range_rebins_exactly():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(0, s, 20_000).astype(np.float32) for s in (0.5, 1.0, 4.0, 2.0)]  # the max grows twice
    hist = _filled(chunks)
    values = np.abs(np.concatenate(chunks))
    assert hist.absmax == pytest.approx(values.max())
    assert hist.counts.sum() == values.size
    assert hist.range >= values.max()
    reference, _ = np.histogram(values, bins=hist.bins, range=(0.0, hist.range))
    assert np.abs(hist.counts - reference).sum() <= 0.001 * values.size  # only float rounding at bin edges differs


def test_percentile_matches_numpy_within_one_bin():
    rng = np.random.default_rng(1)
    chunks = [rng.laplace(0, 1, 50_000).astype(np.float32) for _ in range(4)]
    hist = _filled(chunks)
    values = np.abs(np.concatenate(chunks))
    width = hist.range / hist.bins
    for p in (50.0, 99.0, 99.9, 99.99):
        assert abs(percentile_amax(hist, p) - np.percentile(values, p)) <= width
    assert percentile_amax(hist, 100.0) == pytest.approx(values.max())


def _entropy_reference(counts: np.ndarray, levels: int = 128, start: int = 128) -> int:
    """The GTC 2017 pseudo-code, literally (MXNet's zero handling), as the index of the best threshold."""
    best, best_kl = None, np.inf
    for i in range(start, len(counts) + 1):
        p = counts[:i].astype(np.float64).copy()
        p[i - 1] += counts[i:].sum()
        merged = len(p) // levels
        q = np.zeros(i)
        for j in range(levels):
            lo, hi = j * merged, (j + 1) * merged if j < levels - 1 else i
            nonzero = [k for k in range(lo, hi) if p[k] != 0]
            for k in nonzero:
                q[k] = counts[lo:hi].sum() / len(nonzero)
        p, q = p / p.sum(), q / q.sum()
        kl = sum(p[k] * np.log(p[k] / q[k]) if q[k] > 0 else np.inf for k in range(i) if p[k] > 0)
        if kl < best_kl:
            best, best_kl = i, kl
    return best


def test_entropy_matches_the_reference_algorithm():
    rng = np.random.default_rng(2)
    hist = _filled([rng.normal(0, 1, 100_000).astype(np.float32)], bins=512)
    threshold = entropy_amax(hist)
    assert threshold == pytest.approx(hist.edges[_entropy_reference(hist.counts)])


def test_entropy_clips_a_heavy_tail_and_keeps_a_uniform_range():
    rng = np.random.default_rng(3)
    heavy = _filled([rng.standard_t(3, 200_000).astype(np.float32)])  # Student t, 3 dof: max ~88
    amax = entropy_amax(heavy)
    assert 5.0 < amax < 0.5 * heavy.absmax  # clips the sparse tail (measured 21.6), keeps the bulk
    uniform = _filled([rng.uniform(-1, 1, 200_000).astype(np.float32)])
    assert entropy_amax(uniform) > 0.98  # nothing to gain from clipping a uniform distribution


def test_minmax_is_the_exact_absmax_and_zeros_are_counted():
    hist = _filled([np.zeros(10, np.float32), np.array([0.5, -3.0], np.float32)])
    assert hist.absmax == 3.0
    assert hist.counts.sum() == 12 and hist.counts[0] == 10


def test_bad_percentile_and_non_finite_values_are_rejected():
    hist = _filled([np.ones(4, np.float32)])
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        percentile_amax(hist, 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        hist.update(np.array([np.inf], np.float32))
