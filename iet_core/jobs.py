"""Background training jobs for the app: a queue keyed by run id, threads, and pause / resume /
stop / lambda control.

A `JobManager` owns every training job started through it. Jobs wait in a FIFO queue and run
`train.train` in daemon threads, at most `max_running` at a time (one by default: a GPU is
best used by one job), splitting torch's CPU threads between them. Pause, resume, stop and
lambda changes go through the job's `TrainControl`. Each job remembers the owner token of
whoever started it, and only that token may steer it (iet_core.owners). A `RunHistory` is the
job's event sink: a polling UI reads it without touching the run folder. Runs that are not live
(finished, or from before a restart) are read from their folder once and cached until the
folder changes.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, RunConfig
from .data import SourcePolicy
from .evaluate import evaluate_run
from .history import RunHistory
from .owners import JobError, Quota, check_recorded_owner, owner_digest, same_owner, set_aside_stale
from .neighbours import resolve_device
from .runs import DATASETS_DIR, Run, is_run_folder, list_runs, remove_folders
from .telemetry import Event, RoundEvent
from .train import TrainControl, check_base_model, train

log = logging.getLogger(__name__)
EVALUATING = "training finished; generating samples and measuring copies (see the Memorization page)"
# Torch's CPU threads when the engine was loaded; jobs training at once split them. A small
# model gains little from a second thread, so two jobs side by side on 1 thread each finish
# sooner than one after the other on 2 (bench/demo_speed.py --side-by-side).
CPU_THREADS = torch.get_num_threads()


def use_cpu_share(threads: int) -> None:
    """Set torch's CPU threads from the calling thread: each job sets them from its own thread
    (with OpenMP a thread keeps the count it set), so the share holds for that job's work."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@dataclass
class Job:
    run: Run
    owner: str
    resume: bool
    control: TrainControl
    history: RunHistory | None = None  # None until the first event (resumed runs load their folder's then)
    thread: threading.Thread | None = None  # None while queued
    done: bool = False
    error: str | None = None
    evaluating: bool = False  # measuring the finished run (eval.after_training)
    last_round: int | None = None  # stop after this round (counted from 1): a shorter schedule
    client: str | None = None  # who asked for it (see JobManager's client_of), for the per-client limit

    @cached_property
    def config(self) -> RunConfig:
        """The run's settings, read once: config.json is written when the run is made, never
        after, so status polls of a live job read no file."""
        return self.run.config

    @property
    def state(self) -> str:
        if self.thread is None:
            return "queued"
        if self.evaluating:
            return "evaluating"
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
    checkpoint by then), so the store holds the whole run and nothing twice. Called in the job's
    thread, it also keeps that thread's torch CPU threads at its share (`threads()`)."""

    def __init__(self, job: Job, threads: Callable[[], int]):
        self.job, self.threads = job, threads

    def __call__(self, event: Event) -> None:
        use_cpu_share(self.threads())
        if self.job.history is None:
            step = event.global_step
            first = int(step[0]) if isinstance(step, np.ndarray) and len(step) else int(np.max(step, initial=0))
            self.job.history = RunHistory.from_run(self.job.run, before_step=first) if self.job.resume else RunHistory()
        self.job.history(event)
        if isinstance(event, RoundEvent) and self.job.last_round is not None and event.round + 1 >= self.job.last_round:
            self.job.control.stop()  # the round's checkpoint is saved; the stop saves the same step


