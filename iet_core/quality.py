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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError
from .data import ImageDataset
from .fid import frechet_distance, statistics
from .neighbours import nearest_neighbours


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
    def fit(cls, heldout: ImageDataset, steps: int = 300, batch_size: int = 64, seed: int = 0) -> "QualityMeter":
        if heldout.labels is None:
            raise ConfigError("the quality measure trains a classifier on held-out images and needs labels: "
                              "use a labelled dataset (class folders, an .npz with labels, or digits).")
        if len(heldout) < 10:
            raise ConfigError(f"only {len(heldout)} held-out images: keep at least 10 out of training for the quality measure.")
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        classes = torch.unique(heldout.labels)
        labels = torch.searchsorted(classes, heldout.labels)
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
        meter = cls(net, heldout, np.zeros((0, net.head.in_features)), accuracy)
        meter.reference_features = meter.features(heldout.images)
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
