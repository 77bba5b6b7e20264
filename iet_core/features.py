"""Image embeddings for copy detection, and nearest training images by cosine similarity.

Text-to-image copy detection compares generations with training images in the space of a
copy-detection descriptor: SSCD (Pizzi et al., a TorchScript file), or DINOv2 / CLIP image
features (transformers folders). A generation is a copy when the cosine similarity to its
nearest training image is above 0.5, the convention of Somepalli et al. for SSCD. Nothing is
downloaded: the user gives a local file or folder. Without one, a clearly named stand-in
compares small centred greyscale thumbnails (a correlation): it finds near-exact copies only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError
from .metrics import memorization_ratio
from .neighbours import as_uint8_images, resolve_device

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SSCD_SIZE = 288  # the resolution SSCD's authors evaluate their descriptors at
PIXEL_SIZE = 32
PIXEL_MEASURE = (f"pixel correlation at {PIXEL_SIZE}x{PIXEL_SIZE} grey (no feature extractor given; "
                 "not SSCD: finds near-exact copies only)")
# transformers classes accepted from a folder's config.json "architectures", and what each embeds
VISION_MODELS = {"Dinov2Model": "pooler_output", "CLIPVisionModel": "pooler_output",
                 "CLIPVisionModelWithProjection": "image_embeds", "CLIPModel": "image_features"}


@dataclass
class FeatureExtractor:
    """Embeds uint8 (N, 3, H, W) images as unit vectors: resize, normalize, network."""

    name: str
    network: Callable[[torch.Tensor], torch.Tensor]
    size: int
    mean: tuple[float, ...] | None  # None: the stand-in's per-image centring instead
    std: tuple[float, ...] | None
    device: torch.device

    @torch.no_grad()
    def __call__(self, images, batch_size: int = 64) -> torch.Tensor:
        images = as_uint8_images(images, "images")
        if images.shape[1] != 3:
            raise ConfigError(f"feature extractors take RGB images, got {images.shape[1]} channels.")
        out = []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(self.device).float().div(255.0)
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            if self.mean is not None:
                mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
                x = (x - mean) / torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
            out.append(F.normalize(self.network(x).float().flatten(1), dim=1).cpu())
        return torch.cat(out)


def _centred_grey(x: torch.Tensor) -> torch.Tensor:
    grey = x.mean(dim=1).flatten(1)
    return grey - grey.mean(dim=1, keepdim=True)


def load_feature_extractor(source: str | None, device: str | torch.device | None = None) -> FeatureExtractor:
    """SSCD (a TorchScript file), a DINOv2 / CLIP transformers folder, or None for the
    pixel-space stand-in."""
    device = resolve_device(device)
    if source is None:
        return FeatureExtractor(PIXEL_MEASURE, _centred_grey, PIXEL_SIZE, None, None, device)
    path = Path(source).expanduser()
    if path.is_file():
        try:
            module = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as err:
            raise ConfigError(f"feature extractor {path.name} is not a TorchScript file ({err}): give SSCD's "
                              ".torchscript.pt file, or a DINOv2 / CLIP transformers folder.") from None
        return FeatureExtractor(f"SSCD-style TorchScript ({path.name})", module, SSCD_SIZE, IMAGENET_MEAN, IMAGENET_STD, device)
    if not (path / "config.json").exists():
        raise ConfigError(f"feature extractor {source!r} is neither a TorchScript file nor a transformers folder "
                          "(no config.json): give SSCD's .torchscript.pt, or a DINOv2 / CLIP folder saved with save_pretrained.")
    return _transformers_extractor(path, device)


def _transformers_extractor(path: Path, device: torch.device) -> FeatureExtractor:
    import transformers

    config = json.loads((path / "config.json").read_text())
    kind = next((a for a in config.get("architectures") or [] if a in VISION_MODELS), None)
    if kind is None:
        raise ConfigError(f"feature extractor folder {path.name} holds {config.get('architectures')}: use one of "
                          f"{', '.join(VISION_MODELS)}.")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"feature extractor folder {path.name} has no .safetensors weights (pickled weights are not loaded).")
    model = getattr(transformers, kind).from_pretrained(str(path), use_safetensors=True).to(device).eval()
    output = VISION_MODELS[kind]

    def network(x: torch.Tensor) -> torch.Tensor:
        if output == "image_features":
            features = model.get_image_features(pixel_values=x)
            return features if torch.is_tensor(features) else features.pooler_output
        return getattr(model(pixel_values=x), output)

    processor = path / "preprocessor_config.json"
    settings = json.loads(processor.read_text()) if processor.exists() else {}
    vision = config.get("vision_config", config)
    size = settings.get("crop_size", vision.get("image_size", 224))
    size = size.get("height", 224) if isinstance(size, dict) else int(size)
    mean = tuple(settings.get("image_mean", IMAGENET_MEAN))
    std = tuple(settings.get("image_std", IMAGENET_STD))
    return FeatureExtractor(f"{kind} ({path.name})", network, size, mean, std, device)


def cosine_neighbours(queries: torch.Tensor, keys: torch.Tensor, k: int = 2, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar keys of every query (unit rows): similarities (G, k) descending and
    key positions (G, k); k is capped at the number of keys."""
    k = min(k, len(keys))
    sims, index = [], []
    for start in range(0, len(queries), chunk):
        best_sim = best_idx = None
        for key_start in range(0, len(keys), chunk):
            sim = queries[start:start + chunk] @ keys[key_start:key_start + chunk].T
            top = sim.topk(min(k, sim.shape[1]), dim=1)
            cand_sim, cand_idx = top.values, top.indices + key_start
            if best_sim is not None:
                cand_sim, cand_idx = torch.cat([best_sim, cand_sim], 1), torch.cat([best_idx, cand_idx], 1)
            order = cand_sim.topk(k, dim=1).indices
            best_sim, best_idx = cand_sim.gather(1, order), cand_idx.gather(1, order)
        sims.append(best_sim)
        index.append(best_idx)
    return torch.cat(sims).double().numpy(), torch.cat(index).numpy()


def similarity_ratio(sims: np.ndarray) -> np.ndarray:
    """The memorization ratio (distance to the nearest / to the second nearest, copies below
    config.MEMORIZATION_THRESHOLD) in the embedding space: for unit vectors the squared distance is 2 - 2 cos."""
    return memorization_ratio(np.maximum(2.0 - 2.0 * sims[:, :2], 0.0))
