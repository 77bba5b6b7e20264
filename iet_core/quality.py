"""An offline quality measure for when FID's Inception weights are not available.

"Feature FD": the Fréchet distance between generated and held-out images in the penultimate
features of a small CNN trained here to classify held-out images of the same dataset (images
never used for training the diffusion model). Like FID it rewards samples that look like real
data of that dataset; unlike FID it is specific to this dataset and this classifier, so compare
it only between runs on the same data with the same held-out set, classifier seed and sample
count. "Held-out L2": mean L2 distance (in [0, 1] pixel space) from each sample to its nearest
held-out image; realistic samples that are not copies sit close to some unseen image.
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


@dataclass
class QualityMeter:
    net: FeatureNet
    heldout: ImageDataset
    reference_stats: tuple[np.ndarray, np.ndarray]
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
        meter = cls(net, heldout, (np.zeros(0), np.zeros(0)), accuracy)
        meter.reference_stats = statistics(meter.features(heldout.images))
        return meter

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        return self.net.features(torch.as_tensor(images)).double().numpy()

    def measure(self, generated) -> dict[str, float]:
        mu, sigma = statistics(self.features(generated))
        nearest = nearest_neighbours(generated, self.heldout.images, k=1)
        return {"feature_fd": float(frechet_distance(mu, sigma, *self.reference_stats)),
                "heldout_l2": float(nearest.l2[:, 0].mean())}
