"""Background training jobs for the app: a queue keyed by run id, pause/stop, ownership, and
live telemetry kept in memory.

A `JobManager` owns every training job started through it. Jobs wait in a FIFO queue and run
`train.train` in daemon threads, at most `max_running` at a time (one by default: a GPU is
best used by one job). Pause, resume, stop and lambda changes go through the job's
`TrainControl`. Each job remembers the owner token of whoever started it, and only that token
may steer it. A `RunTelemetry` store is the job's event sink: a polling UI reads it without
touching the run folder. Runs that are not live (finished, or from before a restart) are read
from their folder once and cached until the folder changes.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import ConfigError, RunConfig
from .runs import Run, atomic_write, list_runs
from .telemetry import (CheckpointEvent, Event, RoundEvent, RoundStartEvent, SampleEvent, SettingEvent, StatusEvent,
                        StepEvent)
from .train import TrainControl, train

log = logging.getLogger(__name__)

# Loss-ratio histogram bins: 0.01 wide on [0, 3); larger ratios land in the last bin. The
# skip rule compares ratios with lambda in (0, 1], so this resolves every useful threshold.
RATIO_EDGES = np.round(np.arange(0.0, 3.0 + 1e-9, 0.01), 2)
STEP_COLUMNS = ("global_step", "round", "proxy", "local_step", "loss", "kept_fraction", "lr", "skip_lambda")
STEP_DTYPES = dict.fromkeys(STEP_COLUMNS[:4], np.int64) | dict.fromkeys(STEP_COLUMNS[4:], np.float32)  # as the events
# The sha256 of the owner token of the session that started a run, so that ownership (delete,
# resume, quotas) survives a restart of the app without storing the token itself.
OWNER_FILE = "owner.json"
DELETED_DIR = ".deleted"  # run folders set aside for removal; never listed (no config.json)


class JobError(ConfigError):
    """A job request cannot be carried out; the message says why and what to do instead."""


def owner_digest(token: str) -> str:
    return hashlib.sha256(str(token).encode()).hexdigest()


def folder_bytes(path: Path) -> int:
    total = 0
    for file in path.rglob("*"):
        try:
            total += file.stat().st_size if file.is_file() else 0
        except OSError:  # removed meanwhile (e.g. an old checkpoint of a training run)
            continue
    return total


def _remove(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            log.warning("could not remove all of %s; the admin cleanup tries again", folder.name)


def new_owner_token() -> str:
    """A random token that identifies one browser session (or client) as a job's owner."""
    return secrets.token_urlsafe(16)


@dataclass
class RatioSnapshot:
    """The loss ratios (loss / bank[t]) of one flush of one proxy, binned by RATIO_EDGES."""

    round: int
    proxy: int
    first_step: int
    last_step: int
    counts: np.ndarray  # int64, len(RATIO_EDGES) - 1
    unseen: int  # visits at a timestep the bank had not seen yet (ratio inf or nan): kept
    skipped: int

    @property
    def visits(self) -> int:
        return int(self.counts.sum()) + self.unseen

    def merged(self, other: "RatioSnapshot") -> "RatioSnapshot":
        return RatioSnapshot(self.round, self.proxy, self.first_step, other.last_step, self.counts + other.counts,
                             self.unseen + other.unseen, self.skipped + other.skipped)


def bin_ratios(ratio: np.ndarray) -> tuple[np.ndarray, int]:
    """Histogram counts over RATIO_EDGES (ratios >= 3 in the last bin) and the number of
    ratios that are not finite (timesteps the bank had not seen)."""
    ratio = np.asarray(ratio, dtype=np.float64)
    finite = np.isfinite(ratio)
    values = np.clip(ratio[finite], 0.0, RATIO_EDGES[-1] - 1e-9)
    counts = np.histogram(values, bins=RATIO_EDGES)[0].astype(np.int64)
    return counts, int((~finite).sum())


