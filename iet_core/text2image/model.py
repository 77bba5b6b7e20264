"""Stable Diffusion components: loading (safetensors only), LoRA adapters through peft the way
diffusers' train_text_to_image_lora.py adds them, frozen encoders, and export."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig, TextToImageConfig
from ..hub import CONFIG_FILES, MODEL_FILES, local_folder
from ..neighbours import as_uint8_images


@dataclass
class Components:
    unet: torch.nn.Module  # UNet2DConditionModel
    vae: torch.nn.Module  # AutoencoderKL
    text_encoder: torch.nn.Module  # CLIPTextModel
    tokenizer: object  # CLIPTokenizer
    scheduler: object  # the pipeline's training noise schedule (DDPMScheduler)

    def pipeline(self, sampler: str = "pipeline"):
        """A StableDiffusionPipeline over these components (no safety checker: the images are
        for measuring copies); "ddim" swaps in DDIM with the same noise schedule."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        scheduler = DDIMScheduler.from_config(self.scheduler.config) if sampler == "ddim" else self.scheduler
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


def pipeline_folder(source: str, files: tuple[str, ...] = MODEL_FILES) -> Path:
    """The folder of a Stable Diffusion pipeline (a Hub id: its snapshot with `files`), checked
    to hold one."""
    path = local_folder(source, "model.pretrained", files)
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"model.pretrained={source!r} is not a diffusers pipeline folder (no model_index.json): "
                          "give the folder StableDiffusionPipeline.save_pretrained wrote, or a Hub id.")
    kind = _read_json(path / "model_index.json", source).get("_class_name", "")
    if kind != "StableDiffusionPipeline":
        raise ConfigError(f"model.pretrained={source!r} holds a {kind}: text2image fine-tunes Stable Diffusion 1.x / 2.x "
                          "pipelines (UNet2DConditionModel with one CLIP text encoder).")
    return path


def _read_json(path: Path, source: str) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise ConfigError(f"model.pretrained={source!r}: {path.parent.name}/{path.name} is missing or not valid JSON.")
    return config


def check_resolution_fits(unet_config: dict, vae_config: dict, resolution: int) -> None:
    """A pipeline trains at multiples of what its VAE and UNet downsample by together, up to its
    own size (the UNet's sample size in latent pixels times the VAE's factor)."""
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    step = vae_scale * 2 ** (len(unet_config["block_out_channels"]) - 1)
    sample = unet_config.get("sample_size")
    largest = (min(sample) if isinstance(sample, (list, tuple)) else sample) * vae_scale if sample else None
    if resolution % step or (largest is not None and resolution > largest):
        fits = max(step, resolution // step * step) if largest is None else min(max(step, resolution // step * step), largest)
        bound = f" up to {largest}" if largest is not None else ""
        raise ConfigError(f"data.resolution={resolution} does not fit this pipeline: use a multiple of {step} pixels"
                          f"{bound} (e.g. {fits}).")


def check_pipeline(config: RunConfig) -> None:
    """A fine-tune's base pipeline fits its settings: read from the pipeline's configs only (a
    Hub id's configs are fetched, not its weights), before a run folder is made."""
    folder = pipeline_folder(config.model.pretrained, CONFIG_FILES)
    unet, vae = (_read_json(folder / part / "config.json", config.model.pretrained) for part in ("unet", "vae"))
    check_resolution_fits(unet, vae, config.data.resolution)


def load_components(source: str) -> Components:
    """The UNet, VAE, text encoder, tokenizer and noise schedule of a diffusers Stable Diffusion
    pipeline: a local folder or a Hub id (iet_core.hub). Weights are read from safetensors only."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    where = str(pipeline_folder(source))
    try:
        return Components(
            unet=UNet2DConditionModel.from_pretrained(where, subfolder="unet", use_safetensors=True),
            vae=AutoencoderKL.from_pretrained(where, subfolder="vae", use_safetensors=True),
            text_encoder=CLIPTextModel.from_pretrained(where, subfolder="text_encoder", use_safetensors=True),
            tokenizer=CLIPTokenizer.from_pretrained(where, subfolder="tokenizer"),
            scheduler=DDPMScheduler.from_pretrained(where, subfolder="scheduler"))
    except (OSError, ValueError, EnvironmentError) as err:  # their messages name the folder: a server path
        raise ConfigError(f"cannot load the Stable Diffusion pipeline model.pretrained={source!r} ({type(err).__name__}): "
                          "give a pipeline folder with .safetensors weights for the UNet, VAE and text encoder.") from None


def add_lora(unet: torch.nn.Module, config: TextToImageConfig) -> None:
    """Freeze the UNet and add one trainable LoRA adapter, as diffusers' LoRA example does
    (gaussian init: B starts at zero, so the adapter starts as a no-op)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    targets = [t.strip() for t in config.lora_targets.split(",")]
    try:
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank,
                                    init_lora_weights="gaussian", target_modules=targets))
    except ValueError as err:
        raise ConfigError(f"text2image.lora_targets={config.lora_targets!r} does not fit this UNet ({err}): "
                          "use module names such as to_k,to_q,to_v,to_out.0.") from None


def trainable_unet(components: Components, config: TextToImageConfig) -> torch.nn.Module:
    """The UNet with what trains marked requires_grad: LoRA adapters, or every weight."""
    if config.lora_rank is None:
        components.unet.requires_grad_(True)
    else:
        add_lora(components.unet, config)
    return components.unet


def load_trained(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load trained weights (a checkpoint's trainable parameters) into a trainable_unet."""
    missing = {n for n, p in unet.named_parameters() if p.requires_grad} - set(state)
    unexpected = set(state) - {n for n, _ in unet.named_parameters()}
    if missing or unexpected:
        raise ConfigError(f"the checkpoint does not match this model ({len(missing)} weights missing, "
                          f"{len(unexpected)} unknown): was model.pretrained or text2image.lora_* changed?")
    unet.load_state_dict(state, strict=False)


@torch.no_grad()
def encode_images(vae: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 16) -> torch.Tensor:
    """Scaled latents of uint8 images (N, 3, H, W): the mean of the VAE's posterior, so the
    cache is deterministic and a resumed run sees the same latents."""
    images = as_uint8_images(images, "training images")
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float().div(127.5).sub(1.0)
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (N, tokens) as the pipeline makes them: padded and truncated to the tokenizer's length."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_tokens(text_encoder: torch.nn.Module, ids: torch.Tensor, device: torch.device,
                  batch_size: int = 64) -> torch.Tensor:
    """The text encoder's last hidden states (N, tokens, width), as the pipeline computes prompt
    embeddings."""
    return torch.cat([text_encoder(ids[start:start + batch_size].to(device))[0] for start in range(0, len(ids), batch_size)])


def save_lora(unet: torch.nn.Module, folder: Path) -> Path:
    """The UNet's adapter as a diffusers LoRA file (pytorch_lora_weights.safetensors) that
    StableDiffusionPipeline.load_lora_weights reads."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder
