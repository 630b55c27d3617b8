"""Running |x| histograms and the activation-range methods that read them.

`Histogram` keeps a fixed number of bins over [0, range). When a batch exceeds the range, the range
doubles (as many times as needed) and neighbouring bins are summed pairwise, so the old counts are
re-binned exactly and memory stays fixed, as TensorRT's and ModelOpt's histogram calibrators grow
their range. From it:

- `percentile_amax(hist, p)`: the smallest bin edge below which p% of |x| lies;
- `entropy_amax(hist)`: TensorRT's IInt8EntropyCalibrator2 threshold (KL divergence between the
  clipped reference distribution and its 128-level quantization, thresholds from bin 128 up);
- `Histogram.absmax`: the exact running max (the "minmax" method).

Reference: Szymon Migacz, "8-bit Inference with TensorRT", GTC 2017.
"""

from __future__ import annotations

import numpy as np

DEFAULT_BINS = 2048


class Histogram:
    """A histogram of |x| with `bins` equal bins over [0, range); `range` doubles as values grow.

    Attributes:
        counts: int64 [bins].
        range: the upper edge of the last bin (0 until the first non-zero value).
        absmax: the exact largest |x| seen.
    """

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2 (re-binning halves the bin count), got {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.range = 0.0
        self.absmax = 0.0
        self.zeros = 0  # values seen before any non-zero one (they belong in bin 0)

    def update(self, x: np.ndarray) -> None:
        """Add the values of `x` (any shape, float)."""
        a = np.abs(np.asarray(x, dtype=np.float32)).ravel()
        if a.size == 0:
            return
        batch_max = float(a.max())
        if not np.isfinite(batch_max):
            raise ValueError("calibration saw a non-finite activation (inf or NaN); check the model and the prompts")
        self.absmax = max(self.absmax, batch_max)
        if batch_max == 0.0 and self.range == 0.0:
            self.zeros += a.size
            return
        if self.range == 0.0:
            self.range = batch_max
        while batch_max >= self.range:
            self._double()
        width = self.range / self.bins
        index = np.minimum((a / np.float32(width)).astype(np.int64), self.bins - 1)
        self.counts += np.bincount(index, minlength=self.bins)
        if self.zeros:
            self.counts[0] += self.zeros
            self.zeros = 0

    def _double(self) -> None:
        """Double the range: bin i of the new histogram holds old bins 2i and 2i+1."""
        half = self.counts.reshape(-1, 2).sum(axis=1)
        self.counts = np.concatenate([half, np.zeros(self.bins // 2, dtype=np.int64)])
        self.range *= 2.0

    @property
    def edges(self) -> np.ndarray:
        """float64 [bins + 1] bin edges."""
        return np.linspace(0.0, self.range, self.bins + 1)

    def to_dict(self) -> dict:
        return {"bins": self.bins, "counts": self.counts.tolist(), "range": self.range, "absmax": self.absmax}


def percentile_amax(hist: Histogram, percentile: float) -> float:
    """The upper edge of the first bin where the cumulative share of |x| reaches `percentile` %.

    Within one bin width of `numpy.percentile(abs(x), percentile)`.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    total = hist.counts.sum()
    if total == 0 or hist.range == 0.0:
        return hist.absmax
    cdf = np.cumsum(hist.counts)
    index = int(np.searchsorted(cdf, percentile / 100.0 * total, side="left"))
    index = min(index, hist.bins - 1)
    return min(float(hist.edges[index + 1]), hist.absmax)


def entropy_amax(hist: Histogram, *, num_levels: int = 128, start_bin: int = 128, stride: int = 1) -> float:
    """TensorRT's entropy calibration threshold for a histogram of |x|.

    For each candidate i (bins from `start_bin` to the last, every `stride`):
    1. P = counts[:i] with the outliers counts[i:] added to its last bin;
    2. Q = counts[:i] merged into `num_levels` groups, each group's total spread evenly over the
       group's bins that are non-empty in P (empty bins stay empty): what int8 can represent;
    3. KL(P || Q) over the normalized distributions.
    The threshold is the upper edge of the bins of the i with the smallest divergence.
    """
    counts = hist.counts.astype(np.float64)
    nbins = counts.size
    if counts.sum() == 0 or hist.range == 0.0:
        return hist.absmax
    last_nonzero = int(np.flatnonzero(counts)[-1]) + 1
    if last_nonzero <= start_bin:
        # All values fit below the first candidate: no clipping helps.
        return float(hist.edges[last_nonzero])
    total = counts.sum()
    suffix = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # suffix[i] = counts[i:].sum()
    best_i, best_kl = nbins, np.inf
    for i in range(start_bin, nbins + 1, stride):
        kl = _kl_for_threshold(counts[:i], suffix[i], total, num_levels)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(hist.edges[best_i])


def _kl_for_threshold(sliced: np.ndarray, outliers: float, total: float, num_levels: int) -> float:
    i = sliced.size
    p = sliced.copy()
    p[-1] += outliers
    nonzero = p != 0  # as MXNet's and TensorRT's: the clipped bin counts as representable
    group = np.minimum(np.arange(i) // (i // num_levels), num_levels - 1)
    group_sum = np.bincount(group, weights=sliced, minlength=num_levels)
    group_nonzero = np.bincount(group, weights=nonzero, minlength=num_levels)
    per_bin = np.divide(group_sum, group_nonzero, out=np.zeros_like(group_sum), where=group_nonzero > 0)
    q = np.where(nonzero, per_bin[group], 0.0)
    p /= total
    q_sum = q.sum()
    if q_sum == 0:
        return np.inf
    q /= q_sum
    mask = p > 0
    if np.any(q[mask] == 0):
        return np.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
