"""Memorization metrics from nearest-neighbour distances: pure functions of arrays.

Three named copy criteria, each a flag per sample:
- "ratio": the memorization ratio (Yoon et al., Gu et al.): L2 to the nearest / L2 to the second nearest
  training image; a sample is memorized when it is below a threshold (config.MEMORIZATION_THRESHOLD by convention).
- "distance": L2 to the nearest training image below delta, a low quantile of the training
  images' distances to their nearest other training image (`distance_threshold`).
- "mq", the reference MQ (the IET-AGC authors' evaluation): squared L2 to the nearest / mean squared L2
  to the 50 nearest (the nearest included); the share of samples below each of MQ_THRESHOLDS.
Exact copies (distance 0) count as memorized by both (the reference script dropped them).
"""
from __future__ import annotations

import numpy as np

from .config import ConfigError

MQ_THRESHOLDS = (0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, with 0 / 0 = 0: a sample equal to all its neighbours is a copy."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def memorization_ratio(sq_dist: np.ndarray) -> np.ndarray:
    """L2(nearest) / L2(second nearest) per sample, from ascending squared distances (G, k >= 2)."""
    if sq_dist.ndim != 2 or sq_dist.shape[1] < 2:
        raise ConfigError("the memorization ratio needs at least 2 training images (nearest and second nearest).")
    return _safe_ratio(np.sqrt(sq_dist[:, 0]), np.sqrt(sq_dist[:, 1]))


def mq_ratio(sq_dist: np.ndarray, neighbours: int = 50) -> np.ndarray:
    """Squared L2(nearest) / mean squared L2 of the `neighbours` nearest (fewer when the
    training set or the given columns are fewer), from ascending squared distances (G, k)."""
    if sq_dist.ndim != 2 or sq_dist.shape[1] < 1:
        raise ConfigError("the MQ ratio needs at least one neighbour per sample.")
    # the nearest is at most the mean; the clip removes the mean's rounding (equal distances)
    return np.minimum(_safe_ratio(sq_dist[:, 0], sq_dist[:, :neighbours].mean(axis=1)), 1.0)


def shares_below(values: np.ndarray, thresholds=MQ_THRESHOLDS) -> dict[float, float]:
    """{threshold: share of values strictly below it} (0.0 for no values)."""
    values = np.asarray(values, dtype=np.float64)
    return {float(t): float((values < t).mean()) if len(values) else 0.0 for t in thresholds}


def proportion_interval(count: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a share count / total (e.g. memorized samples out of N): the
    range the true share lies in with this confidence. (0, 1) when total is 0."""
    if total <= 0:
        return 0.0, 1.0
    if not 0 <= count <= total:
        raise ConfigError(f"a share of {count} out of {total} is impossible.")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    share = count / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    # None or all flagged: the bound on that side is exactly 0 or 1 (the formula leaves rounding dust)
    return (0.0 if count == 0 else float(centre - half)), (1.0 if count == total else float(centre + half))


def share_summary(flags, confidence: float = 0.95) -> dict:
    """A share of flagged samples with what it rests on: count, total, share and the Wilson
    interval (low, high). The one way a memorized share is reported."""
    flags = np.asarray(flags, bool)
    count, total = int(flags.sum()), int(flags.size)
    low, high = proportion_interval(count, total, confidence)
    return {"count": count, "total": total, "share": count / total if total else 0.0, "low": low, "high": high}


def mean_summary(values, confidence: float = 0.95, resamples: int = 1000, seed: int = 0) -> dict:
    """A mean with what it rests on: the value count and a percentile bootstrap interval
    (low, high) of the mean. The one way a mean score (e.g. CLIP score) is reported."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"mean": float("nan"), "count": 0, "low": float("nan"), "high": float("nan")}
    draws = values[np.random.default_rng(seed).integers(0, values.size, (resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return {"mean": float(values.mean()), "count": int(values.size), "low": float(low), "high": float(high)}


def distance_threshold(nearest_other_l2: np.ndarray, quantile: float) -> float:
    """delta of the (l2, delta) copy criterion (Carlini et al. 2023 style), calibrated on the data:
    this quantile of the training images' L2 distances to their nearest other training image.
    A sample nearer to a training image than that is closer than almost any two training images."""
    if not len(nearest_other_l2):
        raise ConfigError("calibrating the copy distance needs at least 2 training images.")
    return float(np.quantile(np.asarray(nearest_other_l2, np.float64), quantile))


def copy_counts(nearest: np.ndarray, num_training: int, memorized: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per training position: how many samples have it as nearest neighbour, and how many of
    those samples are memorized."""
    nearest = np.asarray(nearest, dtype=np.int64)
    times_nearest = np.bincount(nearest, minlength=num_training)
    flags = np.zeros(len(nearest), bool) if memorized is None else np.asarray(memorized, bool)
    times_memorized = np.bincount(nearest[flags], minlength=num_training)
    return times_nearest, times_memorized
