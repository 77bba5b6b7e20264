"""How fast can the classroom demo be, with a baseline that still copies?

The demo is the Start page's (the `classroom` recipe). Three measurements, all usable on a busy
machine:

1. `steps` (default): the choices for the demo side by side in one process, interleaved
   round-robin so that machine load hits them alike: model preset, resolution, batch size and
   torch.compile, each timed on the trainer's own step (the baseline's; IET-AGC's costs the same
   to within a few percent, see bench/train_step.py), plus what each round adds (preview
   samples, a checkpoint) and the automatic evaluation at the end. Prints where a demo run's
   time goes, and each choice's projected idle demo time (both runs) at a few step budgets:
   today's demo measured from the click on 2 idle cores (--idle-demo-minutes), times the
   choice's cost ratio to it.
2. `--until-memorized`: trains one demo run (`--mode`, `--seed`, the chosen settings) and
   evaluates it every few rounds as the demo's automatic evaluation does (64 DDIM-50 samples
   from the raw weights, the 1/3 rule); prints the step (deterministic for a seed) and the
   training time at which more than half of the samples are memorized; --keep-going traces the
   whole curve.
3. `--side-by-side`: the demo's two runs trained one after the other on all CPU threads against
   both at once, each on its share of the threads, as the app trains them.

    python bench/demo_speed.py --repeats 20 --extra-repeats 3 --choices demo 16px 12px
    python bench/demo_speed.py --until-memorized --keep-going --seed 0 --check-every 1 --max-rounds 30
    python bench/demo_speed.py --side-by-side --repeats 30
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iet_core.config import recipe_config  # noqa: E402
from iet_core.evaluate import evaluate_images, evaluate_run  # noqa: E402
from iet_core.jobs import CPU_THREADS, use_cpu_share  # noqa: E402
from iet_core.sample import generate  # noqa: E402
from iet_core.telemetry import CheckpointEvent  # noqa: E402
from iet_core.train import Trainer, TrainControl, create_run, train  # noqa: E402

CLASSROOM = recipe_config("classroom")
STEPS_PER_ROUND = CLASSROOM.train.steps_for_shard(CLASSROOM.data.subset)  # the baseline's; IET-AGC's K proxies share as many
# name: (preset, resolution, batch size, torch.compile); "demo" is today's demo (8x8, the digits'
# own size), "16px" the demo before it
DEMO = (CLASSROOM.model.preset, CLASSROOM.data.resolution, CLASSROOM.train.batch_size, CLASSROOM.train.compile)
CHOICES = {
    "demo": DEMO,
    "compile": (*DEMO[:3], True),
    "16px": ("tiny", 16, 64, False),
    "12px": ("tiny", 12, 64, False),
    "batch32": (*DEMO[:2], 32, False),
}


def demo(mode: str, preset: str, resolution: int, batch_size: int, compile_: bool, device: str):
    """The classroom demo's run (the recipe the Start page's demo uses) with one choice changed."""
    config = recipe_config("classroom", mode)
    config.model.preset, config.data.resolution = preset, resolution
    config.train.batch_size, config.train.compile, config.train.device = batch_size, compile_, device
    return config


def demo_step(choice: tuple, root: Path, device: str) -> tuple[Trainer, Callable[[], None]]:
    """A trainer for the demo's baseline with one choice changed, and one training step of it."""
    run, dataset = create_run(demo("ddpm", *choice, device), root)
    trainer = Trainer(run, dataset)
    trainer._start_round()
    trainer.flat.bind(trainer.weights[0], trainer.grads[0])
    return trainer, lambda: trainer._step([0], torch.randint(0, len(trainer.images), (1, choice[2])))


