"""Memorization against quality for the fair test (docs/results.md, section 1). Each point is one
evaluation (512 samples, raw weights); each seed its own line; one column per local-step setting,
each with the baseline.

Top: the share of samples the 1/3 rule calls memorized, with its 95% Wilson interval. Bottom: a
measure with no threshold, the mean distance from a sample to its nearest training image over the
mean distance to its nearest held-out image. Real images the model never saw score the dashed
line (computed here from the same data); a model that copies scores far below it.

    python docs/results/plot_fair_test.py   # reads fair-test*.csv and cifar-test.csv, writes the .png beside them
"""
import re
from dataclasses import replace
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from iet_core.config import demo_config  # noqa: E402
from iet_core.data import load_dataset  # noqa: E402
from iet_core.metrics import proportion_interval  # noqa: E402
from iet_core.neighbours import nearest_neighbours  # noqa: E402
from iet_core.quality import heldout_set  # noqa: E402

here = Path(__file__).resolve().parent
MARKERS = "os^D"  # one per seed


def unseen_reference(data) -> float:
    """Nearest-training over nearest-held-out L2 for up to 512 real images outside both sets."""
    training = load_dataset(data)
    heldout = heldout_set(data, training.ids)
    everything = load_dataset(replace(data, subset=None))
    used = np.concatenate([training.ids.numpy(), heldout.ids.numpy()])
    unseen_ids = np.flatnonzero(~np.isin(everything.ids.numpy(), used))
    unseen = everything.select(np.random.default_rng(1).choice(unseen_ids, min(512, len(unseen_ids)), replace=False))
    to_training = nearest_neighbours(unseen.images, training.images, k=1).l2[:, 0].mean()
    return float(to_training / nearest_neighbours(unseen.images, heldout.images, k=1).l2[:, 0].mean())


QUALITY = {"feature_fd": "feature FD to 500 held-out images (lower is better; log scale)",
           "heldout_l2": "mean L2 to the nearest held-out image (lower is better; log scale)"}
TICKS = {"feature_fd": [0.5, 1, 1.5, 2, 3, 5, 10, 20, 30], "heldout_l2": [1.0, 1.1, 1.2, 1.3, 1.5, 2, 2.5, 3, 4, 5]}


def panels_of(results: pd.DataFrame) -> dict[str, list[str]]:
    """The labels drawn in each column: IET and IET-AGC runs by their local steps per round, each
    column with the plain baseline, and a baseline variant ("DDPM (K = 1), dropout 0.1") beside
    the runs that share its variant."""
    labels = list(dict.fromkeys(results["label"]))
    baselines = [label for label in labels if label.startswith("DDPM")]
    columns: dict[str, list[str]] = {}
    for label in labels:
        if label not in baselines:
            steps = results.loc[results["label"] == label, "local_steps"].iloc[0]
            columns.setdefault(f"{steps:.0f} local steps per round" if pd.notna(steps) else "", []).append(label)
    for name, runs in columns.items():
        variants = [b for b in baselines if "," not in b or any(b.split(", ", 1)[1] in run for run in runs)]
        columns[name] = variants + runs
    return columns


def colours(results: pd.DataFrame) -> dict[str, str]:
    """A colour per label of one column: the baseline black (its variants grey), IET blue, IET-AGC
    orange, and each variant of them (dropout, a longer run, another L) its own."""
    spare = iter(["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    plain = {"ddpm": "black", "iet": "tab:blue", "iet-agc": "tab:orange", "iet-agc+": "tab:purple"}
    chosen: dict[str, str] = {}
    for label, mode in results.groupby("label", sort=False)["mode"].first().items():
        is_plain = label == "DDPM (K = 1)" or re.search(r", L = \d+ \(\d+ rounds?\)$", label) is not None
        if is_plain and plain[mode] not in chosen.values():
            chosen[label] = plain[mode]
        else:
            chosen[label] = "grey" if mode == "ddpm" else next(spare)
    return chosen


def plot(results: pd.DataFrame, reference: float, title: str, out: Path, quality: str = "feature_fd",
         by_local_steps: bool = True) -> None:
    """Memorization (top) and the threshold-free ratio (bottom) against a quality measure, one
    column per local-step setting (or one column for everything)."""
    columns = panels_of(results) if by_local_steps else {"": list(dict.fromkeys(results["label"]))}
    fig, axes = plt.subplots(2, len(columns), figsize=(max(4.6 * len(columns) + 1.5, 8), 9), squeeze=False, sharex=True, sharey="row")
    for (name, labels), top, bottom in zip(columns.items(), axes[0], axes[1]):
        colour_of = colours(results[results["label"].isin(labels)])
        for label in labels:
            colour = colour_of[label]
            runs = results[results["label"] == label]
            for seed, run in runs.groupby("seed"):
                marker = MARKERS[int(seed) % len(MARKERS)]
                run = run.sort_values("step")
                share = run["memorized_fraction"] * 100
                bounds = np.array([proportion_interval(round(f * n), n) for f, n in zip(run["memorized_fraction"], run["num_samples"])])
                top.errorbar(run[quality], share, yerr=[share - 100 * bounds[:, 0], 100 * bounds[:, 1] - share],
                             marker=marker, color=colour, capsize=3, label=label if seed == runs["seed"].min() else None)
                bottom.plot(run[quality], run["mean_l2_nearest"] / run["heldout_l2"], marker=marker, color=colour)
                for _, row in run.iterrows():
                    top.annotate(f"{row.step / 1000:.0f}k", (row[quality], row.memorized_fraction * 100),
                                 textcoords="offset points", xytext=(4, 4), fontsize=7)
        bottom.axhline(reference, color="grey", linestyle="--", label=f"real images never trained on ({reference:.2f})")
        seeds = [plt.Line2D([], [], color="grey", marker=MARKERS[int(seed) % len(MARKERS)], linestyle="", label=f"seed {seed}")
                 for seed in sorted(results["seed"].unique())]
        top.legend(handles=top.get_legend_handles_labels()[0] + seeds, fontsize=7, loc="upper right")
        bottom.legend(fontsize=7, loc="lower right")
        top.set_title(name, fontsize=10)
        bottom.set_xlabel(QUALITY[quality])
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(TICKS[quality]))
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0, 0].set_ylabel("memorized by the 1/3 rule, % of 512 (95% interval)")
    axes[1, 0].set_ylabel("nearest training L2 / nearest held-out L2\n(lower = closer to its training images; no threshold)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)

digits = demo_config("ddpm").data
plot(pd.read_csv(here / "fair-test.csv"), unseen_reference(digits),
     "64 digits at 16x16, K = 4 class-balanced, raw weights, 3,000 steps per run (two IET-AGC seeds of L = 62 also to 6,000)",
     here / "fair-test.png")
plot(pd.read_csv(here / "fair-test-8px.csv"), unseen_reference(replace(digits, resolution=8)),
     "64 digits at 8x8 (the classroom demo's regime)\nK = 4 class-balanced, raw weights, 3,000 steps per run "
     "(baseline, IET-AGC and IET also to 6,000)\nquality by held-out L2 (feature FD is erratic at 8x8)", here / "fair-test-8px.png", quality="heldout_l2")
cifar = replace(digits, source="../shared/data/cifar10_test_subset.npz", channels=3)
if Path(cifar.source).exists():  # the shared data sit beside the repository, not in it
    plot(pd.read_csv(here / "cifar-test.csv"), unseen_reference(cifar),
         "64 CIFAR-10 images at 16x16, K = 4 class-balanced, raw weights\n3,000 steps per run", here / "cifar-test.png",
         by_local_steps=False)
