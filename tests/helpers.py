"""Small configs and data for fast engine tests (8x8 images, the tiny UNet, a few steps)."""
from __future__ import annotations

import numpy as np

from iet_core.config import demo_config


def tiny_config(mode: str = "iet-agc", **train):
    config = demo_config(mode)
    config.data.resolution = 8
    config.data.subset = 12
    config.train.rounds = 2
    config.train.local_steps = 3
    config.train.batch_size = 4
    config.train.warmup_steps = 2
    config.train.preview_samples = 0
    config.train.log_every = 2
    config.method.num_shards = 1 if mode == "ddpm" else 2
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def random_images(n: int, size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels) if channels == 3 else (n, size, size), dtype=np.uint8)
