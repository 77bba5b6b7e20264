"""Memorization against mitigation, end to end: baseline DDPM, IET, IET-AGC and IET-AGC+ on the
same data, model and seeds, with equal compute (the same number of optimizer steps of the same
batch size, so the same number of sample visits), each evaluated at several points of training.

    python -m iet_core.experiments --out experiments/out/digits --seeds 0 1 2

Writes into --out: results.csv (one row per method, seed and evaluation point), summary.csv
(final numbers and memorization at equal quality, mean and spread over seeds), plots (bar chart,
ratio histograms, memorization against quality, nearest-neighbour galleries) and report.md.
Quality is FID when Inception weights are given (--set eval.fid=true), and always the offline
"feature FD" and held-out distance of `iet_core.quality` (say which in any write-up).

Text-to-image fine-tunes (`--recipe sd-lora` or `sd-full` with `--pretrained PIPE --data
CAPTIONED`) compare the same way at equal steps, measured as their evaluation does
(iet_core.text2image): the share of generations whose nearest training image has similarity
above text2image.copy_threshold (0.5), the distance ratio in that space, the CLIP score
(text2image.clip_model) and FID (eval.fid), each "not measured" without its model.

Fair by construction: every method of one comparison is evaluated on the same kind of weights
(raw averaged weights unless eval.use_ema) and with the same flip setting (mirrored training
images count as copies for all methods or for none, also when only IET-AGC+'s TAA flips);
settings that would mix them are refused. Every memorized share comes with its sample count and
95% Wilson interval, feature FD with a 95% bootstrap interval.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cli import add_config_arguments, apply_settings, config_from_args
from .config import MEMORIZATION_THRESHOLD, MODES, ConfigError, RunConfig, demo_config, method_for_mode
from .data import load_dataset
from .evaluate import COPY_CRITERIA, evaluate_images, evaluate_run, flips_in_training
from .metrics import proportion_interval
from .neighbours import resolve_device
from .quality import QualityMeter, heldout_set
from .runs import Run, atomic_write, list_runs
from .sample import generate_from_run
from .train import train


@dataclass
class Experiment:
    base: RunConfig = field(default_factory=demo_config)
    modes: tuple[str, ...] = MODES
    seeds: tuple[int, ...] = (0, 1, 2)
    num_shards: int = 4
    steps: int = 3000  # optimizer steps of base.train.batch_size per method (equal compute)
    rounds: int = 30
    eval_points: int = 5  # evaluations spread over the rounds (the last one at the end)
    num_samples: int = 512  # per evaluation point: +-4 points at most on a share (64 gave +-12)
    sample_steps: int = 50
    heldout: int = 500  # images of the same source never trained on, for the quality measure
    classifier_steps: int = 300
    # Extra methods to compare, by label: a mode and settings over it, e.g.
    # {"ddpm+agc": ("ddpm", ("method.agc.enabled=true",))}: AGC without IET.
    variants: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    train: bool = True  # False: only evaluate the checkpoints that matching runs already have
    # Other experiments' results.csv drawn in the memorization-against-quality plot, by name
    # (same data and quality measure only: feature FD is specific to its held-out set).
    overlays: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def labels(self) -> tuple[str, ...]:
        return (*self.modes, *self.variants)

    def mode_of(self, label: str) -> str:
        return self.variants[label][0] if label in self.variants else label

    def validate(self) -> None:
        unknown = [m for m in map(self.mode_of, self.labels) if m not in MODES]
        if unknown:
            raise ConfigError(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}.")
        if not self.seeds:
            raise ConfigError("give at least one seed.")
        if not 1 <= self.eval_points <= self.rounds:
            raise ConfigError(f"eval_points={self.eval_points}: use between 1 and rounds ({self.rounds}).")
        for label in self.labels:
            shards = self._method(label)["method"]["num_shards"]
            if self.steps // self.rounds // shards < 1:
                raise ConfigError(f"{self.steps} steps over {self.rounds} rounds leave no local step for {shards} "
                                  "proxies: raise steps or lower rounds or num_shards.")
            self.run_config(label, self.seeds[0])  # a variant's settings are checked here
        self.evaluation()

    def evaluation(self) -> dict:
        """The one evaluation setting of the comparison: {"use_ema", "flip_aware"}. A variant may
        not change evaluation settings (refused); flips follow eval.flip_aware or, when it is
        unset, are on for every method as soon as any method trained on mirrored images (e.g.
        IET-AGC+'s TAA flips), so no method is judged against mirrored copies alone."""
        configs = {label: self.run_config(label, self.seeds[0]) for label in self.labels}
        changed = [label for label, config in configs.items() if config.eval != self.base.eval]
        if changed:
            raise ConfigError(f"variant(s) {', '.join(changed)} change evaluation settings (weights, flips or "
                              "thresholds), which must be the same for every method of one comparison: set eval.* "
                              "once for all with --set, not in a variant.")
        flips = self.base.eval.flip_aware
        if flips is None:
            flips = any(map(flips_in_training, configs.values()))
        return {"use_ema": self.base.eval.use_ema, "flip_aware": bool(flips)}

    def _method(self, label: str) -> dict:
        """The mode's switches over the base's method settings, then the variant's settings."""
        config = copy.deepcopy(self.base)
        switches = method_for_mode(self.mode_of(label), self.num_shards)
        config.method.num_shards = switches.num_shards
        for part in ("agc", "msr", "taa"):
            getattr(config.method, part).enabled = getattr(switches, part).enabled
        # cached latents: TAA's pixel augmentations cannot act (iet-agc+ adds MSR), as in the sd recipes
        config.method.taa.enabled &= not config.text2image.enabled
        tree = config.to_dict()
        apply_settings(tree, self.variants.get(label, ("", ()))[1])
        return RunConfig.from_dict(tree).to_dict()  # the variant's values typed and checked

    def run_config(self, label: str, seed: int) -> RunConfig:
        """The base config with this mode's switches (keeping the base's AGC/MSR/TAA settings),
        a variant's settings over them, and local steps chosen so that rounds x K x local
        steps = steps."""
        tree = self._method(label)
        proxies = tree["method"]["num_shards"]
        tree["train"].update(rounds=self.rounds, local_steps=self.steps // self.rounds // proxies,
                             local_epochs=None, seed=seed, checkpoint_every_rounds=self.rounds // self.eval_points,
                             keep_checkpoints=self.rounds)  # every evaluation point stays
        tree["name"] = f"{label}-seed{seed}"
        return RunConfig.from_dict(tree).validate()


def matching_run(root: Path, config: RunConfig) -> Run | None:
    """The run under root trained with exactly this config (newest first), so that an
    interrupted or extended experiment picks up where it stopped instead of training again."""
    wanted = config.to_dict()
    for run in list_runs(root):
        try:
            if run.config.to_dict() == wanted and run.status().get("state") != "failed":
                return run
        except (OSError, ValueError):  # ConfigError is a ValueError
            continue  # a half-written or foreign folder is not ours to reuse
    return None


def run_experiment(experiment: Experiment, out: str | Path, log=print) -> pd.DataFrame:
    experiment.validate()
    evaluation = experiment.evaluation()
    for name, frame in experiment.overlays.items():
        check_same_evaluation(frame, evaluation, f"overlay {name}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    text2image = experiment.base.text2image.enabled
    meter = None
    if not text2image:  # fine-tunes are judged by CLIP score and FID instead
        heldout = heldout_set(experiment.base.data, load_dataset(experiment.base.data).ids, experiment.heldout)
        if heldout is None:
            raise ConfigError("no images are left out of training for the quality measure: lower data.subset.")
        meter = QualityMeter.fit(heldout, steps=experiment.classifier_steps)
        log(f"quality classifier: {len(heldout)} held-out images, accuracy {meter.accuracy:.2f}")
    log(f"every method evaluated on {'EMA' if evaluation['use_ema'] else 'raw averaged'} weights, "
        f"flip-aware {evaluation['flip_aware']}, {experiment.num_samples} samples per point")
    rows, finals = [], {}
    for seed in experiment.seeds:
        for mode in experiment.labels:
            config = experiment.run_config(mode, seed)
            run = matching_run(out / "runs", config)
            finished = run is not None and run.status().get("state") == "finished"
            if not experiment.train and not (run and run.checkpoints()):
                log(f"{mode:9s} seed {seed}: nothing trained yet, left out")
                continue
            if not experiment.train or finished:
                log(f"{mode:9s} seed {seed}: reusing {'finished' if finished else 'unfinished'} run {run.id}")
            elif run is None:
                run = train(config, runs_root=out / "runs")
            else:
                log(f"{mode:9s} seed {seed}: resuming {run.id}")
                train(run=run, resume=True)
            train_seconds = float(run.rounds()["seconds"].sum())  # training only, also when reused
            dataset = run.dataset()
            for checkpoint in run.checkpoints():
                if text2image:
                    row = _evaluate_fine_tune(run, checkpoint, dataset, experiment, evaluation, mode, seed, train_seconds)
                    quality = (f"CLIP score {_number(row['clip_score'])} [{_number(row['clip_score_low'])}, "
                               f"{_number(row['clip_score_high'])}], FID {_number(row['fid'])}")
                    copies = f"copies {row['copy_fraction']:.3f} [{row['copy_low']:.3f}, {row['copy_high']:.3f}], "
                else:
                    row = _evaluate_point(run, checkpoint, dataset, meter, experiment, evaluation, mode, seed, train_seconds)
                    quality = (f"feature FD {row['feature_fd']:.2f} [{row['feature_fd_low']:.2f}, {row['feature_fd_high']:.2f}], "
                               f"held-out L2 {row['heldout_l2']:.3f}")
                    copies = ""
                rows.append(row)
                log(f"{mode:9s} seed {seed} step {row['step']:6d}: {copies}memorized {row['memorized_fraction']:.3f} "
                    f"[{row['memorized_low']:.3f}, {row['memorized_high']:.3f}] of {row['num_samples']}, {quality}")
            finals[(mode, seed)] = rows[-1].pop("_result")
            for row in rows:
                row.pop("_result", None)
    if not rows:
        raise ConfigError(f"no run of this experiment has a checkpoint in {out / 'runs'}: train it first.")
    results = pd.DataFrame(rows)
    results.to_csv(out / "results.csv", index=False)
    summary = summarize_fine_tunes(results) if text2image else summarize(results)
    summary.to_csv(out / "summary.csv", index=False)
    if text2image:
        plot_fine_tunes(summary, finals, experiment, out)
        write_fine_tune_report(results, summary, experiment, out, time.time() - started)
    else:
        plot_all(results, finals, experiment, out)
        write_report(results, summary, experiment, out, time.time() - started, meter.accuracy)
    return results


def _number(value) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{value:.2f}"


def _evaluate_point(run: Run, checkpoint: Path, dataset, meter: QualityMeter, experiment: Experiment,
                    evaluation: dict, mode: str, seed: int, train_seconds: float) -> dict:
    config = run.config
    _, meta = run.load_checkpoint(checkpoint)
    samples = generate_from_run(run, experiment.num_samples, checkpoint=checkpoint, steps=experiment.sample_steps,
                                seed=1000 + seed, use_ema=evaluation["use_ema"], device=resolve_device(config.train.device))
    result = evaluate_images(samples, dataset, experiment.base.eval, flip_aware=evaluation["flip_aware"], per_sample=run.per_sample())
    summary, criteria = result.summary, result.summary["criteria"]
    return {"mode": mode, "seed": seed, "round": meta["round"], "step": meta["global_step"],
            "visits": meta["global_step"] * config.train.batch_size, "num_samples": summary["num_samples"],
            "memorized_fraction": summary["memorized_fraction"], "memorized_low": criteria["ratio"]["low"],
            "memorized_high": criteria["ratio"]["high"],
            **{f"{name}_{key}": criteria[name][key] for name in COPY_CRITERIA if name != "ratio"
               for key in ("share", "low", "high")},
            "copy_delta": criteria["distance"]["delta"],
            "mq_below_1_3": float((result.table["mq_ratio"] < MEMORIZATION_THRESHOLD).mean()), "mean_l2_nearest": summary["mean_l2_nearest"],
            **meter.measure(samples), "fid": summary["fid"], "weights": "ema" if evaluation["use_ema"] else "raw",
            "flip_aware": evaluation["flip_aware"], "resize_filter": summary["resize_filter"],
            "train_seconds": train_seconds, "_result": result}


def _evaluate_fine_tune(run: Run, checkpoint: Path, dataset, experiment: Experiment, evaluation: dict, mode: str,
                       seed: int, train_seconds: float) -> dict:
    """A fine-tune's checkpoint as its evaluation measures it: generations from training
    captions (the same captions for every method of a seed), copies, CLIP score and FID."""
    _, meta = run.load_checkpoint(checkpoint)
    config = dataclasses.replace(experiment.base.eval, num_samples=experiment.num_samples, steps=experiment.sample_steps,
                                 seed=1000 + seed, use_ema=evaluation["use_ema"])
    result = evaluate_run(run, config, step=meta["global_step"], save=False, dataset=dataset,
                          device=resolve_device(run.config.train.device))
    summary = result.summary
    return {"mode": mode, "seed": seed, "round": meta["round"], "step": meta["global_step"],
            "visits": meta["global_step"] * run.config.train.batch_size, "num_samples": summary["num_samples"],
            "num_captions": summary["num_captions"], "num_training": summary["num_training"],
            "copy_count": summary["copy_count"],
            "copy_fraction": summary["copy_fraction"], "copy_low": summary["copy_interval"][0],
            "copy_high": summary["copy_interval"][1], "memorized_fraction": summary["memorized_fraction"],
            "memorized_low": summary["memorized_interval"][0], "memorized_high": summary["memorized_interval"][1],
            "mean_similarity": summary["mean_similarity"], "clip_score": summary["clip_score"],
            "clip_score_low": summary.get("clip_score_low"), "clip_score_high": summary.get("clip_score_high"),
            "fid": summary["fid"], "fid_message": summary["fid_message"], "measure": summary["measure"],
            "weights": "ema" if evaluation["use_ema"] else "raw",
            "flip_aware": evaluation["flip_aware"], "train_seconds": train_seconds, "_result": result}


def check_same_evaluation(results: pd.DataFrame, evaluation: dict, what: str) -> None:
    """Refuse to compare results evaluated on other weights or with another flip setting (rows
    written before these were recorded carry no such columns and are taken as they are)."""
    weights = "ema" if evaluation["use_ema"] else "raw"
    if "weights" in results and set(results["weights"].dropna()) - {weights}:
        raise ConfigError(f"{what} was evaluated on {', '.join(sorted(set(results['weights'])))} weights, this "
                          f"comparison on {weights}: evaluate both on the same weights (eval.use_ema).")
    if "flip_aware" in results and set(results["flip_aware"].dropna().astype(bool)) - {evaluation["flip_aware"]}:
        raise ConfigError(f"{what} used another flip setting than this comparison (flip-aware "
                          f"{evaluation['flip_aware']}): set eval.flip_aware to the same value for both.")


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per mode: final numbers (mean, std over seeds) and memorization at equal quality, i.e.
    at the first evaluation point where the mode's seed-mean feature FD reaches the level every
    mode reaches (the worst of the modes' best)."""
    final = results[results.step == results.groupby(["mode", "seed"]).step.transform("max")]
    metrics = [m for m in ["memorized_fraction", "distance_share", "mq_share", "mq_below_1_3", "mean_l2_nearest",
                           "feature_fd", "heldout_l2"] if m in results]
    table = final.groupby("mode", sort=False)[metrics].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    curves = results.groupby(["mode", "step"], sort=False)[["memorized_fraction", "feature_fd"]].mean().reset_index()
    target = curves.groupby("mode").feature_fd.min().max()
    reached = curves[curves.feature_fd <= target + 1e-12].groupby("mode", sort=False).first()
    table["equal_quality_fd"] = target
    table["equal_quality_step"] = reached.step
    table["memorized_at_equal_quality"] = reached.memorized_fraction
    table["seeds"] = final.groupby("mode").seed.nunique()
    return table.reset_index()


def plot_all(results: pd.DataFrame, finals: dict, experiment: Experiment, out: Path) -> None:
    plt = _pyplot()
    import matplotlib.ticker

    modes = [m for m in experiment.labels if m in set(results["mode"])]
    final = results[results.step == results.groupby(["mode", "seed"]).step.transform("max")]

    stats = final.groupby("mode").memorized_fraction.agg(["mean", "std"]).reindex(modes)
    save_bars(modes, stats["mean"] * 100, stats["std"].fillna(0) * 100, "memorized samples (%)",
              f"Memorization at equal compute (nearest / second < {MEMORIZATION_THRESHOLD:.2f})", out / "memorization_bar.png")
    save_histograms(finals, modes, "memorization_ratio", MEMORIZATION_THRESHOLD, "nearest / second nearest",
                    out / "ratio_histograms.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for label, frame, style in [("", results, "-"), *[(f" ({name})", other, "--") for name, other in experiment.overlays.items()]]:
        for i, mode in enumerate(frame["mode"].unique()):
            colour = colours[(i + (len(modes) if label else 0)) % len(colours)]
            for j, (seed, run) in enumerate(frame[frame["mode"] == mode].sort_values("step").groupby("seed")):
                plot_seed(ax, run, style, colour, mode + label if j == 0 else None)
    ax.set_xscale("log")  # quality spans an order of magnitude over training
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("feature FD to held-out images (lower = more realistic)")
    ax.set_ylabel(f"memorized samples (%, nearest / second < {MEMORIZATION_THRESHOLD:.2f})")
    ax.set_title("Memorization against quality over training\n(each seed a line; bars: 95% intervals)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memorization_vs_quality.png", dpi=120)
    plt.close(fig)

    save_galleries(finals, modes, out)


def save_galleries(finals: dict, modes: list[str], out: Path) -> None:
    """neighbours_<mode>.png: (generated | nearest training image) pairs of the mode's first
    seed, most copied first."""
    from PIL import Image
    from torchvision.utils import make_grid

    for mode in modes:
        first = next(result for (m, _), result in finals.items() if m == mode)
        pairs = np.stack([image if image.ndim == 3 else image[..., None] for image, _ in first.pairs(16)])
        grid = make_grid(torch.from_numpy(pairs).permute(0, 3, 1, 2), nrow=4, padding=2, pad_value=255).permute(1, 2, 0).numpy()
        image = Image.fromarray(grid)
        image.resize((image.width * 3, image.height * 3), Image.Resampling.NEAREST).save(out / f"neighbours_{mode}.png")


def summarize_fine_tunes(results: pd.DataFrame) -> pd.DataFrame:
    """Per mode at the last evaluation point: copies pooled over seeds with their Wilson
    interval, and mean and spread over seeds of each measure."""
    final = results[results.step == results.groupby(["mode", "seed"]).step.transform("max")]
    metrics = ["copy_fraction", "memorized_fraction", "mean_similarity", "clip_score", "fid"]
    table = final.groupby("mode", sort=False)[metrics].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    pooled = final.groupby("mode", sort=False)[["copy_count", "num_samples"]].sum()
    table["copies"], table["samples"] = pooled.copy_count, pooled.num_samples
    intervals = [proportion_interval(int(c), int(n)) for c, n in zip(pooled.copy_count, pooled.num_samples)]
    table["copies_low"], table["copies_high"] = [low for low, _ in intervals], [high for _, high in intervals]
    table["step"] = final.groupby("mode", sort=False).step.max()
    table["seeds"] = final.groupby("mode", sort=False).seed.nunique()
    return table.reset_index()


def plot_fine_tunes(summary: pd.DataFrame, finals: dict, experiment: Experiment, out: Path) -> None:
    modes = [m for m in experiment.labels if m in set(summary["mode"])]
    stats = summary.set_index("mode").reindex(modes)
    share, threshold = stats.copies / stats.samples * 100, experiment.base.text2image.copy_threshold
    save_bars(modes, share, [share - stats.copies_low * 100, stats.copies_high * 100 - share],
              f"generations with similarity > {threshold:g} (%)",
              "Copies at equal steps (seeds pooled; bars: 95% Wilson intervals)", out / "copies_bar.png")
    save_histograms(finals, modes, "similarity", threshold, "similarity to nearest training image",
                    out / "similarity_histograms.png")
    save_galleries(finals, modes, out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_bars(modes: list[str], heights, errors, ylabel: str, title: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(modes, heights, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_histograms(finals: dict, modes: list[str], column: str, threshold: float, xlabel: str, path: Path) -> None:
    """One histogram per mode of a per-sample column of its final evaluations, over [0, 1]
    (or from the lowest value when below 0), with the threshold drawn."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(modes), figsize=(3 * len(modes), 2.8), sharey=True)
    for ax, mode in zip(np.atleast_1d(axes), modes):
        values = np.concatenate([result.table[column].to_numpy() for (m, _), result in finals.items() if m == mode])
        ax.hist(values, bins=np.linspace(min(0.0, values.min()), 1, 26), color="#55a868")
        ax.axvline(threshold, color="#c44e52", linestyle="--")
        ax.set_title(mode)
        ax.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _device_line(seconds: float) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads, {platform.machine()})"
    return f"- device: {device}; run time {seconds / 60:.1f} min"


def write_fine_tune_report(results: pd.DataFrame, summary: pd.DataFrame, experiment: Experiment, out: Path,
                           seconds: float) -> None:
    base, evaluation = experiment.base, experiment.evaluation()
    settings = base.text2image
    clip, fid = results.clip_score.notna().any(), results.fid.notna().any()
    fid_note = next((note for note in results.fid_message.dropna() if note), "")
    columns = ["mode", "copies", "samples", "copies_low", "copies_high", "copy_fraction_std", "memorized_fraction_mean",
               "mean_similarity_mean", "clip_score_mean", "clip_score_std", "fid_mean", "step", "seeds"]
    text = [f"# Experiment: {', '.join(experiment.labels)} (text-to-image fine-tune)", "",
            f"- data: {base.data.source}, {int(results.num_training.iloc[0])} captioned images at "
            f"{base.data.resolution}x{base.data.resolution}; pipeline {base.model.pretrained}, "
            + (f"LoRA rank {settings.lora_rank}" if settings.lora_rank else "full UNet"),
            *[f"- variant {label}: {mode} with {', '.join(values) or 'no changes'}"
              for label, (mode, values) in experiment.variants.items()],
            f"- equal compute: {experiment.steps} optimizer steps of batch {base.train.batch_size} per method, "
            f"{experiment.rounds} rounds, K = {experiment.num_shards}",
            f"- seeds: {', '.join(map(str, experiment.seeds))}; {experiment.num_samples} generations per evaluation from "
            f"training captions ({settings.images_per_caption} per caption, the same captions for every method of a seed), "
            f"{base.eval.sampler} {experiment.sample_steps} steps, guidance {settings.guidance_scale:g}, "
            f"{'EMA' if evaluation['use_ema'] else 'raw averaged'} weights",
            f"- copies: similarity > {settings.copy_threshold:g} to the nearest training image in "
            f"{results.measure.iloc[0]}; memorized: distance ratio < {base.eval.memorization_threshold:.3g} in that space",
            f"- CLIP score: {'100 x max(cos, 0) with ' + Path(settings.clip_model).name if clip else 'not measured (no text2image.clip_model)'}; "
            f"FID: {f'{base.eval.fid_dims}-d Inception features against the training images' if fid else 'not measured'}"
            + (f" ({fid_note})" if fid_note else ""),
            f"- command: `python -m iet_core.experiments {' '.join(sys.argv[1:])}`",
            _device_line(seconds), "",
            summary[[c for c in columns if c in summary]].to_markdown(index=False, floatfmt=".3f"), "",
            "![copies](copies_bar.png)", "", "![similarities](similarity_histograms.png)", ""]
    text += [f"![{mode}](neighbours_{mode}.png)" for mode in experiment.labels if mode in set(results["mode"])]
    atomic_write(out / "report.md", "\n".join(text) + "\n")


def plot_seed(ax, run: pd.DataFrame, style: str, colour: str, label: str | None) -> None:
    """One seed's evaluation points over training, with their intervals where recorded."""
    x, y = run["feature_fd"].to_numpy(), run["memorized_fraction"].to_numpy() * 100
    ax.plot(x, y, style, marker="o", markersize=3, linewidth=0.8, color=colour, label=label)
    if {"feature_fd_low", "memorized_low"} <= set(run.columns):
        # rounding can put a bound a hair inside its value
        ax.errorbar(x, y, xerr=np.maximum([x - run["feature_fd_low"], run["feature_fd_high"] - x], 0),
                    yerr=np.maximum([y - run["memorized_low"] * 100, run["memorized_high"] * 100 - y], 0),
                    fmt="none", ecolor=colour, elinewidth=0.6, alpha=0.5, capsize=1.5)


def write_report(results: pd.DataFrame, summary: pd.DataFrame, experiment: Experiment, out: Path,
                 seconds: float, accuracy: float) -> None:
    columns = ["mode", "memorized_fraction_mean", "memorized_fraction_std", "distance_share_mean", "mq_share_mean", "feature_fd_mean",
               "feature_fd_std", "heldout_l2_mean", "mean_l2_nearest_mean", "memorized_at_equal_quality", "equal_quality_step"]
    base, evaluation = experiment.base, experiment.evaluation()
    text = [f"# Experiment: {', '.join(experiment.labels)}", "",
            f"- data: {base.data.source}, {base.data.subset} images at {base.data.resolution}x{base.data.resolution}, "
            f"{base.data.channels} channel(s); model preset {base.model.preset}",
            *[f"- variant {label}: {mode} with {', '.join(settings) or 'no changes'}"
              for label, (mode, settings) in experiment.variants.items()],
            f"- equal compute: {experiment.steps} optimizer steps of batch {base.train.batch_size} per method "
            f"({experiment.steps * base.train.batch_size:,} sample visits), {experiment.rounds} rounds, K = {experiment.num_shards}",
            f"- seeds: {', '.join(map(str, experiment.seeds))}; {experiment.num_samples} samples per evaluation, DDIM {experiment.sample_steps} steps",
            f"- evaluation, the same for every method: {'EMA' if evaluation['use_ema'] else 'raw averaged'} weights, "
            f"flip-aware {evaluation['flip_aware']}, images resized with {base.data.resize_filter}; copies by three "
            f"criteria: ratio (nearest / second < {base.eval.memorization_threshold:.3g}), distance (L2 below the "
            f"{base.eval.distance_quantile:g} quantile of training nearest-other distances), MQ < {base.eval.mq_threshold:.3g}; "
            "results.csv has each share's 95% Wilson interval and feature FD's 95% bootstrap interval",
            f"- quality: feature FD and held-out L2 against {experiment.heldout} held-out images "
            f"(classifier accuracy on them {accuracy:.2f}); see iet_core/quality.py",
            f"- command: `python -m iet_core.experiments {' '.join(sys.argv[1:])}`",
            _device_line(seconds), "",
            summary[[c for c in columns if c in summary]].to_markdown(index=False, floatfmt=".3f"), "",
            "![memorization](memorization_bar.png)", "", "![histograms](ratio_histograms.png)", "",
            "![memorization vs quality](memorization_vs_quality.png)", ""]
    text += [f"![{mode}](neighbours_{mode}.png)" for mode in experiment.labels if mode in set(results["mode"])]
    atomic_write(out / "report.md", "\n".join(text) + "\n")


def read_overlays(paths: list[str]) -> dict[str, pd.DataFrame]:
    overlays = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"--overlay {path}: no such file; give the results.csv of another experiment.")
        frame = pd.read_csv(path)
        if not {"mode", "step", "memorized_fraction", "feature_fd"} <= set(frame.columns):
            raise ConfigError(f"--overlay {path} is not an experiment's results.csv (mode, step, memorized_fraction, feature_fd).")
        overlays[path.parent.name] = frame
    return overlays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iet_core.experiments", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per method (equal compute)")
    parser.add_argument("--eval-points", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=512, help="samples per evaluation point (512: +-4 points)")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--heldout", type=int, default=500)
    parser.add_argument("--classifier-steps", type=int, default=300)
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=MODE[,SECTION.NAME=VALUE...]",
                        help="an extra method, e.g. ddpm+agc=ddpm,method.agc.enabled=true (repeatable)")
    parser.add_argument("--overlay", action="append", default=[], metavar="RESULTS_CSV",
                        help="draw another experiment's curves (its results.csv) in the quality plot (repeatable)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: evaluate the checkpoints matching runs in --out have so far")
    args = parser.parse_args(argv)
    try:
        base = config_from_args(args)  # --shards sets K for the IET modes (default 4)
        shards = base.method.num_shards if base.method.num_shards > 1 else 4
        variants = {}
        for item in args.variant:
            label, _, spec = item.partition("=")
            mode, *settings = spec.split(",")
            if not label or not mode:
                raise ConfigError(f"--variant {item!r}: write LABEL=MODE[,section.name=value...], "
                                  "e.g. ddpm+agc=ddpm,method.agc.enabled=true.")
            variants[label.strip()] = (mode.strip(), tuple(settings))
        experiment = Experiment(base=base, modes=tuple(args.modes), seeds=tuple(args.seeds), num_shards=shards,
                                steps=args.steps, rounds=base.train.rounds, eval_points=args.eval_points,
                                num_samples=args.num_samples, sample_steps=args.sample_steps, heldout=args.heldout,
                                classifier_steps=args.classifier_steps, variants=variants,
                                train=not args.report_only, overlays=read_overlays(args.overlay))
        run_experiment(experiment, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
