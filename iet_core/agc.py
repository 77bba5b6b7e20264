"""Anti-gradient control and threshold-aware augmentation: pure tensor functions.

Everything here stays on the device and returns tensors, so the training step never waits
for the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import TAAConfig


def loss_ratio(loss: torch.Tensor, bank: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """loss / bank[t], +inf where the bank has not seen timestep t yet. With (J, T) banks and
    (J, B) timesteps, row j of the losses is read against bank j."""
    return loss / bank.gather(-1, t)


def keep_mask(loss: torch.Tensor, bank: torch.Tensor, t: torch.Tensor, skip_lambda: float) -> torch.Tensor:
    """The reference rule `loss * mem_ratio >= bank[t]` with lambda = 1 / mem_ratio: keep a
    sample unless its loss is below lambda times the recent loss at its timestep. The bank is
    read before this batch updates it, and an empty bank (0) keeps everything."""
    return loss >= skip_lambda * bank[t]


def update_bank(bank: torch.Tensor, t: torch.Tensor, loss: torch.Tensor, decay: float) -> torch.Tensor:
    """The bank after the reference's sequential per-sample update
        for i in batch order: bank[t_i] = decay * bank[t_i] + (1 - decay) * loss_i
    in closed form, without a loop or a host sync. For a timestep hit m times by losses
    l_0..l_{m-1} (in batch order): bank' = decay^m * bank + (1 - decay) * sum_j decay^(m-1-j) * l_j.
    """
    t = t.long()
    order = torch.argsort(t, stable=True)
    t_sorted = t[order]
    rank_sorted = torch.arange(len(t), device=t.device) - torch.searchsorted(t_sorted, t_sorted)
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted  # position of each sample among the batch's samples at its t
    hits = torch.bincount(t, minlength=bank.shape[0]).to(bank.dtype)
    later = hits[t] - 1 - rank.to(bank.dtype)  # samples after this one at the same t
    contribution = (1.0 - decay) * torch.pow(torch.full_like(later, decay), later) * loss.to(bank.dtype)
    return bank * torch.pow(torch.full_like(hits, decay), hits) + torch.zeros_like(bank).index_add_(0, t, contribution)


def update_bank_sequential(bank: torch.Tensor, t: torch.Tensor, loss: torch.Tensor, decay: float) -> torch.Tensor:
    """The reference's loop, one host sync per sample; kept as the specification that
    `update_bank` is tested and benchmarked against."""
    bank = bank.clone()
    for i, step in enumerate(t.tolist()):
        bank[step] = decay * bank[step] + (1.0 - decay) * loss[i].item()
    return bank


def taa_strength(running_ratio: torch.Tensor, skip_lambda: float, config: TAAConfig) -> torch.Tensor:
    """Augmentation strength in [0, max_strength]: full at or below the skip threshold, falling
    linearly to 0 at skip_lambda + band; 0 for samples not yet seen (NaN ratio)."""
    strength = ((skip_lambda + config.band - running_ratio) / config.band).clamp(0.0, 1.0)
    return torch.nan_to_num(strength, nan=0.0) * config.max_strength


def augment(x: torch.Tensor, strength: torch.Tensor, config: TAAConfig,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample flip, shift, zoom and brightness/contrast jitter scaled by strength, as a few
    batched ops (affine_grid + grid_sample). Samples with strength 0 are returned unchanged."""
    n = x.shape[0]
    s = strength.to(x.dtype)
    u = torch.rand(n, 5, device=x.device, dtype=x.dtype, generator=generator) * 2 - 1  # uniform in [-1, 1]
    if config.flip:
        flip = torch.rand(n, device=x.device, generator=generator) < s * 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    zoom = 1.0 + s * config.max_scale * u[:, 0]
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / zoom
    theta[:, 0, 2] = s * config.max_shift * 2 * u[:, 1]  # grid coordinates span [-1, 1]
    theta[:, 1, 2] = s * config.max_shift * 2 * u[:, 2]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mean = moved.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (1.0 + s * config.jitter * u[:, 3]).view(-1, 1, 1, 1)
    brightness = (s * config.jitter * u[:, 4]).view(-1, 1, 1, 1)
    jittered = ((moved - mean) * contrast + mean + brightness).clamp(-1.0, 1.0)
    return torch.where((s > 0).view(-1, 1, 1, 1), jittered, x)
