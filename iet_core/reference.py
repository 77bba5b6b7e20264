"""One IET-AGC round written out plainly: the specification that the trainer's faster paths
(proxies side by side under vmap, proxies spread over processes) are tested against.

    for each proxy k, on its shard D_k:
        model_k <- a copy of the global model, with a fresh Adam
        for each local step:
            x0 <- the shard's next batch;  t, eps <- the step's random draws
            l_i = mean (eps_i - model_k(x_t_i, t_i))^2          x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
            keep_i = l_i >= lambda * bank_k[t_i]               (the bank before this batch updates it)
            if any sample is kept: one Adam step on the mean of l_i over kept samples (clipped)
            bank_k[t_i] <- decay * bank_k[t_i] + (1 - decay) * l_i, one sample after another
    global <- sum_k |D_k| / |D| * model_k

No vmap, no flat parameter vectors, no process group: torch.optim and a loop over samples.
It covers the first round of a run (fresh optimizers) without TAA, MSR or EMA; the random
draws are the trainer's (`data_order`, `draw_inputs`), so both see the same batches.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from . import agc
from .config import RunConfig
from .models import forward_noise, training_scheduler
from .train import data_order, derive_seed, draw_inputs


def reference_round(model: torch.nn.Module, images: torch.Tensor, shard_of: np.ndarray, config: RunConfig,
                    round_: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One round from `model` (the global weights) on images in model space ([-1, 1], (N, C, H, W)).
    Returns the averaged state dict, the banks (K, T) and each image's skip count."""
    tc, agc_config = config.train, config.method.agc
    num_shards, timesteps = config.method.num_shards, config.model.num_train_timesteps
    alphas_cumprod = training_scheduler(config.model).alphas_cumprod.float()
    banks = torch.zeros(num_shards, timesteps)
    skips = torch.zeros(len(images))
    sizes = np.bincount(shard_of, minlength=num_shards)
    average = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
    for k in range(num_shards):
        proxy = copy.deepcopy(model).train()
        optimizer_type = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        optimizer = optimizer_type(proxy.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        positions = torch.from_numpy(np.flatnonzero(shard_of == k))
        steps, warmup = tc.steps_for_shard(len(positions)), tc.warmup_for_shard(len(positions))
        order = positions[data_order(tc.seed, round_, k, len(positions), steps * tc.batch_size)]
        for step in range(steps):
            batch = order[step * tc.batch_size:(step + 1) * tc.batch_size]
            generator = torch.Generator().manual_seed(derive_seed(tc.seed, round_, k, step))
            x0, t, noise, _ = draw_inputs(images[batch], timesteps, generator, tc.hflip)
            prediction = proxy(forward_noise(x0, noise, alphas_cumprod[t]), t).sample
            losses = (prediction - noise).square().mean(dim=(1, 2, 3))
            if agc_config.enabled:
                keep = agc.keep_mask(losses.detach(), banks[k], t, agc_config.skip_lambda)
            else:
                keep = torch.ones(len(batch), dtype=torch.bool)
            skips.index_add_(0, batch, (~keep).float())  # a batch may hold an image twice
            if keep.any():
                for group in optimizer.param_groups:  # linear warmup from lr 0 over the proxy's steps
                    group["lr"] = tc.lr * (min(step, warmup) / warmup if warmup else 1.0)
                optimizer.zero_grad()
                (losses[keep].sum() / keep.sum()).backward()
                torch.nn.utils.clip_grad_norm_(proxy.parameters(), tc.grad_clip)
                optimizer.step()
            banks[k] = agc.update_bank_sequential(banks[k], t, losses.detach(), agc_config.bank_decay)
        for name, value in proxy.state_dict().items():
            average[name] += sizes[k] / sizes.sum() * value
    return average, banks, skips
