"""Image embeddings for copy detection, and nearest training images by cosine similarity.

Text-to-image copy detection compares generations with training images in the space of a
copy-detection descriptor: SSCD (Pizzi et al., a TorchScript file), or DINOv2 / CLIP image
features (transformers folders, local or a Hub id's snapshot: iet_core.hub). A generation is a
copy when the cosine similarity to its nearest training image is above 0.5, the convention of
Somepalli et al. for SSCD. Without an extractor, a clearly named stand-in
compares small centred greyscale thumbnails (a correlation): it finds near-exact copies only.
The same loading path gives the CLIP score of generations against their prompts (ClipScorer),
from a CLIPModel folder.
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
from .hub import is_hub_id, local_folder
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
    path = local_folder(source, "text2image.feature_extractor")
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
    return _transformers_extractor(path, _label(source, path), device)


def _label(source: str, path: Path) -> str:
    """A model's name as shown: its Hub id, or its folder's name (never a server path)."""
    return source if is_hub_id(source) else path.name


def _transformers_model(path: Path, label: str, device: torch.device, accepted, what: str):
    """(class name, model in eval mode, config.json) of a transformers folder holding one of
    the `accepted` classes, from .safetensors only (pickled weights are not loaded)."""
    import transformers

    config = json.loads((path / "config.json").read_text())
    kind = next((a for a in config.get("architectures") or [] if a in accepted), None)
    if kind is None:
        raise ConfigError(f"{what} {label} holds {config.get('architectures')}: use one of {', '.join(accepted)}.")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{what} {label} has no .safetensors weights (pickled weights are not loaded).")
    model = getattr(transformers, kind).from_pretrained(str(path), use_safetensors=True, local_files_only=True)
    return kind, model.to(device).eval(), config


def _pooled(output) -> torch.Tensor:
    """get_image_features / get_text_features give a tensor (older transformers) or an output
    whose pooler_output is the projected embedding (transformers 5)."""
    return output if torch.is_tensor(output) else output.pooler_output


def _preprocessing(path: Path, config: dict) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(input size, mean, std) from the folder's image processor (preprocessor_config.json, or
    processor_config.json as transformers 5 writes it), else the model config and ImageNet's."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):  # no processor saved: the model's own defaults
        vision = config.get("vision_config", config)
        return int(vision.get("image_size", 224)), IMAGENET_MEAN, IMAGENET_STD
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = crop or processor.size
    side = size.get("height") or size.get("shortest_edge") or 224
    return int(side), tuple(processor.image_mean), tuple(processor.image_std)


def _transformers_extractor(path: Path, label: str, device: torch.device) -> FeatureExtractor:
    kind, model, config = _transformers_model(path, label, device, VISION_MODELS, "feature extractor")
    output = VISION_MODELS[kind]

    def network(x: torch.Tensor) -> torch.Tensor:
        if output == "image_features":
            return _pooled(model.get_image_features(pixel_values=x))
        return getattr(model(pixel_values=x), output)

    return FeatureExtractor(f"{kind} ({label})", network, *_preprocessing(path, config), device)


@dataclass
class ClipScorer:
    """CLIP score (Hessel et al. 2021; torchmetrics' CLIPScore): how well an image matches its
    prompt, 100 * max(cos(image embedding, text embedding), 0); the reference repository reports
    its mean over generations."""

    name: str
    images: FeatureExtractor  # the CLIPModel's image embeddings, with its own preprocessing
    tokenizer: object
    max_length: int
    model: torch.nn.Module

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(prompts[start:start + batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.images.device)
            features = _pooled(self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))
            out.append(F.normalize(features.float(), dim=1).cpu())
        return torch.cat(out)

    def __call__(self, images, prompts: list[str], batch_size: int = 64) -> np.ndarray:
        """float64 (N,) CLIP scores of image i against prompt i."""
        if len(images) != len(prompts):
            raise ConfigError(f"CLIP score pairs images with prompts: got {len(images)} images and {len(prompts)} prompts.")
        cosine = (self.images(images, batch_size) * self.text_embeddings(list(prompts), batch_size)).sum(dim=1)
        return (100.0 * cosine.clamp(min=0)).double().numpy()


def load_clip_scorer(source: str, device: str | torch.device | None = None) -> ClipScorer:
    """A CLIP score from a CLIPModel folder (CLIPModel.save_pretrained and its processor's or
    tokenizer's save_pretrained in the same folder), local or a Hub id's snapshot."""
    from transformers import AutoTokenizer

    path = local_folder(source, "text2image.clip_model")
    label = _label(source, path)
    if not (path / "config.json").exists():
        raise ConfigError(f"CLIP model {source!r} is not a transformers folder (no config.json): give a folder that "
                          "CLIPModel.save_pretrained and CLIPProcessor.save_pretrained wrote (e.g. openai/clip-vit-large-patch14).")
    device = resolve_device(device)
    _, model, config = _transformers_model(path, label, device, ("CLIPModel",), "CLIP model (image and text towers)")
    images = FeatureExtractor(f"CLIPModel ({label})", lambda x: _pooled(model.get_image_features(pixel_values=x)),
                              *_preprocessing(path, config), device)
    # transformers 5 builds an empty tokenizer from a folder without one: look for its files first
    found = any((path / name).exists() for name in ("tokenizer.json", "vocab.json"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True) if found else None
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if tokenizer is None:
        raise ConfigError(f"CLIP model {label} has no readable tokenizer (tokenizer.json or vocab.json): save "
                          "the CLIPProcessor (or its tokenizer) into the same folder with save_pretrained.")
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    return ClipScorer(f"CLIP score, {label}", images, tokenizer, max_length, model)


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
