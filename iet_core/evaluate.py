"""How much a trained model copies its training data, and at what cost in quality.

`evaluate_images` measures given samples against a dataset (no model needed); `evaluate_run`
samples a run's checkpoint first and saves the result under `RUN/eval/<name>/`:

    table.csv        one row per generated sample: nearest training image, distances, ratios
    summary.json     aggregate numbers (memorized share, MQ shares, FID or why not, settings)
    most_copied.csv  per training image: times it is the nearest, with its training skip stats
    images.npz       generated images and their nearest training images (for galleries)
    gallery.png      (generated | nearest) pairs, most memorized first (ratio criterion);
                     gallery-distance.png and gallery-mq.png sort by the other criteria
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .config import MEMORIZATION_THRESHOLD, SAMPLERS, ConfigError, EvalConfig, RunConfig, TextToImageConfig
from .data import ImageDataset
from .families import TEXT_TO_IMAGE, family
from .fid import FIDUnavailable, fid_score
from .metrics import (MQ_THRESHOLDS, copy_counts, distance_threshold, memorization_ratio, mq_ratio, share_summary,
                      shares_below)
from .neighbours import as_uint8_images, nearest_neighbours, resolve_device
from .quality import measure_quality, quality_text
from .runs import Run, check_eval_name, checkpoint_step
from .sample import Cancelled, generate_from_run

COPY_DETECTION = TEXT_TO_IMAGE  # summary["kind"] of text-to-image copy detection (iet_core.text2image.evaluate)
# progress(stage, done, total); stages: "sampling", "neighbours", "fid"
Progress = Callable[[str, int, int], None]

# Copy criteria by name: (the table's score column, lower = more copied; its flag column).
COPY_CRITERIA = {"ratio": ("memorization_ratio", "memorized"), "distance": ("l2_nearest", "copy_distance"),
                 "mq": ("mq_ratio", "copy_mq")}
CALIBRATION_IMAGES = 2048  # training images whose nearest other image calibrates delta (a seeded subset beyond)
# Samples are still noise when their mean distance to their nearest training image is this many
# times the training images' median distance to each other (uniform noise on 16x16 digits: 2.7,
# on 8x8: 1.9; other real digits: 1.0; near-copies: 0.2), or when their quality figure is more
# than this share of uniform noise's (the demo baseline on 16x16 digits, raw weights: 0.8 at
# step 300, 0.35 at step 400 where digits appear; real digits 0.06).
NOISE_DISTANCE_FACTOR = 1.5
NOISE_QUALITY_SHARE = 0.5
EMA_START_WEIGHT_LIMIT = 0.05  # an EMA holding more of the random initial weights has not caught up


@dataclass
class EvalResult:
    table: pd.DataFrame  # one row per generated sample
    summary: dict
    most_copied: pd.DataFrame  # one row per training image, most often nearest first
    generated: np.ndarray  # uint8 (G, C, H, W)
    nearest: np.ndarray  # uint8 (G, C, H, W): each sample's nearest training image, as matched (mirrored if flipped)
    path: Path | None = None  # the folder it was saved in

    def pairs(self, limit: int | None = None, criterion: str = "ratio") -> list[tuple[np.ndarray, str]]:
        """(generated | nearest side by side as HxW or HxWx3 uint8, caption), most copied by
        the named criterion (see COPY_CRITERIA) first: ready for an image gallery."""
        if criterion not in COPY_CRITERIA:
            raise ConfigError(f"copy criterion {criterion!r} is unknown: choose one of {', '.join(COPY_CRITERIA)}.")
        order = self.table.sort_values([COPY_CRITERIA[criterion][0], "sample_id"]).index[:limit]
        out = []
        for i in order:
            row = self.table.loc[i]
            image = _side_by_side(self.generated[i], self.nearest[i])
            copied = [name for name, (_, flag) in COPY_CRITERIA.items() if row.get(flag, False)]
            flag = f"memorized by {'+'.join(copied)}, " if copied else ""
            mirror = " (mirrored)" if row["nearest_flipped"] else ""
            out.append((image, f"sample {row['sample_id']} | train {row['nearest_id']}{mirror}: "
                               f"{flag}ratio {row['memorization_ratio']:.3f}, L2 {row['l2_nearest']:.3f}"))
        return out


def _side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two (C, H, W) images as one (H, 2W + 1[, 3]) image with a white gap."""
    gap = np.full((left.shape[0], left.shape[1], 1), 255, np.uint8)
    joined = np.concatenate([left, gap, right], axis=2).transpose(1, 2, 0)
    return joined[..., 0] if joined.shape[2] == 1 else joined


