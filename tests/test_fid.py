import math
import socket

import numpy as np
import pytest
import torch
import torchvision

from iet_core.config import EvalConfig
from iet_core.data import ImageDataset
from iet_core.evaluate import evaluate_images
from iet_core.fid import (WEIGHTS_FILE, FIDUnavailable, fid_score, find_weights, frechet_distance, inception_features,
                          load_inception, statistics, training_statistics)


def images(n: int, seed: int, channels: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, channels, 16, 16), dtype=np.uint8))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test: nothing may be downloaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    assert torch.hub.get_dir().startswith(str(tmp_path))  # where the weights would be looked for
    return tmp_path


@pytest.fixture(scope="module")
def stand_in_weights(tmp_path_factory):
    """A randomly initialised network with the FID Inception's exact layout (pytorch-fid's FID
    blocks only change torchvision's forward passes, not the parameters), saved as the
    weights file: the real loading path without the real (unavailable) weights."""
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    path = tmp_path_factory.mktemp("weights") / WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 8))
    mu, sigma = statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_matches_a_hand_computed_2d_case():
    # ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)); S1 = I, S2 has eigenvalues 3 and 1.
    sigma2 = np.array([[2.0, 1.0], [1.0, 2.0]])
    expected = (1 + 4) + 2 + 4 - 2 * (math.sqrt(3) + 1)
    assert frechet_distance(np.zeros(2), np.eye(2), np.array([1.0, 2.0]), sigma2) == pytest.approx(expected, abs=1e-9)
    # Diagonal: sqrt(diag(1, 4) diag(4, 1)) = diag(2, 2).
    assert frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([4.0, 1.0])) == pytest.approx(4.0, abs=1e-9)


def test_missing_weights_fail_with_a_clear_message_and_no_download(empty_hub, no_network):
    with pytest.raises(FIDUnavailable, match=WEIGHTS_FILE) as err:
        fid_score(images(4, 0), images(4, 1))
    assert "eval.fid_weights" in str(err.value) and "never downloaded" in str(err.value)
    with pytest.raises(FIDUnavailable, match="no such file"):
        find_weights(empty_hub / "elsewhere.pth")


def test_other_metrics_work_without_fid_weights(empty_hub, no_network):
    train = ImageDataset(images(10, 0), None, torch.arange(10))
    result = evaluate_images(train.images[:4], train, EvalConfig(fid=True))
    assert result.summary["fid"] is None
    assert WEIGHTS_FILE in result.summary["fid_message"]
    assert result.summary["memorized_fraction"] == 1.0


def test_unusable_weights_files_are_reported(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(FIDUnavailable, match="does not hold the FID Inception weights"):
        load_inception(wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(FIDUnavailable, match="not a readable"):
        load_inception(garbage)


def test_fid_with_a_local_weights_file(stand_in_weights, tmp_path, no_network):
    model = load_inception(stand_in_weights, dims=64)
    features = inception_features(model, images(3, 0, channels=1), batch_size=2)
    assert features.shape == (3, 64) and np.isfinite(features).all()
    a, b = images(6, 0), images(6, 1)
    same = fid_score(a, a, weights=stand_in_weights, dims=64, cache_dir=tmp_path)
    different = fid_score(b, a, weights=stand_in_weights, dims=64, cache_dir=tmp_path)
    assert abs(same) < 1e-6 and different > 1e-3


def test_training_statistics_are_cached_per_dataset(stand_in_weights, tmp_path):
    model = load_inception(stand_in_weights, dims=64)
    a = images(4, 0)
    mu, sigma = training_statistics(model, a, stand_in_weights, tmp_path)
    cached = list(tmp_path.glob("*.npz"))
    assert len(cached) == 1
    # A second call reads the file (proved by planting values the network cannot produce).
    np.savez(cached[0], mu=np.full_like(mu, 7.0), sigma=sigma)
    again, _ = training_statistics(model, a, stand_in_weights, tmp_path)
    assert (again == 7.0).all()
    # Other images (or another resolution) get their own entry.
    training_statistics(model, images(4, 5), stand_in_weights, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_evaluation_reports_fid_when_weights_are_given(stand_in_weights, tmp_path):
    train = ImageDataset(images(8, 0), None, torch.arange(8))
    config = EvalConfig(fid=True, fid_weights=str(stand_in_weights.parent), fid_dims=64, fid_cache=str(tmp_path))
    result = evaluate_images(images(5, 3), train, config)
    assert result.summary["fid"] > 0 and result.summary["fid_dims"] == 64
    assert "biased" in result.summary["fid_message"]  # 5 samples < 64 dimensions
