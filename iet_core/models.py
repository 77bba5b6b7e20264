"""diffusers UNet presets, loading for fine-tuning, schedulers and pipeline export."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from .config import ConfigError, ModelConfig

# Each preset: UNet2DModel keyword arguments (sample_size and channels come from the data).
PRESETS: dict[str, dict] = {
    # ~1.1M parameters: trains at useful speed on 2 CPU cores and memorizes small sets quickly.
    "tiny": dict(
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        dropout=0.0,
    ),
    # ~17M parameters: a GPU model for 32x32 data in minutes.
    "small": dict(
        block_out_channels=(64, 128, 128, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1,
    ),
    # The DDPM paper's CIFAR-10 network (~35.7M parameters), as google/ddpm-cifar10-32 converts it:
    # ch 128, mult (1, 2, 2, 2), attention at 16x16, 2 res blocks per level, dropout 0.1.
    "ddpm-cifar10": dict(
        block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    ),
}


def check_resolution(preset: str, resolution: int) -> None:
    levels = len(PRESETS[preset]["block_out_channels"]) - 1
    if resolution % 2**levels:
        raise ConfigError(f"data.resolution={resolution} does not suit model preset {preset!r}: it halves the image "
                          f"{levels} times, so use a multiple of {2**levels} (e.g. {max(2**levels, resolution // 2**levels * 2**levels)}).")


def build_unet(config: ModelConfig, resolution: int, channels: int) -> UNet2DModel:
    """A fresh UNet from a preset, or a pretrained one (checked against the data) to fine-tune."""
    if config.pretrained:
        return load_pretrained_unet(config.pretrained, resolution, channels)
    check_resolution(config.preset, resolution)
    kwargs = dict(PRESETS[config.preset])
    if config.dropout is not None:
        kwargs["dropout"] = config.dropout
    return UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels, **kwargs)


def load_pretrained_unet(source: str, resolution: int, channels: int) -> UNet2DModel:
    """A diffusers UNet2DModel from a local folder (a UNet or a pipeline folder) or a Hub id.
    Weights are read from safetensors only: nothing is unpickled."""
    path = Path(source).expanduser()
    subfolder = None
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "unet" / "config.json").exists():
            subfolder = "unet"
        folder = path / subfolder if subfolder else path
        if not (folder / "config.json").exists():
            raise ConfigError(f"model.pretrained={source!r}: no config.json there; give a diffusers UNet or pipeline folder.")
        if not any(folder.glob("*.safetensors")):
            raise ConfigError(f"model.pretrained={source!r}: no .safetensors weights there (pickled .bin weights are not "
                              "loaded for safety); convert them with diffusers' save_pretrained(safe_serialization=True).")
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"model.pretrained={source!r}: config.json is not valid JSON ({err}).") from None
        if config.get("_class_name") not in (None, "UNet2DModel"):
            raise ConfigError(f"model.pretrained={source!r} holds a {config.get('_class_name')}, not a UNet2DModel.")
    # A Hub id may name a UNet repo or a pipeline repo that keeps it in "unet/".
    attempts = [subfolder] if path.is_dir() else [None, "unet"]
    for attempt in attempts:
        try:
            unet = UNet2DModel.from_pretrained(str(path) if path.is_dir() else source, subfolder=attempt, use_safetensors=True)
            break
        except (OSError, ValueError) as err:
            error = err
    else:
        raise ConfigError(f"cannot load model.pretrained={source!r} ({error}). Give a local diffusers folder, "
                          "or check the Hub id and the network.")
    if unet.config.in_channels != channels:
        raise ConfigError(f"model.pretrained expects {unet.config.in_channels}-channel images but data.channels={channels}: set data.channels={unet.config.in_channels}.")
    if unet.config.sample_size not in (None, resolution) and not isinstance(unet.config.sample_size, (list, tuple)):
        raise ConfigError(f"model.pretrained was trained at {unet.config.sample_size}x{unet.config.sample_size} but data.resolution={resolution}: set data.resolution={unet.config.sample_size}.")
    return unet


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_scheduler(config: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_start=config.beta_start,
                         beta_end=config.beta_end, beta_schedule=config.beta_schedule, clip_sample=True)


def sampling_scheduler(train_scheduler: DDPMScheduler, kind: str = "ddim"):
    """DDIM (the reference's evaluation sampler) or ancestral DDPM with the training betas."""
    if kind == "ddim":
        return DDIMScheduler.from_config(train_scheduler.config)
    return DDPMScheduler.from_config(train_scheduler.config)


def export_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, folder: str | Path) -> Path:
    """A folder that `DDPMPipeline.from_pretrained` loads (safetensors weights)."""
    folder = Path(folder)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return folder
