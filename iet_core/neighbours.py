"""Exact k nearest training images of every generated image, in [0, 1] pixel space.

1. Shortlist: chunked float32 products |a|^2 + |b|^2 - 2ab (on the GPU when there is one),
   keeping the best `k + margin` candidates per generated image.
2. Recompute the shortlist's distances exactly. On grey levels (integers 0..255) every float64
   partial sum of |a|^2 + |b|^2 - 2ab is an integer below 2^53, so it is exact in any summation
   order; only the final division by 255^2 rounds. (The float32 expansion loses precision
   exactly for near-copies, which is what we look for.)
3. A row whose shortlist might have missed a neighbour through float32 rounding (the shortlist
   boundary lies within the rounding bound of its k-th exact distance) is searched again
   exhaustively in exact float64 products, so the result equals a brute-force search.

Flip-aware search compares every generated image with each training image and its mirror image,
keeps the nearer of the two per training image, and reports which one matched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .config import ConfigError

# Elements (not bytes) one chunk of work may hold; bounds memory whatever the image size.
CHUNK_ELEMENTS = 2**24
# Bound on the float32 shortlist error, as a multiple of 2^-24 * sqrt(pixels) * (|a|^2 + max |b|^2)
# (centred norms); errors measured on near-copies at 16x16 to 128x128 stay below 1/5 of it.
ROUNDING_FACTOR = 2.0


@dataclass
class Neighbours:
    index: np.ndarray  # int64 (G, k): positions in the training set, nearest first
    flipped: np.ndarray  # bool (G, k): the training image matched as its mirror image
    sq_dist: np.ndarray  # float64 (G, k): squared L2 distance in [0, 1] pixel space
    exhaustive_rows: int = 0  # rows searched again because rounding could have hidden a neighbour

    @property
    def l2(self) -> np.ndarray:
        return np.sqrt(self.sq_dist)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto": the GPU when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={str(device)!r} is not a device name: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but no CUDA GPU is available: use 'auto' or 'cpu'.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={str(device)!r} but this machine has {torch.cuda.device_count()} GPU(s): "
                          f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}, or 'auto'.")
    return device


def as_uint8_images(images, what: str) -> torch.Tensor:
    """uint8 (N, C, H, W) as a CPU tensor; anything else is a user error."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8 or tensor.ndim != 4:
        raise ConfigError(f"{what} must be uint8 images (N, C, H, W), got {tensor.dtype} {tuple(tensor.shape)}.")
    return tensor.cpu()