def evaluate_images(generated, dataset: ImageDataset, config: EvalConfig | None = None, *,
                    flip_aware: bool | None = None, per_sample: pd.DataFrame | None = None,
                    device: str | torch.device | None = None, progress: Progress | None = None) -> EvalResult:
    """Memorization metrics (and FID when config.fid) of uint8 (G, C, H, W) samples against a
    dataset. flip_aware: None follows config.flip_aware (None there: off). per_sample: the
    run's per-training-image skip statistics, merged into `most_copied`."""
    config = config or EvalConfig()
    config.validate()
    generated = as_uint8_images(generated, "generated images")
    if len(dataset) < 2:
        raise ConfigError(f"the training set has {len(dataset)} image(s): the memorization ratio needs at least 2.")
    if len(generated) == 0:
        raise ConfigError("no generated images to evaluate: ask for at least one sample.")
    flip_aware = bool(config.flip_aware) if flip_aware is None else flip_aware
    device = resolve_device(device)
    started = time.perf_counter()
    found = nearest_neighbours(generated, dataset.images, k=max(2, config.mq_neighbours), flip_aware=flip_aware,
                               margin=config.nn_margin, query_chunk=config.nn_query_chunk,
                               train_chunk=config.nn_train_chunk, device=device,
                               progress=(lambda d, t: progress("neighbours", d, t)) if progress else None)
    seconds = {"neighbours": time.perf_counter() - started}

    ids = dataset.ids.numpy()
    ratio = memorization_ratio(found.sq_dist)
    memorized = ratio < config.memorization_threshold
    mq = mq_ratio(found.sq_dist, config.mq_neighbours)
    started = time.perf_counter()
    training_nn = training_nn_distances(dataset, flip_aware, device)
    delta = distance_threshold(training_nn, config.distance_quantile)
    seconds["calibration"] = time.perf_counter() - started
    table = pd.DataFrame({
        "sample_id": np.arange(len(generated)),
        "nearest_id": ids[found.index[:, 0]],
        "nearest_flipped": found.flipped[:, 0],
        "second_id": ids[found.index[:, 1]],
        "l2_nearest": found.l2[:, 0],
        "l2_second": found.l2[:, 1],
        "memorization_ratio": ratio,
        "memorized": memorized,
        "sq_l2_nearest": found.sq_dist[:, 0],
        "mq_ratio": mq,
        "copy_distance": found.l2[:, 0] < delta,
        "copy_mq": mq < config.mq_threshold,
    })
    times_nearest, times_memorized = copy_counts(found.index[:, 0], len(dataset), memorized)
    most_copied = pd.DataFrame({"training_id": ids, "times_nearest": times_nearest,
                                "times_memorized": times_memorized, "share": times_nearest / len(generated)})
    if per_sample is not None and len(per_sample) and "sample_id" in per_sample:
        stats = per_sample.rename(columns={"sample_id": "training_id"})
        most_copied = most_copied.merge(stats, on="training_id", how="left")
    most_copied = most_copied.sort_values(["times_nearest", "times_memorized", "training_id"],
                                          ascending=[False, False, True], ignore_index=True)

    nearest = dataset.images[torch.from_numpy(found.index[:, 0])].clone()
    mirrored = torch.from_numpy(found.flipped[:, 0])
    nearest[mirrored] = nearest[mirrored].flip(-1)

    fid, fid_message, fid_seconds = measure_fid(generated, dataset, config, device, progress)
    if config.fid:
        seconds["fid"] = fid_seconds

    ratio_share = share_summary(memorized)
    summary = {
        "num_samples": len(generated),
        "num_training": len(dataset),
        "dataset": dataset.name,
        "resize_filter": dataset.resize_filter,
        "flip_aware": flip_aware,
        "memorization_threshold": config.memorization_threshold,
        "memorized_count": ratio_share["count"],
        "memorized_fraction": ratio_share["share"],
        "memorized_interval": [ratio_share["low"], ratio_share["high"]],
        # Each criterion's share with its sample count and 95% Wilson interval.
        "criteria": {
            "ratio": {"rule": f"L2 nearest / L2 second nearest < {config.memorization_threshold:.3g}", **ratio_share},
            "distance": {"rule": f"L2 nearest < delta = {delta:.4f}, the {config.distance_quantile:g} quantile of "
                                 "training images' L2 to their nearest other training image",
                         "delta": delta, **share_summary(table["copy_distance"])},
            "mq": {"rule": f"MQ (squared L2 nearest / mean of {min(config.mq_neighbours, len(dataset))} nearest) "
                           f"< {config.mq_threshold:.3g}", **share_summary(table["copy_mq"])},
        },
        "mq_neighbours": min(config.mq_neighbours, len(dataset)),
        "mq_shares": {f"{t:g}": share for t, share in shares_below(mq, MQ_THRESHOLDS).items()},
        "mean_l2_nearest": float(table["l2_nearest"].mean()),
        "training_nn_l2_median": float(np.median(training_nn)),
        "median_l2_nearest": float(table["l2_nearest"].median()),
        "distinct_nearest": int((times_nearest > 0).sum()),
        "exhaustive_rows": found.exhaustive_rows,
        "fid": fid,
        "fid_dims": config.fid_dims if config.fid else None,
        "fid_message": fid_message,
        "seconds": seconds,
    }
    return EvalResult(table, summary, most_copied, generated.numpy(), nearest.numpy())


