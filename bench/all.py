"""Every benchmark in one go, one table: an IET-AGC round with K = 10 proxies (ours against the
reference approach), the AGC step against a plain DDPM step (with model FLOP utilisation),
nearest neighbours (ours against a naive per-sample search) and DDIM sampling throughput.
Each script measures its variants side by side in one process; this runs them one after
another and merges their JSON into bench/results/all.json.

    python bench/all.py                 # CPU: the tiny preset at 16x16
    python bench/all.py --gpu           # GPU: small preset, 32x32x3, batch 128, bf16; 10k x 50k neighbours
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"


def run(script: str, *args: str) -> dict:
    out = RESULTS / f"all-{script.removesuffix('.py')}.json"
    flag = "--out" if script == "eval_timing.py" else "--json"
    # Paths relative to the repository, so the recorded arguments name no machine's folders.
    subprocess.run([sys.executable, str(BENCH.relative_to(REPO) / script), *args, flag, str(out.relative_to(REPO))],
                   check=True, cwd=REPO)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU settings of the issue's targets")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per variant (steps use 10x)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        model = ["--device", "cuda", "--preset", "small", "--resolution", "32", "--channels", "3", "--batch-size", "128",
                 "--precision", "bf16"]
        search = ["--device", "cuda", "--synthetic-training", "50000", "--presets", "small", "ddpm-cifar10",
                  "--sample-batch", "256"]
    else:
        model = ["--device", "cpu"]
        search = ["--device", "cpu", "--presets", "tiny"]
    round_ = run("round.py", *model, "--shards", "10", "--repeats", str(args.repeats))
    step = run("train_step.py", *model, "--repeats", str(10 * args.repeats))
    evaluation = run("eval_timing.py", *search)

    rows = {row["variant"]: row for row in round_["rows"]}
    steps = {row["variant"]: row for row in step["rows"]}
    near = evaluation["naive_search"]
    table = [
        ("K=10 IET-AGC round, batched proxies vs reference", f"{rows['ours, batched proxies (vmap)']['speedup_vs_reference']:.2f}x faster"),
        ("K=10 IET-AGC round, sequential proxies vs reference", f"{rows['ours, sequential proxies']['speedup_vs_reference']:.2f}x faster"),
        ("AGC overhead over our step without AGC", f"{100 * (step['agc_over_no_agc'] - 1):+.1f}%"),
        ("our IET-AGC step vs plain DDPM step", f"{steps['ours, IET-AGC step']['ratio_to_plain']:.2f}x the time"),
        ("model FLOP utilisation (IET-AGC step)", f"{100 * step['mfu']:.1f}% of measured {step['peak_dtype']} matmul peak"),
        (f"nearest neighbours, {evaluation['num_generated']} x {evaluation['num_training']}",
         f"{evaluation['metrics'][0]['seconds']:.2f} s"),
        (f"nearest 2, ours vs naive per-sample search ({near['count']} images)", f"{near['speedup']:.0f}x faster"),
        *[(f"DDIM 50 sampling, {s['preset']}", f"{s['images_per_second']:.1f} images/s") for s in evaluation["sampling"]],
    ]
    device = step["device"]
    print(f"\nall benchmarks on {device} ({platform.machine()})")
    for what, result in table:
        print(f"  {what:58s} {result}")
    (RESULTS / "all.json").write_text(json.dumps({"device": device, "table": table, "round": round_, "step": step,
                                                   "evaluation": evaluation}, indent=2))


if __name__ == "__main__":
    main()