class RunTelemetry:
    """A bounded, thread-safe store of one run's training history for a UI to poll.

    It is an event sink (call it with events) and can be filled from a run folder
    (`from_run`). Step series keep every `stride`-th step of each proxy, the stride doubling whenever
    they pass `max_steps`; ratio snapshots each cover `width` flushes, the width doubling
    (neighbours merged) past `max_snapshots`, so old and new history stay evenly sampled. Only the most
    recent `recent_visits` per-sample visits are kept raw (for the threshold what-if);
    per-image visit and skip counts are exact. `version` grows with every change.
    """

    def __init__(self, max_steps: int = 20_000, max_snapshots: int = 1_000, recent_visits: int = 4_096):
        self.max_steps, self.max_snapshots, self.recent_visits = max_steps, max_snapshots, recent_visits
        self._lock = threading.Lock()
        self.version = 0
        self._steps: list[dict[str, np.ndarray]] = []
        self._num_steps = 0
        self._stride = 1
        self._proxy_steps: dict[int, int] = {}  # steps seen per proxy
        self._last: dict | None = None  # the newest step, kept or thinned
        self._snapshots: list[RatioSnapshot] = []
        self._width, self._last_width = 1, 0  # flushes per snapshot, and in the newest one
        self._recent: collections.deque[dict[str, np.ndarray]] = collections.deque()
        self._num_recent = 0
        self._visits = np.zeros(0, np.int64)
        self._skips = np.zeros(0, np.int64)
        self._last_ratio = np.zeros(0, np.float64)
        self._shard = np.zeros(0, np.int64)
        self._proxies: dict[int, dict] = {}
        self._rounds: list[dict] = []
        self._plan: dict | None = None  # the current round's steps per proxy
        self._settings: list[dict] = []
        self._status: dict = {}
        self._checkpoint: str | None = None

    # -- writing ---------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, StepEvent):
                self._add_steps(event.columns())
            elif isinstance(event, SampleEvent):
                self._add_samples(event.columns())
            elif isinstance(event, RoundEvent):
                self._rounds.append({"round": event.round, "global_step": event.global_step,
                                     "skip_rate": event.skip_rate, "moves": len(event.moves),
                                     "seconds": event.seconds, "shard_sizes": list(event.shard_sizes)})
            elif isinstance(event, RoundStartEvent):
                self._plan = {"round": event.round, "steps_per_proxy": list(event.steps_per_proxy)}
                self._status["total_steps"] = event.total_steps
            elif isinstance(event, SettingEvent):
                self._settings.append({"name": event.name, "value": event.value, "global_step": event.global_step})
            elif isinstance(event, StatusEvent):
                total = event.total_steps or self._status.get("total_steps")  # also set by each round's start
                self._status = {"state": event.state, "round": event.round, "global_step": event.global_step,
                                "message": event.message, "total_steps": total}
            elif isinstance(event, CheckpointEvent):
                self._checkpoint = event.path
            self.version += 1

    def _add_steps(self, columns: dict[str, np.ndarray]) -> None:
        if not len(columns["global_step"]):
            return
        proxy = int(columns["proxy"][-1])  # a chunk holds one proxy's steps
        self._proxies[proxy] = {"round": int(columns["round"][-1]), "local_step": int(columns["local_step"][-1]),
                                "global_step": int(columns["global_step"][-1])}
        # Thinned by each proxy's own step count: side-by-side proxies interleave global
        # steps, so thinning by global step would drop whole proxies.
        first = self._proxy_steps.get(proxy, 0)
        index = np.arange(first, first + len(columns["global_step"]))
        self._proxy_steps[proxy] = first + len(index)
        typed = {k: np.asarray(columns[k], STEP_DTYPES[k]) for k in STEP_COLUMNS}
        self._last = {k: v[-1].item() for k, v in typed.items()}
        keep = index % self._stride == 0
        self._steps.append({"index": index[keep]} | {k: v[keep] for k, v in typed.items()})
        self._num_steps += int(keep.sum())
        while self._num_steps > self.max_steps:
            self._stride *= 2
            merged = self._merged_steps()
            keep = merged["index"] % self._stride == 0
            self._steps = [{k: v[keep] for k, v in merged.items()}]
            self._num_steps = int(keep.sum())

    def _merged_steps(self) -> dict[str, np.ndarray]:
        """The step chunks joined into one, in global-step order (kept joined, so repeated
        reads are cheap)."""
        if len(self._steps) > 1:
            merged = {k: np.concatenate([c[k] for c in self._steps]) for k in self._steps[0]}
            order = np.argsort(merged["global_step"], kind="stable")
            self._steps = [{k: v[order] for k, v in merged.items()}]
        return self._steps[0]

    def _add_samples(self, columns: dict) -> None:
        """One flush of one proxy's visits (columns as in samples.csv)."""
        if not len(columns["sample_id"]):
            return
        global_step = np.asarray(columns["global_step"], np.int64)
        sample_id = np.asarray(columns["sample_id"], np.int64)
        ratio = np.asarray(columns["ratio"], np.float64)
        skipped = np.asarray(columns["skipped"], bool)
        counts, unseen = bin_ratios(ratio)
        snapshot = RatioSnapshot(int(columns["round"][0]), int(columns["proxy"][0]), int(global_step.min()),
                                 int(global_step.max()), counts, unseen, int(skipped.sum()))
        if self._snapshots and self._last_width < self._width:
            self._snapshots[-1] = self._snapshots[-1].merged(snapshot)
            self._last_width += 1
        else:
            self._snapshots.append(snapshot)
            self._last_width = 1
        if len(self._snapshots) > self.max_snapshots:
            # All but the newest cover `width` flushes; merging neighbours doubles that.
            pairs = self._snapshots
            if len(pairs) % 2 == 0:
                self._last_width += self._width
            self._width *= 2
            self._snapshots = [pairs[i].merged(pairs[i + 1]) if i + 1 < len(pairs) else pairs[i]
                               for i in range(0, len(pairs), 2)]
        size = int(sample_id.max()) + 1
        if size > len(self._visits):
            grow = size - len(self._visits)
            self._visits = np.concatenate([self._visits, np.zeros(grow, np.int64)])
            self._skips = np.concatenate([self._skips, np.zeros(grow, np.int64)])
            self._last_ratio = np.concatenate([self._last_ratio, np.full(grow, np.nan)])
            self._shard = np.concatenate([self._shard, np.full(grow, -1, np.int64)])
        np.add.at(self._visits, sample_id, 1)
        np.add.at(self._skips, sample_id, skipped.astype(np.int64))
        self._last_ratio[sample_id] = ratio  # later visits overwrite earlier ones
        self._shard[sample_id] = np.asarray(columns["shard"], np.int64)
        self._recent.append({"global_step": global_step, "sample_id": sample_id,
                             "ratio": ratio, "skipped": skipped})
        self._num_recent += len(sample_id)
        while self._num_recent - len(self._recent[0]["sample_id"]) >= self.recent_visits:
            self._num_recent -= len(self._recent.popleft()["sample_id"])

    # -- filling from a run folder ---------------------------------------------------------
    @classmethod
    def from_run(cls, run: Run, before_step: int | None = None) -> "RunTelemetry":
        """The history in a run folder (optionally only steps before `before_step`)."""
        store = cls()
        metrics = run.metrics()
        samples = run.sample_records()
        if before_step is not None:
            metrics = metrics[metrics["global_step"] < before_step] if len(metrics) else metrics
            samples = samples[samples["global_step"] < before_step] if len(samples) else samples
        if len(metrics):
            metrics = metrics.sort_values("global_step", kind="stable")
            for (_, proxy), part in metrics.groupby(["round", "proxy"], sort=False):
                store._add_steps({k: part[k].to_numpy() for k in STEP_COLUMNS})
        if len(samples):
            # One snapshot per `log_every` local steps of a proxy's round, in the order the
            # trainer flushed them (an uninterrupted run is reproduced exactly; pauses flush
            # early). A proxy's local step is the rank of its global step within the round.
            every = run.config.train.log_every
            local = samples.groupby(["round", "proxy"])["global_step"].rank(method="dense").astype(np.int64) - 1
            flush = [samples["round"], samples["proxy"], local // every]
            first_step = samples.groupby(flush)["global_step"].transform("min")  # one per flush, in flush order
            for _, part in samples.groupby(first_step, sort=True):
                store._add_samples({k: part[k].to_numpy() for k in part.columns})
        else:
            store._add_per_sample(run.per_sample())
        rounds = run.rounds()
        if len(rounds) and before_step is not None and "global_step" in rounds:
            rounds = rounds[rounds["global_step"] <= before_step]
        store._rounds = rounds.to_dict("records") if len(rounds) else []
        for row in store._rounds:  # the log keeps shard sizes as "n0 n1 ..."
            row["shard_sizes"] = [int(n) for n in str(row.get("shard_sizes", "")).split()]
        store._plan = cls._plan_from_folder(run, store._rounds)
        settings = run.settings_history()
        if len(settings) and before_step is not None:
            settings = settings[settings["global_step"] < before_step]
        store._settings = settings.to_dict("records") if len(settings) else []
        store._status = run.status()
        checkpoint = run.latest_checkpoint()
        store._checkpoint = str(checkpoint) if checkpoint else None
        store.version = 1
        return store

    @staticmethod
    def _plan_from_folder(run: Run, rounds: list[dict]) -> dict | None:
        """The round a stopped run is in (its shard sizes from the last checkpoint's
        per_sample.csv), else the last round it completed."""
        status, train = run.status(), run.config.train
        completed = int(rounds[-1]["round"]) if rounds else -1
        current = int(status.get("round") or 0)
        shards = run.per_sample() if status.get("state") != "finished" and current > completed else pd.DataFrame()
        if len(shards):
            sizes = np.bincount(shards["shard"].to_numpy(np.int64), minlength=run.config.method.num_shards)
            return {"round": current, "steps_per_proxy": [train.steps_for_shard(int(n)) for n in sizes]}
        if rounds:
            return {"round": completed, "steps_per_proxy": [train.steps_for_shard(n) for n in rounds[-1]["shard_sizes"]]}
        return None

    def _add_per_sample(self, frame: pd.DataFrame) -> None:
        """Visit and skip counts from per_sample.csv, for runs that did not record every visit."""
        if not len(frame):
            return
        ids = frame["sample_id"].to_numpy(np.int64)
        size = int(ids.max()) + 1
        self._visits, self._skips = np.zeros(size, np.int64), np.zeros(size, np.int64)
        self._last_ratio, self._shard = np.full(size, np.nan), np.full(size, -1, np.int64)
        self._visits[ids] = frame["visits"].to_numpy(np.int64)
        self._skips[ids] = frame["skips"].to_numpy(np.int64)
        self._shard[ids] = frame["shard"].to_numpy(np.int64)
        self._last_ratio[ids] = frame["running_ratio"].to_numpy(np.float64)

    # -- reading (copies, safe to use while training goes on) -------------------------------
    def steps(self, max_points: int | None = None) -> pd.DataFrame:
        """Logged steps (global_step, round, proxy, local_step, loss, kept_fraction, lr,
        skip_lambda), evenly thinned to at most `max_points` rows."""
        with self._lock:
            merged = {k: v.copy() for k, v in self._merged_steps().items()} if self._steps else {}
        frame = pd.DataFrame(merged, columns=list(STEP_COLUMNS))
        if max_points and len(frame) > max_points:
            frame = frame.iloc[np.linspace(0, len(frame) - 1, max_points).round().astype(int)]
        return frame.reset_index(drop=True)

    def snapshots(self) -> list[RatioSnapshot]:
        with self._lock:
            return list(self._snapshots)

    def recent_visits_frame(self) -> pd.DataFrame:
        """The most recent raw visits: global_step, sample_id, ratio, skipped."""
        with self._lock:
            chunks = list(self._recent)
        if not chunks:
            return pd.DataFrame(columns=["global_step", "sample_id", "ratio", "skipped"])
        return pd.DataFrame({k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]})

    def per_sample(self) -> pd.DataFrame:
        """Per training image seen so far: sample_id, shard, visits, skips, skip_rate, last_ratio."""
        with self._lock:
            visits, skips = self._visits.copy(), self._skips.copy()
            last_ratio, shard = self._last_ratio.copy(), self._shard.copy()
        seen = np.flatnonzero(visits)
        return pd.DataFrame({"sample_id": seen, "shard": shard[seen], "visits": visits[seen], "skips": skips[seen],
                             "skip_rate": skips[seen] / visits[seen], "last_ratio": last_ratio[seen]})

    def proxies(self) -> dict[int, dict]:
        """Per proxy: the round, local step and global step of its latest logged step."""
        with self._lock:
            return {k: dict(v) for k, v in sorted(self._proxies.items())}

    def rounds(self) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._rounds]

    def round_plan(self) -> dict | None:
        """The current round (or, read from a folder, the last complete one): round and
        steps_per_proxy. None before the first round starts."""
        with self._lock:
            return None if self._plan is None else {**self._plan, "steps_per_proxy": list(self._plan["steps_per_proxy"])}

    def settings(self) -> list[dict]:
        with self._lock:
            return [dict(s) for s in self._settings]

    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    def last(self) -> dict | None:
        """The latest logged step (global_step, round, proxy, ..., skip_lambda), or None."""
        with self._lock:
            return dict(self._last) if self._last else None

    @property
    def last_step(self) -> int:
        last = self.last()
        return int(last["global_step"]) if last else -1