def training_nn_distances(dataset: ImageDataset, flip_aware: bool, device: torch.device) -> np.ndarray:
    """L2 of (up to CALIBRATION_IMAGES) training images to their nearest other training image,
    with the evaluation's flip setting (an image's own mirror image is the image itself): delta
    of the "distance" criterion is a quantile of these, and their median says how far apart
    real images are (samples much farther from every training image are not images yet)."""
    positions = np.arange(len(dataset))
    if len(dataset) > CALIBRATION_IMAGES:
        positions = np.sort(np.random.default_rng(0).choice(len(dataset), CALIBRATION_IMAGES, replace=False))
    found = nearest_neighbours(dataset.images[torch.from_numpy(positions)], dataset.images, k=2, flip_aware=flip_aware,
                               device=device)
    return found.l2[:, 1]  # column 0 is the image itself


def measure_fid(generated: torch.Tensor, dataset: ImageDataset, config: EvalConfig, device: torch.device,
         progress: Progress | None) -> tuple[float | None, str, float]:
    """(FID or None, a note on it, seconds); a missing weights file is a note, not an error."""
    if not config.fid:
        return None, "FID not requested (eval.fid, CLI --fid).", 0.0
    started = time.perf_counter()
    try:
        fid = fid_score(generated, dataset.images, weights=config.fid_weights, dims=config.fid_dims,
                        cache_dir=config.fid_cache, batch_size=config.fid_batch_size, device=device,
                        progress=(lambda d, t: progress("fid", d, t)) if progress else None)
    except FIDUnavailable as err:
        return None, str(err), time.perf_counter() - started
    note = ""
    if len(generated) < config.fid_dims:
        note = (f"FID from {len(generated)} samples (fewer than the {config.fid_dims} feature dimensions) is biased "
                "upwards; use 10,000 samples for numbers comparable with published FIDs.")
    return fid, note, time.perf_counter() - started


def flips_in_training(config: RunConfig) -> bool:
    """Whether training showed mirrored images (random flips or TAA flips)."""
    return config.train.hflip or (config.method.taa.enabled and config.method.taa.flip)


