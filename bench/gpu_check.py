"""One prepared GPU check that fits in 9 minutes on one GPU and answers every GPU question at once.

On a bare GPU machine with torch, it installs the project's missing pure-Python wheels from a
carried folder (`bash bench/gpu_prepare.sh` fetches them, and copies the CIFAR-10 subset), then
runs four parts, each in its own process and stopped at its own time budget with what it has:

1. tests: the `cuda`-marked tests (tests/test_cuda.py);
2. bench: `bench/all.py --gpu` (K = 10 round against the reference approach, AGC overhead, MFU
   in bf16, 10k x 50k neighbours, sampling throughput, K = 4 LoRA proxies side by side against
   one after another);
3. demo: the GPU demo, timed: a baseline DDPM (small preset, bf16) trained 80 s on 256 real
   CIFAR-10 images, then its memorized share;
4. pilot: the fair-regime experiment of issue 12 (K = 4 class-balanced shards, 750 local steps
   per proxy per round, raw averaged weights, 512 samples, the same flip setting for every mode),
   baseline and IET-AGC, one seed, in as many rounds as the time left allows (from the demo's speed).

Everything lands in --out ($OUT when set), 8 files: gpu_check.json (every figure), gpu_check.md
(the tables), log.txt, bench.json, and each pilot mode's report and nearest-neighbour gallery.

    python3 bench/gpu_check.py --wheels .whl --out "$OUT"      # on the GPU machine
    python bench/gpu_check.py --dry-run --out /tmp/gpu-check    # the same, tiny sizes on the CPU

The dry run runs the `cuda` tests on the CPU as a stand-in (the CUDA-only ones skip, saying why).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_NAME = "cifar10_test_subset.npz"
# Where the CIFAR-10 subset is looked for: beside the repository, or where gpu_prepare.sh copies it.
DATA_PLACES = (REPO.parent / "shared" / "data" / DATA_NAME, REPO / ".gpu-data" / DATA_NAME)
GRACE_SECONDS = 20  # after SIGINT at the budget: time to save a checkpoint and write what it has
PILOT_LOCAL_STEPS = 750  # per proxy per round: long local training, as in the reference (issue 12)
PILOT_SHARDS = 4
PILOT_MIN_ROUNDS = 3  # IET is iterative: averaging once after long local training gives noise
PILOT_MODES = ("ddpm", "iet-agc")
# The pilot's speed per mode, as a share of the demo's steps per second: a cautious guess for two
# processes sharing the GPU (a round cut short by the budget leaves nothing to evaluate).
SHARED_GPU_SPEED = 0.5
FALLBACK_STEPS_PER_SECOND = 10.0  # the pilot's sizing when the demo measured no speed
RECIPE = "gpu-small"  # the demo and the pilot start from this recipe (iet_core.config.RECIPES), then `Sizes.model`


@dataclass
class Sizes:
    """What each part runs at: the GPU sizes, or tiny ones for the dry run on the CPU."""

    budgets: dict[str, float]  # seconds per part; the pilot takes what is left of `total`
    total: float
    bench: list[str]
    model: list[str]  # the demo's and the pilot's settings over RECIPE's (section.name=value)
    demo_subset: int
    demo_seconds: float  # training time of the demo
    demo_samples: int
    demo_sample_steps: int
    pilot_subset: int
    pilot_heldout: int
    pilot_samples: int
    pilot_sample_steps: int
    pilot_classifier_steps: int
    pilot_local_steps: int
    pilot_reserve: float  # seconds of the pilot's budget not training: start-up, evaluation, report
    report_reserve: float  # seconds left after stopping the pilot's training, to evaluate its checkpoints
    size_pilot: bool  # size the pilot's rounds by the demo's speed (else one round of pilot_local_steps)
    stand_in: dict[str, str] = field(default_factory=dict)  # environment of the tests part


# A part may overrun its budget by GRACE_SECONDS, so the total leaves that much of the 9 minutes.
GPU = Sizes(budgets={"tests": 130, "bench": 110, "demo": 120}, total=500,
            bench=["--gpu"],
            model=["data.resolution=32", "data.channels=3", "train.precision=bf16", "train.device=cuda"],
            demo_subset=256, demo_seconds=80, demo_samples=256, demo_sample_steps=50,
            pilot_subset=600, pilot_heldout=246, pilot_samples=512, pilot_sample_steps=50, pilot_classifier_steps=300,
            pilot_local_steps=PILOT_LOCAL_STEPS, pilot_reserve=80, report_reserve=40, size_pilot=True)
DRY_RUN = Sizes(budgets={"tests": 300, "bench": 300, "demo": 300}, total=1500,
                bench=["--smoke", "--repeats", "1"],
                model=["model.preset=tiny", "data.resolution=8", "data.channels=3", "train.batch_size=8",
                       "train.lr=1e-3", "train.device=cpu"],
                demo_subset=32, demo_seconds=2, demo_samples=16, demo_sample_steps=5,
                pilot_subset=40, pilot_heldout=20, pilot_samples=16, pilot_sample_steps=2, pilot_classifier_steps=5,
                pilot_local_steps=2, pilot_reserve=60, report_reserve=30, size_pilot=False,
                stand_in={"IET_CUDA_TESTS_DEVICE": "cpu"})


class Check:
    """Runs the parts one after another in child processes, each within its budget, and keeps
    their results in one JSON and one markdown file (rewritten after every part)."""

    def __init__(self, sizes: Sizes, out: Path, work: Path, data: Path, env: dict[str, str]):
        self.sizes, self.out, self.work, self.data, self.env = sizes, out, work, data, env
        self.started = time.monotonic()
        self.log = out / "log.txt"
        # Children stop at their budget on SIGINT, but inherit it ignored when this runs as a
        # background job; a handler here is reset to the default in each child instead.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.results: dict = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                              "dry_run": sizes is DRY_RUN, "parts": {}}

    def left(self) -> float:
        return self.sizes.total - (time.monotonic() - self.started)

    def children(self, *commands: list[str], budget: float, env: dict | None = None) -> list[dict]:
        """Run commands side by side, their output appended to log.txt. Those still running at
        `budget` seconds get SIGINT (they save what they have), and SIGKILL after a grace period."""
        with self.log.open("a") as log:
            log.write("".join(f"\n$ {' '.join(command)}\n" for command in commands))
            log.flush()
            started = time.monotonic()
            processes = [subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          env={**self.env, **(env or {})}) for command in commands]
            stopped = [not finished_by(process, started + budget) for process in processes]
            for process, late in zip(processes, stopped):
                if late:
                    process.send_signal(signal.SIGINT)
            for process in processes:
                if not finished_by(process, started + budget + GRACE_SECONDS):
                    process.kill()
                    process.wait()
        seconds = round(time.monotonic() - started, 1)
        return [{"exit": process.returncode, "seconds": seconds, "stopped_at_budget": late}
                for process, late in zip(processes, stopped)]

    def child(self, command: list[str], budget: float, env: dict | None = None) -> dict:
        return self.children(command, budget=budget, env=env)[0]

    def part(self, name: str, run) -> None:
        budget = self.sizes.budgets.get(name, self.left())
        budget = max(0.0, min(budget, self.left()))
        started = time.monotonic()
        with self.log.open("a") as log:
            log.write(f"\n===== {name} (budget {budget:.0f} s) =====\n")
        try:
            result = run(budget)
        except Exception as err:  # a part that breaks must not cost the others their turn
            result = {"error": f"{type(err).__name__}: {err}"}
        result.update(budget_s=round(budget), used_s=round(time.monotonic() - started, 1))
        self.results["parts"][name] = result
        self.save()

    # -- the parts -------------------------------------------------------------------------
    def tests(self, budget: float) -> dict:
        done = self.child([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-v", "--tb=short",
                           "-p", "no:cacheprovider", "-o", f"timeout={max(10, int(budget))}"], budget,
                          env=self.sizes.stand_in)
        log = self.log.read_text(errors="replace")
        outcomes = dict(re.findall(r"^tests/test_cuda\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", log, re.M))
        counts = {name: sum(1 for o in outcomes.values() if o == kind) for name, kind in (
            ("passed", "PASSED"), ("failed", "FAILED"), ("skipped", "SKIPPED"), ("errors", "ERROR"))}
        return {**done, "tests": outcomes, **counts, "device": self.sizes.stand_in.get("IET_CUDA_TESTS_DEVICE", "cuda")}

    def bench(self, budget: float) -> dict:
        figures = self.out / "bench.json"
        done = self.child([sys.executable, "bench/all.py", *self.sizes.bench, "--out", str(figures)], budget)
        return {**done, **(json.loads(figures.read_text()) if figures.exists() else {})}

    def demo(self, budget: float) -> dict:
        answer = self.work / "demo.json"
        spec = {"data": str(self.data), "runs": str(self.work / "demo"), "settings": self.sizes.model,
                "subset": self.sizes.demo_subset, "seconds": self.sizes.demo_seconds, "samples": self.sizes.demo_samples,
                "sample_steps": self.sizes.demo_sample_steps, "answer": str(answer)}
        done = self.child([sys.executable, str(Path(__file__).relative_to(REPO)), "--demo", json.dumps(spec)], budget)
        return {**done, **(json.loads(answer.read_text()) if answer.exists() else {})}

    def pilot(self, budget: float) -> dict:
        """Baseline and IET-AGC side by side (two processes share the GPU), each in its own
        folder; a mode stopped at the budget is evaluated afterwards from the checkpoints it has."""
        s = self.sizes
        rate = self.results["parts"].get("demo", {}).get("steps_per_second") or FALLBACK_STEPS_PER_SECOND
        rounds, local_steps = pilot_size(rate, budget - s.pilot_reserve) if s.size_pilot else (1, s.pilot_local_steps)
        steps = rounds * PILOT_SHARDS * local_steps
        command = [sys.executable, "-m", "iet_core.experiments", "--recipe", RECIPE, "--seeds", "0",
                   "--shards", str(PILOT_SHARDS),
                   "--rounds", str(rounds), "--steps", str(steps), "--eval-points", str(rounds),
                   "--num-samples", str(s.pilot_samples), "--sample-steps", str(s.pilot_sample_steps),
                   "--heldout", str(s.pilot_heldout), "--classifier-steps", str(s.pilot_classifier_steps),
                   "--data", str(self.data), "--subset", str(s.pilot_subset), *[f"--set={x}" for x in (
                       *s.model, "method.shard_split=class", "eval.use_ema=false", "train.hflip=true",
                       "train.preview_samples=0")]]
        modes = {mode: [*command, "--modes", mode, "--out", str(self.work / "pilot" / mode)] for mode in PILOT_MODES}
        result = {"rounds": rounds, "local_steps_per_proxy": local_steps, "steps_per_mode": steps,
                  "sized_from_steps_per_second": rate, "results": []}
        result.update(zip(modes, self.children(*modes.values(), budget=budget - s.report_reserve)))
        stopped = [mode for mode in modes if result[mode]["stopped_at_budget"]]
        if stopped and self.left() > 5:  # evaluate the checkpoints the stopped modes have, side by side
            reports = self.children(*[[*modes[mode], "--report-only"] for mode in stopped], budget=self.left())
            for mode, done in zip(stopped, reports):
                result[mode]["report_only"] = done
        for mode in modes:
            out = self.work / "pilot" / mode
            # At most 8 files come back from the GPU machine: with these, the output folder holds 8.
            for name, copy in (("report.md", f"pilot_{mode}_report.md"),
                               (f"neighbours_{mode}.png", f"pilot_{mode}_neighbours.png")):
                if (out / name).exists():
                    (self.out / copy).write_bytes((out / name).read_bytes())
            if (out / "results.csv").exists():
                with (out / "results.csv").open() as f:
                    result["results"] += list(csv.DictReader(f))
        from iet_core.metrics import proportion_interval

        for row in result["results"]:  # every memorized share with its sample count and interval
            count = round(float(row["memorized_fraction"]) * s.pilot_samples)
            row.update(samples=s.pilot_samples, memorized_count=count,
                       interval=list(proportion_interval(count, s.pilot_samples)))
        result["stopped_at_budget"] = bool(stopped)
        return result

    # -- output ----------------------------------------------------------------------------
    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2))
        (self.out / "gpu_check.md").write_text(markdown(self.results))


def pilot_size(steps_per_second: float, seconds: float) -> tuple[int, int]:
    """Rounds and local steps per proxy for the pilot's training time: as many rounds of
    PILOT_LOCAL_STEPS as fit, but never fewer than PILOT_MIN_ROUNDS (shorter rounds, a multiple
    of 50, at least 50): on CPU, one round of 750 local steps averaged four proxies into noise
    (docs/results.md, section 1), so a single round answers nothing."""
    capacity = steps_per_second * SHARED_GPU_SPEED * max(0.0, seconds)  # optimizer steps per mode
    rounds = int(capacity // (PILOT_SHARDS * PILOT_LOCAL_STEPS))
    if rounds >= PILOT_MIN_ROUNDS:
        return rounds, PILOT_LOCAL_STEPS
    local_steps = int(capacity // (PILOT_SHARDS * PILOT_MIN_ROUNDS)) // 50 * 50
    return PILOT_MIN_ROUNDS, max(50, local_steps)


def finished_by(process: subprocess.Popen, when: float) -> bool:
    """Wait for the process until the monotonic time `when`; whether it has ended."""
    try:
        process.wait(timeout=max(0.0, when - time.monotonic()))
        return True
    except subprocess.TimeoutExpired:
        return False


def markdown(results: dict) -> str:
    parts = results["parts"]
    device = (parts.get("demo", {}).get("device") or parts.get("bench", {}).get("device") or "unknown device")
    lines = [f"# GPU check: {device}, {results['date']}{' (dry run, tiny sizes on the CPU)' if results['dry_run'] else ''}",
             "", "| part | budget s | used s | stopped at budget | result |", "|---|---|---|---|---|"]
    for name, part in parts.items():
        stopped = "yes" if part.get("stopped_at_budget") else "no"
        lines.append(f"| {name} | {part['budget_s']} | {part['used_s']} | {stopped} "
                     f"| {part.get('error') or summary_of(name, part)} |")
    if "tests" in parts and parts["tests"].get("tests"):
        lines += ["", f"## CUDA tests (on {parts['tests']['device']})", "", "| test | outcome |", "|---|---|"]
        lines += [f"| {test} | {outcome} |" for test, outcome in parts["tests"]["tests"].items()]
    if parts.get("bench", {}).get("table"):
        lines += ["", "## Benchmarks (`bench/all.py`)", "", "| what | result |", "|---|---|"]
        lines += [f"| {what} | {result} |" for what, result in parts["bench"]["table"]]
    if parts.get("demo", {}).get("memorized_fraction") is not None:
        demo = parts["demo"]
        lines += ["", "## Demo: baseline DDPM on real images", "",
                  f"{demo['images']} images of {demo['data']} at {demo['resolution']}x{demo['resolution']}, "
                  f"preset {demo['preset']}, "
                  f"batch {demo['batch_size']}, {demo['precision']}: {demo['steps']} steps in {demo['train_seconds']:.0f} s "
                  f"({demo['steps_per_second']:.1f} steps/s); {demo['memorized_count']} of {demo['samples']} samples "
                  f"memorized ({100 * demo['memorized_fraction']:.0f}%, 95% interval {100 * demo['interval'][0]:.0f}-"
                  f"{100 * demo['interval'][1]:.0f}%, {demo['weights']} weights)."]
    if parts.get("pilot", {}).get("results"):
        pilot = parts["pilot"]
        lines += ["", f"## Pilot of the fair regime: K = {PILOT_SHARDS} class-balanced shards, "
                  f"{pilot['local_steps_per_proxy']} "
                  f"local steps per proxy per round, {pilot['rounds']} round(s), raw averaged weights", "",
                  "| mode | step | memorized of samples (95% interval) | MQ < 1/3 | feature FD | held-out L2 | train s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['step']} | {r['memorized_count']} of {r['samples']} ({100 * r['interval'][0]:.0f}-"
                  f"{100 * r['interval'][1]:.0f}%) | {float(r['mq_below_1_3']):.3f} "
                  f"| {float(r['feature_fd']):.2f} | {float(r['heldout_l2']):.3f} | {float(r['train_seconds']):.0f} |"
                  for r in pilot["results"]]
    return "\n".join(lines) + "\n"


def summary_of(name: str, part: dict) -> str:
    if name == "tests":
        failed = part.get("failed", 0) + part.get("errors", 0)
        return f"{part.get('passed', 0)} passed, {failed} failed, {part.get('skipped', 0)} skipped"
    if name == "bench":
        failed = [what for what, result in part.get("table", []) if result.startswith("failed")]
        return f"{len(part.get('table', [])) - len(failed)} figures" + (f", failed: {', '.join(failed)}" if failed else "")
    if name == "demo" and part.get("memorized_fraction") is not None:
        return f"{100 * part['memorized_fraction']:.0f}% memorized after {part['train_seconds']:.0f} s of training"
    if name == "pilot":
        return (f"{len(part.get('results', []))} evaluations, {part['rounds']} round(s) of "
                f"{part['local_steps_per_proxy']} local steps")
    return f"exit status {part.get('exit')}"


def run_demo(spec: dict) -> None:
    """The demo part, in its own process: train a baseline for spec['seconds'] (stopped with a
    checkpoint), then sample it and measure memorization; the figures go to spec['answer']."""
    import threading

    import torch

    from iet_core.cli import apply_settings
    from iet_core.config import RunConfig, recipe_config
    from iet_core.evaluate import evaluate_run
    from iet_core.metrics import proportion_interval
    from iet_core.telemetry import StatusEvent
    from iet_core.train import TrainControl, train

    tree = recipe_config(RECIPE, "ddpm").to_dict()
    tree["train"]["local_epochs"] = None  # trained for a time, in local steps
    apply_settings(tree, [*spec["settings"], f"data.source={spec['data']}", f"data.subset={spec['subset']}",
                          "train.rounds=1000", "train.local_steps=1000", "train.preview_samples=0",
                          "train.checkpoint_every_rounds=1000"])  # one checkpoint: the one the stop writes
    config = RunConfig.from_dict(tree).validate()
    control = TrainControl()
    timer = threading.Timer(spec["seconds"], control.stop)
    clock = {}

    def start_clock(event) -> None:  # the training time starts at the first step, after loading
        if isinstance(event, StatusEvent) and event.state == "running" and not clock:
            clock["started"] = time.monotonic()
            timer.start()

    run = train(config, runs_root=spec["runs"], control=control, sinks=[start_clock])
    train_seconds = time.monotonic() - clock["started"]
    timer.cancel()
    steps = run.status()["global_step"]
    eval_config = config.eval
    eval_config.num_samples, eval_config.steps = spec["samples"], spec["sample_steps"]
    result = evaluate_run(run, eval_config, device=config.train.device, save=False).summary
    device = config.train.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    Path(spec["answer"]).write_text(json.dumps({
        "device": name, "torch": torch.__version__, "data": Path(spec["data"]).name, "images": spec["subset"],
        "resolution": config.data.resolution,
        "preset": config.model.preset, "batch_size": config.train.batch_size, "precision": config.train.precision,
        "steps": steps, "train_seconds": train_seconds, "steps_per_second": steps / train_seconds,
        "samples": result["num_samples"], "memorized_count": result["memorized_count"],
        "memorized_fraction": result["memorized_fraction"],
        "interval": list(proportion_interval(result["memorized_count"], result["num_samples"])),
        "weights": result["weights"], "sampling_seconds": result["seconds"]["sampling"]}))


def install_wheels(folder: Path, site: Path, log: Path) -> dict:
    """Install the carried wheels into `site` (no network, no dependencies resolved)."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return {"installed": [], "note": f"no wheels in {folder}: using what is installed"}
    with log.open("a") as out:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
                       check=True, stdout=out, stderr=subprocess.STDOUT)
    return {"installed": [w.name for w in wheels]}


