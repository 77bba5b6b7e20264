"""Memorization against quality for the fair test (docs/results.md, section 1): each point one
evaluation (512 samples, raw weights), with its 95% Wilson interval on the memorized share.

    python docs/results/plot_fair_test.py   # reads docs/results/fair-test.csv, writes fair-test.png
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from iet_core.metrics import proportion_interval  # noqa: E402

here = Path(__file__).resolve().parent
results = pd.read_csv(here / "fair-test.csv")
fig, ax = plt.subplots(figsize=(7, 4.5))
for label, run in results.groupby("label", sort=False):
    run = run.sort_values("step")
    share = run["memorized_fraction"] * 100
    bounds = [proportion_interval(round(f * n), n) for f, n in zip(run["memorized_fraction"], run["num_samples"])]
    low = share - [100 * b[0] for b in bounds]
    high = [100 * b[1] for b in bounds] - share
    ax.errorbar(run["feature_fd"], share, yerr=[low, high], marker="o", capsize=3, label=label)
    for _, row in run.iterrows():
        ax.annotate(f"{row.step // 1000}k", (row.feature_fd, row.memorized_fraction * 100), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
ax.set_xscale("log")
ax.set_xlabel("feature FD to 500 held-out digits (lower is better; log scale)")
ax.set_ylabel("memorized, % of 512 samples (95% interval)")
ax.set_title("Fair test: K = 4 class-balanced, raw weights, equal compute (seed 0)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(here / "fair-test.png", dpi=110)
