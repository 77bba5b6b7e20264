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

K = 1 with AGC off is plain DDPM. Every random draw of a step comes from a seed derived from
(seed, round, proxy, step), so a run stopped anywhere and resumed from its checkpoint ends
with the same weights as one never interrupted.
"""
from __future__ import annotations

import io
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from . import agc
from .config import ConfigError, RunConfig
from .data import ImageDataset, load_dataset
from .models import build_unet, training_scheduler
from .optim import AdamState, FlatParams, adam_step, clip_grad_norm_, ema_update_, shard_weights
from .runs import Run, append_csv, atomic_write
from .shards import redistribute, split_shards
from .telemetry import (CheckpointEvent, Event, RoundEvent, SampleEvent, SettingEvent, Sink, StatusEvent,
                        StepEvent, StepRecorder)

CHECKPOINT_FORMAT = 1
_STREAM_TAG = 2**31 - 1  # seed tag of a proxy's data order, distinct from any step index


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


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
        if not 0.0 < float(value) <= 1.0:
            raise ConfigError(f"skip_lambda={value}: use a value in (0, 1].")
        with self._lock:
            self._pending["skip_lambda"] = float(value)

    def take_pending(self) -> dict[str, float]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint32)[0])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA GPU is available: use 'auto' or 'cpu'.")
    return device


class RunLogger:
    """The sink that writes events into the run folder's logs and status."""

    def __init__(self, run: Run):
        self.run = run

    def __call__(self, event: Event) -> None:
        path = self.run.path
        if isinstance(event, StepEvent):
            append_csv(path / "metrics.csv", pd.DataFrame({
                "global_step": event.global_step, "round": event.round, "proxy": event.proxy,
                "local_step": event.local_step, "loss": event.loss, "kept_fraction": event.kept_fraction,
                "lr": event.lr, "skip_lambda": event.skip_lambda}))
        elif isinstance(event, SampleEvent):
            append_csv(path / "samples.csv", pd.DataFrame({
                "global_step": event.global_step, "round": event.round, "proxy": event.proxy,
                "sample_id": event.sample_id, "shard": event.shard, "timestep": event.timestep,
                "loss": event.loss, "ratio": event.ratio, "skipped": event.skipped, "augment": event.augment}))
        elif isinstance(event, RoundEvent):
            append_csv(path / "rounds.csv", pd.DataFrame([{
                "round": event.round, "global_step": event.global_step, "shard_sizes": " ".join(map(str, event.shard_sizes)),
                "skip_rate": event.skip_rate, "moves": len(event.moves), "seconds": event.seconds}]))
            if event.moves:
                append_csv(path / "msr_moves.csv", pd.DataFrame(
                    [(event.round, event.global_step, *m) for m in event.moves],
                    columns=["round", "global_step", "sample_id", "from_shard", "to_shard"]))
        elif isinstance(event, SettingEvent):
            append_csv(path / "settings.csv", pd.DataFrame([{
                "global_step": event.global_step, "name": event.name, "value": event.value}]))
        elif isinstance(event, StatusEvent):
            fields = {"total_steps": event.total_steps} if event.total_steps else {}
            self.run.write_status(event.state, round=event.round, global_step=event.global_step,
                                  message=event.message, **fields)


@dataclass
class ProxyState:
    adam: AdamState
    bank: torch.Tensor  # (T,) loss memory per timestep
    iterations: int = 0  # batches seen, for the warmup schedule (the reference's LambdaLR)