def step_times(args) -> dict:
    """Per choice: the median step, and the medians of what each round adds (preview samples, a
    checkpoint) and of the automatic evaluation at the end (sampling, copies, quality), all
    interleaved round-robin so that machine load hits the choices alike."""
    choices = {name: CHOICES[name] for name in args.choices}
    with tempfile.TemporaryDirectory() as tmp:
        trainers, steps = {}, {}
        for name, choice in choices.items():
            trainers[name], steps[name] = demo_step(choice, Path(tmp) / name, args.device)
        times = {name: [] for name in choices}
        for i in range(args.warmup + args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        extras = {name: {"preview_s": [], "checkpoint_s": [], "eval_s": []} for name in choices}
        for _ in range(args.extra_repeats):
            for name, trainer in trainers.items():
                for key, work in (("preview_s", trainer._write_preview), ("checkpoint_s", trainer.save_checkpoint),
                                  ("eval_s", lambda t=trainer: evaluate_run(t.run, save=False, device=args.device))):
                    start = time.perf_counter()
                    work()
                    extras[name][key].append(time.perf_counter() - start)
    return {name: {"median_ms": 1000 * statistics.median(t),
                   **{key: statistics.median(values) for key, values in extras[name].items()}}
            for name, t in times.items()}


def side_by_side(args) -> dict:
    """The demo's two runs (one choice, `--choices`' first) trained one after the other on all of
    torch's CPU threads, against both at once in two threads on their share each, as the app's
    JobManager trains them: seconds per step of both runs, the two ways interleaved so that
    machine load hits them alike."""
    choice = CHOICES[args.choices[0]]
    with tempfile.TemporaryDirectory() as tmp:
        steps = [demo_step(choice, Path(tmp) / str(i), args.device)[1] for i in range(2)]

        def train(step, threads: int) -> None:
            use_cpu_share(threads)
            for _ in range(args.repeats):
                step()

        def after_other() -> None:
            for step in steps:
                train(step, CPU_THREADS)

        def at_once() -> None:
            workers = [threading.Thread(target=train, args=(step, max(1, CPU_THREADS // 2))) for step in steps]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()

        times = {"one after the other": [], "side by side": []}
        for i in range(args.warmup + 3):
            for name, work in (("one after the other", after_other), ("side by side", at_once)):
                start = time.perf_counter()
                work()
                if i >= args.warmup:
                    times[name].append((time.perf_counter() - start) / args.repeats)
        use_cpu_share(CPU_THREADS)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    return {"choice": args.choices[0], "cpu_threads": CPU_THREADS, "seconds_per_step_of_both": seconds,
            "speedup_side_by_side": seconds["one after the other"] / seconds["side by side"]}


def run_seconds(row: dict, steps: int) -> float:
    """One demo run: its steps, a preview and a checkpoint per round, and the evaluation."""
    rounds = steps / STEPS_PER_ROUND
    return steps * row["median_ms"] / 1000 + rounds * (row["preview_s"] + row["checkpoint_s"]) + row["eval_s"]


def until_memorized(args) -> dict:
    """Train one demo run (`--mode`, `--seed`) and, every check_every rounds, evaluate it as the
    demo's automatic evaluation does (its sample count, sampler steps and weights); stop once
    more than half of the samples are memorized, or with --keep-going trace the whole curve."""
    config = demo(args.mode, args.preset, args.resolution, args.batch_size, args.compile, args.device)
    config.train.seed, config.eval.seed = args.seed, args.seed
    config.train.checkpoint_every_rounds, config.train.rounds = args.check_every, args.max_rounds
    control, curve, evaluating = TrainControl(), [], [0.0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run, dataset = create_run(config, Path(tmp))

        def check(event) -> None:
            if not isinstance(event, CheckpointEvent):
                return
            begin = time.perf_counter()
            unet = run.load_unet(ema=config.eval.use_ema, checkpoint=Path(event.path))
            samples = generate(unet, run.scheduler(), config.eval.num_samples, sampler=config.eval.sampler,
                               steps=config.eval.steps, seed=config.eval.seed)
            share = evaluate_images(samples, dataset, config.eval).summary["memorized_fraction"]
            evaluating[0] += time.perf_counter() - begin
            seconds = time.perf_counter() - started - evaluating[0]
            curve.append({"global_step": event.global_step, "memorized": share, "train_seconds": seconds})
            print(f"step {event.global_step}: {100 * share:.0f}% of {config.eval.num_samples} memorized "
                  f"after {seconds:.0f} s of training", flush=True)
            if share > 0.5 and not args.keep_going:
                control.stop()

        train(run=run, dataset=dataset, resume=True, sinks=[check], control=control)
    passed = next((point for point in curve if point["memorized"] > 0.5), None)
    return {"mode": args.mode, "seed": args.seed, "resolution": args.resolution,
            "first_over_half": passed or f"not 50% memorized within {args.max_rounds} rounds", "curve": curve}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--until-memorized", action="store_true", help="time the baseline until 50%% of samples are memorized")
    parser.add_argument("--side-by-side", action="store_true",
                        help="time the demo's two runs one after the other against both at once (as the app trains them)")
    parser.add_argument("--mode", default="ddpm", help="--until-memorized: which demo run (iet-agc to see its contrast)")
    parser.add_argument("--seed", type=int, default=0, help="--until-memorized: training and sampling seed")
    parser.add_argument("--keep-going", action="store_true", help="--until-memorized: trace every check up to --max-rounds")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=CLASSROOM.data.resolution)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--check-every", type=int, default=3, help="rounds between memorization checks")
    parser.add_argument("--max-rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile compiles there)")
    parser.add_argument("--choices", nargs="+", default=list(CHOICES), choices=list(CHOICES), metavar="CHOICE",
                        help="which to time, the first as the reference (default: all; compile takes minutes to compile on a CPU)")
    parser.add_argument("--extra-repeats", type=int, default=3, help="times each preview, checkpoint and evaluation is measured")
    parser.add_argument("--budgets", type=int, nargs="+", default=[2000, 1500, 1200, 1000, 800], help="steps per run to project")
    parser.add_argument("--idle-demo-minutes", type=float, default=9.9,
                        help="today's demo (both runs, from the click) measured on 2 idle cores: the scale of the projection")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="bench/results/demo_speed.json")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.until_memorized:
        result = until_memorized(args)
        print(json.dumps(result))
    elif args.side_by_side:
        result = side_by_side(args)
        seconds = result["seconds_per_step_of_both"]
        print(f"The demo's two runs ({result['choice']}, {args.device}, {CPU_THREADS} threads), one step of each: one after the "
              f"other {1000 * seconds['one after the other']:.1f} ms, side by side on {max(1, CPU_THREADS // 2)} thread(s) each "
              f"{1000 * seconds['side by side']:.1f} ms: x{result['speedup_side_by_side']:.2f} faster side by side")
    else:
        rows = step_times(args)
        reference = rows[args.choices[0]]
        demo_steps = CLASSROOM.train.rounds * STEPS_PER_ROUND
        demo_seconds = run_seconds(reference, demo_steps)
        print(f"{args.repeats} interleaved steps per choice on {args.device} ({threads} threads). Where a demo run's "
              f"time goes ({args.choices[0]}, {demo_steps} steps): training {demo_steps * reference['median_ms'] / 10 / demo_seconds:.0f}%, "
              f"previews {CLASSROOM.train.rounds * reference['preview_s'] * 100 / demo_seconds:.0f}%, checkpoints "
              f"{CLASSROOM.train.rounds * reference['checkpoint_s'] * 100 / demo_seconds:.0f}%, evaluation {reference['eval_s'] * 100 / demo_seconds:.0f}%.")
        print(f"Projected idle demo (both runs): {args.idle_demo_minutes:g} min measured for today's demo, times each "
              "choice's cost ratio to it at these steps per run")
        for name, row in rows.items():
            row["ratio_to_demo"] = row["median_ms"] / reference["median_ms"]
            row["projected_idle_min"] = {steps: args.idle_demo_minutes * run_seconds(row, steps) / demo_seconds
                                         for steps in args.budgets}
            projected = "  ".join(f"{s}: {m:4.1f}" for s, m in row["projected_idle_min"].items())
            print(f"{name:8s} {'-'.join(map(str, CHOICES[name]))}  {row['median_ms']:7.1f} ms/step  x{row['ratio_to_demo']:.2f}  "
                  f"per round: preview {row['preview_s']:.2f} s, checkpoint {row['checkpoint_s']:.2f} s; "
                  f"evaluation {row['eval_s']:.1f} s  | min: {projected}")
        result = {"device": args.device, "threads": threads, "repeats": args.repeats, "choices": rows}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **result}, indent=2))


if __name__ == "__main__":
    main()