def nearest_neighbours(generated, training, k: int = 50, *, flip_aware: bool = False, margin: int = 16,
                       query_chunk: int | None = None, train_chunk: int | None = None,
                       device: str | torch.device | None = None,
                       progress: Callable[[int, int], None] | None = None) -> Neighbours:
    """The k nearest training images (k capped at the training set size) of every generated
    image. Both sets are uint8 (N, C, H, W); chunk sizes (images) default to a fixed memory budget."""
    generated = as_uint8_images(generated, "generated images")
    training = as_uint8_images(training, "training images")
    if generated.shape[1:] != training.shape[1:]:
        raise ConfigError(f"generated images are {tuple(generated.shape[1:])} but training images are "
                          f"{tuple(training.shape[1:])}: evaluate samples at the training resolution and channels.")
    if len(training) == 0:
        raise ConfigError("the training set is empty: nothing to compare the samples with.")
    if k < 1 or margin < 0:
        raise ConfigError(f"k={k}, margin={margin}: use k >= 1 and margin >= 0.")
    device = resolve_device(device)
    dim = training[0].numel()
    query_chunk = query_chunk or max(1, min(1024, CHUNK_ELEMENTS // dim))
    train_chunk = train_chunk or max(1, min(8192, CHUNK_ELEMENTS // dim))
    k = min(k, len(training))
    keep = min(k + margin, len(training))
    scan = _Scanner(training, flip_aware, train_chunk, device)

    index = np.empty((len(generated), k), np.int64)
    flipped = np.empty((len(generated), k), bool)
    sq = np.empty((len(generated), k), np.float64)
    exhaustive_rows = 0
    for start in range(0, len(generated), query_chunk):
        queries = generated[start:start + query_chunk]
        approx, candidates = scan.top(queries, keep, exact=False)
        exact, flips = scan.exact_distances(queries, candidates)
        order = np.lexsort((candidates, exact), axis=1)  # by distance, ties by position
        rows = np.arange(len(queries))[:, None]
        candidates, exact, flips = candidates[rows, order], exact[rows, order], flips[rows, order]
        if keep < len(training):
            # A missed neighbour j has approx_j >= approx[:, -1] and approx_j <= d_j + bound
            # <= exact[:, k-1] + bound; so none was missed where approx[:, -1] > exact[:, k-1] + bound.
            doubtful = np.flatnonzero(approx[:, -1] <= exact[:, k - 1] + scan.rounding_bound(queries))
            if len(doubtful):
                exhaustive_rows += len(doubtful)
                _, again = scan.top(queries[doubtful], k, exact=True)
                redo, redo_flips = scan.exact_distances(queries[doubtful], again)
                order = np.lexsort((again, redo), axis=1)
                rows = np.arange(len(doubtful))[:, None]
                candidates[doubtful, :k], exact[doubtful, :k] = again[rows, order], redo[rows, order]
                flips[doubtful, :k] = redo_flips[rows, order]
        stop = start + len(queries)
        index[start:stop], flipped[start:stop] = candidates[:, :k], flips[:, :k]
        sq[start:stop] = exact[:, :k] / 255.0**2
        if progress is not None:
            progress(stop, len(generated))
    return Neighbours(index, flipped, sq, exhaustive_rows)


class _Scanner:
    """Chunked distance products between query images and the whole training set."""

    def __init__(self, training: torch.Tensor, flip_aware: bool, train_chunk: int, device: torch.device):
        self.training = training
        self.flat = training.reshape(len(training), -1)
        self.flip_aware = flip_aware
        self.train_chunk = train_chunk
        self.device = device
        # Centring on the training mean shrinks the norms, hence the float32 rounding error.
        total = sum(self.flat[i:i + train_chunk].double().sum(0) for i in range(0, len(self.flat), train_chunk))
        self.centre = (total / (255.0 * len(self.flat))).float().to(device)
        self.max_sq_norm = max(float(self._prepare(self.flat[i:i + train_chunk], False).square().sum(1).max())
                               for i in range(0, len(self.flat), train_chunk))

    def _prepare(self, flat_uint8: torch.Tensor, exact: bool) -> torch.Tensor:
        """float64 grey levels (exact products) or centred float32 [0, 1] pixels (shortlist)."""
        if exact:
            return flat_uint8.to(self.device, torch.float64)
        return flat_uint8.to(self.device, torch.float32).div_(255.0).sub_(self.centre)

    def _orientations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Flattened images, and their mirror images when the search is flip-aware."""
        found = [images.reshape(len(images), -1)]
        if self.flip_aware:
            found.append(images.flip(-1).reshape(len(images), -1))
        return found

    def rounding_bound(self, queries: torch.Tensor) -> np.ndarray:
        """Bound on |float32 shortlist distance - exact distance|, in squared grey levels."""
        norms = self._prepare(queries.reshape(len(queries), -1), False).square().sum(1).double().cpu().numpy()
        # TF32 products (when a user turned them on for CUDA) keep 10 mantissa bits, not 23
        tf32 = self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        unit = 2.0**-11 if tf32 else 2.0**-24
        return ROUNDING_FACTOR * np.sqrt(queries[0].numel()) * unit * (norms + self.max_sq_norm) * 255.0**2

    def top(self, queries: torch.Tensor, keep: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
        """The `keep` smallest distances per query (squared grey levels) and training positions,
        ascending; float32 shortlist or exact float64 products."""
        q = self._prepare(queries.reshape(len(queries), -1), exact)
        q_sq = q.square().sum(1, keepdim=True)
        best_d = torch.empty(len(q), 0, dtype=q.dtype, device=self.device)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=self.device)
        for start in range(0, len(self.training), self.train_chunk):
            d = None
            for flat in self._orientations(self.training[start:start + self.train_chunk]):
                t = self._prepare(flat, exact)
                # |q|^2 + |t|^2 - 2 q.t in one fused product
                dist = torch.addmm(q_sq + t.square().sum(1)[None], q, t.T, alpha=-2.0)
                d = dist if d is None else torch.minimum(d, dist)
            ids = torch.arange(start, start + d.shape[1], device=self.device).expand(len(q), -1)
            best_d, pick = torch.cat([best_d, d], 1).topk(min(keep, best_d.shape[1] + d.shape[1]), 1, largest=False, sorted=True)
            best_i = torch.cat([best_i, ids], 1).gather(1, pick)
        scale = 1.0 if exact else 255.0**2
        return (best_d.double() * scale).cpu().numpy(), best_i.cpu().numpy()

    def exact_distances(self, queries: torch.Tensor, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact squared distances (grey levels) from each query to its candidate training
        images, and whether the mirror image was the nearer orientation. Queries go in blocks;
        each block's distinct candidates are gathered once and met with one float64 product,
        which is exact on integer pixels and much cheaper than per-pair differences when
        blocks share candidates (small training sets)."""
        flat = queries.reshape(len(queries), -1)
        block = max(1, CHUNK_ELEMENTS // (flat.shape[1] * candidates.shape[1]))
        if len(self.flat) * flat.shape[1] <= CHUNK_ELEMENTS:  # a small training set: fewer, larger blocks
            block = max(block, CHUNK_ELEMENTS // len(self.flat))
        exact = np.empty(candidates.shape, np.float64)
        flips = np.zeros(candidates.shape, bool)
        for start in range(0, len(flat), block):
            stop = start + block
            distinct, where = np.unique(candidates[start:stop], return_inverse=True)
            where = torch.from_numpy(where.reshape(-1, candidates.shape[1])).to(self.device)
            train = self._prepare(self.flat[torch.from_numpy(distinct)], exact=True)
            train_sq = train.square().sum(1)
            d = None
            for q_flat in self._orientations(queries[start:stop]):
                # q'.flip(t) = flip(q').t: mirror the queries instead of the candidates
                q = self._prepare(q_flat, exact=True)
                dist = torch.addmm(q.square().sum(1, keepdim=True) + train_sq[None], q, train.T, alpha=-2.0).gather(1, where)
                if d is not None:
                    flips[start:stop] = (dist < d).cpu().numpy()
                d = dist if d is None else torch.minimum(d, dist)
            exact[start:stop] = d.cpu().numpy()
        return exact, flips
