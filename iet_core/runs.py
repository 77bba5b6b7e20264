"""Run folders: the one place a run's config, history, checkpoints and exports live.

    <root>/<run id>/
      config.json          the RunConfig
      status.json          state, round, step, message (rewritten atomically)
      metrics.csv          one row per optimizer step of any proxy
      rounds.csv           one row per round (shard sizes, skip rate, MSR moves, seconds)
      drift.csv            per round and proxy: weight drift, distances, probe losses (DriftEvent)
      samples.csv          per-sample records (id, shard, t, loss, ratio, skipped, ...)
      msr_moves.csv        every MSR move
      settings.csv         settings changed while running (e.g. skip_lambda)
      per_sample.csv       per training image: shard, visits, skips (rewritten at checkpoints)
      owner.json           the sha256 of the app session's token that started the run (app runs only)
      previews/round-NNNN.png   samples after each round
      checkpoints/ckpt-NNNNNNNN/{model,ema,state}.safetensors + state.json + unet_config.json
                           (the UNet's own config, as diffusers' save_pretrained keeps it), and LATEST
      eval/<name>/         an evaluation: table.csv, summary.json, most_copied.csv, images.npz,
                           gallery*.png (iet_core.evaluate says what they hold)
      export/              a diffusers DDPMPipeline
      tensorboard/         event files of the trackers that keep local files (train.trackers)
    <root>/.deleted/       run folders set aside for removal (never listed: no config.json at the top)
    <root>/datasets/       datasets uploaded to the app, kept so that runs trained on them can resume

One writer per run (the trainer, through `RunLogger`), enforced by an advisory lock on
`.writer.lock` that the trainer holds for its lifetime; everything else only reads. Every file
is written to a temporary name and renamed into place, so a crash never leaves a half-written
file; CSV logs are append-only and are cut back to the checkpoint on resume. `read_events`
reads the logs back as the events that wrote them.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ConfigError, RunConfig
from .families import TEXT_TO_IMAGE, family
from .optim import shard_weights
from .telemetry import (CheckpointEvent, DriftEvent, Event, RoundEvent, RoundStartEvent, SampleEvent, SettingEvent, StatusEvent,
                        StepEvent)

log = logging.getLogger(__name__)


try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, permissions)."""


class RunBusy(ConfigError):
    """Another trainer holds the run's writer lock; the message names it."""


CSV_LOGS = ("metrics.csv", "rounds.csv", "drift.csv", "samples.csv", "msr_moves.csv", "settings.csv")
ROUND_END_LOGS = ("rounds.csv", "drift.csv")  # rows stamped with the round's last step, which a checkpoint there includes
OWNER_FILE = "owner.json"
UNET_CONFIG = "unet_config.json"
DATASETS_DIR = "datasets"
DELETED_DIR = ".deleted"
WRITER_LOCK = ".writer.lock"


