"""Every benchmark in one go, one table: an IET-AGC round with K = 10 proxies (ours against the
reference approach), the AGC step against a plain DDPM step (with model FLOP utilisation),
nearest neighbours (ours against a naive per-sample search), DDIM sampling throughput, and K = 4
LoRA proxies of a fine-tune side by side against one after another (the tiny random pipeline).
Each script measures its variants side by side; this runs them one after another in one
process and merges their JSON into bench/results/all.json (rewritten after each script).

    python bench/all.py                 # CPU: the tiny preset at 16x16
    python bench/all.py --gpu           # GPU: small preset, 32x32x3, batch 128, bf16; 10k x 50k neighbours
    python bench/all.py --smoke         # tiny sizes in seconds: every script runs
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"


def run(script: str, *args: str) -> dict:
    """One benchmark script's main() in this process; its JSON, or the error that stopped it."""
    out = RESULTS / f"all-{script}.json"
    out.unlink(missing_ok=True)
    spec = importlib.util.spec_from_file_location(script, BENCH / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    flag = "--out" if script == "eval_timing" else "--json"
    try:
        # A path relative to the repository, so the recorded arguments name no machine's folders.
        module.main([*args, flag, str(out.relative_to(REPO))])
    except Exception as err:  # one failing benchmark leaves the others their turn
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"}
    return json.loads(out.read_text())


# Per setting, each script's arguments: an IET-AGC round, a training step, evaluation.
_GPU_MODEL = ["--device", "cuda", "--preset", "small", "--resolution", "32", "--channels", "3", "--batch-size", "128",
              "--precision", "bf16"]
_SMOKE_MODEL = ["--device", "cpu", "--resolution", "8", "--batch-size", "8"]
SETTINGS = {
    "cpu": {"round": ["--device", "cpu"], "step": ["--device", "cpu"], "evaluation": ["--device", "cpu", "--presets", "tiny"],
            "lora": ["--device", "cpu"]},
    "gpu": {"round": _GPU_MODEL, "step": _GPU_MODEL,
            "evaluation": ["--device", "cuda", "--synthetic-training", "50000", "--presets", "small", "ddpm-cifar10",
                           "--sample-batch", "256"],
            "lora": ["--device", "cuda", "--precision", "bf16"]},
    # Tiny sizes that run in seconds: every script still works (the GPU check's dry run).
    "smoke": {"round": [*_SMOKE_MODEL, "--subset", "40", "--local-steps", "1"], "step": [*_SMOKE_MODEL, "--warmup", "1"],
              "evaluation": ["--device", "cpu", "--synthetic-training", "500", "--num-generated", "200",
                             "--naive-count", "20", "--presets", "tiny", "--sample-batch", "4", "--sample-steps", "1"],
              "lora": ["--device", "cpu", "--local-steps", "1"]},
}


def summary_table(round_: dict, step: dict, evaluation: dict, lora: dict) -> list[tuple[str, str]]:
    """One line per figure, from the scripts that finished (a failed one says why)."""
    table = []
    if "error" in round_:
        table.append(("K=10 IET-AGC round", f"failed: {round_['error']}"))
    else:
        rows = {row["variant"]: row for row in round_["rows"]}
        table += [("K=10 IET-AGC round, batched proxies vs reference",
                   f"{rows['ours, batched proxies (vmap)']['speedup_vs_reference']:.2f}x faster"),
                  ("K=10 IET-AGC round, sequential proxies vs reference",
                   f"{rows['ours, sequential proxies']['speedup_vs_reference']:.2f}x faster")]
    if "error" in step:
        table.append(("training step", f"failed: {step['error']}"))
    else:
        steps = {row["variant"]: row for row in step["rows"]}
        table += [("AGC overhead over our step without AGC", f"{100 * (step['agc_over_no_agc'] - 1):+.1f}%"),
                  ("our IET-AGC step vs plain DDPM step", f"{steps['ours, IET-AGC step']['ratio_to_plain']:.2f}x the time"),
                  ("model FLOP utilisation (IET-AGC step)",
                   f"{100 * step['mfu']:.1f}% of measured {step['peak_dtype']} matmul peak")]
    if "error" in evaluation:
        table.append(("nearest neighbours and sampling", f"failed: {evaluation['error']}"))
    else:
        near = evaluation["naive_search"]
        table += [(f"nearest neighbours, {evaluation['num_generated']} x {evaluation['num_training']}",
                   f"{evaluation['metrics'][0]['seconds']:.2f} s"),
                  (f"nearest 2, ours vs naive per-sample search ({near['count']} images)", f"{near['speedup']:.0f}x faster"),
                  *[(f"DDIM 50 sampling, {s['preset']}", f"{s['images_per_second']:.1f} images/s")
                    for s in evaluation["sampling"]]]
    if "error" in lora:
        table.append(("K=4 LoRA proxies", f"failed: {lora['error']}"))
    else:
        rows = {row["variant"]: row for row in lora["rows"]}
        table.append(("K=4 LoRA proxies side by side vs one after another",
                      f"{rows['side by side (vmap)']['speedup_vs_one_after_another']:.2f}x faster"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    setting = parser.add_mutually_exclusive_group()
    setting.add_argument("--gpu", action="store_true", help="the GPU settings of the issue's targets")
    setting.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks that every script runs")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per variant (steps use 10x)")
    parser.add_argument("--out", default=str(RESULTS / "all.json"), help="the merged JSON")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    arguments = SETTINGS["gpu" if args.gpu else "smoke" if args.smoke else "cpu"]
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = {name: {"error": "not run"} for name in ("round", "step", "evaluation", "lora")}
    os.chdir(REPO)  # the scripts' default paths are relative to the repository
    for name, script, extra in (("round", "round", ["--shards", "10", "--repeats", str(args.repeats)]),
                                ("step", "train_step", ["--repeats", str(10 * args.repeats)]),
                                ("evaluation", "eval_timing", []),
                                ("lora", "lora_proxies", ["--repeats", str(args.repeats)])):
        figures[name] = run(script, *arguments[name], *extra)
        # Written after each script, so a run stopped at its time budget keeps what finished.
        device = figures["step"].get("device") or figures["round"].get("device") or figures["evaluation"].get("device")
        table = summary_table(figures["round"], figures["step"], figures["evaluation"], figures["lora"])
        out.write_text(json.dumps({"device": device, "table": table, **figures}, indent=2))
    print(f"\nall benchmarks on {device} ({platform.machine()})")
    for what, result in table:
        print(f"  {what:58s} {result}")


if __name__ == "__main__":
    main()
