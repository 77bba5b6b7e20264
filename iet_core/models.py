"""diffusers UNet presets, loading for fine-tuning, schedulers and pipeline export."""
from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from .config import MODEL_PRESETS, ConfigError, ModelConfig, RunConfig, check_resolution
from .hub import CONFIG_FILES, MODEL_FILES, local_folder

# torch's global random generator is shared by every thread. Code that must draw from it (a
# module's initialisation, dropout: neither takes a generator) holds this lock and restores the
# generator's state after (`seeded_global_rng`), so runs training side by side in one process
# never see each other's draws.
GLOBAL_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | None = None):
    """The global generator (CPU, and `device`'s if CUDA) seeded with `seed` for this block only."""
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def build_unet(config: ModelConfig, resolution: int, channels: int, seed: int = 0) -> UNet2DModel:
    """A fresh UNet from a preset (initialised from `seed`), or a pretrained one (checked
    against the data) to fine-tune."""
    if config.pretrained:
        return load_pretrained_unet(config.pretrained, resolution, channels)
    check_resolution(config.preset, resolution)
    kwargs = dict(MODEL_PRESETS[config.preset])
    if config.dropout is not None:
        kwargs["dropout"] = config.dropout
    return unet_from_config(dict(sample_size=resolution, in_channels=channels, out_channels=channels, **kwargs), seed)


def unet_from_config(unet_config: dict, seed: int = 0) -> UNet2DModel:
    """A UNet2DModel from its own config (as `UNet2DModel.config` holds it), initialised from
    `seed` (a checkpoint's weights usually replace that)."""
    with seeded_global_rng(seed):
        return UNet2DModel.from_config(unet_config)


def unet_config_json(unet: UNet2DModel) -> str:
    """The UNet's own config as JSON, without diffusers' private keys (they name, e.g., the
    local folder it was loaded from)."""
    return json.dumps({k: v for k, v in unet.config.items() if not k.startswith("_")}, indent=2)


def has_dropout(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def forward_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x_0): x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, with ab =
    alphas_cumprod[t] per sample (any leading batch dimensions)."""
    alpha_bar = alpha_bar.reshape(*alpha_bar.shape, *([1] * (x0.dim() - alpha_bar.dim())))
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def _unet_folder(source: str, files: tuple[str, ...] = MODEL_FILES) -> tuple[Path, str | None, dict]:
    """A UNet2DModel's folder (a UNet folder, or a pipeline folder that keeps it in "unet/"; a Hub
    id: its snapshot with `files`), the subfolder it is in, and its config."""
    path = local_folder(source, "model.pretrained", files)
    if not path.is_dir():
        raise ConfigError(f"model.pretrained={source!r} is not a folder: give a diffusers UNet or pipeline folder, "
                          "or a Hub id (owner/name).")
    subfolder = "unet" if not (path / "config.json").exists() and (path / "unet" / "config.json").exists() else None
    folder = path / subfolder if subfolder else path
    if not (folder / "config.json").exists():
        raise ConfigError(f"model.pretrained={source!r}: no config.json there; give a diffusers UNet or pipeline folder.")
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"model.pretrained={source!r}: config.json is not valid JSON ({err}).") from None
    if config.get("_class_name") not in (None, "UNet2DModel"):
        raise ConfigError(f"model.pretrained={source!r} holds a {config.get('_class_name')}, not a UNet2DModel.")
    return path, subfolder, config


def check_unet_fits(unet_config: dict, resolution: int, channels: int) -> None:
    """A pretrained UNet trains on images like those it was made for: its channels, its size."""
    in_channels, size = unet_config.get("in_channels", 3), unet_config.get("sample_size")
    if in_channels != channels:
        raise ConfigError(f"model.pretrained expects {in_channels}-channel images but data.channels={channels}: set data.channels={in_channels}.")
    if size not in (None, resolution) and not isinstance(size, (list, tuple)):
        raise ConfigError(f"model.pretrained was trained at {size}x{size} but data.resolution={resolution}: set data.resolution={size}.")


def check_pretrained_unet(config: RunConfig) -> None:
    """A fine-tune's UNet fits the data settings: read from its config only (a Hub id's config
    is fetched, not its weights), before a run folder is made."""
    _, _, unet_config = _unet_folder(config.model.pretrained, CONFIG_FILES)
    check_unet_fits(unet_config, config.data.resolution, config.data.channels)


def load_pretrained_unet(source: str, resolution: int, channels: int) -> UNet2DModel:
    """A diffusers UNet2DModel from a UNet or pipeline folder: local, or a Hub id's snapshot
    (iet_core.hub). Weights are read from safetensors only: nothing is unpickled."""
    path, subfolder, unet_config = _unet_folder(source)
    if not any((path / subfolder if subfolder else path).glob("*.safetensors")):
        raise ConfigError(f"model.pretrained={source!r}: no .safetensors weights there (pickled .bin weights are not "
                          "loaded for safety); convert them with diffusers' save_pretrained(safe_serialization=True).")
    check_unet_fits(unet_config, resolution, channels)
    try:
        return UNet2DModel.from_pretrained(str(path), subfolder=subfolder, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load model.pretrained={source!r} ({type(err).__name__}). Give a diffusers UNet or pipeline "
                          "folder with .safetensors weights.") from None


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
