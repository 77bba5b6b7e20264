"""Report a run to the experiment trackers practitioners already use (TensorBoard, and W&B or
trackio when installed) through accelerate's tracker API, so a long run launched from the CLI
shows up in the dashboard they already watch.

Off by default (`train.trackers = []`). TensorBoard writes local event files under the run
folder (`tensorboard/`); W&B and trackio follow their own settings (e.g. WANDB_MODE=offline).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import TRACKERS, ConfigError
from .telemetry import DriftEvent, Event, RoundEvent, StatusEvent, StepEvent

def _available(name: str) -> bool:
    from accelerate.utils import is_tensorboard_available, is_trackio_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
            "trackio": is_trackio_available}[name]()


def check_trackers(names) -> None:
    """An uninstalled tracker is a configuration error, said before training starts."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.trackers: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}.")
        if not _available(name):
            raise ConfigError(f"train.trackers: {name} is not installed: `pip install {name}`, or leave it out.")


class TrackerSink:
    """An event sink that logs each step's loss, kept share, learning rate and λ, and each
    round's skip rate, duration and proxy drift, to accelerate trackers; the run's config is stored as
    hyperparameters. Finishes the trackers when the run stops, finishes or fails."""

    def __init__(self, names, run_name: str, folder: str | Path, config: dict):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        check_trackers(names)
        self.trackers = []
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            tracker = cls(run_name, str(folder)) if cls.requires_logging_directory else cls(run_name)
            tracker.start()
            tracker.store_init_configuration(flat_config(config))
            self.trackers.append(tracker)
        self.open = True

    def __call__(self, event: Event) -> None:
        if not self.open:
            return
        if isinstance(event, StepEvent):
            for i, step in enumerate(event.global_step.tolist()):
                self._log({"train/loss": event.loss[i], "train/kept_fraction": event.kept_fraction[i],
                           "train/lr": event.lr[i], "train/skip_lambda": event.skip_lambda[i]}, step)
        elif isinstance(event, RoundEvent):
            self._log({"round/skip_rate": event.skip_rate, "round/seconds": event.seconds, "round/index": event.round},
                      event.global_step)
        elif isinstance(event, DriftEvent):
            for row in event.rows():
                self._log({f"drift/proxy{row['proxy']}/{key}": row[key]
                           for key in ("drift", "distance_to_others", "loss_own", "loss_others")}, event.global_step)
        elif isinstance(event, StatusEvent) and event.state in ("stopped", "finished", "failed"):
            for tracker in self.trackers:
                tracker.finish()
            self.open = False

    def _log(self, values: dict, step: int) -> None:
        values = {k: float(v) for k, v in values.items() if np.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(values, step=int(step))


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A nested config as flat "section.name" hyperparameters of types trackers accept."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
