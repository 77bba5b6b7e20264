"""What the quality figure adds to an evaluation in the app: the classroom recipe's data and
model (one short round of training: the timing does not depend on how well it learned), evaluated
as the Memorization page does (64 samples, DDIM 50 steps, raw weights). The first evaluation on
a dataset trains the quality classifier (then cached); later ones only measure. Prints each
stage's seconds and quality's share of the evaluation for the first and a later evaluation.

    python bench/quality_cost.py --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iet_core import quality  # noqa: E402
from iet_core.config import EvalConfig, recipe_config  # noqa: E402
from iet_core.evaluate import evaluate_run  # noqa: E402
from iet_core.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="evaluations after the first")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        config = recipe_config("classroom", "ddpm")
        config.train.rounds, config.train.local_epochs, config.train.preview_samples = 1, 1, 0
        run = train(config, runs_root=Path(folder) / "runs")
        eval_config = EvalConfig(num_samples=args.num_samples)
        shares = []
        for i in range(args.repeats + 1):
            seconds = evaluate_run(run, eval_config, save=False).summary["seconds"]
            shares.append(seconds["quality"] / sum(seconds.values()))
            print(json.dumps({"evaluation": i, **{k: round(v, 3) for k, v in seconds.items()},
                              "quality_share": round(shares[-1], 3)}))
            quality._meters.clear()  # each later evaluation as in a new process: the classifier from the cache file
            quality._heldout_sets.clear()
        print(f"quality's share of an evaluation: {100 * shares[0]:.0f}% the first time on a dataset (classifier "
              f"trained), median {100 * statistics.median(shares[1:]):.0f}% afterwards (classifier read from the cache)")


if __name__ == "__main__":
    main()
