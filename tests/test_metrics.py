import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from iet_core.config import ConfigError, EvalConfig
from iet_core.data import ImageDataset
from iet_core.evaluate import evaluate_images
from iet_core.metrics import MQ_THRESHOLDS, copy_counts, memorization_ratio, mq_ratio, shares_below


def dataset(n: int = 60, seed: int = 0, shape=(3, 16, 16)) -> ImageDataset:
    images = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8))
    return ImageDataset(images, None, torch.arange(n) + 1000, "random")


def test_exact_and_flipped_copies_are_all_memorized_by_both_metrics():
    train = dataset()
    copies = torch.cat([train.images[:10], train.images[10:20].flip(-1)])
    result = evaluate_images(copies, train, flip_aware=True)
    assert result.summary["memorized_fraction"] == 1.0
    assert result.table["memorized"].all()
    # MQ counts exact copies (ratio 0) at every threshold: the reference script dropped them.
    assert (result.table["mq_ratio"] == 0).all()
    assert result.summary["mq_shares"] == {f"{t:g}": 1.0 for t in MQ_THRESHOLDS}
    np.testing.assert_array_equal(result.table["nearest_id"], np.arange(20) + 1000)
    np.testing.assert_array_equal(result.table["nearest_flipped"], [False] * 10 + [True] * 10)
    # Without flip-awareness the mirrored copies are not copies of anything.
    plain = evaluate_images(copies, train, flip_aware=False)
    assert plain.summary["memorized_count"] == 10


def test_fresh_noise_is_not_memorized():
    train = dataset()
    noise = torch.from_numpy(np.random.default_rng(99).integers(0, 256, (40, 3, 16, 16), dtype=np.uint8))
    result = evaluate_images(noise, train, flip_aware=True)
    assert result.summary["memorized_fraction"] == 0.0
    assert not result.table["memorized"].any()
    # Noise is about equally far from every training image: MQ ratios sit near 1.
    assert result.summary["mq_shares"]["0.5"] == 0.0
    assert (result.table["mq_ratio"] > 0.5).all()


def test_memorization_ratio_values_and_zero_over_zero():
    sq = np.array([[9.0, 16.0, 20.0], [0.0, 0.0, 1.0], [0.0, 4.0, 5.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(memorization_ratio(sq), [3 / 4, 0.0, 0.0, 1.0])
    with pytest.raises(ConfigError, match="at least 2"):
        memorization_ratio(sq[:, :1])


def test_mq_ratio_uses_the_nearest_n_including_the_nearest():
    sq = np.array([[1.0, 2.0, 3.0, 100.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(mq_ratio(sq, neighbours=3), [1 / 2, 0.0])
    np.testing.assert_allclose(mq_ratio(sq, neighbours=50), [1 / 26.5, 0.0])  # fewer columns: all of them


def test_shares_are_strictly_below_each_threshold():
    shares = shares_below(np.array([0.0, 0.15, 0.2, 0.95]))
    assert shares[0.15] == 0.25 and shares[0.2] == 0.5 and shares[0.3] == 0.75 and shares[0.9] == 0.75
    assert shares_below(np.array([]))[0.5] == 0.0


def test_copy_counts_per_training_image():
    nearest, memorized = copy_counts(np.array([2, 2, 0, 2]), 4, np.array([True, False, True, True]))
    np.testing.assert_array_equal(nearest, [1, 0, 3, 0])
    np.testing.assert_array_equal(memorized, [1, 0, 2, 0])


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(2, 60)), elements=st.floats(0, 1e6)))
def test_ratios_of_ascending_distances_lie_in_zero_one(sq):
    sq = np.sort(sq, axis=1)
    for ratio in (memorization_ratio(sq), mq_ratio(sq)):
        assert ((ratio >= 0) & (ratio <= 1)).all()


def test_threshold_is_a_setting():
    train = dataset(n=20, shape=(1, 8, 8))
    near = train.images[:5].clone()
    near[:, 0, 0, 0] ^= 64  # a visible change, far closer to its source than to any other image
    strict = evaluate_images(near, train, EvalConfig(memorization_threshold=0.01))
    loose = evaluate_images(near, train, EvalConfig(memorization_threshold=1 / 3))
    assert strict.summary["memorized_count"] == 0 and loose.summary["memorized_count"] == 5


def test_proportion_interval_matches_the_wilson_score_interval():
    from iet_core.metrics import proportion_interval

    # Wilson 95% intervals worked by hand: centre (p + z²/2n) / (1 + z²/n), z = 1.96.
    assert proportion_interval(50, 64) == pytest.approx((0.6657, 0.8650), abs=1e-4)
    assert proportion_interval(0, 64) == pytest.approx((0.0, 0.0566), abs=1e-4)
    assert proportion_interval(64, 64) == pytest.approx((0.9434, 1.0), abs=1e-4)
    assert proportion_interval(256, 512) == pytest.approx((0.4568, 0.5432), abs=1e-4)
    low, high = proportion_interval(5, 100, confidence=0.99)
    assert low < proportion_interval(5, 100)[0] and high > proportion_interval(5, 100)[1]
    assert proportion_interval(0, 0) == (0.0, 1.0)
    assert proportion_interval(0, 512)[0] == 0.0 and proportion_interval(512, 512)[1] == 1.0  # exactly: a share lies inside
    with pytest.raises(ValueError, match="impossible"):
        proportion_interval(5, 4)
