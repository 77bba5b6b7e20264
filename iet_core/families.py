"""Model families beyond the engine's own pixel-space UNet, and what each brings: its trainer,
exporter and evaluator. One today: text-to-image (iet_core.text2image, on when a run's
config.text2image.enabled). A family's package imports the engine and registers itself here,
so train, runs and evaluate hand a run to it without importing it (no import loop).
iet_core/__init__ imports every family package: any use of iet_core finds them registered."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

TEXT_TO_IMAGE = "text2image"  # also the summary["kind"] of its evaluations


@dataclass(frozen=True)
class Family:
    trainer: type  # its subclass of iet_core.train.Trainer
    export: Callable  # export(run, folder, use_ema): the trained weights in the form people load
    evaluate: Callable  # evaluate(run, checkpoint, dataset, eval config, family settings, device, progress) -> EvalResult
    result: type  # the EvalResult subclass its saved evaluations load as
    format_summary: Callable[[dict], str]  # an evaluation's summary as text for a terminal
    check: Callable  # check(config): what its model's configs decide (no weights read), before a run folder is made


_registered: dict[str, Family] = {}


def register(name: str, family: Family) -> None:
    _registered[name] = family


def family(name: str) -> Family:
    try:
        return _registered[name]
    except KeyError:
        raise RuntimeError(f"model family {name!r} is not registered: import iet_core (its __init__ imports "
                           f"iet_core.{name}, which registers it).") from None
