"""Splitting a dataset into K shards, and moving often-skipped samples between them (MSR)."""
from __future__ import annotations

import numpy as np

from .config import ConfigError, MSRConfig


def resolve_split(method: str, labels: np.ndarray | None) -> str:
    """The split "auto" stands for: class-balanced when there are labels (as the reference's
    shards), random otherwise; other methods stand for themselves."""
    if method == "auto":
        return "random" if labels is None else "class"
    return method


def split_shards(num_samples: int, num_shards: int, method: str = "auto", labels: np.ndarray | None = None,
                 seed: int = 0) -> np.ndarray:
    """Shard index per sample. "random": a seeded permutation dealt round-robin (sizes differ
    by at most one). "class": each class dealt round-robin on its own, continuing where the
    previous class stopped, so every shard gets the same mix of classes. "auto": "class" when
    labels are given, else "random"."""
    method = resolve_split(method, labels)
    if num_shards > num_samples:
        raise ConfigError(f"cannot split {num_samples} images into {num_shards} shards: use at most {num_samples} shards.")
    rng = np.random.default_rng(seed)
    shard_of = np.empty(num_samples, dtype=np.int64)
    if method == "random":
        shard_of[rng.permutation(num_samples)] = np.arange(num_samples) % num_shards
    elif method == "class":
        if labels is None:
            raise ConfigError("method.shard_split='class' needs labelled data: use 'random', or data with labels.")
        offset = 0
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            shard_of[members] = (offset + np.arange(len(members))) % num_shards
            offset += len(members)
    else:
        raise ConfigError(f"unknown shard split {method!r}: use 'auto', 'class' or 'random'.")
    return shard_of


def redistribute(shard_of: np.ndarray, round_visits: np.ndarray, round_skips: np.ndarray,
                 skips_by_shard: np.ndarray, visits_by_shard: np.ndarray, config: MSRConfig,
                 num_shards: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """MSR: after a round, every sample whose skip rate in that round is above the threshold
    (seen at least min_visits times) moves to another shard: the one where it has been skipped
    least so far ("least-skipped", ties to the smaller shard) or the next one ("round-robin").
    A shard is never emptied. Returns the new assignment and (position, from, to) per move."""
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(round_visits > 0, round_skips / np.maximum(round_visits, 1), 0.0)
        history = np.where(visits_by_shard > 0, skips_by_shard / np.maximum(visits_by_shard, 1), 0.0)
    candidates = np.flatnonzero((rate > config.threshold) & (round_visits >= config.min_visits))
    new = shard_of.copy()
    sizes = np.bincount(new, minlength=num_shards)
    moves = []
    for pos in candidates[np.argsort(-rate[candidates], kind="stable")]:  # most-skipped first
        source = int(new[pos])
        if sizes[source] <= 1:
            continue
        if config.policy == "round-robin":
            target = (source + 1) % num_shards
        else:
            order = np.lexsort((sizes, history[pos]))  # least skipped, then smallest
            target = int(next(k for k in order if k != source))
        new[pos] = target
        sizes[source] -= 1
        sizes[target] += 1
        moves.append((int(pos), source, target))
    return new, moves
