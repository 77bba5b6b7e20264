"""Latents and text embeddings computed once and kept on disk.

The VAE and the text encoder stay frozen, so a training image's latent depends only on the
image at its resolution and the VAE's weights, and a caption's embedding only on its token ids
and the text encoder's weights. Each is stored under a key that hashes exactly those, so a
resumed run and a second run on the same data read them back, and any change (images,
resolution, captions, tokenizer, weights) gives a new key. Files are written atomically and
carry their key and a digest of their contents: one that is truncated, damaged or of another
key is recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from ..runs import atomic_write, user_cache_dir

# Part of every key: bump it when what is stored changes meaning (e.g. the latent's definition).
CACHE_FORMAT = "1: posterior mean x scaling factor; last hidden state of max-length tokens"


def default_cache_dir() -> Path:
    return user_cache_dir("sd-inputs")


def _update(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)};".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's tensors (names, dtypes, shapes, values): the same weights from any
    folder or Hub id give the same digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        _update(digest, tensor)
    return digest.hexdigest()


def cache_key(kind: str, weights: str, inputs: torch.Tensor, settings: dict | None = None) -> str:
    """Names what `kind` computes from `inputs` (images or token ids, whose shape carries the
    resolution or length) with these weights and settings."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, kind, weights, settings or {}], sort_keys=True).encode())
    _update(digest, inputs)
    return digest.hexdigest()[:40]


def _content_digest(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256()
    _update(digest, tensor)
    return digest.hexdigest()


def _read(path: Path, key: str, rows: int) -> torch.Tensor | None:
    """The stored tensor when the file is whole, of this key and of `rows` rows; else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as stored:
            meta, value = stored.metadata() or {}, stored.get_tensor("value")
    except Exception:  # missing, truncated or not a safetensors file: all mean "compute it again"
        return None
    if meta.get("key") != key or len(value) != rows or meta.get("sha256") != _content_digest(value):
        return None
    return value


def cached(kind: str, key: str, rows: int, compute: Callable[[], torch.Tensor], folder: str | Path | None = None
           ) -> tuple[torch.Tensor, str]:
    """(tensor, how it was had: "read", "computed" or "recomputed" over a damaged or foreign
    file) for `key`, from folder (None: the user cache) or computed and stored there."""
    from safetensors.torch import save

    path = Path(folder).expanduser() if folder else default_cache_dir()
    path = path / f"{kind}-{key}.safetensors"
    value = _read(path, key, rows)
    if value is not None:
        return value, "read"
    existed = path.exists()
    value = compute().detach().contiguous()
    stored = value.cpu()
    atomic_write(path, save({"value": stored}, metadata={"key": key, "sha256": _content_digest(stored)}))
    return value, "recomputed" if existed else "computed"