class Trainer:
    """Owns the model, the proxies' state and the run folder while training."""

    def __init__(self, run: Run, dataset: ImageDataset | None = None, sinks: Iterable[Sink] = (),
                 control: TrainControl | None = None):
        self.run = run
        self.config = config = run.config
        self.dataset = dataset if dataset is not None else load_dataset(config.data)
        config.validate(num_images=len(self.dataset))
        self.sinks: list[Sink] = [RunLogger(run), *sinks]
        self.control = control or TrainControl()
        self.device = device = resolve_device(config.train.device)

        torch.manual_seed(config.train.seed)  # the same seed starts from the same weights
        self.unet = build_unet(config.model, config.data.resolution, config.data.channels).to(device).train()
        self.flat = FlatParams(self.unet)
        alphas_cumprod = training_scheduler(config.model).alphas_cumprod.to(device=device, dtype=torch.float32)
        self.sqrt_ab = alphas_cumprod.sqrt()
        self.sqrt_one_minus_ab = (1 - alphas_cumprod).sqrt()
        self.num_timesteps = config.model.num_train_timesteps
        self.images = self.dataset.to_model_space().to(device)
        self.ids = self.dataset.ids.to(device)

        n, k = len(self.dataset), config.method.num_shards
        labels = None if self.dataset.labels is None else self.dataset.labels.numpy()
        self.shard_of = split_shards(n, k, config.method.shard_split, labels, config.train.seed)
        self.global_weights = self.flat.data.clone()
        self.global_ema = self.flat.data.clone()
        self.sum_weights = torch.zeros_like(self.global_weights)  # this round's finished proxies
        self.sum_ema = torch.zeros_like(self.global_weights)
        self.proxy_ema = self.global_ema.clone()
        self.proxies = [ProxyState(AdamState.zeros_like(self.flat.data), torch.zeros(self.num_timesteps, device=device))
                        for _ in range(k)]
        # Per training image, on the device: visits and skips per shard, this round's counts,
        # and a running loss ratio (TAA's input).
        self.visits = torch.zeros(k, n, device=device)
        self.skips = torch.zeros(k, n, device=device)
        self.round_visits = torch.zeros(n, device=device)
        self.round_skips = torch.zeros(n, device=device)
        self.running_ratio = torch.full((n,), float("nan"), device=device)
        self.round = self.proxy = self.local_step = self.global_step = 0
        self.skip_lambda = config.method.agc.skip_lambda
        self.round_sizes = np.bincount(self.shard_of, minlength=k).tolist()
        self.round_started = time.time()
        self.total_steps = self._estimate_total_steps()
        self.recorder = StepRecorder(config.train.record_samples)

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> str:
        """Train until done or stopped; returns the final state ("finished" or "stopped")."""
        rounds = self.config.train.rounds
        self._emit(StatusEvent("running", self.round, self.global_step, total_steps=self.total_steps))
        try:
            while self.round < rounds:
                if self.proxy == 0 and self.local_step == 0:
                    self._start_round()
                while self.proxy < self.config.method.num_shards:
                    if not self._train_proxy(self.proxy):
                        self.save_checkpoint()
                        self._emit(StatusEvent("stopped", self.round, self.global_step, "stopped; resume to continue"))
                        return "stopped"
                self._end_round()
        except Exception as err:
            self._emit(StatusEvent("failed", self.round, self.global_step, f"{type(err).__name__}: {err}"))
            raise
        self._emit(StatusEvent("finished", self.round, self.global_step))
        return "finished"

    def _start_round(self) -> None:
        k = self.config.method.num_shards
        self.round_sizes = np.bincount(self.shard_of, minlength=k).tolist()
        self.sum_weights.zero_()
        self.sum_ema.zero_()
        self.round_visits.zero_()
        self.round_skips.zero_()
        self.round_started = time.time()
        if self.config.train.reset_optimizer_each_round:
            for proxy in self.proxies:
                proxy.adam = AdamState.zeros_like(self.flat.data)
        self.total_steps = self.global_step + self._estimate_total_steps(self.config.train.rounds - self.round)

    def _train_proxy(self, k: int) -> bool:
        """Local training of proxy k from where it stands; False if stopped on the way."""
        tc = self.config.train
        positions = torch.from_numpy(np.flatnonzero(self.shard_of == k)).to(self.device)
        steps = tc.steps_for_shard(len(positions))
        order = self._data_order(k, len(positions), steps * tc.batch_size)
        if self.local_step == 0:
            self.flat.data.copy_(self.global_weights)
            self.proxy_ema.copy_(self.global_ema)
        while self.local_step < steps:
            if not self._steer():
                self._flush()
                return False
            s = self.local_step
            self._step(k, positions[order[s * tc.batch_size:(s + 1) * tc.batch_size]])
            self.local_step += 1
            self.global_step += 1
            if len(self.recorder) >= tc.log_every:
                self._flush()
        self._flush()
        weight = shard_weights(self.round_sizes)[k]
        self.sum_weights.add_(self.flat.data, alpha=weight)
        self.sum_ema.add_(self.proxy_ema, alpha=weight)
        self.proxy += 1
        self.local_step = 0
        return True

    def _step(self, k: int, batch: torch.Tensor) -> None:
        """One optimizer step of proxy k on the dataset positions in `batch`."""
        config, tc, proxy = self.config, self.config.train, self.proxies[k]
        torch.manual_seed(derive_seed(tc.seed, self.round, k, self.local_step))
        x0 = self.images[batch]
        if tc.hflip:
            x0 = torch.where(torch.rand(len(batch), 1, 1, 1, device=self.device) < 0.5, x0.flip(-1), x0)
        strength = torch.zeros(len(batch), device=self.device)
        if config.method.taa.enabled:
            strength = agc.taa_strength(self.running_ratio[batch], self.skip_lambda, config.method.taa)
            x0 = agc.augment(x0, strength, config.method.taa)
        t = torch.randint(0, self.num_timesteps, (len(batch),), device=self.device)
        noise = torch.randn_like(x0)
        x_t = self.sqrt_ab[t].view(-1, 1, 1, 1) * x0 + self.sqrt_one_minus_ab[t].view(-1, 1, 1, 1) * noise
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
            prediction = self.unet(x_t, t).sample
        per_sample = (prediction.float() - noise).square().mean(dim=(1, 2, 3))

        loss_seen = per_sample.detach()
        ratio = agc.loss_ratio(loss_seen, proxy.bank, t)
        if config.method.agc.enabled:
            keep = agc.keep_mask(loss_seen, proxy.bank, t, self.skip_lambda)
            do_step = keep.any()
        else:
            keep, do_step = torch.ones_like(loss_seen, dtype=torch.bool), None
        kept = keep.sum()
        loss = (per_sample * keep).sum() / kept.clamp(min=1)
        self.flat.zero_grad()
        loss.backward()
        clip_grad_norm_(self.flat.grad, tc.grad_clip)
        lr = tc.lr * (min(1.0, (proxy.iterations + 1) / tc.warmup_steps) if tc.warmup_steps else 1.0)
        adam_step(self.flat.data, self.flat.grad, proxy.adam, lr, do_step, weight_decay=tc.weight_decay,
                  decoupled=tc.optimizer == "adamw")
        ema_update_(self.proxy_ema, self.flat.data, tc.ema_decay, do_step)
        proxy.bank.copy_(agc.update_bank(proxy.bank, t, loss_seen, config.method.agc.bank_decay))
        proxy.iterations += 1

        skipped = ~keep
        ones = torch.ones_like(loss_seen)
        self.visits[k].index_add_(0, batch, ones)
        self.skips[k].index_add_(0, batch, skipped.float())
        self.round_visits.index_add_(0, batch, ones)
        self.round_skips.index_add_(0, batch, skipped.float())
        previous = self.running_ratio[batch]
        decay = config.method.taa.ratio_decay
        updated = torch.where(torch.isnan(previous), ratio, decay * previous + (1 - decay) * ratio)
        self.running_ratio[batch] = torch.where(torch.isfinite(ratio), updated, previous)
        self.recorder.add(self.global_step, self.local_step, loss.detach(), kept.float() / len(batch), lr,
                          self.skip_lambda, self.ids[batch], k, t, loss_seen, ratio, skipped, strength)

    def _end_round(self) -> None:
        config = self.config
        self.global_weights.copy_(self.sum_weights)
        self.global_ema.copy_(self.sum_ema)
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
        rounds = config.train.rounds
        if self.round % config.train.checkpoint_every_rounds == 0 or self.round == rounds:
            self.save_checkpoint()

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
        return not self.control.stop_requested

    def _flush(self) -> None:
        events = self.recorder.flush(self.round, self.proxy)
        for event in events:
            if isinstance(event, StepEvent) and not np.isfinite(event.loss).all():
                first = np.flatnonzero(~np.isfinite(event.loss))[0]
                raise TrainingDiverged(
                    f"the loss became {event.loss[first]} at step {event.global_step[first]} "
                    f"(round {self.round}, proxy {self.proxy}); the last good checkpoint is kept. "
                    "Lower train.lr, keep train.grad_clip on, or use train.precision='fp32'.")
            self._emit(event)

    def _emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink(event)

    def _data_order(self, k: int, shard_size: int, count: int) -> torch.Tensor:
        """The proxy's sample order this round: seeded permutations of its shard, back to back."""
        generator = torch.Generator().manual_seed(derive_seed(self.config.train.seed, self.round, k, _STREAM_TAG))
        repeats = math.ceil(count / shard_size)
        return torch.cat([torch.randperm(shard_size, generator=generator) for _ in range(repeats)])[:count].to(self.device)

    def _estimate_total_steps(self, rounds: int | None = None) -> int:
        rounds = self.config.train.rounds if rounds is None else rounds
        return rounds * sum(self.config.train.steps_for_shard(n) for n in self.round_sizes)

    def _write_preview(self) -> None:
        count = self.config.train.preview_samples
        if not count:
            return
        from PIL import Image
        from torchvision.utils import make_grid  # torchvision comes with pytorch-fid

        from .sample import generate

        self.flat.data.copy_(self.global_weights)
        images = generate(self.unet, training_scheduler(self.config.model), count,
                          steps=self.config.train.preview_steps, seed=self.config.train.seed, device=self.device)
        self.unet.train()
        grid = make_grid(images, nrow=int(math.ceil(math.sqrt(count))), padding=1, pad_value=255)
        buffer = io.BytesIO()
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        atomic_write(self.run.path / "previews" / f"round-{self.round + 1:04d}.png", buffer.getvalue())

    # -- checkpoints ---------------------------------------------------------------------
    def _state_dict(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A UNet state dict whose parameters are read from a flat vector."""
        state = dict(self.unet.state_dict())
        offset = 0
        for name, param in self.unet.named_parameters():
            state[name] = vector[offset:offset + param.numel()].view_as(param)
            offset += param.numel()
        return state

    def _flatten(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[name].reshape(-1) for name, _ in self.unet.named_parameters()]).to(self.device)

    def save_checkpoint(self) -> Path:
        tensors = {"current.weights": self.flat.data, "current.ema": self.proxy_ema, "sum.weights": self.sum_weights,
                   "sum.ema": self.sum_ema, "shard_of": torch.from_numpy(self.shard_of), "visits": self.visits,
                   "skips": self.skips, "round_visits": self.round_visits, "round_skips": self.round_skips,
                   "running_ratio": self.running_ratio, "dataset_ids": self.dataset.ids}
        for k, proxy in enumerate(self.proxies):
            tensors.update(proxy.adam.tensors(f"proxy{k}.adam"))
            tensors[f"proxy{k}.bank"] = proxy.bank
        meta = {"format": CHECKPOINT_FORMAT, "round": self.round, "proxy": self.proxy, "local_step": self.local_step,
                "global_step": self.global_step, "skip_lambda": self.skip_lambda, "round_sizes": self.round_sizes,
                "proxy_iterations": [p.iterations for p in self.proxies], "saved": time.time()}
        path = self.run.save_checkpoint(self.global_step, {"model": self._state_dict(self.global_weights),
                                                           "ema": self._state_dict(self.global_ema), "state": tensors},
                                        meta, keep=self.config.train.keep_checkpoints)
        self._write_per_sample()
        self.run.write_status(self.run.status().get("state", "running"), round=self.round, global_step=self.global_step,
                              total_steps=self.total_steps, checkpoint=path.name)
        self._emit(CheckpointEvent(str(path), self.round, self.global_step))
        return path

    def load_checkpoint(self, path: Path | None = None) -> None:
        groups, meta = self.run.load_checkpoint(path)
        state = groups["state"]
        if not torch.equal(state["dataset_ids"], self.dataset.ids):
            raise ConfigError("the data differs from the data this run was trained on (image ids changed): "
                              "restore the original data source, or start a new run.")
        self.global_weights.copy_(self._flatten(groups["model"]))
        self.global_ema.copy_(self._flatten(groups["ema"]))
        self.flat.data.copy_(state["current.weights"])
        for name, tensor in (("current.ema", self.proxy_ema), ("sum.weights", self.sum_weights), ("sum.ema", self.sum_ema),
                             ("visits", self.visits), ("skips", self.skips), ("round_visits", self.round_visits),
                             ("round_skips", self.round_skips), ("running_ratio", self.running_ratio)):
            tensor.copy_(state[name])
        self.shard_of = state["shard_of"].numpy().copy()
        for k, proxy in enumerate(self.proxies):
            proxy.adam = AdamState.from_tensors(state, f"proxy{k}.adam", self.device)
            proxy.bank = state[f"proxy{k}.bank"].to(self.device)
            proxy.iterations = meta["proxy_iterations"][k]
        self.round, self.proxy, self.local_step = meta["round"], meta["proxy"], meta["local_step"]
        self.global_step, self.skip_lambda, self.round_sizes = meta["global_step"], meta["skip_lambda"], meta["round_sizes"]
        self.total_steps = self.global_step + self._estimate_total_steps(self.config.train.rounds - self.round)
        self.run.cut_logs(self.global_step)

    def _write_per_sample(self) -> None:
        visits, skips = self.visits.sum(0).cpu().numpy(), self.skips.sum(0).cpu().numpy()
        frame = pd.DataFrame({"sample_id": self.dataset.ids.numpy(), "shard": self.shard_of,
                              "visits": visits.astype(np.int64), "skips": skips.astype(np.int64),
                              "skip_rate": np.where(visits > 0, skips / np.maximum(visits, 1), 0.0),
                              "running_ratio": self.running_ratio.cpu().numpy()})
        atomic_write(self.run.path / "per_sample.csv", frame.to_csv(index=False))


def create_run(config: RunConfig, runs_root: str | Path, dataset: ImageDataset | None = None) -> tuple[Run, ImageDataset]:
    """Load the data and check every setting against it before a run folder is made."""
    dataset = dataset if dataset is not None else load_dataset(config.data)
    config.validate(num_images=len(dataset))
    return Run.create(runs_root, config), dataset


def train(config: RunConfig | None = None, *, runs_root: str | Path | None = None, run: Run | None = None,
          resume: bool = False, sinks: Iterable[Sink] = (), control: TrainControl | None = None,
          dataset: ImageDataset | None = None) -> Run:
    """Train a new run (config + runs_root) or continue an existing one (run, resume=True).
    Blocks until the run finishes or is stopped; returns the Run."""
    if run is None:
        if config is None or runs_root is None:
            raise ConfigError("give a config and a runs folder for a new run, or an existing run to resume.")
        run, dataset = create_run(config, runs_root, dataset)
    trainer = Trainer(run, dataset=dataset, sinks=sinks, control=control)
    if resume and run.latest_checkpoint() is not None:
        trainer.load_checkpoint()
    else:
        run.cut_logs(0)  # a run restarted from scratch logs afresh
    trainer.fit()
    return run
