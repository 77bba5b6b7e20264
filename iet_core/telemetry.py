"""Training events and the sinks that consume them.

The trainer keeps per-step and per-sample values on the device and flushes them every
`train.log_every` steps with one host transfer, so consumers (a log, the run folder, a UI)
never slow the hot loop. A sink is any callable taking one event (`list.append` will do).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Union

import numpy as np


class _Flush:
    def columns(self) -> dict[str, np.ndarray]:
        """One row per step or visit, as the run folder's logs keep them: global_step, round
        and proxy first, then the other fields in order."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        size = len(self.global_step)
        return {"global_step": values.pop("global_step"), "round": np.full(size, values.pop("round")),
                "proxy": np.full(size, values.pop("proxy")), **values}


@dataclass
class StepEvent(_Flush):
    """A flush of consecutive steps of one proxy (arrays of equal length)."""

    round: int
    proxy: int
    global_step: np.ndarray  # int64, steps of all proxies counted together
    local_step: np.ndarray  # int64, the proxy's step within the round
    loss: np.ndarray  # float32, mean loss over kept samples
    kept_fraction: np.ndarray  # float32
    lr: np.ndarray  # float32
    skip_lambda: np.ndarray  # float32, lambda in force (it can be changed while running)


@dataclass
class SampleEvent(_Flush):
    """Per-sample records of the same flush: one row per sample visit."""

    round: int
    proxy: int
    global_step: np.ndarray  # int64
    sample_id: np.ndarray  # int64 global image id
    shard: np.ndarray  # int64
    timestep: np.ndarray  # int64
    loss: np.ndarray  # float32
    ratio: np.ndarray  # float32, loss / bank[t] before the update (inf while bank[t] is 0)
    skipped: np.ndarray  # bool
    augment: np.ndarray  # float32, TAA strength applied (0 without TAA)


@dataclass
class RoundEvent:
    round: int
    global_step: int
    shard_sizes: list[int]
    weights: list[float]  # averaging weights |D_k| / |D|
    moves: list[tuple[int, int, int]] = field(default_factory=list)  # MSR: (sample id, from, to)
    skip_rate: float = 0.0  # share of visits skipped in the round
    seconds: float = 0.0


@dataclass
class DriftEvent:
    """After a round, before averaging: whether the proxies learned different things. Distances
    are L2 in weight space; losses are on each shard's probe batch (a few of its first-round
    images with noise and timesteps fixed for the whole run, the model in eval mode), so rounds
    compare with each other and the measurement costs a few forward passes."""

    round: int
    global_step: int
    start_norm: float  # |w| of the global weights at the round's start: the scale of the distances
    drift: list[float]  # per proxy k: |w_k - w_start|
    distances: list[list[float]]  # (K, K): |w_i - w_j|
    probe_loss: list[list[float]]  # (K, K): proxy i's loss on shard j's probe
    average_loss: list[float]  # per shard j: the averaged weights' loss on its probe

    def rows(self) -> list[dict]:
        """One row per proxy, as drift.csv keeps it: the distances and losses in full
        (distance_to_j, loss_on_j), then the summaries a chart shows (mean over the other proxies
        or shards; NaN with one proxy)."""
        k = len(self.drift)
        rows = []
        for i in range(k):
            others = [j for j in range(k) if j != i]
            rows.append({
                "round": self.round, "global_step": self.global_step, "proxy": i, "start_norm": self.start_norm,
                "drift": self.drift[i],
                "distance_to_others": float(np.mean([self.distances[i][j] for j in others])) if others else np.nan,
                "loss_own": self.probe_loss[i][i],
                "loss_others": float(np.mean([self.probe_loss[i][j] for j in others])) if others else np.nan,
                "average_loss_own": self.average_loss[i],
                **{f"distance_to_{j}": self.distances[i][j] for j in range(k)},
                **{f"loss_on_{j}": self.probe_loss[i][j] for j in range(k)},
            })
        return rows

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "DriftEvent":
        """The event back from its rows (one round's, as drift.csv keeps them)."""
        rows = sorted(rows, key=lambda row: row["proxy"])
        k = len(rows)
        return cls(int(rows[0]["round"]), int(rows[0]["global_step"]), float(rows[0]["start_norm"]),
                   [float(row["drift"]) for row in rows],
                   [[float(row[f"distance_to_{j}"]) for j in range(k)] for row in rows],
                   [[float(row[f"loss_on_{j}"]) for j in range(k)] for row in rows],
                   [float(row["average_loss_own"]) for row in rows])


