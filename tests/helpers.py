"""Small configs and data for fast engine tests (8x8 images, the tiny UNet, a few steps)."""
from __future__ import annotations

import time

import numpy as np

from iet_core.config import recipe_config


def tiny_config(mode: str = "iet-agc", **train):
    """The "smoke" recipe (seconds per run) with these train settings."""
    config = recipe_config("smoke", mode)
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def random_images(n: int, size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels) if channels == 3 else (n, size, size), dtype=np.uint8)


def wait_until(condition, timeout: float = 120.0, what: str = "the condition", interval: float = 0.02):
    """Poll `condition` until it returns something truthy (returned) or the deadline passes: for
    state another thread or process changes and that offers no event to wait on."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)
