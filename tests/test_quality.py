"""The quality figure every evaluation reports, and the warnings that keep a copy share of
noise from reading as a result."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from iet_core import quality
from iet_core.config import ConfigError, DataConfig, EvalConfig
from iet_core.data import load_dataset
from iet_core.evaluate import evaluate_images, evaluation_warnings
from iet_core.quality import equal_quality, measure_quality

DATA = DataConfig(resolution=8, subset=64)


def noise(count: int, size: int = 8) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (count, 1, size, size), dtype=np.uint8))


def unseen_digits(training, count: int) -> torch.Tensor:
    everything = load_dataset(DataConfig(resolution=8, subset=None))
    outside = np.flatnonzero(~np.isin(everything.ids.numpy(), training.ids.numpy()))
    return everything.images[torch.from_numpy(outside[-count:])]


def test_feature_fd_against_held_out_images_with_a_classifier_trained_once(tmp_path):
    training = load_dataset(DATA)
    digits, random = unseen_digits(training, 32), noise(32)
    real = measure_quality(digits, DATA, training, cache_dir=tmp_path)
    assert real["measure"] == "feature FD" and real["reference"] == "500 held-out images" and real["num_samples"] == 32
    assert real["low"] <= real["value"] <= real["high"]
    saved = list(tmp_path.glob("*.safetensors"))
    assert len(saved) == 1
    quality._meters.clear()  # a new process: the classifier comes from the cache file, not trained again
    stamp = saved[0].stat().st_mtime_ns
    again = measure_quality(digits, DATA, training, cache_dir=tmp_path)
    assert again["value"] == real["value"] and saved[0].stat().st_mtime_ns == stamp
    noisy = measure_quality(random, DATA, training, cache_dir=tmp_path)
    assert noisy["low"] > real["high"] and real["value"] < 0.5 * real["noise_value"]
    assert noisy["noise_value"] == real["noise_value"]  # the scale's bad end: as many images of uniform noise


def test_without_held_out_images_the_fallback_is_named_and_still_tells_noise_from_digits(tmp_path):
    everything = DataConfig(resolution=8, subset=None)
    training = load_dataset(everything)
    digits = measure_quality(training.images[:32], everything, training, cache_dir=tmp_path)
    assert digits["measure"] == "pixel FD" and "training images" in digits["reference"] and "copies score well" in digits["reference"]
    assert measure_quality(noise(32), everything, training, cache_dir=tmp_path)["low"] > 3 * digits["high"]
    assert not list(tmp_path.iterdir())  # no classifier was trained
    assert measure_quality(noise(1), everything, training)["measure"] is None


def test_noise_is_flagged_instead_of_reading_as_no_copies():
    training = load_dataset(DATA)
    summary = evaluate_images(noise(32), training, EvalConfig()).summary | {"checkpoint_step": 40}
    assert summary["memorized_fraction"] == 0
    assert any(w.startswith("samples are still noise at step 40: 0% copies here means nothing yet") for w in evaluation_warnings(summary))
    digits = evaluate_images(unseen_digits(training, 32), training, EvalConfig()).summary | {"checkpoint_step": 300}
    assert evaluation_warnings(digits) == []
    # Blobs near the data by distance, but with a quality near uniform noise's: still noise.
    blobs = digits | {"quality": {"measure": "feature FD", "value": 12.9, "noise_value": 15.1}}
    assert evaluation_warnings(blobs) == ["samples are still noise at step 300: 0% copies here means nothing yet (their "
                                          "feature FD 12.90 is nearer uniform noise's 15.10 than real images' (near 0))"]


def points(rows):
    return pd.DataFrame(rows, columns=["run", "step", "value", "low", "high"])


def test_equal_quality_picks_each_runs_point_nearest_the_worst_runs_best():
    picks, target = equal_quality(points([("a", 100, 10, 9, 11), ("a", 200, 5, 4, 6), ("a", 300, 3, 2, 4),
                                          ("b", 100, 12, 11, 13), ("b", 200, 6, 5, 7)]))
    assert (target["run"], target["step"]) == ("b", 200)
    assert picks[["run", "step"]].values.tolist() == [["a", 200], ["b", 200]] and picks["matched"].all()


def test_equal_quality_says_when_a_run_never_gets_as_bad_or_jumps_past_the_target():
    picks, _ = equal_quality(points([("a", 100, 2, 1.8, 2.2), ("a", 200, 1.5, 1.4, 1.6),
                                     ("b", 100, 12, 11, 13), ("b", 200, 6, 5.5, 6.5),
                                     ("c", 100, 20, 19, 21), ("c", 200, 1, 0.9, 1.1)]))
    a, b, c = (picks.set_index("run").loc[r] for r in "abc")
    assert not a["matched"] and a["side"] == "better" and a["always_better"] and a["step"] == 100
    assert b["matched"] and not c["matched"] and c["side"] == "better" and not c["always_better"]
    with pytest.raises(ConfigError, match="evaluate the runs first"):
        equal_quality(points([]))


def test_a_held_out_set_is_read_once_for_many_evaluations(tmp_path):
    training = load_dataset(DATA)
    first = quality.heldout_set(DATA, training.ids)
    assert quality.heldout_set(DATA, training.ids) is first and len(first) == 500
    assert not np.isin(first.ids.numpy(), training.ids.numpy()).any()
    reseeded = DataConfig(resolution=8, subset=64, subset_seed=1)
    other = quality.heldout_set(reseeded, load_dataset(reseeded).ids)
    assert other is not first and not torch.equal(other.ids, first.ids)
