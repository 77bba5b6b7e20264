import numpy as np
import pytest
import torch

from iet_core.config import ConfigError
from iet_core.neighbours import nearest_neighbours


def brute_force(generated: np.ndarray, training: np.ndarray, k: int, flip_aware: bool):
    """float64 distances in [0, 1] pixel space to every training image (and its mirror)."""
    g = generated.reshape(len(generated), -1).astype(np.float64) / 255
    d = ((g[:, None] - training.reshape(len(training), -1)[None] / 255) ** 2).sum(-1)
    flipped = np.zeros_like(d, bool)
    if flip_aware:
        d_flip = ((g[:, None] - training[..., ::-1].reshape(len(training), -1)[None] / 255) ** 2).sum(-1)
        flipped = d_flip < d
        d = np.minimum(d, d_flip)
    order = np.lexsort((np.broadcast_to(np.arange(len(training)), d.shape), d), axis=1)[:, :k]
    return order, np.take_along_axis(d, order, 1), np.take_along_axis(flipped, order, 1), np.sort(d, axis=1)


def near_duplicate_sets(seed: int = 0):
    """Clusters of 20 training images that differ from a base by one grey level in 1..20 pixels,
    generated images one grey level from a base in another pixel (2..21 grey levels squared from
    the cluster's members), plus random images and mirrored copies. Bright and dark bases keep
    the norms large after centring: the float32 shortlist mixes up these clusters."""
    rng = np.random.default_rng(seed)
    bases = np.concatenate([rng.integers(230, 250, (3, 3, 32, 32)), rng.integers(5, 25, (3, 3, 32, 32))]).astype(np.uint8)
    clusters = []
    for base in bases:
        for j in range(20):
            variant = base.copy()
            variant.reshape(-1)[:j + 1] += 1
            clusters.append(variant)
    others = rng.integers(0, 256, (30, 3, 32, 32), dtype=np.uint8)
    training = np.concatenate([np.stack(clusters), others])
    near = bases.copy()
    near.reshape(len(near), -1)[:, 500] += 1
    generated = np.concatenate([near, rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8),
                                training[[125, 130, 145], ..., ::-1]])
    return generated, training


@pytest.mark.parametrize("flip_aware", [False, True])
@pytest.mark.parametrize("margin", [0, 16])
def test_matches_float64_brute_force_with_near_duplicates(flip_aware, margin):
    generated, training = near_duplicate_sets()
    k = 5
    found = nearest_neighbours(generated, training, k, flip_aware=flip_aware, margin=margin,
                               query_chunk=7, train_chunk=11)  # small chunks: many merges
    index, sq, flipped, all_sorted = brute_force(generated, training, k, flip_aware)
    # The comparison is meaningful only without ties among the first k + 1.
    assert (np.diff(all_sorted[:, :k + 1], axis=1) > 0).all()
    np.testing.assert_array_equal(found.index, index)
    np.testing.assert_allclose(found.sq_dist, sq, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(found.flipped, flipped)
    # Two pixels one grey level off: each near-copy's nearest is 2/255^2 away, not rounded to 0 or lost.
    np.testing.assert_allclose(found.sq_dist[:6, 0], 2 / 255**2, rtol=1e-12)
    if margin == 0:  # the shortlist boundary always sits at the k-th: every row is searched again
        assert found.exhaustive_rows == len(generated)


def test_flip_aware_finds_mirrored_copies_only_when_asked():
    rng = np.random.default_rng(1)
    training = rng.integers(0, 256, (30, 1, 8, 8), dtype=np.uint8)
    generated = training[[4, 9, 17], ..., ::-1].copy()
    found = nearest_neighbours(generated, training, 5, flip_aware=True)
    np.testing.assert_array_equal(found.index[:, 0], [4, 9, 17])
    assert found.flipped[:, 0].all() and (found.sq_dist[:, 0] == 0).all()
    plain = nearest_neighbours(generated, training, 5, flip_aware=False)
    assert (plain.sq_dist[:, 0] > 0).all() and not plain.flipped.any()


def test_chunk_sizes_do_not_change_the_result():
    rng = np.random.default_rng(2)
    training = torch.from_numpy(rng.integers(0, 256, (97, 3, 8, 8), dtype=np.uint8))
    generated = torch.from_numpy(rng.integers(0, 256, (23, 3, 8, 8), dtype=np.uint8))
    reference = nearest_neighbours(generated, training, 50, flip_aware=True)
    chunked = nearest_neighbours(generated, training, 50, flip_aware=True, query_chunk=5, train_chunk=13)
    np.testing.assert_array_equal(chunked.index, reference.index)
    np.testing.assert_array_equal(chunked.sq_dist, reference.sq_dist)


def test_k_is_capped_at_the_training_set_and_progress_is_reported():
    rng = np.random.default_rng(3)
    training = rng.integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    calls = []
    found = nearest_neighbours(training[:3], training, 50, query_chunk=2, progress=lambda d, t: calls.append((d, t)))
    assert found.index.shape == (3, 4)
    np.testing.assert_array_equal(found.index[:, 0], [0, 1, 2])
    assert calls == [(2, 3), (3, 3)]


def test_bad_inputs_say_what_to_do():
    images = np.zeros((2, 1, 8, 8), np.uint8)
    with pytest.raises(ConfigError, match="uint8"):
        nearest_neighbours(images.astype(np.float32), images)
    with pytest.raises(ConfigError, match="training resolution"):
        nearest_neighbours(np.zeros((2, 1, 16, 16), np.uint8), images)
    with pytest.raises(ConfigError, match="empty"):
        nearest_neighbours(images, images[:0])
