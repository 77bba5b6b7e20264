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
      previews/round-NNNN.png   samples after each round
      checkpoints/ckpt-NNNNNNNN/{model,ema,state}.safetensors + state.json, and LATEST
      eval/                evaluation results;  export/  a diffusers DDPMPipeline

One writer per run (the trainer), enforced by an advisory lock on `.writer.lock` that the
trainer holds for its lifetime; everything else only reads. Every file is written to a
temporary name and renamed into place, so a crash never leaves a half-written file; CSV logs
are append-only and are cut back to the checkpoint on resume.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, RunConfig

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
        if not (run.path / "config.json").exists():
            raise ConfigError(f"{path} is not a run folder (no config.json): give a folder made by `iet_core train`.")
        return run

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def config(self) -> RunConfig:
        return RunConfig.load(self.path / "config.json")

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

    def preview_paths(self) -> list[Path]:
        return sorted((self.path / "previews").glob("round-*.png"))

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

    def save_checkpoint(self, global_step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict, keep: int = 2) -> Path:
        """Write {file stem: tensors} + state.json into a new folder, then point LATEST at it.
        Older checkpoints are removed only after the new one is complete."""
        name = f"ckpt-{global_step:09d}"
        final = self.checkpoint_root / name
        tmp = self.checkpoint_root / f".tmp-{name}-{uuid.uuid4().hex[:6]}"
        try:
            tmp.mkdir(parents=True)
            for stem, group in tensors.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{stem}.safetensors"))
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

    # -- models --------------------------------------------------------------------------
    def scheduler(self):
        from .models import training_scheduler

        return training_scheduler(self.config.model)

    def load_unet(self, ema: bool = True, device: str | torch.device = "cpu", checkpoint: Path | None = None):
        """The global model (or its EMA) from the latest or a given checkpoint."""
        from .models import build_unet

        config = self.config
        tensors, _ = self.load_checkpoint(checkpoint)
        unet = build_unet(config.model, config.data.resolution, config.data.channels)
        unet.load_state_dict(tensors["ema" if ema else "model"])
        return unet.to(device).eval()

    def dataset(self):
        from .data import load_dataset

        return load_dataset(self.config.data)

    def export(self, folder: str | Path | None = None, ema: bool = True) -> Path:
        from .models import export_pipeline

        folder = Path(folder) if folder else self.path / "export"
        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:6]}")
        export_pipeline(self.load_unet(ema=ema), self.scheduler(), tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder


def list_runs(root: str | Path) -> list[Run]:
    """Every run folder under root, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [Run(p) for p in root.iterdir() if (p / "config.json").exists()]
    return sorted(runs, key=lambda r: (r.path / "config.json").stat().st_mtime, reverse=True)