@dataclass
class Job:
    run: Run
    owner: str
    resume: bool
    control: TrainControl
    telemetry: RunTelemetry | None = None  # None until the first event (resumed runs load history then)
    thread: threading.Thread | None = None  # None while queued
    done: bool = False
    error: str | None = None

    @property
    def state(self) -> str:
        if self.thread is None:
            return "queued"
        if self.done:
            # A trainer that fails before its first step (e.g. the data is gone) leaves the
            # run's own status untouched, so the job's error decides.
            return "failed" if self.error else self.run.status().get("state", "stopped")
        if self.control.stop_requested:
            return "stopping"
        return "paused" if self.control.paused else "running"


class _JobSink:
    """The trainer's sink for one job. A resumed run's history up to the step it resumes from is
    read from its folder when the first event arrives (the trainer has cut its logs back to the
    checkpoint by then), so the store holds the whole run and nothing twice."""

    def __init__(self, job: Job):
        self.job = job

    def __call__(self, event: Event) -> None:
        if self.job.telemetry is None:
            step = event.global_step
            first = int(step[0]) if isinstance(step, np.ndarray) and len(step) else int(np.max(step, initial=0))
            self.job.telemetry = RunTelemetry.from_run(self.job.run, before_step=first) if self.job.resume else RunTelemetry()
        self.job.telemetry(event)


