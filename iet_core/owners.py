"""Who may steer and delete a run started in the app, how much each user may keep, and the
admin's cleanup.

A browser session (or API client) is identified by a random owner token. A run's folder keeps
only the token's sha256 (`Run.write_owner`), so ownership survives a restart of the app without
the token being stored. Runs made outside the app (the CLI) record no owner: anyone may resume
them from the app, no one may delete them there.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from .config import MAX_IMAGES, ConfigError, RunConfig
from .runs import Run, list_runs, set_aside_folders


class JobError(ConfigError):
    """A job request cannot be carried out; the message says why and what to do instead."""


def new_owner_token() -> str:
    """A random token that identifies one browser session (or client) as a job's owner."""
    return secrets.token_urlsafe(16)


def owner_digest(token: str) -> str:
    return hashlib.sha256(str(token).encode()).hexdigest()


def same_owner(given: str, owner: str) -> bool:
    """Constant-time comparison of owner tokens (bytes: tokens may hold any characters)."""
    return bool(given) and secrets.compare_digest(str(given).encode(), str(owner).encode())


def check_recorded_owner(run: Run, owner: str, action: str, required: bool = False) -> None:
    """Raise unless `owner` started the run. Runs with no recorded owner pass unless `required`."""
    recorded = run.owner()
    if recorded is None and not required:
        return
    if recorded is None or not secrets.compare_digest(recorded, owner_digest(owner)):
        raise JobError(f"run {run.id} was started from another browser session or outside the app; "
                       f"only its owner can {action} it.")


@dataclass
class Quota:
    """What a server allows (None: no limit): per owner, the runs kept and their disk use; for
    all users together (so fresh owner tokens cannot get around them), the jobs training or
    queued and the training steps of one run; per client (network address, which fresh tokens
    do not change), the jobs training or queued."""

    max_runs: int | None = None
    max_bytes: int | None = None
    max_live_jobs: int | None = None
    max_steps_per_run: int | None = None
    max_live_jobs_per_client: int | None = None

    def check_size(self, config: RunConfig) -> None:
        if self.max_steps_per_run is None:
            return
        images = min(config.data.subset or MAX_IMAGES, MAX_IMAGES)  # an upper bound before the data is read
        shards = config.method.num_shards
        steps = config.train.rounds * shards * config.train.steps_for_shard(-(-images // shards))
        if steps > self.max_steps_per_run:
            raise JobError(f"this run asks for up to {steps:,} training steps and this server allows "
                           f"{self.max_steps_per_run:,} per run: lower train.rounds or train.local_steps.")

    def check_room(self, live_jobs: int, client_live_jobs: int = 0) -> None:
        """`client_live_jobs`: those of the client asking."""
        if self.max_live_jobs is not None and live_jobs >= self.max_live_jobs:
            raise JobError(f"{live_jobs} runs are training or waiting on this server, its limit: "
                           "try again when one has finished.")
        if self.max_live_jobs_per_client is not None and client_live_jobs >= self.max_live_jobs_per_client:
            raise JobError(f"{client_live_jobs} runs started from your network address are training or waiting, "
                           f"this server's limit per client (--max-live-jobs-per-client {self.max_live_jobs_per_client}): "
                           "stop one or wait until one has finished, then start again.")

    def check(self, runs_root: Path, owner: str) -> None:
        """Raise when the owner has no room for another run."""
        digest = owner_digest(owner)
        mine = [run for run in list_runs(runs_root) if run.owner() == digest]
        if self.max_runs is not None and len(mine) >= self.max_runs:
            raise JobError(f"you already have {len(mine)} runs and the limit per user is {self.max_runs}: "
                           "delete runs you no longer need, then start again.")
        if self.max_bytes is not None:
            used = sum(run.size_bytes() for run in mine)
            if used >= self.max_bytes:
                raise JobError(f"your runs use {used / 2**20:.0f} MiB and the limit per user is "
                               f"{self.max_bytes / 2**20:.0f} MiB: delete runs you no longer need first.")


def set_aside_stale(runs_root: Path, older_than_days: float, training: set[str]) -> tuple[list[str], list[Path]]:
    """Admin cleanup, first half (quick, under the caller's lock): set aside every run not in
    `training` whose last update is older than this. Returns the runs' ids and the folders to
    remove with `remove_folders` (these plus what an earlier deletion left set aside)."""
    cutoff = time.time() - older_than_days * 86400
    removed, doomed = [], set_aside_folders(runs_root)
    for run in list_runs(runs_root):
        if run.id not in training and run.updated() < cutoff:
            doomed.append(run.set_aside())
            removed.append(run.id)
    return removed, doomed