def evaluate_run(run: Run | str | Path, config: EvalConfig | None = None, *, device: str | torch.device | None = None,
                 progress: Progress | None = None, name: str | None = None, save: bool = True,
                 dataset: ImageDataset | None = None, cancelled: Callable[[], bool] | None = None,
                 step: int | None = None, text2image: TextToImageConfig | None = None) -> EvalResult:
    """Sample the run's checkpoint of global step `step` (None: the latest; EMA or raw weights), measure the samples against its
    training data, and save the result under RUN/eval/<name>/ (name: from the settings).
    config: None uses the run's own eval settings. `cancelled` is asked at every sampling step
    and progress report; when it returns True, `Cancelled` is raised and nothing is saved.
    text2image (for text-to-image runs): None uses the run's own copy-detection settings."""
    if cancelled is not None:
        progress = _cancellable(progress, cancelled)
    run = run if isinstance(run, Run) else Run.open(run)
    config = config or run.config.eval
    config.validate()
    if name is not None:
        check_eval_name(name)
    checkpoint = run.checkpoint(step)
    dataset = dataset or run.dataset()
    _check_trained_on(run, checkpoint, dataset)
    device = resolve_device(device)
    weights = "ema" if config.use_ema else "model"
    default_name = f"{checkpoint.name}-{weights}-{config.sampler}{config.steps}-n{config.num_samples}-seed{config.seed}"
    if run.config.text2image.enabled:
        text2image = text2image or run.config.text2image
        result = family(TEXT_TO_IMAGE).evaluate(run, checkpoint, dataset, config, text2image, device, progress)
        if save:
            result.path = save_eval(run, result, name or f"{default_name}-cfg{text2image.guidance_scale:g}", config.gallery_pairs)
        return result
    started = time.perf_counter()
    images = generate_from_run(run, config.num_samples, use_ema=config.use_ema, checkpoint=checkpoint, device=device,
                               sampler=config.sampler, steps=config.steps, eta=config.eta, seed=config.seed,
                               batch_size=config.batch_size, cancelled=cancelled,
                               progress=(lambda d, t: progress("sampling", d, t)) if progress else None)
    sampling_seconds = time.perf_counter() - started
    flip_aware = flips_in_training(run.config) if config.flip_aware is None else config.flip_aware
    result = evaluate_images(images, dataset, config, flip_aware=flip_aware, per_sample=run.per_sample(),
                             device=device, progress=progress)
    step = checkpoint_step(checkpoint)
    result.summary.update({
        "run_id": run.id, "checkpoint": checkpoint.name, "checkpoint_step": step,
        "weights": weights, "sampler": config.sampler, "steps": config.steps, "eta": config.eta, "seed": config.seed,
        "device": str(device), "ema_decay": run.config.train.ema_decay,
        # The EMA starts at the random initial weights and each proxy step moves it by (1 - decay).
        "ema_start_weight": run.config.train.ema_decay ** (step / run.config.method.num_shards),
    })
    result.summary["seconds"]["sampling"] = sampling_seconds
    started = time.perf_counter()
    result.summary["quality"] = measure_quality(images, run.config.data, dataset)
    result.summary["seconds"]["quality"] = time.perf_counter() - started
    if cancelled is not None and cancelled():
        raise Cancelled("the evaluation was cancelled")
    if save:
        result.path = save_eval(run, result, name or default_name, config.gallery_pairs)
    return result


class EvaluationBusy(ConfigError):
    """A server will not take this evaluation now; the message says when to try again."""