class JobManager:
    """Training jobs keyed by run id: queue, threads, control, and each run's history."""

    def __init__(self, runs_root: str | Path, max_running: int = 1, cache_size: int = 8,
                 max_runs_per_owner: int | None = None, max_bytes_per_owner: int | None = None,
                 sources: SourcePolicy | None = None, claim_unowned: bool = False,
                 max_live_jobs: int | None = None, max_steps_per_run: int | None = None,
                 max_live_jobs_per_client: int | None = None, client_of: Callable[[], str | None] = lambda: None):
        """`sources`: the data users may train on (default: built-ins, Hub ids and uploads kept
        in the runs folder). `claim_unowned`: runs made outside the app may be resumed and
        evaluated from it. `max_live_jobs` (training or queued) and `max_steps_per_run` hold
        for all users together, so fresh owner tokens cannot get around them;
        `max_live_jobs_per_client` for each client that `client_of` names when asked who is
        starting or resuming a run (the app: the web client's address; None: nobody to count)."""
        if max_running < 1:
            raise ConfigError(f"max_running={max_running}: allow at least 1 concurrent job.")
        self.quota = Quota(max_runs_per_owner, max_bytes_per_owner, max_live_jobs, max_steps_per_run,
                           max_live_jobs_per_client)
        self.client_of = client_of
        self.runs_root = Path(runs_root)
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.sources = sources or SourcePolicy.allowing(self.runs_root / DATASETS_DIR)
        self.claim_unowned = claim_unowned
        self.max_running = max_running
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._queue: list[str] = []
        self._cache: collections.OrderedDict[str, tuple[tuple, RunHistory]] = collections.OrderedDict()
        self._cache_size = cache_size

    # -- starting --------------------------------------------------------------------------
    def submit(self, config: RunConfig, owner: str, run_id: str | None = None) -> str:
        """Check everything that can be checked without the data (settings, data source,
        device, size, room), then create the run folder (so it is listed at once) and queue
        its training."""
        config.validate()
        self.sources.check_run(config)
        if config.eval.fid_weights or config.eval.fid_cache or config.text2image.input_cache:
            raise JobError("eval.fid_weights, eval.fid_cache and text2image.input_cache name files on the server: there "
                           "they are its admin's to set; leave them empty.")
        resolve_device(config.train.device)
        check_base_model(config)
        self.quota.check_size(config)
        client = self.client_of()
        with self._lock:
            self._check_room(client)
            self.quota.check(self.runs_root, owner)
            run = Run.create(self.runs_root, config, run_id=run_id)
            run.write_owner(owner_digest(owner))
            self._enqueue(Job(run=run, owner=owner, resume=False, control=TrainControl(), client=client))
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
            run = self.check_owner(run_id, owner, "resume")
            holder = run.describe_writer()
            if holder is not None:
                raise JobError(f"run {run_id} is being trained by {holder}: stop it there first.")
            client = self.client_of()
            self._check_room(client)
            state = run.status().get("state")
            if state == "finished":
                raise JobError(f"run {run_id} has finished; start a new run to train longer.")
            self._enqueue(Job(run=run, owner=owner, resume=True, control=TrainControl(), client=client))

    def check_owner(self, run_id: str, owner: str, action: str) -> Run:
        """The run, if `owner` started it. Runs made outside the app (no recorded owner) pass
        only when the admin lets the app claim them."""
        run = self._open(run_id)
        if run.owner() is None and not self.claim_unowned:
            raise JobError(f"run {run_id} was made outside the app (with the command line); the app may {action} "
                           "such runs only when its admin allows it (--claim-cli-runs).")
        check_recorded_owner(run, owner, action)
        self.sources.check_hub_use(run.config)
        return run

    def _check_room(self, client: str | None) -> None:
        """Raise unless the server, and this client, may have one more job training or queued."""
        with self._lock:
            live = [job for job in self._jobs.values() if not job.done]
            self.quota.check_room(len(live), sum(1 for job in live if client is not None and job.client == client))

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
            use_cpu_share(self.cpu_threads_per_job())
            train(run=job.run, resume=job.resume, control=job.control, sinks=[_JobSink(job, self.cpu_threads_per_job)],
                  holder="the app")
            state = job.run.status().get("state")
            if job.config.eval.after_training and (state == "finished" or job.last_round and state == "stopped"):
                self._evaluate(job)
        except Exception as err:  # the trainer has marked the run failed; keep the reason for the UI
            job.error = f"{type(err).__name__}: {err}"
            log.exception("training run %s failed", job.run.id)
        finally:
            with self._lock:
                job.done = True
                if job.history is not None:
                    self._remember(job.run, job.history)
                self._start_queued()

    @staticmethod
    def _evaluate(job: Job) -> None:
        """Measure a finished run with its own evaluation settings, so its copies are on the
        Memorization page when training ends; a failure leaves the trained run as it is."""
        job.evaluating = True
        try:
            evaluate_run(job.run)
        except Exception as err:
            log.exception("evaluating run %s after training failed", job.run.id)
            job.run.write_status("finished", message=f"training finished; evaluating it failed ({err}): evaluate it "
                                                      "on the Memorization page")
        finally:
            job.evaluating = False

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

    @staticmethod
    def _last_step(job: Job, total_steps: int | None) -> int | None:
        """The step a shortened job stops at (rounds have about equal steps); None: its plan's end."""
        if job.last_round is None or not total_steps:
            return None
        return total_steps * job.last_round // job.config.train.rounds

    def shorten(self, run_id: str, rounds: int, owner: str) -> None:
        """Stop a live job after `rounds` rounds (counted from 1) instead of its planned number,
        then measure it as a finished run would be (eval.after_training)."""
        job = self._live_job(run_id, owner)
        planned = job.config.train.rounds
        if not 1 <= rounds < planned:
            raise JobError(f"rounds={rounds}: a shorter schedule has between 1 and {planned - 1} rounds.")
        job.last_round = int(rounds)

    def set_skip_lambda(self, run_id: str, value: float, owner: str) -> None:
        """Change the AGC threshold of a running job from its next step (recorded in its history)."""
        job = self._live_job(run_id, owner)
        if not job.config.method.agc.enabled:
            raise JobError(f"run {run_id} trains without AGC, so it has no skip threshold to change.")
        job.control.set_skip_lambda(value)

    def _live_job(self, run_id: str, owner: str) -> Job:
        """The owner's live job; ownership is checked before state, so a non-owner learns nothing
        about the run (not even whether it is still training)."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is None or job.done:
                check_recorded_owner(self._open(run_id), owner, "steer")
                raise JobError(f"run {run_id} is not running in this app: resume it first.")
            self._check_owner(job, owner)
            return job

    def delete(self, run_id: str, owner: str) -> None:
        """Remove a run folder that is not training, if this owner started it."""
        with self._lock:
            run = self._open(run_id)
            check_recorded_owner(run, owner, "delete", required=True)  # ownership first, as everywhere
            job = self._jobs.get(run_id)
            if job is not None and not job.done:
                raise JobError(f"run {run_id} is {job.state}: stop it before deleting it.")
            doomed = run.set_aside()  # a rename: the removal below happens outside the lock
            self._forget(run_id)
        remove_folders([doomed])

    def cleanup(self, older_than_days: float) -> list[str]:
        """Admin: delete every run not training whose last update is older than this, and what
        an earlier deletion left set aside; returns the runs' ids."""
        with self._lock:
            training = {run_id for run_id, job in self._jobs.items() if not job.done}
            removed, doomed = set_aside_stale(self.runs_root, older_than_days, training)
            for run_id in removed:
                self._forget(run_id)
        remove_folders(doomed)
        return removed

    def _forget(self, run_id: str) -> None:
        self._jobs.pop(run_id, None)
        self._cache.pop(run_id, None)

    @staticmethod
    def _check_owner(job: Job, owner: str) -> None:
        if not same_owner(owner, job.owner):
            raise JobError(f"run {job.run.id} was started from another browser session; only that session can "
                           "pause, resume or stop it.")

    def _open(self, run_id: str) -> Run:
        if not run_id or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
            raise JobError(f"{run_id!r} is not a run id.")
        if not is_run_folder(self.runs_root / run_id):
            raise JobError(f"no run {run_id!r} in {self.runs_root.name}/: pick one from the list.")
        return Run(self.runs_root / run_id)

    # -- reading ---------------------------------------------------------------------------
    def is_owner(self, run_id: str, owner: str) -> bool:
        job = self._jobs.get(run_id)
        return job is not None and same_owner(owner, job.owner)

    def queue_position(self, run_id: str) -> int | None:
        """1 for the next job to start, None when not queued."""
        with self._lock:
            return self._queue.index(run_id) + 1 if run_id in self._queue else None

    def running_count(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.thread is not None and not j.done)

    def cpu_threads_per_job(self) -> int:
        """Each training job's share of the CPU threads, split between the jobs running now."""
        return max(1, CPU_THREADS // max(1, self.running_count()))

    def run(self, run_id: str) -> Run:
        job = self._jobs.get(run_id)
        return job.run if job is not None else self._open(run_id)

    def config(self, run_id: str) -> RunConfig:
        """A run's settings: a job's from memory, other runs' from their folder."""
        job = self._jobs.get(run_id)
        return job.config if job is not None else self._open(run_id).config

    def status(self, run_id: str) -> dict:
        """state (queued, running, paused, stopping, or the run folder's), queue position,
        round, global step, total steps, message, error; live jobs are read from memory."""
        job = self._jobs.get(run_id)
        if job is None or job.done:
            run = self.run(run_id)
            status = dict(run.status())
            status.update(run_id=run_id, queue_position=None, live=False, rounds=run.config.train.rounds,
                          seconds_left=None)
            holder = run.describe_writer() if job is None else None
            if holder is not None:  # another process (the command line) trains it
                status.update(state="running", message=f"trained by {holder}; steer it there")
            elif job is None and status.get("state") in ("running", "paused"):
                # The folder says training, but nothing trains it: the app or the command line
                # stopped without stopping the run (killed, crashed).
                status.update(state="interrupted", message="training was interrupted; Resume continues from its "
                                                            "last checkpoint")
            if job is not None and job.error:
                status.update(state="failed", error=job.error, message=status.get("message") or job.error)
            return status
        history = job.history
        live = history.status() if history is not None else {}
        last = history.last_step if history is not None else -1
        state = job.state
        return {"run_id": run_id, "state": state, "queue_position": self.queue_position(run_id), "live": True,
                "round": live.get("round", 0), "rounds": job.config.train.rounds,
                "global_step": max(last + 1, live.get("global_step", 0)), "total_steps": live.get("total_steps"),
                "seconds_left": (history.seconds_left(self._last_step(job, live.get("total_steps")))
                                 if history is not None and state == "running" else None),
                "shorter": (history.shorter_schedule(job.config.train.rounds, job.config.train.time_budget_minutes)
                            if history is not None and job.last_round is None and state in ("running", "paused")
                            else None),
                "last_round": job.last_round,
                "message": EVALUATING if state == "evaluating" else live.get("message", ""), "error": job.error}

    def history(self, run_id: str) -> RunHistory:
        """The run's history: the live store while training, else its folder (cached)."""
        job = self._jobs.get(run_id)
        if job is not None and not job.done:
            if job.history is not None:
                return job.history
            if not job.resume:
                return RunHistory()
            # A resumed run waiting for its trainer: its folder, cached like a finished run's.
        run = self.run(run_id)
        key = run.signature()
        with self._lock:
            cached = self._cache.get(run_id)
            if cached is not None and cached[0] == key:
                self._cache.move_to_end(run_id)
                return cached[1]
        store = RunHistory.from_run(run)
        with self._lock:
            self._remember(run, store, key)
        return store

    def _remember(self, run: Run, store: RunHistory, key: tuple | None = None) -> None:
        self._cache[run.id] = (key or run.signature(), store)
        self._cache.move_to_end(run.id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def list_runs(self) -> list[dict]:
        """Every run under the runs folder, newest first, with its live state and queue position."""
        rows = []
        for run in list_runs(self.runs_root):
            try:
                config = run.config
                status = self.status(run.id)
            except (FileNotFoundError, JobError):  # deleted since the folder was listed
                continue
            except (ConfigError, OSError, ValueError, TypeError) as err:  # listed, so the user sees it
                rows.append({"run_id": run.id, "name": run.id, "mode": "?", "state": "damaged", "queue_position": None,
                             "round": 0, "rounds": 0, "message": f"this run's files cannot be read: {err}"})
                continue
            rows.append({"run_id": run.id, "name": config.name, "mode": config.method.mode, "state": status.get("state"),
                         "queue_position": status.get("queue_position"), "round": status.get("round", 0),
                         "rounds": config.train.rounds, "global_step": status.get("global_step", 0),
                         "total_steps": status.get("total_steps"), "seconds_left": status.get("seconds_left")})
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

