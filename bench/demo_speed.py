"""How fast can the classroom demo be? Two measurements:

1. `steps` (default): the choices for the demo side by side in one process, interleaved
   round-robin so that machine load hits them alike: model preset, resolution, batch size and
   torch.compile, each timed on the trainer's own step (the baseline's; IET-AGC's costs the same
   to within a few percent, see bench/train_step.py), plus the per-round extras (preview
   samples, checkpoint). Prints per-step medians, ratios to the current demo and the demo's
   projected time (both runs) for each choice and a few step budgets.
2. `--until-memorized`: trains the demo baseline (with the chosen settings) and checks every
   few rounds how many of 64 samples are memorized; prints the training time until the share
   passes 50% (evaluation time not counted).

    python bench/demo_speed.py --repeats 20 --choices demo 12px 8px batch32 compile
    python bench/demo_speed.py --until-memorized --resolution 16 --check-every 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iet_core.config import demo_config  # noqa: E402
from iet_core.evaluate import evaluate_images  # noqa: E402
from iet_core.sample import generate  # noqa: E402
from iet_core.telemetry import CheckpointEvent  # noqa: E402
from iet_core.train import Trainer, TrainControl, create_run, train  # noqa: E402

# name: (preset, resolution, batch size, torch.compile); "demo" is today's demo
CHOICES = {
    "demo": ("tiny", 16, 64, False),
    "compile": ("tiny", 16, 64, True),
    "12px": ("tiny", 12, 64, False),
    "8px": ("tiny", 8, 64, False),
    "batch32": ("tiny", 16, 32, False),
}


def demo(mode: str, preset: str, resolution: int, batch_size: int, compile_: bool, device: str):
    config = demo_config(mode)
    config.model.preset, config.data.resolution = preset, resolution
    config.train.batch_size, config.train.compile, config.train.device = batch_size, compile_, device
    return config


def step_times(args) -> dict:
    choices = {name: CHOICES[name] for name in args.choices}
    with tempfile.TemporaryDirectory() as tmp:
        trainers, steps = {}, {}
        for name, choice in choices.items():
            run, dataset = create_run(demo("ddpm", *choice, args.device), Path(tmp) / str(len(trainers)))
            trainer = trainers[name] = Trainer(run, dataset)
            trainer._start_round()
            trainer.flat.bind(trainer.weights[0], trainer.grads[0])
            steps[name] = lambda t=trainer, b=choice[2]: t._step([0], torch.randint(0, len(t.images), (1, b)))
        times = {name: [] for name in choices}
        for i in range(args.warmup + args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        extras = {}
        for name, trainer in trainers.items():  # what each round adds: previews and a checkpoint
            start = time.perf_counter()
            trainer._write_preview()
            preview = time.perf_counter() - start
            start = time.perf_counter()
            trainer.save_checkpoint()
            extras[name] = {"preview_s": preview, "checkpoint_s": time.perf_counter() - start}
    return {name: {"median_ms": 1000 * statistics.median(t), **extras[name]} for name, t in times.items()}


def until_memorized(args) -> dict:
    """Train the demo baseline; every check_every rounds, sample 64 images from the raw weights
    and stop once more than half are memorized."""
    config = demo("ddpm", args.preset, args.resolution, args.batch_size, args.compile, args.device)
    config.train.checkpoint_every_rounds, config.train.rounds = args.check_every, args.max_rounds
    control, found, evaluating = TrainControl(), [], [0.0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run, dataset = create_run(config, Path(tmp))

        def check(event) -> None:
            if not isinstance(event, CheckpointEvent) or found:
                return
            begin = time.perf_counter()
            unet = run.load_unet(ema=False, checkpoint=Path(event.path))
            samples = generate(unet, run.scheduler(), 64, steps=20, seed=0)
            share = evaluate_images(samples, dataset, config.eval).summary["memorized_fraction"]
            evaluating[0] += time.perf_counter() - begin
            seconds = time.perf_counter() - started - evaluating[0]
            print(f"step {event.global_step}: {100 * share:.0f}% memorized after {seconds:.0f} s of training", flush=True)
            if share > 0.5:
                found.append({"global_step": event.global_step, "train_seconds": seconds, "memorized": share})
                control.stop()

        train(run=run, dataset=dataset, resume=True, sinks=[check], control=control)
    return found[0] if found else {"global_step": None, "note": f"not 50% memorized within {args.max_rounds} rounds"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--until-memorized", action="store_true", help="time the baseline until 50%% of samples are memorized")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--check-every", type=int, default=3, help="rounds between memorization checks")
    parser.add_argument("--max-rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile compiles there)")
    parser.add_argument("--choices", nargs="+", default=list(CHOICES), choices=list(CHOICES), metavar="CHOICE",
                        help="which to time, the first as the reference (default: all; compile takes minutes to compile on a CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="bench/results/demo_speed.json")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.until_memorized:
        result = until_memorized(args)
        print(json.dumps(result))
    else:
        rows = step_times(args)
        base = rows[args.choices[0]]["median_ms"]
        rounds = demo_config("ddpm").train.rounds
        print(f"{args.repeats} interleaved steps per choice on {args.device} ({threads} threads); "
              "projected: both demo runs, steps x step time + rounds x (preview + checkpoint)")
        for name, row in rows.items():
            row["ratio_to_demo"] = row["median_ms"] / base
            extra = rounds * (row["preview_s"] + row["checkpoint_s"])
            row["projected_min"] = {steps: 2 * (steps * row["median_ms"] / 1000 + extra) / 60 for steps in (3000, 2000, 1500)}
            projected = "  ".join(f"{s} steps {m:4.1f} min" for s, m in row["projected_min"].items())
            print(f"{name:8s} {'-'.join(map(str, CHOICES[name]))}  {row['median_ms']:7.1f} ms/step  x{row['ratio_to_demo']:.2f}  "
                  f"preview {row['preview_s']:.2f} s, checkpoint {row['checkpoint_s']:.2f} s per round  | {projected}")
        result = {"device": args.device, "threads": threads, "repeats": args.repeats, "choices": rows}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **result}, indent=2))


if __name__ == "__main__":
    main()
