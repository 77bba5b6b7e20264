import numpy as np
import pytest

from iet_core.config import ConfigError, MSRConfig
from iet_core.shards import redistribute, split_shards


def test_random_split_is_seeded_and_balanced():
    a = split_shards(103, 4, "random", seed=1)
    assert np.array_equal(a, split_shards(103, 4, "random", seed=1))
    assert not np.array_equal(a, split_shards(103, 4, "random", seed=2))
    assert sorted(np.bincount(a).tolist()) == [25, 26, 26, 26]


def test_class_split_gives_every_shard_the_same_mix():
    labels = np.repeat(np.arange(5), 20)
    shard_of = split_shards(100, 4, "class", labels, seed=0)
    for k in range(4):
        assert np.bincount(labels[shard_of == k], minlength=5).tolist() == [5] * 5
    with pytest.raises(ConfigError, match="labelled"):
        split_shards(10, 2, "class", None)
    with pytest.raises(ConfigError, match="at most 5 shards"):
        split_shards(5, 6)


def _counts(n, k):
    return np.zeros((n, k)), np.zeros((n, k))


def test_msr_moves_exactly_the_samples_over_the_threshold():
    shard_of = np.array([0, 0, 0, 1, 1, 1])
    visits = np.array([4, 4, 4, 4, 4, 1])
    skips = np.array([3, 2, 0, 4, 1, 1])  # rates .75 .5 0 1 .25 1(one visit only)
    skips_by, visits_by = _counts(6, 2)
    new, moves = redistribute(shard_of, visits, skips, skips_by, visits_by, MSRConfig(enabled=True, threshold=0.5, min_visits=2), 2)
    assert sorted(m[0] for m in moves) == [0, 3]  # .5 is not above .5; sample 5 was seen once
    assert new.tolist() == [1, 0, 0, 0, 1, 1]
    assert {(p, a, b) for p, a, b in moves} == {(0, 0, 1), (3, 1, 0)}


def test_msr_least_skipped_policy_and_never_empties_a_shard():
    shard_of = np.array([0, 0, 1, 2])
    visits = np.array([5, 5, 5, 5])
    skips = np.array([5, 5, 5, 5])
    skips_by = np.array([[5, 9, 1], [5, 0, 9], [0, 5, 0], [0, 0, 5]], float)
    visits_by = np.full((4, 3), 10.0)
    new, moves = redistribute(shard_of, visits, skips, skips_by, visits_by, MSRConfig(enabled=True, threshold=0.5), 3)
    # Most-skipped first, ties in order: sample 0 -> shard 2 (least skipped there); sample 1 is
    # now alone in shard 0 and stays, as does sample 2 in shard 1; sample 3 leaves shard 2
    # (two members now) for shard 0 (ties with shard 1 on history and size; lower index).
    assert moves == [(0, 0, 2), (3, 2, 0)]
    assert new.tolist() == [2, 0, 1, 0]
    rr, rr_moves = redistribute(shard_of, visits, skips, skips_by, visits_by,
                                MSRConfig(enabled=True, threshold=0.5, policy="round-robin"), 3)
    assert rr_moves == [(0, 0, 1), (2, 1, 2), (3, 2, 0)]  # each to the next shard, none emptied
    assert np.bincount(rr, minlength=3).min() >= 1


def test_class_balanced_shards_are_the_default_when_labels_exist():
    from iet_core.config import MethodConfig

    labels = np.repeat(np.arange(4), 8)
    default = MethodConfig().shard_split
    assert np.array_equal(split_shards(32, 4, default, labels, seed=3), split_shards(32, 4, "class", labels, seed=3))
    assert np.array_equal(split_shards(32, 4, default, None, seed=3), split_shards(32, 4, "random", None, seed=3))