class EvaluationGate:
    """How a server shares its evaluations: `running` at a time, at most `waiting` more in
    line, one per owner and `per_client` per client (network address, which fresh owner tokens
    do not change; None: no such limit), running or waiting. A waiter whose client left gives
    up its place, and `close` cancels everything (the server is stopping)."""

    def __init__(self, running: int = 1, waiting: int = 4, per_client: int | None = None):
        self.running, self.waiting, self.per_client = running, waiting, per_client
        self._changed = threading.Condition()
        self._active = self._queued = 0
        self._owners: set[str] = set()
        self._clients: collections.Counter[str] = collections.Counter()
        self.closed = False

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        """Evaluations waiting for a place to run."""
        return self._queued

    @property
    def capacity(self) -> int:
        """Requests worth admitting at once: those running, those waiting, and one more to
        hear at once that the line is full."""
        return self.running + self.waiting + 1

    @contextlib.contextmanager
    def slot(self, owner: str, cancelled: Callable[[], bool] = lambda: False, client: str | None = None):
        """Hold a place for one evaluation of `owner` asked by `client` (wait for it while
        others run); yields the check to pass to `evaluate_run` (the client left, or the server
        is closing)."""
        def stop() -> bool:
            return self.closed or cancelled()

        def release() -> None:
            self._owners.discard(owner)
            if client is not None:
                self._clients[client] -= 1
                if not self._clients[client]:
                    del self._clients[client]  # forget clients with nothing running

        with self._changed:
            if self.closed:  # close() waits only for evaluations in the gate: none may start after it
                raise Cancelled("the server is stopping")
            if owner in self._owners:
                raise EvaluationBusy("you already have an evaluation running or waiting: wait for it to finish.")
            if client is not None and self.per_client is not None and self._clients[client] >= self.per_client:
                raise EvaluationBusy(f"{self._clients[client]} evaluations from your network address are running or "
                                     f"waiting, this server's limit per client (--max-evals-per-client "
                                     f"{self.per_client}): wait for one to finish.")
            if self._queued >= self.waiting:
                raise EvaluationBusy(f"the server is busy ({self._active} evaluation(s) running, {self._queued} "
                                     "waiting): try again in a minute.")
            self._owners.add(owner)
            if client is not None:
                self._clients[client] += 1
            self._queued += 1
            try:
                while self._active >= self.running:
                    if stop():
                        release()
                        raise Cancelled("the evaluation was cancelled before it started")
                    self._changed.wait(timeout=0.5)  # and look at the client again
            finally:
                self._queued -= 1
            self._active += 1
        try:
            yield stop
        finally:
            with self._changed:
                self._active -= 1
                release()
                self._changed.notify_all()

    def close(self, timeout: float = 60.0) -> None:
        """Cancel every evaluation and wait (up to `timeout`) until none runs."""
        with self._changed:
            self.closed = True
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._active == 0, timeout)


def _cancellable(progress: Progress | None, cancelled: Callable[[], bool]) -> Progress:
    def report(stage: str, done: int, total: int) -> None:
        if cancelled():
            raise Cancelled(f"the evaluation was cancelled ({stage})")
        if progress is not None:
            progress(stage, done, total)
    return report


def _check_trained_on(run: Run, checkpoint: Path, dataset: ImageDataset) -> None:
    """The checkpoint records the ids of the images it was trained on; comparing samples with
    other images would measure nothing."""
    trained = run.trained_ids(checkpoint)
    if trained is not None and not torch.equal(trained, dataset.ids):
        raise ConfigError("the data differs from the data this run was trained on (image ids changed): restore "
                          "the original data source, or pass the training dataset to evaluate_run.")


# -- saved results --------------------------------------------------------------------------

def save_eval(run: Run, result: EvalResult, name: str, gallery_pairs: int = 32) -> Path:
    """Write the result into RUN/eval/<name>/, replacing an older one of that name, with a
    gallery per copy criterion it has (a result of another kind, e.g. text-to-image, has one)."""
    criteria = [c for c in COPY_CRITERIA if c in result.summary.get("criteria", {})] or [None]
    galleries = {gallery_name(c): _gallery_png(result, gallery_pairs, c) for c in criteria} if gallery_pairs else {}
    return run.write_eval(name, result.table, result.most_copied, result.summary,
                          {"generated": result.generated, "nearest": result.nearest}, galleries)


def gallery_name(criterion: str | None) -> str:
    return f"gallery-{criterion}.png" if criterion not in (None, "ratio") else "gallery.png"


