"""Shards over several processes: one per GPU, or CPU processes with the gloo backend.

    torchrun --standalone --nproc_per_node 2 -m iet_core train --mode iet-agc --shards 4
    accelerate launch --num_processes 2 -m iet_core train --mode iet-agc --shards 4

Each process trains a contiguous block of the K proxies. At the end of a round the weighted
average of weights and EMA is one all-reduce (each process adds its proxies' share), and the
rows of bookkeeping each process owns (memory banks, per-image counters) a second one, so every
process starts the next round from the same state and MSR moves the same samples everywhere.
Adam moments are only read by their own proxy, so they travel only when a checkpoint is saved.
Rank 0 alone writes the run folder; the other ranks' step records reach it at each round's end.
A stop (Ctrl-C) takes effect at the end of the round, when all processes agree on it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    world_size: int

    @classmethod
    def from_environment(cls) -> "ProcessGroup | None":
        """The group that torchrun or accelerate launch describe (WORLD_SIZE, RANK, ...), joined
        on first use; None when this is the only process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" means this process's GPU
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def block(self, num_proxies: int) -> range:
        """This process's proxies: a contiguous block, so its steps keep their global numbers."""
        if num_proxies < self.world_size:
            raise ConfigError(f"{self.world_size} processes but only {num_proxies} proxies: launch at most "
                              f"{num_proxies} processes, or raise method.num_shards.")
        return range(self.rank * num_proxies // self.world_size, (self.rank + 1) * num_proxies // self.world_size)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        return bool(self.sum_(torch.tensor([float(flag)], device=device)).item() > 0)

    def gather_to_writer(self, items: list) -> list:
        """Every process's items, in rank order, on rank 0 (an empty list elsewhere)."""
        gathered = [None] * self.world_size if self.is_writer else None
        dist.gather_object(items, gathered, dst=0)
        return [item for part in gathered for item in part] if self.is_writer else []

    def share_from_writer(self, value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        dist.barrier()  # the writer's last checkpoint is on disk before anyone exits
        dist.destroy_process_group()
