"""An offline quality measure for when FID's Inception weights are not available.

"Feature FD": the Fréchet distance between generated and held-out images in the penultimate
features of a small CNN trained here to classify held-out images of the same dataset (images
never used for training the diffusion model). Like FID it rewards samples that look like real
data of that dataset; unlike FID it is specific to this dataset and this classifier, so compare
it only between runs on the same data with the same held-out set, classifier seed and sample
count. "Held-out L2": mean L2 distance (in [0, 1] pixel space) from each sample to its nearest
held-out image; realistic samples that are not copies sit close to some unseen image.

Feature FD comes with a 95% bootstrap interval (`bootstrap_fd`): how much the figure would move
with other samples of the same model and another held-out draw.

`measure_quality` is what an evaluation reports: feature FD against up to 500 held-out images
(the classifier is trained once per held-out set and cached), or, where the data hold no
labelled held-out images, the clearly named fallback "pixel FD": the same Fréchet distance on
8x8 thumbnails against the held-out images, or against the training images when none is held
out (then a model that copies scores well too; it still tells noise from images).
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

from .config import ConfigError, DataConfig
from .data import ImageDataset, load_dataset
from .fid import frechet_distance, statistics
from .neighbours import as_uint8_images, nearest_neighbours
from .runs import atomic_write, user_cache_dir

HELDOUT_IMAGES = 500  # held-out images a quality figure is measured against (as the experiments)
HELDOUT_SEED = 12345  # which ones: the same for every run on the same data
MIN_HELDOUT = 10
CLASSIFIER_STEPS = 300
PIXEL_FD_SIZE = 8  # the fallback's thumbnails: 8x8 per channel


class _Recent:
    """The last few results by key, shared by the threads of a server."""

    def __init__(self, size: int = 4):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key: str, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_meters, _heldout_sets = _Recent(), _Recent()  # classifiers by cache file; held-out sets by data and training ids


class FeatureNet(nn.Module):
    """Two conv blocks and a linear classifier; `features` is the pooled 32-d embedding."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.GroupNorm(8, width), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() / 127.5 - 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


BOOTSTRAP_RESAMPLES = 200


