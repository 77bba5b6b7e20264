"""Memorization against quality for the fair test (docs/results.md, section 1). Each point is one
evaluation (512 samples, raw weights); each seed its own line.

Left: the share of samples the 1/3 rule calls memorized, with its 95% Wilson interval. Right: a
measure with no threshold, the mean distance from a sample to its nearest training image over the
mean distance to its nearest held-out image. Real images the model never saw score the dashed
line (computed here from the same data); a model that copies scores far below it.

    python docs/results/plot_fair_test.py   # reads fair-test*.csv and cifar-test.csv, writes the .png beside them
"""
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


def plot(results: pd.DataFrame, reference: float, title: str, out: Path, quality: str = "feature_fd") -> None:
    """Memorization (left) and the threshold-free ratio (right) against a quality measure."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (label, runs) in zip(colours, results.groupby("label", sort=False)):
        for seed, run in runs.groupby("seed"):
            marker = MARKERS[int(seed) % len(MARKERS)]
            run = run.sort_values("step")
            share = run["memorized_fraction"] * 100
            bounds = np.array([proportion_interval(round(f * n), n) for f, n in zip(run["memorized_fraction"], run["num_samples"])])
            name = f"{label}, seed {seed}"
            left.errorbar(run[quality], share, yerr=[share - 100 * bounds[:, 0], 100 * bounds[:, 1] - share],
                          marker=marker, color=colour, capsize=3, label=name)
            right.plot(run[quality], run["mean_l2_nearest"] / run["heldout_l2"], marker=marker, color=colour, label=name)
            for _, row in run.iterrows():
                left.annotate(f"{row.step / 1000:.0f}k", (row[quality], row.memorized_fraction * 100),
                              textcoords="offset points", xytext=(4, 4), fontsize=7)
    right.axhline(reference, color="grey", linestyle="--", label=f"real images never trained on ({reference:.2f})")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(QUALITY[quality])
    left.set_ylabel("memorized by the 1/3 rule, % of 512 (95% interval)")
    right.set_ylabel("nearest training L2 / nearest held-out L2\n(lower = closer to its training images)")
    left.set_title(title, fontsize=10)
    right.set_title("The same samples, no threshold", fontsize=10)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the plot: it covered the curves
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


digits = demo_config("ddpm").data
plot(pd.read_csv(here / "fair-test.csv"), unseen_reference(digits),
     "64 digits, K = 4 class-balanced, raw weights\n3,000 steps per run (two IET-AGC seeds also to 6,000)", here / "fair-test.png")
plot(pd.read_csv(here / "fair-test-8px.csv"), unseen_reference(replace(digits, resolution=8)),
     "64 digits at 8x8 (the classroom demo's regime), K = 4 class-balanced, raw weights\n3,000 steps per run; "
     "quality by held-out L2 (feature FD is erratic at 8x8)", here / "fair-test-8px.png", quality="heldout_l2")
cifar = replace(digits, source="../shared/data/cifar10_test_subset.npz", channels=3)
if Path(cifar.source).exists():  # the shared data sit beside the repository, not in it
    plot(pd.read_csv(here / "cifar-test.csv"), unseen_reference(cifar),
         "64 CIFAR-10 images at 16x16, K = 4 class-balanced, raw weights\n3,000 steps per run", here / "cifar-test.png")