@dataclass
class RoundStartEvent:
    """A round's plan: each proxy's local steps (they follow its shard's size, which MSR
    changes between rounds) and the run's expected total."""

    round: int
    global_step: int
    steps_per_proxy: list[int]
    total_steps: int


@dataclass
class StatusEvent:
    state: str  # "running", "paused", "stopped", "finished", "failed"
    round: int
    global_step: int
    message: str = ""
    total_steps: int = 0


@dataclass
class CheckpointEvent:
    path: str
    round: int
    global_step: int


@dataclass
class SettingEvent:
    """A setting changed while running (recorded in the run's history)."""

    name: str
    value: float
    global_step: int


Event = Union[StepEvent, SampleEvent, RoundEvent, DriftEvent, RoundStartEvent, StatusEvent, CheckpointEvent, SettingEvent]
Sink = Callable[[Event], None]


class ProgressBar:
    """A tqdm bar over the run's total steps, for the CLI."""

    def __init__(self, total_steps: int, initial: int = 0):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepEvent) and len(event.global_step):
            self._bar.update(int(event.global_step[-1]) + 1 - self._bar.n)
            self._bar.set_postfix(round=event.round, proxy=event.proxy, loss=f"{event.loss.mean():.4f}",
                                  kept=f"{event.kept_fraction.mean():.2f}")
        elif isinstance(event, StatusEvent) and event.state != "running":
            self._bar.close()


class StepRecorder:
    """Collects one proxy's per-step values as device tensors; `flush` moves them to the host
    in one transfer and turns them into events."""

    def __init__(self, record_samples: bool):
        self.record_samples = record_samples
        self._steps: list[tuple] = []
        self._samples: list[tuple] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, global_step: int, local_step: int, loss, kept_fraction, lr: float, skip_lambda: float,
            sample_id, shard: int, timestep, sample_loss, ratio, skipped, augment) -> None:
        self._steps.append((global_step, local_step, loss, kept_fraction, lr, skip_lambda))
        if self.record_samples:
            self._samples.append((global_step, shard, sample_id, timestep, sample_loss, ratio, skipped, augment))

    def flush(self, round_: int, proxy: int) -> list[Event]:
        if not self._steps:
            return []
        import torch

        gsteps, lsteps, losses, kept, lrs, lams = zip(*self._steps)
        device_values = torch.stack([torch.stack(losses).float(), torch.stack(kept).float()]).cpu().numpy()
        events: list[Event] = [StepEvent(round_, proxy, np.asarray(gsteps, np.int64), np.asarray(lsteps, np.int64),
                                         device_values[0], device_values[1], np.asarray(lrs, np.float32),
                                         np.asarray(lams, np.float32))]
        if self._samples:
            counts = [len(s[2]) for s in self._samples]
            cols = list(zip(*self._samples))
            ints = torch.cat([torch.stack([ids, t]) for ids, t in zip(cols[2], cols[3])], dim=1).cpu().numpy()
            floats = torch.cat([torch.stack([l.float(), r.float(), s.float(), a.float()])
                                for l, r, s, a in zip(cols[4], cols[5], cols[6], cols[7])], dim=1).cpu().numpy()
            events.append(SampleEvent(round_, proxy, np.repeat(np.asarray(cols[0], np.int64), counts),
                                      ints[0], np.repeat(np.asarray(cols[1], np.int64), counts), ints[1],
                                      floats[0], floats[1], floats[2] > 0.5, floats[3]))
        self._steps.clear()
        self._samples.clear()
        return events
