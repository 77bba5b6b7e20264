"""FID with pytorch-fid's Inception network, from a local weights file only.

pytorch-fid downloads `pt_inception-2015-12-05-6726825d.pth` on first use; this module never
does. It takes the file from `eval.fid_weights` or the torch hub cache
(`torch.hub.get_dir()/checkpoints`), and raises `FIDUnavailable` saying where to put it when it
is missing, so that the caller can report every other metric without FID.

Training-set statistics (mean and covariance of the features) are cached as .npz files keyed by
a hash of the images, the feature block and the weights file.
"""
from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_fid import inception as fid_inception
from pytorch_fid.fid_score import calculate_frechet_distance
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

from .config import ConfigError
from .neighbours import as_uint8_images, resolve_device
from .runs import atomic_write, user_cache_dir

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
_build_lock = threading.Lock()


class FIDUnavailable(ConfigError):
    """FID cannot be computed (weights missing or unreadable, too few samples); the message says
    what to do. Every other metric still works."""


def default_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def find_weights(path: str | Path | None = None) -> Path:
    """The weights file: `path` (a file, or a folder holding it), else the torch hub cache."""
    if path:
        found = Path(path).expanduser()
        found = found / WEIGHTS_FILE if found.is_dir() else found
        if not found.is_file():
            raise FIDUnavailable(f"eval.fid_weights={str(path)!r}: no such file. Give the path of {WEIGHTS_FILE} "
                                 f"(download it from {FID_WEIGHTS_URL} on a machine with network access).")
        return found
    found = default_weights_path()
    if not found.is_file():
        raise FIDUnavailable(f"FID needs pytorch-fid's Inception weights {WEIGHTS_FILE}, which are not in the torch hub "
                             f"cache ({found.parent}) and are never downloaded here. Download them from {FID_WEIGHTS_URL}, "
                             "then put the file in that folder or give its path with eval.fid_weights (CLI: --fid-weights). "
                             "The other metrics do not need it.")
    return found


def load_inception(weights: str | Path | None = None, dims: int = 2048,
                   device: str | torch.device | None = None) -> InceptionV3:
    """pytorch-fid's FID Inception network returning `dims`-dimensional features, with the
    weights read from a local file (tensors only: nothing is unpickled)."""
    path = find_weights(weights)
    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ConfigError(f"fid dims={dims}: choose one of {', '.join(map(str, InceptionV3.BLOCK_INDEX_BY_DIM))}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file; all mean "unusable"
        raise FIDUnavailable(f"{path} is not a readable Inception weights file ({type(err).__name__}: {err}): "
                             f"replace it with {WEIGHTS_FILE} from {FID_WEIGHTS_URL}.") from None
    # pytorch-fid 0.3 builds its network in fid_inception_v3(), which fetches the weights through
    # the module's `load_state_dict_from_url` and takes no file argument. Hand it the local state
    # dict instead while building; the lock keeps concurrent builds from seeing each other's.
    with _build_lock:
        fetch = fid_inception.load_state_dict_from_url
        fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
        try:
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
        except (RuntimeError, KeyError, TypeError) as err:
            raise FIDUnavailable(f"{path} does not hold the FID Inception weights ({str(err)[:200]}): "
                                 f"replace it with {WEIGHTS_FILE} from {FID_WEIGHTS_URL}.") from None
        finally:
            fid_inception.load_state_dict_from_url = fetch
    return model.to(resolve_device(device)).eval()


@torch.no_grad()
def inception_features(model: InceptionV3, images, batch_size: int = 50,
                       progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """float64 (N, dims) features of uint8 (N, C, H, W) images; greyscale is repeated to RGB."""
    images = as_uint8_images(images, "images")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float().div(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        features = model(x)[0]
        if features.shape[2:] != (1, 1):  # earlier blocks give maps; pool them as pytorch-fid does
            features = F.adaptive_avg_pool2d(features, (1, 1))
        out.append(features.flatten(1).double().cpu().numpy())
        if progress is not None:
            progress(min(start + batch_size, len(images)), len(images))
    return np.concatenate(out) if out else np.zeros((0, model_dims(model)))


def model_dims(model: InceptionV3) -> int:
    index = model.output_blocks[0]
    return next(dims for dims, block in InceptionV3.BLOCK_INDEX_BY_DIM.items() if block == index)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (N >= 2, dims) features."""
    _check_count(len(features))
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _check_count(count: int) -> None:
    if count < 2:
        raise FIDUnavailable(f"FID needs at least 2 images, got {count} (use 10,000 samples for numbers "
                             "comparable with published FIDs).")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), pytorch-fid's implementation."""
    return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


def _file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def statistics_key(images: torch.Tensor, dims: int, weights_digest: str) -> str:
    """Names the statistics of these exact images (and resolution) under these weights."""
    digest = hashlib.sha256()
    digest.update(repr((tuple(images.shape), dims, weights_digest)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def training_statistics(model: InceptionV3, images, weights: Path, cache_dir: str | Path | None = None,
                        batch_size: int = 50, progress: Callable[[int, int], None] | None = None):
    """Feature mean and covariance of a training set, read from or written to the cache."""
    images = as_uint8_images(images, "training images")
    cache = Path(cache_dir).expanduser() if cache_dir else user_cache_dir("fid-stats")
    path = cache / f"{statistics_key(images, model_dims(model), _file_digest(weights))}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            return stored["mu"], stored["sigma"]
    mu, sigma = statistics(inception_features(model, images, batch_size, progress))
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma)
    atomic_write(path, buffer.getvalue())
    return mu, sigma


def fid_score(generated, training, *, weights: str | Path | None = None, dims: int = 2048,
              cache_dir: str | Path | None = None, batch_size: int = 50, device: str | torch.device | None = None,
              progress: Callable[[int, int], None] | None = None) -> float:
    """FID between generated and training uint8 images; raises FIDUnavailable with what to do."""
    generated = as_uint8_images(generated, "generated images")
    _check_count(len(generated))
    path = find_weights(weights)
    model = load_inception(path, dims, device)
    mu_train, sigma_train = training_statistics(model, training, path, cache_dir, batch_size)
    mu_gen, sigma_gen = statistics(inception_features(model, generated, batch_size, progress))
    return frechet_distance(mu_gen, sigma_gen, mu_train, sigma_train)
