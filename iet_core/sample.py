"""Seeded, batched image generation from a UNet with DDIM or DDPM sampling."""
from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDPMScheduler, UNet2DModel

from .config import SAMPLERS, ConfigError
from .models import sampling_scheduler


class Cancelled(RuntimeError):
    """Work given a `cancelled` check stopped early because it returned True (the client
    left, or the server is stopping)."""


@torch.no_grad()
def generate(unet: UNet2DModel, train_scheduler: DDPMScheduler, num_samples: int, *, sampler: str = "ddim",
             steps: int = 50, eta: float = 0.0, seed: int = 0, batch_size: int = 256,
             device: str | torch.device | None = None,
             progress: Callable[[int, int], None] | None = None,
             cancelled: Callable[[], bool] | None = None) -> torch.Tensor:
    """uint8 images (N, C, H, W). Batch b draws its starting noise from seed + b, so the
    result does not depend on the device's random stream or on other work. `steps` applies to
    both samplers: DDPM with fewer steps than the training timesteps is diffusers' strided
    ancestral sampler; give steps = num_train_timesteps for the full chain. `cancelled` is
    asked before every denoising step; when it returns True, `Cancelled` is raised."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler={sampler!r}: choose one of {', '.join(SAMPLERS)}.")
    total_steps = train_scheduler.config.num_train_timesteps
    if not 1 <= steps <= total_steps:
        raise ConfigError(f"steps={steps}: use between 1 and {total_steps} (the model's training timesteps).")
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    scheduler = sampling_scheduler(train_scheduler, sampler)
    scheduler.set_timesteps(steps)
    channels, size = unet.config.in_channels, unet.config.sample_size
    out, done = [], 0
    batches = -(-num_samples // batch_size)
    for b in range(batches):
        n = min(batch_size, num_samples - done)
        generator = torch.Generator("cpu").manual_seed(seed + b)
        x = torch.randn(n, channels, size, size, generator=generator).to(device)
        for t in scheduler.timesteps:
            if cancelled is not None and cancelled():
                unet.train(was_training)
                raise Cancelled("sampling was cancelled")
            eps = unet(x, t.to(device)).sample
            kwargs = {"eta": eta} if sampler == "ddim" else {}
            x = scheduler.step(eps, t, x, generator=generator, **kwargs).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        done += n
        if progress is not None:
            progress(done, num_samples)
    unet.train(was_training)
    return torch.cat(out)


def generate_from_run(run, num_samples: int, *, use_ema: bool = True, checkpoint=None,
                      device: str | torch.device | None = None, **options) -> torch.Tensor:
    """`generate` from a run's latest (or a given) checkpoint, with its EMA or raw weights.
    `options` are generate's: sampler, steps, eta, seed, batch_size, progress, cancelled."""
    unet = run.load_unet(ema=use_ema, device=device or "cpu", checkpoint=checkpoint)
    return generate(unet, run.scheduler(), num_samples, device=device, **options)