def _gallery_png(result: EvalResult, limit: int, criterion: str | None) -> bytes:
    from PIL import Image
    from torchvision.utils import make_grid

    pairs = [np.atleast_3d(image) for image, _ in (result.pairs(limit, criterion) if criterion else result.pairs(limit))]
    scale = max(1, 64 // pairs[0].shape[0])  # small images get big enough pixels to see
    tiles = torch.from_numpy(np.stack(pairs)).permute(0, 3, 1, 2).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    grid = make_grid(tiles, nrow=max(1, int(np.ceil(np.sqrt(len(pairs) / 2)))), padding=2, pad_value=255)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def list_evals(run: Run | str | Path) -> list[str]:
    """Names of the run's saved evaluations, newest first."""
    return (run if isinstance(run, Run) else Run.open(run)).eval_names()


def load_eval(run: Run | str | Path, name: str | None = None) -> EvalResult:
    """A saved evaluation (the newest when no name is given)."""
    run = run if isinstance(run, Run) else Run.open(run)
    if name is None:
        names = run.eval_names()
        if not names:
            raise ConfigError(f"run {run.id} has no saved evaluation: run `python -m iet_core evaluate {run.path}`.")
        name = names[0]
    table, summary, most_copied, images, folder = run.read_eval(name)
    result_class = family(COPY_DETECTION).result if summary.get("kind") == COPY_DETECTION else EvalResult
    return result_class(table, summary, most_copied, images["generated"], images["nearest"], folder)


# -- the CLI --------------------------------------------------------------------------------

def format_summary(summary: dict) -> str:
    """The summary as aligned text lines for a terminal."""
    if summary.get("kind") == COPY_DETECTION:
        return family(COPY_DETECTION).format_summary(summary)
    lines = []
    if "run_id" in summary:
        lines.append(f"run {summary['run_id']}  {summary['checkpoint']} ({summary['weights']} weights), "
                     f"{summary['sampler']} {summary['steps']} steps, seed {summary['seed']}")
    lines.append(f"samples {summary['num_samples']} vs {summary['num_training']} training images"
                 f"{' (and their mirror images)' if summary['flip_aware'] else ''}"
                 f", resized with {summary.get('resize_filter', 'auto')}")
    for name, criterion in summary.get("criteria", {}).items():
        lines.append(f"copies by {name} ({criterion['rule']}): {criterion['count']}/{criterion['total']} = "
                     f"{100 * criterion['share']:.1f}% (95% CI {100 * criterion['low']:.1f}-{100 * criterion['high']:.1f}%)")
    lines += [
        "MQ share below   " + "  ".join(f"{t:>5}" for t in summary["mq_shares"]),
        "                 " + "  ".join(f"{100 * s:>4.0f}%" for s in summary["mq_shares"].values()),
        f"nearest L2: mean {summary['mean_l2_nearest']:.4f}, median {summary['median_l2_nearest']:.4f}; "
        f"{summary['distinct_nearest']} distinct training images are someone's nearest",
        f"FID: {summary['fid']:.2f}" if summary["fid"] is not None else "FID: n/a",
        f"quality: {quality_text(summary)}",
    ]
    if summary.get("fid_message"):
        lines.append(f"  {summary['fid_message']}")
    lines += [f"WARNING: {warning}" for warning in evaluation_warnings(summary)]
    return "\n".join(lines)


def evaluation_warnings(summary: dict) -> list[str]:
    """Why this evaluation's copy share means little yet, in plain words (none: nothing found)."""
    warnings = []
    step, share = summary.get("checkpoint_step", "?"), summary.get("memorized_fraction")
    share_text = f"{100 * share:.0f}% copies" if share is not None else "the copy share"
    typical, quality = summary.get("training_nn_l2_median"), summary.get("quality") or {}
    why = []
    if typical and summary.get("mean_l2_nearest", 0) > NOISE_DISTANCE_FACTOR * typical:
        why.append(f"they are {summary['mean_l2_nearest'] / typical:.1f}x farther from every training image than "
                   "training images are from each other")
    if quality.get("noise_value") and quality["value"] > NOISE_QUALITY_SHARE * quality["noise_value"]:
        why.append(f"their {quality['measure']} {quality['value']:.2f} is nearer uniform noise's "
                   f"{quality['noise_value']:.2f} than real images' (near 0)")
    if why:
        warnings.append(f"samples are still noise at step {step}: {share_text} here means nothing yet ({'; '.join(why)})")
    start = summary.get("ema_start_weight")
    if summary.get("weights") == "ema" and start is not None and start > EMA_START_WEIGHT_LIMIT:
        decay = summary["ema_decay"]
        warnings.append(f"the EMA weights at step {step} have not caught up: {100 * start:.0f}% of them is still the "
                        f"random start (decay {decay:g} averages over about {1 / (1 - decay):.0f} steps per proxy); "
                        f"{share_text} says little: evaluate the raw weights or a later step")
    return warnings


def add_evaluate_command(subparsers) -> argparse.ArgumentParser:
    """`python -m iet_core evaluate RUN [...]`: flags override the run's eval settings."""
    parser = subparsers.add_parser("evaluate", help="sample a run and measure memorization (and FID)",
                                   description="Sample a run's latest (or a chosen) checkpoint, find every sample's nearest "
                                               "training images, print the summary and save the result in RUN/eval/.")
    parser.add_argument("run", help="the run folder")
    parser.add_argument("--num-samples", type=int, help="samples to generate (10,000 for comparable numbers)")
    parser.add_argument("--sampler", choices=SAMPLERS)
    parser.add_argument("--steps", type=int, help="sampling steps (DDIM default 50)")
    parser.add_argument("--eta", type=float, help="DDIM eta (0: deterministic)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int, help="samples per generation batch")
    parser.add_argument("--weights", choices=("ema", "model"), help="raw averaged weights (the default, as the reference) or EMA")
    parser.add_argument("--threshold", type=float, help=f"memorized when L2 nearest / second nearest is below this ({MEMORIZATION_THRESHOLD:.4g})")
    parser.add_argument("--flip-aware", action=argparse.BooleanOptionalAction, default=None,
                        help="also compare with mirrored training images (default: when training flipped)")
    parser.add_argument("--fid", action="store_true", help="also compute FID (needs the Inception weights file)")
    parser.add_argument("--fid-weights", help="path of pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--clip-model", help="text-to-image runs: a local CLIPModel folder for the CLIP score")
    parser.add_argument("--feature-extractor", help="text-to-image runs: SSCD TorchScript file or DINOv2 / CLIP "
                                                    "transformers folder for copy detection")
    parser.add_argument("--guidance-scale", type=float, help="text-to-image runs: classifier-free guidance")
    parser.add_argument("--images-per-caption", type=int, help="text-to-image runs: generations per training caption")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--name", help="folder name under RUN/eval (default: from the settings)")
    parser.add_argument("--no-save", action="store_true", help="print only; save nothing in the run folder")
    parser.add_argument("--step", type=int, help="evaluate the kept checkpoint of this global step (default: the latest)")
    parser.set_defaults(handler=_cmd_evaluate)
    return parser


def _cmd_evaluate(args: argparse.Namespace) -> int:
    run = Run.open(args.run)
    overrides = {"num_samples": args.num_samples, "sampler": args.sampler, "steps": args.steps, "eta": args.eta,
                 "seed": args.seed, "batch_size": args.batch_size, "memorization_threshold": args.threshold,
                 "flip_aware": args.flip_aware, "fid_weights": args.fid_weights,
                 "use_ema": None if args.weights is None else args.weights == "ema", "fid": args.fid or None}
    config = replace(run.config.eval, **{k: v for k, v in overrides.items() if v is not None})
    copy_settings = {"feature_extractor": args.feature_extractor, "clip_model": args.clip_model, "guidance_scale": args.guidance_scale,
                     "images_per_caption": args.images_per_caption}
    text2image = replace(run.config.text2image, **{k: v for k, v in copy_settings.items() if v is not None})
    result = evaluate_run(run, config, device=args.device, name=args.name, save=not args.no_save,
                          progress=_print_progress, step=args.step, text2image=text2image)
    print(format_summary(result.summary))
    if result.path is not None:
        print(f"saved: {result.path}")
    return 0


def _print_progress(stage: str, done: int, total: int) -> None:
    print(f"\r{stage}: {done}/{total}", end="\n" if done >= total else "", file=sys.stderr, flush=True)
