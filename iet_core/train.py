"""The training loop: rounds of K proxies, each trained on its own shard, then averaged.

    for round in rounds:
        for proxy k in shards:                       # IET: independent proxies
            weights <- global weights; ema <- global ema
            for step in local steps:
                x0, t, noise -> per-sample loss l_i
                keep_i = l_i >= lambda * bank_k[t_i]   # AGC (bank read before the update)
                loss = mean of l_i over kept samples; gated Adam step (no step if none kept)
                bank_k <- EMA of l_i per timestep       # every sample, skipped ones too
            sum += |D_k| / |D| * weights (and ema)
        global <- sum                                # FedAvg weighted by shard size
        MSR: move often-skipped samples to another shard

The K proxies of a round run one after another or side by side as one vmapped computation
(train.execution), or spread over several processes (iet_core.distributed); the round's
result is the same either way. K = 1 with AGC off is plain
DDPM. Every random draw of a step comes from the trainer's own torch.Generator, seeded from
(seed, round, proxy, step), never from torch's global generator: a run stopped anywhere and
resumed from its checkpoint ends with the same weights as one never interrupted, and runs
training side by side in one process do not disturb each other.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import threading
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call, grad, vmap

from . import agc
from .config import ConfigError, RunConfig, TAAConfig, check_skip_lambda
from .data import ImageDataset, load_dataset
from .distributed import ProcessGroup
from .families import TEXT_TO_IMAGE, family
from .models import check_pretrained_unet, forward_noise, has_dropout, seeded_global_rng, training_scheduler, unet_config_json
from .neighbours import resolve_device
from .optim import AdamState, FlatParams, adam_step, clip_grad_norm_, ema_update_, shard_weights, weighted_average
from .runs import Run, RunLogger, WriterLock
from .shards import redistribute, resolve_split, split_shards
from .telemetry import (CheckpointEvent, DriftEvent, Event, RoundEvent, RoundStartEvent, SampleEvent, SettingEvent, Sink, StatusEvent,
                        StepEvent, StepRecorder)
from .trackers import TrackerSink

CHECKPOINT_FORMAT = 1
_STREAM_TAG = 2**31 - 1  # seed tag of a proxy's data order, distinct from any step index
_DROPOUT_TAG = 2**31 - 2  # seed tag of a step's dropout masks
_PROBE_TAG = 2**31 - 3  # seed tag of the drift telemetry's probe batches


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingOutOfMemory(RuntimeError):
    """The device ran out of memory; the message says which settings to lower."""


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint32)[0])


def data_order(seed: int, round_: int, proxy: int, shard_size: int, count: int) -> torch.Tensor:
    """A proxy's sample order in a round (`count` positions in its shard): permutations of the
    shard, back to back, seeded from (seed, round, proxy)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, round_, proxy, _STREAM_TAG))
    repeats = math.ceil(count / shard_size)
    return torch.cat([torch.randperm(shard_size, generator=generator) for _ in range(repeats)])[:count]


def draw_inputs(x0: torch.Tensor, num_timesteps: int, generator: torch.Generator, hflip: bool,
                taa_strength: torch.Tensor | None = None, taa: TAAConfig | None = None):
    """One step's random inputs for a batch of clean images, in a fixed order from `generator`:
    random flips, TAA (when given its per-sample strength), timesteps and noise. Returns
    (x0, t, noise, strength)."""
    n, device = len(x0), x0.device
    if hflip:
        x0 = torch.where(torch.rand(n, 1, 1, 1, device=device, generator=generator) < 0.5, x0.flip(-1), x0)
    strength = torch.zeros(n, device=device) if taa_strength is None else taa_strength
    if taa_strength is not None:
        x0 = agc.augment(x0, taa_strength, taa, generator)
    t = torch.randint(0, num_timesteps, (n,), device=device, generator=generator)
    return x0, t, torch.randn(x0.shape, device=device, dtype=x0.dtype, generator=generator), strength