def bootstrap_fd(generated: np.ndarray, reference: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the Fréchet distance between two feature sets (N, d), both
    resampled with replacement. Resampling repeats samples, which inflates the covariances and so
    every resampled distance, so the interval is the resampled distances' spread around their
    median, placed around the distance itself (a median-bias-corrected percentile interval)."""
    fd = frechet_distance(*statistics(generated), *statistics(reference))
    rng = np.random.default_rng(seed)
    values = [frechet_distance(*statistics(generated[rng.integers(0, len(generated), len(generated))]),
                               *statistics(reference[rng.integers(0, len(reference), len(reference))]))
              for _ in range(resamples)]
    tail = (1 - confidence) / 2
    low, median, high = np.quantile(values, [tail, 0.5, 1 - tail])
    return max(0.0, float(fd + low - median)), float(fd + high - median)


@dataclass
class QualityMeter:
    net: FeatureNet
    heldout: ImageDataset
    reference_features: np.ndarray  # (N, d) features of the held-out images
    accuracy: float  # on the held-out images it was trained on (a sanity check, not a claim)

    @classmethod
    def fit(cls, heldout: ImageDataset, steps: int = CLASSIFIER_STEPS, batch_size: int = 64, seed: int = 0) -> "QualityMeter":
        if heldout.labels is None:
            raise ConfigError("the quality measure trains a classifier on held-out images and needs labels: "
                              "use a labelled dataset (class folders, an .npz with labels, or digits).")
        if len(heldout) < 10:
            raise ConfigError(f"only {len(heldout)} held-out images: keep at least 10 out of training for the quality measure.")
        generator = torch.Generator().manual_seed(seed)
        classes = torch.unique(heldout.labels)
        labels = torch.searchsorted(classes, heldout.labels)
        with torch.random.fork_rng():  # seeded initial weights, leaving the caller's global RNG alone
            torch.manual_seed(seed)
            net = FeatureNet(heldout.channels, len(classes))
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(steps):
            pick = torch.randint(0, len(heldout), (batch_size,), generator=generator)
            loss = F.cross_entropy(net(heldout.images[pick]), labels[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            accuracy = float((net(heldout.images).argmax(1) == labels).float().mean())
        return cls.of(net, heldout, accuracy)

    @classmethod
    def of(cls, net: FeatureNet, heldout: ImageDataset, accuracy: float) -> "QualityMeter":
        meter = cls(net.eval(), heldout, np.zeros((0, net.head.in_features)), accuracy)
        meter.reference_features = meter.features(heldout.images)
        return meter

    @classmethod
    def cached(cls, heldout: ImageDataset, steps: int = CLASSIFIER_STEPS, seed: int = 0,
               cache_dir: str | Path | None = None) -> "QualityMeter":
        """`fit`, trained once per held-out set and settings: kept in memory and in the user
        cache (a safetensors file named by a hash of the images, labels and settings)."""
        digest = hashlib.sha256(repr((tuple(heldout.images.shape), steps, seed, FeatureNet.__doc__)).encode())
        digest.update(heldout.images.contiguous().numpy().tobytes())
        digest.update(heldout.labels.numpy().tobytes() if heldout.labels is not None else b"")
        path = (Path(cache_dir).expanduser() if cache_dir else user_cache_dir("quality-classifiers")) / f"{digest.hexdigest()[:32]}.safetensors"
        return _meters.get(str(path), lambda: cls._load_or_fit(path, heldout, steps, seed))

    @classmethod
    def _load_or_fit(cls, path: Path, heldout: ImageDataset, steps: int, seed: int) -> "QualityMeter":
        if path.exists():
            try:
                state = load_file(str(path))
                accuracy = float(state.pop("accuracy"))
                net = FeatureNet(heldout.channels, state["head.weight"].shape[0])
                net.load_state_dict(state)
                return cls.of(net, heldout, accuracy)
            except Exception:  # a damaged or foreign file: train again and replace it
                pass
        meter = cls.fit(heldout, steps=steps, seed=seed)
        atomic_write(path, save({**meter.net.state_dict(), "accuracy": torch.tensor(meter.accuracy)}))
        return meter

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        return self.net.features(torch.as_tensor(images)).double().numpy()

    def measure(self, generated) -> dict[str, float]:
        """feature_fd with its 95% bootstrap interval (feature_fd_low, feature_fd_high), heldout_l2."""
        features = self.features(generated)
        fd = frechet_distance(*statistics(features), *statistics(self.reference_features))
        low, high = bootstrap_fd(features, self.reference_features)
        nearest = nearest_neighbours(generated, self.heldout.images, k=1)
        return {"feature_fd": float(fd), "feature_fd_low": low, "feature_fd_high": high,
                "heldout_l2": float(nearest.l2[:, 0].mean())}


def heldout_set(data: DataConfig, training_ids: torch.Tensor, count: int = HELDOUT_IMAGES) -> ImageDataset | None:
    """Up to `count` images of the same source outside the training subset (a seeded choice,
    the same for every run on this data); None when training uses them all. The last few are
    kept in memory: reading a large source again for every evaluation would cost more than
    the measure."""
    if data.subset is None:
        return None
    key = hashlib.sha256(json.dumps([asdict(data), count]).encode()
                         + training_ids.numpy().tobytes()).hexdigest()
    return _heldout_sets.get(key, lambda: _heldout_set(data, training_ids, count))


def _heldout_set(data: DataConfig, training_ids: torch.Tensor, count: int) -> ImageDataset | None:
    everything = load_dataset(replace(data, subset=None))
    outside = np.flatnonzero(~np.isin(everything.ids.numpy(), training_ids.numpy()))
    if len(outside) == 0:
        return None
    return everything.select(np.sort(np.random.default_rng(HELDOUT_SEED).choice(outside, min(count, len(outside)), replace=False)))


def pixel_features(images) -> np.ndarray:
    """The fallback's features: 8x8 thumbnails (per channel) in [0, 1]."""
    images = as_uint8_images(images, "images")
    return F.adaptive_avg_pool2d(images.float() / 255.0, PIXEL_FD_SIZE).flatten(1).double().numpy()


def measure_quality(generated, data: DataConfig, training: ImageDataset, cache_dir: str | Path | None = None) -> dict:
    """How realistic samples are, lower is better: {"measure", "value", "low", "high" (95%
    bootstrap interval), "reference" (what they were compared with), "num_samples",
    "noise_value" (what as many images of uniform noise score: the scale's bad end)}. Feature
    FD against held-out images where the data have labelled ones, else pixel FD (see the module)."""
    generated = as_uint8_images(generated, "generated images")
    base = {"num_samples": len(generated)}
    if len(generated) < 2:
        return {**base, "measure": None, "reference": "no quality figure from a single sample: ask for more samples"}
    try:
        heldout = heldout_set(data, training.ids)
    except ConfigError:  # the full source cannot be read here: measure against the training images
        heldout = None
    if heldout is not None and len(heldout) < MIN_HELDOUT:
        heldout = None
    if heldout is not None and heldout.labels is not None and len(torch.unique(heldout.labels)) > 1:
        meter = QualityMeter.cached(heldout, cache_dir=cache_dir)
        features_of, reference = meter.features, meter.reference_features
        base.update(measure="feature FD", reference=f"{len(heldout)} held-out images", classifier_accuracy=meter.accuracy)
    else:
        features_of, reference = pixel_features, pixel_features((heldout or training).images)
        where = (f"{len(heldout)} held-out images (no labels to train a classifier on)" if heldout is not None else
                 f"the {len(training)} training images (none is held out: copies score well too; it tells noise from images)")
        base.update(measure="pixel FD", reference=where)
    features = features_of(generated)
    low, high = bootstrap_fd(features, reference)
    noise = torch.randint(0, 256, generated.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return {**base, "value": frechet_distance(*statistics(features), *statistics(reference)), "low": low, "high": high,
            "noise_value": frechet_distance(*statistics(features_of(noise)), *statistics(reference))}


def quality_text(summary: dict, brief: bool = False) -> str:
    """An evaluation's quality figure in words: FID when computed, else its measured quality
    with its interval and reference (brief: the figure alone)."""
    if summary.get("fid") is not None:
        return f"FID {summary['fid']:.1f}"
    quality = summary.get("quality") or {}
    if quality.get("measure") is None:
        return "quality not measured"
    if brief:
        return f"{quality['measure']} {quality['value']:.2f}"
    return (f"{quality['measure']} {quality['value']:.2f} (95% interval {quality['low']:.2f}–{quality['high']:.2f}, "
            f"{quality['num_samples']} samples vs {quality['reference']})")


def equal_quality(points: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Each run's evaluation point nearest a common quality: the best quality the worst run
    reaches (the target). points: one row per run and evaluated checkpoint, with columns run,
    value, low, high (the quality figure, lower is better, and its 95% interval) and any others.
    Returns one row per run, its point nearest the target with `matched` (its interval overlaps
    the target's), `side` ("better" / "worse": where the point lies when unmatched) and
    `always_better` (every point of the run is better than the target: it never gets as bad),
    and the target's row."""
    if points.empty:
        raise ConfigError("no evaluated checkpoints to match: evaluate the runs first.")
    best = points.loc[points.groupby("run", sort=False)["value"].idxmin()]
    target = best.loc[best["value"].idxmax()]
    nearest = points.loc[(points["value"] - target["value"]).abs().groupby(points["run"], sort=False).idxmin()]
    matched = (nearest["low"] <= target["high"]) & (nearest["high"] >= target["low"])
    side = np.where(matched, "", np.where(nearest["value"] < target["value"], "better", "worse"))
    worst = points.groupby("run", sort=False)["value"].max()
    return nearest.assign(matched=matched.to_numpy(), side=side,
                          always_better=(worst[nearest["run"]] < target["low"]).to_numpy()).reset_index(drop=True), target