class JobManager:
    """Training jobs keyed by run id: queue, threads, control, ownership, telemetry."""

    def __init__(self, runs_root: str | Path, max_running: int = 1, cache_size: int = 8,
                 max_runs_per_owner: int | None = None, max_bytes_per_owner: int | None = None):
        if max_running < 1:
            raise ConfigError(f"max_running={max_running}: allow at least 1 concurrent job.")
        self.max_runs_per_owner, self.max_bytes_per_owner = max_runs_per_owner, max_bytes_per_owner
        self.runs_root = Path(runs_root)
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.max_running = max_running
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._queue: list[str] = []
        self._cache: collections.OrderedDict[str, tuple[tuple, RunTelemetry]] = collections.OrderedDict()
        self._cache_size = cache_size

    # -- starting --------------------------------------------------------------------------
    def submit(self, config: RunConfig, owner: str, run_id: str | None = None) -> str:
        """Create the run folder now (so it is listed at once) and queue its training."""
        config.validate()
        with self._lock:
            self._check_quota(owner)
            run = Run.create(self.runs_root, config, run_id=run_id)
            atomic_write(run.path / OWNER_FILE, json.dumps({"owner_sha256": owner_digest(owner)}))
        self._enqueue(Job(run=run, owner=owner, resume=False, control=TrainControl()))
        return run.id

    def resume(self, run_id: str, owner: str) -> None:
        """Un-pause a paused job, or queue a run that is not live to continue from its latest
        checkpoint (a run from before a restart belongs to whoever resumes it)."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is not None and not job.done:
                self._check_owner(job, owner)
                if job.state == "paused":
                    job.control.resume()
                    return
                raise JobError(f"run {run_id} is {job.state}; only a paused or stopped run can be resumed.")
            run = self._open(run_id)
            self._check_recorded_owner(run, owner, "resume")
            state = run.status().get("state")
            if state == "finished":
                raise JobError(f"run {run_id} has finished; start a new run to train longer.")
            self._enqueue(Job(run=run, owner=owner, resume=True, control=TrainControl()))

    def _enqueue(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.run.id] = job
            self._queue.append(job.run.id)
            self._cache.pop(job.run.id, None)
            self._start_queued()

    def _start_queued(self) -> None:
        with self._lock:
            while self._queue and self.running_count() < self.max_running:
                job = self._jobs[self._queue.pop(0)]
                thread = threading.Thread(target=self._work, args=(job,), name=f"train-{job.run.id}", daemon=True)
                thread.start()
                job.thread = thread  # only once started: `wait` joins it without the lock

    def _work(self, job: Job) -> None:
        try:
            train(run=job.run, resume=job.resume, control=job.control, sinks=[_JobSink(job)])
        except Exception as err:  # the trainer has marked the run failed; keep the reason for the UI
            job.error = f"{type(err).__name__}: {err}"
            log.exception("training run %s failed", job.run.id)
        finally:
            with self._lock:
                job.done = True
                if job.telemetry is not None:
                    self._remember(job.run, job.telemetry)
                self._start_queued()

    # -- steering --------------------------------------------------------------------------
    def pause(self, run_id: str, owner: str) -> None:
        job = self._live_job(run_id, owner)
        if job.state != "running":
            raise JobError(f"run {run_id} is {job.state}; only a running run can be paused.")
        job.control.pause()

    def stop(self, run_id: str, owner: str) -> None:
        """Stop a running or paused job (it saves a checkpoint), or take a queued one off the queue."""
        with self._lock:
            job = self._live_job(run_id, owner)
            if job.thread is None:
                self._queue.remove(run_id)
                del self._jobs[run_id]
                return
            job.control.stop()

    def set_skip_lambda(self, run_id: str, value: float, owner: str) -> None:
        """Change the AGC threshold of a running job from its next step (recorded in its history)."""
        job = self._live_job(run_id, owner)
        if not job.run.config.method.agc.enabled:
            raise JobError(f"run {run_id} trains without AGC, so it has no skip threshold to change.")
        if not 0.0 < value <= 1.0:
            raise JobError(f"skip lambda {value}: use a value in (0, 1].")
        job.control.set_skip_lambda(float(value))

    def _live_job(self, run_id: str, owner: str) -> Job:
        """The owner's live job; ownership is checked before state, so a non-owner learns nothing
        about the run (not even whether it is still training)."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is None or job.done:
                self._check_recorded_owner(self._open(run_id), owner, "steer")
                raise JobError(f"run {run_id} is not running in this app: resume it first.")
            self._check_owner(job, owner)
            return job

    def delete(self, run_id: str, owner: str) -> None:
        """Remove a run folder that is not training, if this owner started it."""
        with self._lock:
            run = self._open(run_id)
            self._check_recorded_owner(run, owner, "delete", required=True)  # ownership first, as everywhere
            job = self._jobs.get(run_id)
            if job is not None and not job.done:
                raise JobError(f"run {run_id} is {job.state}: stop it before deleting it.")
            doomed = self._set_aside(run)
        _remove([doomed])

    def cleanup(self, older_than_days: float) -> list[str]:
        """Admin: delete every run not training whose last update is older than this, and what
        an earlier deletion left set aside; returns the runs' ids."""
        cutoff = time.time() - older_than_days * 86400
        removed, doomed = [], []
        with self._lock:
            trash = self.runs_root / DELETED_DIR
            doomed += list(trash.iterdir()) if trash.is_dir() else []  # e.g. the app died while deleting
            for run in list_runs(self.runs_root):
                job = self._jobs.get(run.id)
                if job is not None and not job.done:
                    continue
                if (run.status().get("updated") or (run.path / "config.json").stat().st_mtime) < cutoff:
                    doomed.append(self._set_aside(run))
                    removed.append(run.id)
        _remove(doomed)
        return removed

    def _set_aside(self, run: Run) -> Path:
        """Take a run out of the runs folder at once (a rename), to be removed outside the
        lock: removing a large folder must not hold up every other request."""
        trash = self.runs_root / DELETED_DIR
        trash.mkdir(exist_ok=True)
        target = trash / f"{run.id}-{secrets.token_hex(4)}"
        run.path.rename(target)
        self._jobs.pop(run.id, None)
        self._cache.pop(run.id, None)
        return target

    def _check_quota(self, owner: str) -> None:
        mine = [run for run in list_runs(self.runs_root) if self._recorded_owner(run) == owner_digest(owner)]
        if self.max_runs_per_owner is not None and len(mine) >= self.max_runs_per_owner:
            raise JobError(f"you already have {len(mine)} runs and the limit per user is {self.max_runs_per_owner}: "
                           "delete runs you no longer need, then start again.")
        if self.max_bytes_per_owner is not None:
            used = sum(folder_bytes(run.path) for run in mine)
            if used >= self.max_bytes_per_owner:
                raise JobError(f"your runs use {used / 2**20:.0f} MiB and the limit per user is "
                               f"{self.max_bytes_per_owner / 2**20:.0f} MiB: delete runs you no longer need first.")

    @staticmethod
    def _recorded_owner(run: Run) -> str | None:
        try:
            return json.loads((run.path / OWNER_FILE).read_text())["owner_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _check_recorded_owner(self, run: Run, owner: str, action: str, required: bool = False) -> None:
        """Runs started in the app record their owner; runs made elsewhere (the CLI) have none and
        may be resumed by anyone, but deleted by no one from the app."""
        recorded = self._recorded_owner(run)
        if recorded is None and not required:
            return
        if recorded is None or not secrets.compare_digest(recorded, owner_digest(owner)):
            raise JobError(f"run {run.id} was started from another browser session or outside the app; "
                           f"only its owner can {action} it.")

    @staticmethod
    def _check_owner(job: Job, owner: str) -> None:
        if not _same_owner(owner, job.owner):
            raise JobError(f"run {job.run.id} was started from another browser session; only that session can "
                           "pause, resume or stop it.")

    def _open(self, run_id: str) -> Run:
        if not run_id or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
            raise JobError(f"{run_id!r} is not a run id.")
        path = self.runs_root / run_id
        if not (path / "config.json").exists():
            raise JobError(f"no run {run_id!r} in {self.runs_root.name}/: pick one from the list.")
        return Run.open(path)

    # -- reading ---------------------------------------------------------------------------
    def is_owner(self, run_id: str, owner: str) -> bool:
        job = self._jobs.get(run_id)
        return job is not None and _same_owner(owner, job.owner)

    def queue_position(self, run_id: str) -> int | None:
        """1 for the next job to start, None when not queued."""
        with self._lock:
            return self._queue.index(run_id) + 1 if run_id in self._queue else None

    def running_count(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.thread is not None and not j.done)

    def run(self, run_id: str) -> Run:
        job = self._jobs.get(run_id)
        return job.run if job is not None else self._open(run_id)

    def status(self, run_id: str) -> dict:
        """state (queued, running, paused, stopping, or the run folder's), queue position,
        round, global step, total steps, message, error; live jobs are read from memory."""
        job = self._jobs.get(run_id)
        if job is None or job.done:
            status = dict(self.run(run_id).status())
            status.update(run_id=run_id, queue_position=None, live=False)
            if job is None and status.get("state") in ("running", "paused"):
                # The folder says training, but no job of this app trains it: the app stopped
                # without stopping the run (killed, crashed), or another process trains it.
                status.update(state="interrupted", message="training was interrupted (or runs in another process); "
                                                            "Resume continues from its last checkpoint")
            if job is not None and job.error:
                status.update(state="failed", error=job.error, message=status.get("message") or job.error)
            return status
        live = job.telemetry.status() if job.telemetry is not None else {}
        last = job.telemetry.last_step if job.telemetry is not None else -1
        return {"run_id": run_id, "state": job.state, "queue_position": self.queue_position(run_id), "live": True,
                "round": live.get("round", 0), "global_step": max(last + 1, live.get("global_step", 0)),
                "total_steps": live.get("total_steps"), "message": live.get("message", ""), "error": job.error}

    def telemetry(self, run_id: str) -> RunTelemetry:
        """The run's history: the live store while training, else its folder (cached)."""
        job = self._jobs.get(run_id)
        if job is not None and not job.done:
            if job.telemetry is not None:
                return job.telemetry
            if not job.resume:
                return RunTelemetry()
            # A resumed run waiting for its trainer: its folder, cached like a finished run's.
        run = self.run(run_id)
        key = _folder_signature(run)
        with self._lock:
            cached = self._cache.get(run_id)
            if cached is not None and cached[0] == key:
                self._cache.move_to_end(run_id)
                return cached[1]
        store = RunTelemetry.from_run(run)
        with self._lock:
            self._remember(run, store, key)
        return store

    def _remember(self, run: Run, store: RunTelemetry, key: tuple | None = None) -> None:
        self._cache[run.id] = (key or _folder_signature(run), store)
        self._cache.move_to_end(run.id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def list_runs(self) -> list[dict]:
        """Every run under the runs folder, newest first, with its live state and queue position."""
        rows = []
        for run in list_runs(self.runs_root):
            try:
                config = run.config
            except FileNotFoundError:  # deleted since the folder was listed
                continue
            except ConfigError:  # a folder with a broken config: list it so the user sees it
                rows.append({"run_id": run.id, "name": run.id, "mode": "?", "state": "broken", "queue_position": None,
                             "round": 0, "rounds": 0})
                continue
            try:
                status = self.status(run.id)
            except JobError:  # deleted since the folder was listed
                continue
            rows.append({"run_id": run.id, "name": config.name, "mode": config.method.mode, "state": status.get("state"),
                         "queue_position": status.get("queue_position"), "round": status.get("round", 0),
                         "rounds": config.train.rounds, "global_step": status.get("global_step", 0),
                         "total_steps": status.get("total_steps")})
        return rows

    def wait(self, run_id: str, timeout: float | None = None) -> str:
        """Block until the run's job is done (or the timeout passes); return its state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self._jobs.get(run_id)
            if job is None or job.done:
                return self.status(run_id)["state"]
            if job.thread is not None:
                job.thread.join(timeout=0.2)
            else:
                time.sleep(0.05)
            if deadline is not None and time.monotonic() > deadline:
                return job.state

    def shutdown(self, timeout: float = 60.0) -> None:
        """Empty the queue and stop every running job (each saves a checkpoint)."""
        with self._lock:
            for run_id in list(self._queue):
                self._queue.remove(run_id)
                del self._jobs[run_id]
            running = [j for j in self._jobs.values() if j.thread is not None and not j.done]
            for job in running:
                job.control.stop()
        for job in running:
            job.thread.join(timeout)


def _same_owner(given: str, owner: str) -> bool:
    """Constant-time comparison of owner tokens (bytes: tokens may hold any characters)."""
    return bool(given) and secrets.compare_digest(str(given).encode(), owner.encode())


def _folder_signature(run: Run) -> tuple:
    """Changes whenever the trainer writes status or logs."""
    def stamp(name: str):
        try:
            stat = (run.path / name).stat()
            return stat.st_mtime_ns, stat.st_size
        except OSError:
            return None

    return stamp("status.json"), stamp("metrics.csv"), stamp("samples.csv")