def find_data(given: str | None) -> Path:
    places = [Path(given)] if given else DATA_PLACES
    for place in places:
        if place.is_file():
            return place.resolve()
    raise SystemExit(f"error: no {DATA_NAME} at {', '.join(map(str, places))}: run `bash bench/gpu_prepare.sh` "
                     "(it copies it into .gpu-data/), or give --data.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "gpu"),
                        help="output folder (default: $OUT, else bench/results/gpu)")
    parser.add_argument("--wheels", default=str(REPO / ".whl"), help="folder of wheels to install first (default: .whl)")
    parser.add_argument("--data", help=f"the CIFAR-10 subset (default: ../shared/data/{DATA_NAME} or .gpu-data/)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the whole script runs")
    parser.add_argument("--parts", nargs="+", default=["tests", "bench", "demo", "pilot"],
                        choices=["tests", "bench", "demo", "pilot"])
    parser.add_argument("--demo", help=argparse.SUPPRESS)  # internal: the demo part's child process
    args = parser.parse_args(argv)
    if args.demo:
        run_demo(json.loads(args.demo))
        return 0
    sizes = DRY_RUN if args.dry_run else GPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text("")
    data = find_data(args.data)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        site = Path(work) / "site"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            filter(None, [str(site), str(REPO), os.environ.get("PYTHONPATH")]))}
        check = Check(sizes, out, Path(work), data, env)
        check.results["setup"] = install_wheels(Path(args.wheels), site, out / "log.txt")
        sys.path[:0] = [str(site), str(REPO)]  # the engine too (the pilot's shares get its interval) ...
        importlib.import_module("iet_core.metrics")  # ... imported now, so that its start-up counts before any budget
        for name in args.parts:
            check.part(name, getattr(check, name))
    print((out / "gpu_check.md").read_text())
    return 0 if all("error" not in part for part in check.results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