def _try_lock(fd: int) -> bool:
    """An exclusive, non-blocking lock on an open file; the OS drops it when the process dies,
    so a killed trainer never leaves a stale lock (only the file naming it)."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


class WriterLock:
    """The one-writer lock of a run folder, held by a trainer from before it touches the
    folder until it ends. `holder` says who holds it, for the message a second trainer gets."""

    def __init__(self, run: "Run", holder: str):
        self.run, self.holder = run, holder
        self._fd: int | None = None

    def acquire(self) -> "WriterLock":
        fd = os.open(self.run.path / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise RunBusy(f"run {self.run.id} is being trained by {self.run.describe_writer() or 'another process'}; "
                          "a run has one writer: stop that one first, or wait until it ends.")
        record = {"holder": self.holder, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())  # at offset 0: the file was just opened
        self._fd = fd
        self.run.remove_stale_temporaries()  # only the writer may: they could be another writer's
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # nobody holds it now
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def user_cache_dir(name: str) -> Path:
    """A folder of the user's cache for one kind of derived data (FID statistics, latents):
    $IET_CACHE_DIR/name, else $XDG_CACHE_HOME/iet_core/name, else ~/.cache/iet_core/name."""
    root = os.environ.get("IET_CACHE_DIR")
    if root:
        return Path(root).expanduser() / name
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iet_core" / name


def append_csv(path: Path, frame: pd.DataFrame) -> None:
    if len(frame):
        frame.to_csv(path, mode="a", header=not path.exists() or path.stat().st_size == 0, index=False)


def read_csv(path: Path) -> pd.DataFrame:
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    # A crash can leave a torn last line; pandas skips what it cannot parse.
    return pd.read_csv(path, on_bad_lines="skip")


def new_run_id(name: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{uuid.uuid4().hex[:6]}"


class Run:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- creation ------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, config: RunConfig, run_id: str | None = None) -> "Run":
        config.validate()
        run = cls(Path(root) / (run_id or new_run_id(config.name)))
        if run.path.exists():
            raise ConfigError(f"a run already exists at {run.path}: resume it or choose another name.")
        run.path.mkdir(parents=True)
        try:
            atomic_write(run.path / "config.json", config.to_json())
            run.write_status("created", round=0, global_step=0)
        except BaseException:  # e.g. a full disk: no half-made run folder is left
            shutil.rmtree(run.path, ignore_errors=True)
            raise
        return run

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        run = cls(path)
        if not is_run_folder(run.path):
            raise ConfigError(f"{path} is not a run folder (no config.json): give a folder made by `iet_core train`.")
        return run

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def config(self) -> RunConfig:
        """The run's settings, checked as when it was made: a folder whose config no longer
        validates (edited by hand, or out of today's bounds) is damaged, not trusted."""
        return RunConfig.load(self.path / "config.json").validate()

    # -- status --------------------------------------------------------------------------
    def status(self) -> dict:
        try:
            return json.loads((self.path / "status.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {"state": "unknown", "round": 0, "global_step": 0, "message": ""}

    def write_status(self, state: str, **fields) -> None:
        status = {k: v for k, v in self.status().items() if k not in ("state", "message")}
        status.update(fields, state=state, updated=time.time())
        status.setdefault("message", "")
        atomic_write(self.path / "status.json", json.dumps(status, indent=2))

    # -- the writer ----------------------------------------------------------------------
    def writer_lock(self, holder: str) -> WriterLock:
        return WriterLock(self, holder)

    def describe_writer(self) -> str | None:
        """Who trains this run now ("the command line (pid 12 on host-a, since 20:15 UTC)"), or
        None. Read from the lock file without locking it, so probing never blocks a trainer;
        the record of a process that died on this host is stale."""
        try:
            record = json.loads((self.path / WRITER_LOCK).read_text() or "{}")
            holder, pid, host, since = record["holder"], int(record["pid"]), record["host"], float(record["since"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if host == socket.gethostname() and not _process_alive(pid):
            return None
        return f"{holder} (pid {pid} on {host}, since {time.strftime('%H:%M UTC', time.gmtime(since))})"

    def remove_stale_temporaries(self) -> None:
        """Files and folders a killed writer left half-written (`.name.*.tmp`, `.tmp-*`)."""
        for folder in (self.path, self.checkpoint_root):
            for stale in [*folder.glob(".*.tmp"), *folder.glob(".tmp-*")]:
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)

    # -- logs ----------------------------------------------------------------------------
    def metrics(self) -> pd.DataFrame:
        return read_csv(self.path / "metrics.csv")

    def rounds(self) -> pd.DataFrame:
        return read_csv(self.path / "rounds.csv")

    def drift(self) -> pd.DataFrame:
        return read_csv(self.path / "drift.csv")

    def sample_records(self) -> pd.DataFrame:
        return read_csv(self.path / "samples.csv")

    def msr_moves(self) -> pd.DataFrame:
        return read_csv(self.path / "msr_moves.csv")

    def settings_history(self) -> pd.DataFrame:
        return read_csv(self.path / "settings.csv")

    def per_sample(self) -> pd.DataFrame:
        return read_csv(self.path / "per_sample.csv")

    def cut_logs(self, global_step: int) -> None:
        """Drop log rows after a checkpoint's step, so a resumed run does not log them twice."""
        for name in CSV_LOGS:
            path = self.path / name
            frame = read_csv(path)
            if len(frame) and "global_step" in frame:
                kept = frame[frame["global_step"] <= global_step] if name in ROUND_END_LOGS else frame[frame["global_step"] < global_step]
                atomic_write(path, kept.to_csv(index=False))

    @property
    def metrics_path(self) -> Path:
        """The per-step log (metrics.csv), for a download; it may not exist yet."""
        return self.path / "metrics.csv"

    @property
    def tracker_dir(self) -> Path:
        return self.path / "tensorboard"

    def read_events(self, before_step: int | None = None) -> list[Event]:
        """The logs read back as the events that wrote them (steps and visits before
        `before_step` only, when given): what a history store replays after a restart."""
        metrics, samples = self.metrics(), self.sample_records()
        if before_step is not None:
            metrics = metrics[metrics["global_step"] < before_step] if len(metrics) else metrics
            samples = samples[samples["global_step"] < before_step] if len(samples) else samples
        events: list[Event] = []
        if len(metrics):
            metrics = metrics.sort_values("global_step", kind="stable")
            for (round_, proxy), part in metrics.groupby(["round", "proxy"], sort=False):
                events.append(StepEvent(int(round_), int(proxy), *(part[f.name].to_numpy() for f in _fields(StepEvent)[2:])))
        if len(samples):
            # The trainer flushes every `log_every` local steps of a proxy's round (pauses flush
            # early, which this cannot see): a proxy's local step is the rank of its global step
            # within the round. One event per flush, in the order they were flushed.
            every = self.config.train.log_every
            local = samples.groupby(["round", "proxy"])["global_step"].rank(method="dense").astype(np.int64) - 1
            flush = [samples["round"], samples["proxy"], local // every]
            first_step = samples.groupby(flush)["global_step"].transform("min")
            for _, part in samples.groupby(first_step, sort=True):
                events.append(SampleEvent(int(part["round"].iloc[0]), int(part["proxy"].iloc[0]),
                                          *(part[f.name].to_numpy() for f in _fields(SampleEvent)[2:])))
        rounds, moves = self.rounds(), self.msr_moves()
        if len(rounds) and before_step is not None:
            rounds = rounds[rounds["global_step"] <= before_step]
        for row in rounds.to_dict("records"):
            sizes = [int(n) for n in str(row.get("shard_sizes", "")).split()]  # kept as "n0 n1 ..."
            moved = moves[moves["round"] == row["round"]] if len(moves) else moves
            events.append(RoundEvent(int(row["round"]), int(row["global_step"]), sizes, shard_weights(sizes),
                                     [tuple(m) for m in moved[["sample_id", "from_shard", "to_shard"]].to_numpy().tolist()]
                                     if len(moved) else [], float(row["skip_rate"]), float(row["seconds"])))
        drift = self.drift()
        if len(drift) and before_step is not None:
            drift = drift[drift["global_step"] <= before_step]
        events += [DriftEvent.from_rows(part.to_dict("records")) for _, part in drift.groupby("round", sort=True)] if len(drift) else []
        settings = self.settings_history()
        if len(settings) and before_step is not None:
            settings = settings[settings["global_step"] < before_step]
        events += [SettingEvent(row["name"], float(row["value"]), int(row["global_step"]))
                   for row in settings.to_dict("records")]
        status = self.status()
        plan = self._round_plan(status, [e for e in events if isinstance(e, RoundEvent)])
        events += [plan] if plan else []
        events.append(StatusEvent(status.get("state", "unknown"), int(status.get("round") or 0),
                                  int(status.get("global_step") or 0), status.get("message", ""),
                                  int(status.get("total_steps") or 0)))
        checkpoint = self.latest_checkpoint()
        if checkpoint is not None:
            events.append(CheckpointEvent(str(checkpoint), int(status.get("round") or 0), checkpoint_step(checkpoint)))
        return events

    def _round_plan(self, status: dict, rounds: list[RoundEvent]) -> RoundStartEvent | None:
        """The round a stopped run is in (its shard sizes from the last checkpoint's per-image
        table), else the last round it completed."""
        train = self.config.train
        completed = rounds[-1].round if rounds else -1
        current = int(status.get("round") or 0)
        shards = self.per_sample() if status.get("state") != "finished" and current > completed else pd.DataFrame()
        if len(shards):
            sizes = np.bincount(shards["shard"].to_numpy(np.int64), minlength=self.config.method.num_shards).tolist()
            start = rounds[-1].global_step if rounds else 0
        elif rounds:
            current, sizes, start = completed, rounds[-1].shard_sizes, rounds[-1].global_step
        else:
            return None
        return RoundStartEvent(current, start, [train.steps_for_shard(int(n)) for n in sizes],
                               int(status.get("total_steps") or 0))

    def write_per_sample(self, frame: pd.DataFrame) -> None:
        atomic_write(self.path / "per_sample.csv", frame.to_csv(index=False))

    # -- previews --------------------------------------------------------------------------
    def write_preview(self, round_: int, png: bytes) -> None:
        """The samples drawn after round `round_` (counted from 0) as a PNG."""
        atomic_write(self.path / "previews" / f"round-{round_ + 1:04d}.png", png)

    def previews(self) -> list[tuple[int, Path]]:
        """(round number counted from 1, PNG file) of the samples drawn after each round, oldest first."""
        return [(int(path.stem.split("-")[-1]), path) for path in sorted((self.path / "previews").glob("round-*.png"))]

    # -- ownership (app runs) --------------------------------------------------------------
    def write_owner(self, digest: str) -> None:
        atomic_write(self.path / OWNER_FILE, json.dumps({"owner_sha256": digest}))

    def owner(self) -> str | None:
        """The recorded owner digest; None for runs made outside the app (or unreadable)."""
        try:
            return json.loads((self.path / OWNER_FILE).read_text())["owner_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def updated(self) -> float:
        """When the trainer last wrote the run's status (seconds since the epoch)."""
        return self.status().get("updated") or (self.path / "config.json").stat().st_mtime

    def size_bytes(self) -> int:
        return folder_bytes(self.path)

    def signature(self) -> tuple:
        """Changes whenever the trainer writes status or logs."""
        def stamp(name: str):
            try:
                stat = (self.path / name).stat()
                return stat.st_mtime_ns, stat.st_size
            except OSError:
                return None

        return stamp("status.json"), stamp("metrics.csv"), stamp("samples.csv")

    def set_aside(self) -> Path:
        """Take the run out of its runs folder at once (a rename into the folder's set-aside
        place), to be removed later by `remove_folders` without holding anyone up."""
        trash = self.path.parent / DELETED_DIR
        trash.mkdir(exist_ok=True)
        target = trash / f"{self.id}-{secrets.token_hex(4)}"
        self.path.rename(target)
        return target

    # -- checkpoints ---------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.path / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder is complete once state.json is in it)."""
        return sorted(p for p in self.checkpoint_root.glob("ckpt-*") if (p / "state.json").exists())

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoint_root / "LATEST"
        if pointer.exists():
            candidate = self.checkpoint_root / pointer.read_text().strip()
            if (candidate / "state.json").exists():
                return candidate
        found = self.checkpoints()
        return found[-1] if found else None

    def save_checkpoint(self, global_step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict, keep: int = 2,
                        unet_config: str | None = None) -> Path:
        """Write {file stem: tensors} + state.json (+ the UNet's config as JSON) into a new
        folder, then point LATEST at it. Older checkpoints are removed only after the new one
        is complete."""
        name = f"ckpt-{global_step:09d}"
        final = self.checkpoint_root / name
        tmp = self.checkpoint_root / f".tmp-{name}-{uuid.uuid4().hex[:6]}"
        try:
            tmp.mkdir(parents=True)
            for stem, group in tensors.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{stem}.safetensors"))
            if unet_config is not None:
                (tmp / UNET_CONFIG).write_text(unet_config)
            (tmp / "state.json").write_text(json.dumps(meta, indent=2))
            if final.exists():  # the same step saved again (e.g. stop right after a round end)
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(self.checkpoint_root / "LATEST", name)
        except (OSError, SafetensorError) as err:  # safetensors reports write failures as its own error
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest_checkpoint()
            kept = f"the previous checkpoint {previous.name} is intact and resume continues from it" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"could not write checkpoint {name} in {self.checkpoint_root} ({getattr(err, 'strerror', None) or err}): "
                                       f"free disk space or fix permissions; {kept}.") from err
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.checkpoint_root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        path = path or self.latest_checkpoint()
        if path is None:
            raise ConfigError(f"run {self.id} has no checkpoint yet: start it from the beginning.")
        tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
        return tensors, json.loads((path / "state.json").read_text())

    def trained_ids(self, checkpoint: Path) -> torch.Tensor | None:
        """The ids of the images a checkpoint was trained on (None if it does not say). Reads
        that one tensor, not the whole state."""
        state = checkpoint / "state.safetensors"
        if not state.exists():
            return None
        with safe_open(str(state), "pt") as stored:
            return stored.get_tensor("dataset_ids") if "dataset_ids" in stored.keys() else None

    # -- evaluations -------------------------------------------------------------------------
    def write_eval(self, name: str, table: pd.DataFrame, most_copied: pd.DataFrame, summary: dict,
                   images: dict[str, np.ndarray], galleries: dict[str, bytes] | None = None) -> Path:
        """Write an evaluation into eval/<name>/ (replacing an older one of that name) all at
        once: it is assembled in a hidden folder and renamed into place."""
        check_eval_name(name)
        root = self.path / "eval"
        final = root / name
        tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        try:
            table.to_csv(tmp / "table.csv", index=False)
            most_copied.to_csv(tmp / "most_copied.csv", index=False)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
            np.savez_compressed(tmp / "images.npz", **images)
            for file_name, png in (galleries or {}).items():  # gallery.png and one per other copy criterion
                (tmp / file_name).write_bytes(png)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def eval_names(self) -> list[str]:
        """Names of the run's saved evaluations, newest first."""
        found = [p for p in (self.path / "eval").glob("*") if (p / "summary.json").exists() and not p.name.startswith(".")]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def read_eval(self, name: str) -> tuple[pd.DataFrame, dict, pd.DataFrame, dict[str, np.ndarray], Path]:
        """A saved evaluation: table, summary, most_copied, images and its folder."""
        check_eval_name(name)
        folder = self.path / "eval" / name
        if not (folder / "summary.json").exists():
            raise ConfigError(f"run {self.id} has no evaluation {name!r}; saved: {', '.join(self.eval_names()) or 'none'}.")
        with np.load(folder / "images.npz", allow_pickle=False) as stored:
            images = {key: stored[key] for key in stored.files}
        return (pd.read_csv(folder / "table.csv"), json.loads((folder / "summary.json").read_text()),
                pd.read_csv(folder / "most_copied.csv"), images, folder)

    # -- models --------------------------------------------------------------------------
    def scheduler(self):
        from .models import training_scheduler

        return training_scheduler(self.config.model)

    def checkpoint(self, step: int | None = None) -> Path:
        """The kept checkpoint saved at this global step (None: the latest)."""
        if step is None:
            found = self.latest_checkpoint()
            if found is None:
                raise ConfigError(f"run {self.id} has no checkpoint yet: train it (at least one round) first.")
            return found
        kept = {checkpoint_step(p): p for p in self.checkpoints()}
        if step not in kept:
            raise ConfigError(f"run {self.id} keeps no checkpoint at step {step}; kept steps: "
                              f"{', '.join(map(str, kept)) or 'none'}.")
        return kept[step]

    def unet_config(self, checkpoint: Path | None = None) -> dict | None:
        """The UNet's own config saved with a checkpoint (latest by default); None for
        checkpoints written before checkpoints carried it, and for runs without one."""
        checkpoint = checkpoint or self.latest_checkpoint()
        if checkpoint is None or not (checkpoint / UNET_CONFIG).exists():
            return None
        return json.loads((checkpoint / UNET_CONFIG).read_text())

    def bundle_checkpoint(self, folder: Path) -> Path:
        """The latest checkpoint and the run's config copied into `folder` (for a download)."""
        checkpoint = self.checkpoint()
        shutil.copytree(checkpoint, folder / checkpoint.name)
        shutil.copy2(self.path / "config.json", folder / "config.json")
        return folder

    def build_unet(self, seed: int = 0, checkpoint: Path | None = None):
        """The run's UNet architecture (weights from `seed`): as the checkpoint recorded it,
        else from the run's config (older checkpoints; runs without one yet)."""
        from .models import build_unet, unet_from_config

        saved = self.unet_config(checkpoint)
        if saved is not None:
            return unet_from_config(saved, seed)
        config = self.config
        return build_unet(config.model, config.data.resolution, config.data.channels, seed)

    def load_unet(self, ema: bool = True, device: str | torch.device = "cpu", checkpoint: Path | None = None):
        """The global model (or its EMA) from the latest or a given checkpoint."""
        checkpoint = checkpoint or self.checkpoint()
        tensors, _ = self.load_checkpoint(checkpoint)
        unet = self.build_unet(checkpoint=checkpoint)
        unet.load_state_dict(tensors["ema" if ema else "model"])
        return unet.to(device).eval()

    def dataset(self):
        from .data import load_dataset

        return load_dataset(self.config.data)

    def export(self, folder: str | Path | None = None, ema: bool = True) -> Path:
        from .models import export_pipeline

        folder = Path(folder) if folder else self.path / "export"
        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:6]}")
        if self.config.text2image.enabled:  # a LoRA file, or a Stable Diffusion pipeline folder
            family(TEXT_TO_IMAGE).export(self, tmp, ema)
        else:
            export_pipeline(self.load_unet(ema=ema), self.scheduler(), tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder


def _fields(event_type) -> tuple:
    return dataclasses.fields(event_type)


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint folder was saved at."""
    return int(path.name.split("-")[-1])


def folder_bytes(path: Path) -> int:
    total = 0
    for file in path.rglob("*"):
        try:
            total += file.stat().st_size if file.is_file() else 0
        except OSError:  # removed meanwhile (e.g. an old checkpoint of a training run)
            continue
    return total


def set_aside_folders(root: str | Path) -> list[Path]:
    """Run folders set aside for removal under a runs folder (e.g. the app died while deleting)."""
    trash = Path(root) / DELETED_DIR
    return list(trash.iterdir()) if trash.is_dir() else []


def remove_folders(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            log.warning("could not remove all of %s; the admin cleanup tries again", folder.name)


class RunLogger:
    """The sink that writes events into the run folder's logs and status."""

    def __init__(self, run: Run):
        self.run = run

    def __call__(self, event: Event) -> None:
        path = self.run.path
        if isinstance(event, StepEvent):
            append_csv(path / "metrics.csv", pd.DataFrame(event.columns()))
        elif isinstance(event, SampleEvent):
            append_csv(path / "samples.csv", pd.DataFrame(event.columns()))
        elif isinstance(event, RoundEvent):
            append_csv(path / "rounds.csv", pd.DataFrame([{
                "round": event.round, "global_step": event.global_step, "shard_sizes": " ".join(map(str, event.shard_sizes)),
                "skip_rate": event.skip_rate, "moves": len(event.moves), "seconds": event.seconds}]))
            if event.moves:
                append_csv(path / "msr_moves.csv", pd.DataFrame(
                    [(event.round, event.global_step, *m) for m in event.moves],
                    columns=["round", "global_step", "sample_id", "from_shard", "to_shard"]))
        elif isinstance(event, DriftEvent):
            append_csv(path / "drift.csv", pd.DataFrame(event.rows()))
        elif isinstance(event, SettingEvent):
            append_csv(path / "settings.csv", pd.DataFrame([{
                "global_step": event.global_step, "name": event.name, "value": event.value}]))
        elif isinstance(event, StatusEvent):
            fields = {"total_steps": event.total_steps} if event.total_steps else {}
            self.run.write_status(event.state, round=event.round, global_step=event.global_step,
                                  message=event.message, **fields)


def save_upload(root: str | Path, name: str, arrays: dict[str, np.ndarray]) -> Path:
    """An uploaded dataset as <root>/datasets/<name>.npz (kept if already there: the name holds
    a hash of its content)."""
    target = Path(root) / DATASETS_DIR / f"{name}.npz"
    if not target.exists():
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write(target, buffer.getvalue())
    return target


def is_upload(source: str) -> bool:
    """Whether a data source is a dataset uploaded to the app (see `save_upload`)."""
    return source.endswith(".npz") and Path(source).parent.name == DATASETS_DIR


def check_eval_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"evaluation name {name!r}: use a plain name without slashes or a leading dot.")


def is_run_folder(path: Path) -> bool:
    return (Path(path) / "config.json").exists()


def list_runs(root: str | Path) -> list[Run]:
    """Every run folder under root, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [Run(p) for p in root.iterdir() if is_run_folder(p)]
    return sorted(runs, key=lambda r: (r.path / "config.json").stat().st_mtime, reverse=True)