class TrainControl:
    """Steers a running trainer from another thread: pause, resume, stop, change lambda."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def wait_while_paused(self) -> None:
        self._running.wait()

    def set_skip_lambda(self, value: float) -> None:
        value = check_skip_lambda(value, "skip_lambda")
        with self._lock:
            self._pending["skip_lambda"] = value

    def take_pending(self) -> dict[str, float]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending


class Trainer:
    """Owns the model, the proxies' state and the run folder while training.

    Per-proxy state is stacked: weights, EMA and Adam moments are (K, P) tensors, banks
    (K, T). Sequential execution points the module's parameters at one row at a time;
    batched execution vmaps one step over all rows. Both share the step's tail and the
    round's average, so the round's result does not depend on the strategy.
    """

    def __init__(self, run: Run, dataset: ImageDataset | None = None, sinks: Iterable[Sink] = (),
                 control: TrainControl | None = None, group: ProcessGroup | None = None):
        self.run = run
        self.config = config = run.config
        self.dataset = dataset if dataset is not None else load_dataset(config.data)
        config.validate(num_images=len(self.dataset))
        self.group = group
        self.writer = group is None or group.is_writer  # the one process that writes the run folder
        trackers = ([TrackerSink(config.train.trackers, run.id, run.tracker_dir, config.to_dict())]
                    if self.writer and config.train.trackers else [])
        self.sinks: list[Sink] = [RunLogger(run), *trackers, *sinks] if self.writer else []
        self.outbox: list[Event] = []  # a non-writer's step records, sent to the writer each round
        self.mine = group.block(config.method.num_shards) if group else range(config.method.num_shards)
        self.stopping = False  # all processes agreed to stop at this round's end
        self.control = control or TrainControl()
        self.writer_lock: WriterLock | None = None  # set by prepare_trainer
        self.device = device = resolve_device(config.train.device)

        self.unet = self.build_model().to(device).train()
        self.generator = torch.Generator(device)  # every draw of a step; seeded per step
        self.dropout = has_dropout(self.unet)
        self.flat = FlatParams(self.unet, channels_last=config.train.channels_last)
        # Compiled for one proxy at a time; side-by-side proxies run the eager module under vmap.
        self.forward = torch.compile(self.unet) if config.train.compile else self.unet
        self.alphas_cumprod = self.noise_scheduler().alphas_cumprod.to(device=device, dtype=torch.float32)
        self.num_timesteps = len(self.alphas_cumprod)
        self.images = self.training_inputs()
        self.ids = self.dataset.ids.to(device)

        n, k = len(self.dataset), config.method.num_shards
        labels = None if self.dataset.labels is None else self.dataset.labels.numpy()
        self.shard_split = resolve_split(config.method.shard_split, labels)
        self.shard_of = split_shards(n, k, self.shard_split, labels, config.train.seed)
        # Each proxy's warmup follows its first-round shard (checkpoints restore later shards).
        self.warmup = [config.train.warmup_for_shard(size) for size in np.bincount(self.shard_of, minlength=k)]
        self.probes = self._probe_batches()
        self._check_memory(k)
        self.global_weights = self.flat.data.clone()
        self.global_ema = self.flat.data.clone()
        self.weights = self.global_weights.repeat(k, 1)  # each proxy's weights this round
        self.ema = self.global_ema.repeat(k, 1)
        self.grads = torch.zeros_like(self.weights)
        self.adam = AdamState.zeros_like(self.weights)
        self.banks = torch.zeros(k, self.num_timesteps, device=device)
        self.iterations = [0] * k  # batches per proxy, for warmup (the reference's LambdaLR)
        # Per training image, on the device: visits and skips per shard, this round's counts,
        # and a running loss ratio (TAA's input).
        self.visits = torch.zeros(k, n, device=device)
        self.skips = torch.zeros(k, n, device=device)
        self.round_visits = torch.zeros(n, device=device)
        self.round_skips = torch.zeros(n, device=device)
        self.running_ratio = torch.full((n,), float("nan"), device=device)
        self.round = self.proxy = self.local_step = self.global_step = self.round_start_step = 0
        self.skip_lambda = config.method.agc.skip_lambda
        self.round_sizes = np.bincount(self.shard_of, minlength=k).tolist()
        self.execution = "sequential"
        self.round_started = time.time()
        self.total_steps = self._expected_total_steps()
        self.recorders = [StepRecorder(config.train.record_samples) for _ in range(k)]
        if self.writer:  # what "auto" chose, for whoever reads the run
            run.write_status(run.status().get("state", "created"), shard_split=self.shard_split)

    # -- what a model family changes (see iet_core.text2image for text-to-image) ------------
    def build_model(self) -> torch.nn.Module:
        """The network; its parameters that require grad are what the proxies train."""
        return self.run.build_unet(seed=self.config.train.seed)  # the same seed, the same weights

    def noise_scheduler(self):
        return training_scheduler(self.config.model)

    def training_inputs(self) -> torch.Tensor:
        """x0 of every training image (N, ...), on the device."""
        return self.dataset.to_model_space().to(self.device)

    def conditioning(self, batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Extra model inputs for dataset positions (J, B): (J, B, ...) tensors; none here."""
        return ()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network predicts: the noise (epsilon prediction)."""
        return noise

    def _check_memory(self, k: int) -> None:
        """Refuse before allocating when the K proxies' weights, EMA, Adam moments and gradients
        (5 x K x parameters) cannot fit in the device's free memory (activations come on top)."""
        need = 5 * k * self.flat.numel * self.flat.data.element_size()
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > 0.9 * free:
            raise ConfigError(
                f"{k} proxies of this {self.flat.numel / 1e6:.1f}M-parameter model need {need / 2**30:.1f} GiB for weights, "
                f"EMA and optimizer state, more than the {free / 2**30:.1f} GiB free on {self.device}: lower "
                "method.num_shards or choose a smaller model preset.")

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> str:
        """Train until done or stopped; returns the final state ("finished" or "stopped").
        The writer lock is released when it returns or raises."""
        try:
            return self._fit()
        finally:
            if self.writer_lock is not None:
                self.writer_lock.release()

    def _fit(self) -> str:
        rounds = self.config.train.rounds
        self._emit(StatusEvent("running", self.round, self.global_step, total_steps=self.total_steps))
        if self.proxy or self.local_step:  # resumed mid-round: no round start will announce it
            self._announce_round()
        try:
            while self.round < rounds:
                if self.proxy == 0 and self.local_step == 0:
                    self._start_round()
                done = self._run_batched() if self.execution == "batched" else self._run_sequential()
                if done:
                    self._end_round()
                else:
                    self.save_checkpoint()
                if not done or self.stopping:
                    self._emit(StatusEvent("stopped", self.round, self.global_step, "stopped; resume to continue"))
                    return "stopped"
        except torch.cuda.OutOfMemoryError as err:
            tc = self.config.train
            error = TrainingOutOfMemory(
                f"the GPU ran out of memory (batch size {tc.batch_size}, preset {self.config.model.preset}, "
                f"{self.execution} proxies): lower train.batch_size (try {max(1, tc.batch_size // 2)}), "
                "use train.execution='sequential' or train.precision='bf16', or a smaller model preset; "
                "then resume from the last checkpoint.")
            self._emit(StatusEvent("failed", self.round, self.global_step, str(error)))
            raise error from err
        except Exception as err:
            self._emit(StatusEvent("failed", self.round, self.global_step, f"{type(err).__name__}: {err}"))
            raise
        self._emit(StatusEvent("finished", self.round, self.global_step))
        return "finished"

    def _start_round(self) -> None:
        k = self.config.method.num_shards
        self.round_sizes = np.bincount(self.shard_of, minlength=k).tolist()
        self.round_visits.zero_()
        self.round_skips.zero_()
        self.round_started = time.time()
        self.round_start_step = self.global_step
        # Another process's first proxy takes up the step numbers where the previous one ends.
        self.proxy = self.mine.start
        self.global_step += sum(self.round_steps()[:self.mine.start])
        if self.config.train.reset_optimizer_each_round:
            self.adam.zero_()
        self.execution = self._choose_execution()
        self.total_steps = self._expected_total_steps()
        self._announce_round()

    def round_steps(self) -> list[int]:
        """Each proxy's local steps this round (they follow its shard's size)."""
        return [self.config.train.steps_for_shard(n) for n in self.round_sizes]

    def _announce_round(self) -> None:
        self._emit(RoundStartEvent(self.round, self.round_start_step, self.round_steps(), self.total_steps))

    def _choose_execution(self) -> str:
        tc, k = self.config.train, self.config.method.num_shards
        equal_steps = len(set(self.round_steps())) == 1
        if tc.execution == "batched" and not equal_steps:
            raise ConfigError("train.execution='batched' needs the same number of local steps for every proxy, but "
                              f"the shards differ in size ({self.round_sizes}): use train.local_steps, or 'auto'.")
        if tc.execution != "auto":
            return tc.execution
        if k == 1 or not equal_steps or self.device.type != "cuda":
            return "sequential"
        # Weights, EMA, two moments and gradients per proxy, plus room for K batches of activations.
        free, _ = torch.cuda.mem_get_info(self.device)
        return "batched" if 5 * self.weights.numel() * self.weights.element_size() < 0.5 * free else "sequential"

    def _batches(self, k: int) -> tuple[torch.Tensor, int]:
        """Proxy k's batches this round as dataset positions (steps, batch), and the step count."""
        tc = self.config.train
        positions = torch.from_numpy(np.flatnonzero(self.shard_of == k)).to(self.device)
        steps = tc.steps_for_shard(len(positions))
        order = data_order(tc.seed, self.round, k, len(positions), steps * tc.batch_size)
        return positions[order.to(self.device)].view(steps, tc.batch_size), steps

    def _run_sequential(self) -> bool:
        """Proxies one after another, from where the round stands; False if stopped."""
        for k in range(self.proxy, self.mine.stop):
            batches, steps = self._batches(k)
            if self.local_step == 0:
                self.weights[k] = self.global_weights
                self.ema[k] = self.global_ema
            self.flat.bind(self.weights[k], self.grads[k])
            while self.local_step < steps:
                if not self._steer():
                    return False
                self._step([k], batches[self.local_step].unsqueeze(0))
            self._flush()
            self.proxy, self.local_step = k + 1, 0
        return True

    def _run_batched(self) -> bool:
        """This process's proxies side by side, one vmapped step each; False if stopped."""
        rows = slice(self.mine.start, self.mine.stop)
        batches, steps = zip(*(self._batches(j) for j in self.mine))
        if self.local_step == 0:
            self.weights[rows] = self.global_weights
            self.ema[rows] = self.global_ema
        while self.local_step < steps[0]:
            if not self._steer():
                return False
            self._step(list(self.mine), torch.stack([b[self.local_step] for b in batches]))
        self._flush()
        self.proxy, self.local_step = self.mine.stop, 0
        return True

    def _draw(self, k: int, batch: torch.Tensor):
        """Proxy k's inputs for this step, from the step's own seed: clean images (flipped and
        augmented), timesteps, noise and TAA strength."""
        config = self.config
        self.generator.manual_seed(derive_seed(config.train.seed, self.round, k, self.local_step))
        strength = None
        if config.method.taa.enabled:
            strength = agc.taa_strength(self.running_ratio[batch], self.skip_lambda, config.method.taa)
        return draw_inputs(self.images[batch], self.num_timesteps, self.generator, config.train.hflip,
                           strength, config.method.taa)

    def _masked_loss(self, prediction, target, bank, t):
        """Per-sample loss, AGC's keep mask (bank read before its update) and the mean loss
        over kept samples."""
        per_sample = (prediction.float() - target).square().mean(dim=(1, 2, 3))
        seen = per_sample.detach()
        if self.config.method.agc.enabled:
            keep = agc.keep_mask(seen, bank, t, self.skip_lambda)
        else:
            keep = torch.ones_like(seen, dtype=torch.bool)
        return (per_sample * keep).sum() / keep.sum().clamp(min=1), seen, keep

    def _dropout_rng(self, proxy: int):
        """Dropout draws from torch's global generator (it takes no other): seeded from the step
        under a process-wide lock, so runs side by side stay independent. A no-op without dropout."""
        if not self.dropout:
            return contextlib.nullcontext()
        tc = self.config.train
        return seeded_global_rng(derive_seed(tc.seed, self.round, proxy, self.local_step, _DROPOUT_TAG), self.device)

    def _step(self, proxies: list[int], batches: torch.Tensor) -> None:
        """One optimizer step for each proxy in `proxies` (one, or all side by side) on the
        dataset positions in batches (J, B)."""
        config, tc = self.config, self.config.train
        x0, t, noise, strength = (torch.stack(v) for v in zip(*(self._draw(k, b) for k, b in zip(proxies, batches))))
        x_t = forward_noise(x0, noise, self.alphas_cumprod[t])
        target = self.target(x0, noise, t)
        condition = self.conditioning(batches)
        rows = slice(proxies[0], proxies[-1] + 1)
        bf16 = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
        with self._dropout_rng(proxies[0]):
            if len(proxies) == 1:
                model_input = x_t[0].contiguous(memory_format=torch.channels_last) if tc.channels_last else x_t[0]
                with bf16:
                    prediction = self.forward(model_input, t[0], *(c[0] for c in condition)).sample
                loss, seen, keep = self._masked_loss(prediction, target[0], self.banks[proxies[0]], t[0])
                self.flat.zero_grad()
                loss.backward()
                loss, seen, keep = loss.detach()[None], seen[None], keep[None]
            else:
                def one_proxy(params, x_t, t, target, bank, condition):
                    with bf16:
                        prediction = functional_call(self.unet, params, (x_t, t, *condition)).sample
                    loss, seen, keep = self._masked_loss(prediction, target, bank, t)
                    return loss, (loss.detach(), seen, keep)

                grads, (loss, seen, keep) = vmap(grad(one_proxy, has_aux=True), randomness="different")(
                    self.flat.unflatten(self.weights[rows]), x_t, t, target, self.banks[rows], condition)
                self.grads[rows] = self.flat.flatten(grads)

        ratio = agc.loss_ratio(seen, self.banks[rows], t)  # the bank before the update; inf while empty
        kept = keep.sum(dim=1)
        do_step = (kept > 0)[:, None] if config.method.agc.enabled else None
        clip_grad_norm_(self.grads[rows], tc.grad_clip)
        # From lr 0, as the reference's LambdaLR; proxies side by side have taken the same steps
        # (and their warmups, set by first-round shards, are over once their step counts agree).
        iterations, warmup = self.iterations[proxies[0]], self.warmup[proxies[0]]
        lr = tc.lr * (min(iterations, warmup) / warmup if warmup else 1.0)
        adam_step(self.weights[rows], self.grads[rows], self.adam.rows(rows), lr, do_step,
                  weight_decay=tc.weight_decay, decoupled=tc.optimizer == "adamw")
        ema_update_(self.ema[rows], self.weights[rows], tc.ema_decay, do_step)

        # Banks and per-image counters of all stepping proxies in single ops, by offsetting
        # each proxy's indices into its own row.
        offsets = torch.arange(rows.start, rows.stop, device=self.device)[:, None]
        decay = config.method.agc.bank_decay
        self.banks.view(-1).copy_(agc.update_bank(self.banks.view(-1), (offsets * self.num_timesteps + t).view(-1),
                                                  seen.view(-1), decay))
        skipped = ~keep
        positions = (offsets * len(self.images) + batches).view(-1)
        self.visits.view(-1).index_add_(0, positions, torch.ones_like(seen).view(-1))
        self.skips.view(-1).index_add_(0, positions, skipped.float().view(-1))
        self.round_visits.index_add_(0, batches.view(-1), torch.ones_like(seen).view(-1))
        self.round_skips.index_add_(0, batches.view(-1), skipped.float().view(-1))
        previous = self.running_ratio[batches]
        taa_decay = config.method.taa.ratio_decay
        updated = torch.where(torch.isnan(previous), ratio, taa_decay * previous + (1 - taa_decay) * ratio)
        self.running_ratio[batches] = torch.where(torch.isfinite(ratio), updated, previous)

        for j, k in enumerate(proxies):
            self.recorders[k].add(self.global_step + j, self.local_step, loss[j], kept[j].float() / batches.shape[1], lr,
                                  self.skip_lambda, self.ids[batches[j]], k, t[j], seen[j], ratio[j], skipped[j], strength[j])
            self.iterations[k] += 1
        self.global_step += len(proxies)
        self.local_step += 1
        if len(self.recorders[proxies[0]]) >= tc.log_every:
            self._flush()

    def _end_round(self) -> None:
        config = self.config
        averages = torch.stack([weighted_average(self.weights, self.round_sizes, self.mine),
                                weighted_average(self.ema, self.round_sizes, self.mine)])
        if self.group:
            self.group.sum_(averages)
            self._share_round()
            for event in self.group.gather_to_writer(self.outbox):
                self._emit(event)
            self.outbox = []
            if self.probes is not None:  # the drift compares every proxy's weights
                self._share_rows([self.weights])
        if self.probes is not None and self.writer:
            self._emit(self._drift(averages[0]))
        self.global_weights.copy_(averages[0])
        self.global_ema.copy_(averages[1])
        moves: list[tuple[int, int, int]] = []
        round_visits = self.round_visits.cpu().numpy()
        round_skips = self.round_skips.cpu().numpy()
        if config.method.msr.enabled:
            self.shard_of, positions = redistribute(
                self.shard_of, round_visits, round_skips, self.skips.T.cpu().numpy(), self.visits.T.cpu().numpy(),
                config.method.msr, config.method.num_shards)
            ids = self.dataset.ids.numpy()
            moves = [(int(ids[p]), a, b) for p, a, b in positions]
        skip_rate = float(round_skips.sum() / max(round_visits.sum(), 1))
        self._emit(RoundEvent(self.round, self.global_step, list(self.round_sizes), shard_weights(self.round_sizes),
                              moves, skip_rate, time.time() - self.round_started))
        self._write_preview()
        self.round += 1
        self.proxy = 0
        self.round_start_step = self.global_step  # where the next round starts (a checkpoint now saves it)
        rounds = config.train.rounds
        self.stopping = self.group is not None and self.group.any(self.control.stop_requested)
        if self.round % config.train.checkpoint_every_rounds == 0 or self.round == rounds or self.stopping:
            self.save_checkpoint()

    def _probe_batches(self) -> tuple[torch.Tensor, ...] | None:
        """Up to train.drift_probe first-round images of every shard, noised at fixed timesteps
        with fixed noise, the same for every round of the run: (positions, shard of each, x_t, t,
        target), or None when the drift telemetry is off."""
        count, k = self.config.train.drift_probe, self.config.method.num_shards
        if not count:
            return None
        generator = torch.Generator().manual_seed(derive_seed(self.config.train.seed, _PROBE_TAG))
        picks = [torch.from_numpy(np.flatnonzero(self.shard_of == shard)) for shard in range(k)]
        picks = [members[torch.randperm(len(members), generator=generator)[:count]] for members in picks]
        positions = torch.cat(picks).to(self.device)
        shard = torch.cat([torch.full((len(pick),), j) for j, pick in enumerate(picks)]).to(self.device)
        x0 = self.images[positions]
        t = torch.randint(0, self.num_timesteps, (len(positions),), generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        return positions, shard, forward_noise(x0, noise, self.alphas_cumprod[t]), t, self.target(x0, noise, t)

    @torch.no_grad()
    def _probe_losses(self, rows: torch.Tensor) -> torch.Tensor:
        """(R, K): the loss of each weight vector in rows (R, P) on each shard's probe batch."""
        positions, shard, x_t, t, target = self.probes
        condition = [c[0] for c in self.conditioning(positions[None])]
        k = self.config.method.num_shards
        losses = torch.empty(len(rows), k, device=self.device)
        self.unet.eval()  # no dropout: the probe is deterministic
        for r in range(len(rows)):
            params = {name: value[0] for name, value in self.flat.unflatten(rows[r:r + 1]).items()}
            prediction = functional_call(self.unet, params, (x_t, t, *condition)).sample
            per_sample = (prediction.float() - target).square().mean(dim=tuple(range(1, target.dim())))
            losses[r] = torch.zeros(k, device=self.device).index_add_(0, shard, per_sample) / torch.bincount(shard, minlength=k)
        self.unet.train()
        return losses

    def _drift(self, average: torch.Tensor) -> DriftEvent:
        """How far the proxies moved from the round's start (the global weights, not yet
        replaced by the average) and from each other, and their losses on every shard's probe."""
        weights, start, k = self.weights, self.global_weights, self.config.method.num_shards
        # Norms of differences in float64: float32 sums over millions of weights drift by 1e-5.
        norm = lambda vector: float(vector.double().norm())
        losses = self._probe_losses(torch.cat([weights, average[None]])).cpu()
        return DriftEvent(self.round, self.global_step, norm(start), [norm(weights[i] - start) for i in range(k)],
                          [[norm(weights[i] - weights[j]) for j in range(k)] for i in range(k)],
                          losses[:k].tolist(), losses[k].tolist())

    def _share_round(self) -> None:
        """Give every process what the others did this round: their proxies' banks and
        counters, and their shards' images' counters. Step counts follow from the shard sizes."""
        owned = torch.from_numpy((self.shard_of >= self.mine.start) & (self.shard_of < self.mine.stop)).to(self.device)
        per_image = [self.round_visits, self.round_skips, self.running_ratio]
        for tensor in per_image:  # only the owner of an image's shard added to its counters
            tensor.copy_(torch.where(owned, tensor, 0.0))
        self._share_rows([self.banks, self.visits, self.skips], per_image)
        steps = self.round_steps()
        for k in set(range(len(steps))) - set(self.mine):
            self.iterations[k] += steps[k]
        self.global_step = self.round_start_step + sum(steps)

    def _share_rows(self, per_proxy: list[torch.Tensor], extra: list[torch.Tensor] = ()) -> None:
        """One all-reduce that gives every process the other processes' rows of (K, ...)
        tensors (each row has one owner, the others send zeros, so the sum is exact), plus
        `extra` tensors already zero outside what this process owns."""
        others = torch.ones(self.config.method.num_shards, dtype=torch.bool, device=self.device)
        others[self.mine.start:self.mine.stop] = False
        for tensor in per_proxy:
            tensor[others] = 0
        everything = [*per_proxy, *extra]
        shared = self.group.sum_(torch.cat([t.reshape(-1) for t in everything]))
        for tensor, part in zip(everything, shared.split([t.numel() for t in everything])):
            tensor.copy_(part.view_as(tensor))

    # -- steering, telemetry ---------------------------------------------------------------
    def _steer(self) -> bool:
        """Apply requests from the control; False when a stop was requested."""
        for name, value in self.control.take_pending().items():
            self.skip_lambda = value
            self._emit(SettingEvent(name, value, self.global_step))
        if self.control.paused and not self.control.stop_requested:
            self._flush()
            self._emit(StatusEvent("paused", self.round, self.global_step, "paused"))
            self.control.wait_while_paused()
            if not self.control.stop_requested:
                self._emit(StatusEvent("running", self.round, self.global_step))
        # Processes of one run stop together, at the end of a round (see _end_round).
        return not self.control.stop_requested or self.group is not None

    def _flush(self) -> None:
        events = [e for k, recorder in enumerate(self.recorders) for e in recorder.flush(self.round, k)]
        for event in events:
            if isinstance(event, StepEvent) and not np.isfinite(event.loss).all():
                first = np.flatnonzero(~np.isfinite(event.loss))[0]
                raise TrainingDiverged(
                    f"the loss became {event.loss[first]} at step {event.global_step[first]} "
                    f"(round {self.round}, proxy {event.proxy}); the last good checkpoint is kept. "
                    "Lower train.lr, keep train.grad_clip on, or use train.precision='fp32'.")
            self._emit(event)

    def _emit(self, event: Event) -> None:
        if not self.writer:
            if isinstance(event, (StepEvent, SampleEvent)):
                self.outbox.append(event)
            return
        for sink in self.sinks:
            sink(event)

    def _expected_total_steps(self) -> int:
        """The run's last step if the remaining rounds keep this round's shard sizes (MSR may
        change them)."""
        return self.round_start_step + (self.config.train.rounds - self.round) * sum(self.round_steps())

    def _write_preview(self) -> None:
        count = self.config.train.preview_samples
        if not count or not self.writer:
            return
        from PIL import Image
        from torchvision.utils import make_grid  # torchvision comes with pytorch-fid

        self.flat.bind(self.global_weights.clone(), self.grads[0])
        images = self.preview_images(count)
        self.unet.train()
        grid = make_grid(images, nrow=int(math.ceil(math.sqrt(count))), padding=1, pad_value=255)
        buffer = io.BytesIO()
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        self.run.write_preview(self.round, buffer.getvalue())

    def preview_images(self, count: int) -> torch.Tensor:
        """uint8 (count, C, H, W) from the global weights (bound to the module)."""
        from .sample import generate

        return generate(self.unet, training_scheduler(self.config.model), count,
                        steps=self.config.train.preview_steps, seed=self.config.train.seed, device=self.device)

    # -- checkpoints ---------------------------------------------------------------------
    def _state_dict(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A UNet state dict whose parameters are read from a flat vector."""
        parameters = {name: value[0] for name, value in self.flat.unflatten(vector[None]).items()}
        return {**self.unet.state_dict(), **parameters}

    def _flatten(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.flat.flatten(state).to(self.device)

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint; with several processes all must call it and the writer's path is returned."""
        if self.group:  # Adam moments are read only by their own proxy, so they travel only here
            self._share_rows(list(self.adam.tensors("adam").values()))
        if not self.writer:
            return None
        mid_round = self.proxy > 0 or self.local_step > 0
        tensors = {"banks": self.banks, "shard_of": torch.from_numpy(self.shard_of), "visits": self.visits,
                   "skips": self.skips, "round_visits": self.round_visits, "round_skips": self.round_skips,
                   "running_ratio": self.running_ratio, "dataset_ids": self.dataset.ids, **self.adam.tensors("adam")}
        if mid_round:  # the proxies' own weights matter only until the round's average
            tensors.update({"proxy_weights": self.weights, "proxy_ema": self.ema})
        meta = {"format": CHECKPOINT_FORMAT, "round": self.round, "proxy": self.proxy, "local_step": self.local_step,
                "global_step": self.global_step, "round_start_step": self.round_start_step,
                "skip_lambda": self.skip_lambda, "round_sizes": self.round_sizes,
                "iterations": self.iterations, "execution": self.execution, "saved": time.time()}
        path = self.run.save_checkpoint(self.global_step, {"model": self._state_dict(self.global_weights),
                                                           "ema": self._state_dict(self.global_ema), "state": tensors},
                                        meta, keep=self.config.train.keep_checkpoints,
                                        unet_config=unet_config_json(self.unet))
        self._write_per_sample()
        self.run.write_status(self.run.status().get("state", "running"), round=self.round, global_step=self.global_step,
                              total_steps=self.total_steps, checkpoint=path.name)
        self._emit(CheckpointEvent(str(path), self.round, self.global_step))
        return path

    def load_checkpoint(self, path: Path | None = None) -> None:
        groups, meta = self.run.load_checkpoint(path)
        state = groups["state"]
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"checkpoint format {meta.get('format')} is not {CHECKPOINT_FORMAT}: "
                              "it was written by another version; start a new run.")
        if not torch.equal(state["dataset_ids"], self.dataset.ids):
            raise ConfigError("the data differs from the data this run was trained on (image ids changed): "
                              "restore the original data source, or start a new run.")
        self.global_weights.copy_(self._flatten(groups["model"]))
        self.global_ema.copy_(self._flatten(groups["ema"]))
        self.adam = AdamState.from_tensors(state, "adam", self.device)
        for name, tensor in (("banks", self.banks), ("visits", self.visits), ("skips", self.skips),
                             ("round_visits", self.round_visits), ("round_skips", self.round_skips),
                             ("running_ratio", self.running_ratio), ("proxy_weights", self.weights),
                             ("proxy_ema", self.ema)):
            if name in state:
                tensor.copy_(state[name])
        self.shard_of = state["shard_of"].numpy().copy()
        self.round, self.proxy, self.local_step = meta["round"], meta["proxy"], meta["local_step"]
        self.global_step, self.skip_lambda, self.round_sizes = meta["global_step"], meta["skip_lambda"], meta["round_sizes"]
        self.iterations, self.execution = list(meta["iterations"]), meta["execution"]
        self.round_start_step = meta.get("round_start_step", self.global_step)  # absent before it was saved
        self.total_steps = self._expected_total_steps()
        if self.group and (self.proxy or self.local_step):
            raise ConfigError("this checkpoint was saved in the middle of a round: resume it in a single process "
                              "(`python -m iet_core resume`), then launch several processes from the next one.")
        if self.writer:
            self.run.cut_logs(self.global_step)

    def _write_per_sample(self) -> None:
        visits, skips = self.visits.sum(0).cpu().numpy(), self.skips.sum(0).cpu().numpy()
        frame = pd.DataFrame({"sample_id": self.dataset.ids.numpy(), "shard": self.shard_of,
                              "visits": visits.astype(np.int64), "skips": skips.astype(np.int64),
                              "skip_rate": np.where(visits > 0, skips / np.maximum(visits, 1), 0.0),
                              "running_ratio": self.running_ratio.cpu().numpy()})
        self.run.write_per_sample(frame)


def check_base_model(config: RunConfig) -> None:
    """What a fine-tune's base model decides about its settings (the resolutions a Stable
    Diffusion pipeline trains at, a UNet's channels and size), from the model's configs."""
    if config.text2image.enabled:
        family(TEXT_TO_IMAGE).check(config)
    elif config.model.pretrained is not None:
        check_pretrained_unet(config)


def create_run(config: RunConfig, runs_root: str | Path, dataset: ImageDataset | None = None) -> tuple[Run, ImageDataset]:
    """Check every setting, the device, the model's configs and the data before a run folder is made."""
    config.validate()
    resolve_device(config.train.device)
    check_base_model(config)
    dataset = dataset if dataset is not None else load_dataset(config.data)
    config.validate(num_images=len(dataset))
    return Run.create(runs_root, config), dataset


def prepare_trainer(run: Run, dataset: ImageDataset | None = None, resume: bool = False,
                    sinks: Iterable[Sink] = (), control: TrainControl | None = None,
                    group: ProcessGroup | None = None, holder: str = "another trainer") -> Trainer:
    """A Trainer for the run, restored from its last checkpoint when resuming. The writing
    process takes the run's writer lock first (in the name of `holder`) and keeps it until
    `fit` ends; a run another trainer holds is refused untouched. A failure after that (data
    gone, checkpoint unreadable) marks the run failed with the reason."""
    lock = run.writer_lock(holder).acquire() if group is None or group.is_writer else None
    try:
        trainer_class = family(TEXT_TO_IMAGE).trainer if run.config.text2image.enabled else Trainer
        trainer = trainer_class(run, dataset=dataset, sinks=sinks, control=control, group=group)
        trainer.writer_lock = lock
        if resume and run.latest_checkpoint() is not None:
            trainer.load_checkpoint()
        elif trainer.writer:
            run.cut_logs(0)  # a run restarted from scratch logs afresh
        return trainer
    except Exception as err:
        if lock is not None:
            run.write_status("failed", message=f"{type(err).__name__}: {err}")
            lock.release()
        raise


def train(config: RunConfig | None = None, *, runs_root: str | Path | None = None, run: Run | None = None,
          resume: bool = False, sinks: Iterable[Sink] = (), control: TrainControl | None = None,
          dataset: ImageDataset | None = None, holder: str = "another trainer") -> Run:
    """Train a new run (config + runs_root) or continue an existing one (run, resume=True).
    Blocks until the run finishes or is stopped; returns the Run."""
    if run is None:
        if config is None or runs_root is None:
            raise ConfigError("give a config and a runs folder for a new run, or an existing run to resume.")
        run, dataset = create_run(config, runs_root, dataset)
    prepare_trainer(run, dataset, resume, sinks, control, holder=holder).fit()
    return run
