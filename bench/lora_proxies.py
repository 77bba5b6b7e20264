"""K LoRA proxies of one IET-AGC round side by side (one vmapped step over the K adapters, the
frozen base shared) against one after another, in one process. Rounds alternate between the
two so machine load hits them alike; the first pass warms up.

    python bench/lora_proxies.py                       # CPU: the tiny random pipeline, 16x16
    python bench/lora_proxies.py --device cuda --pretrained stabilityai/stable-diffusion-2-1-base \\
        --resolution 256 --batch-size 4 --precision bf16 --shards 4
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iet_core.config import recipe_config  # noqa: E402
from iet_core.text2image.tiny import build_tiny_pipeline  # noqa: E402
from iet_core.train import create_run, prepare_trainer  # noqa: E402

MAX_ROUNDS = 1000


def write_captioned_set(folder: Path, count: int, resolution: int) -> Path:
    """Random images with same-name .txt captions."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(buffer, format="PNG")
        (folder / f"{i}.png").write_bytes(buffer.getvalue())
        (folder / f"{i}.txt").write_text(f"a photo of object number {i}")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", help="a Stable Diffusion pipeline (default: a tiny random one)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench/results/lora_proxies.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pretrained = args.pretrained or str(build_tiny_pipeline(tmp / "pipeline"))
        data = write_captioned_set(tmp / "data", args.images, args.resolution)

        def trainer_for(execution: str):
            config = recipe_config("sd-lora", "iet-agc")
            config.model.pretrained, config.data.source, config.data.resolution = pretrained, str(data), args.resolution
            config.text2image.lora_rank = args.rank
            config.method.num_shards = args.shards
            for key, value in dict(local_steps=args.local_steps, batch_size=args.batch_size, device=args.device,
                                   precision=args.precision, execution=execution, rounds=MAX_ROUNDS, preview_samples=0,
                                   checkpoint_every_rounds=MAX_ROUNDS).items():
                setattr(config.train, key, value)
            return prepare_trainer(*create_run(config, tmp / execution))

        trainers = {"one after another": trainer_for("sequential"), "side by side (vmap)": trainer_for("batched")}
        device = trainers["one after another"].device
        cuda = device.type == "cuda"

        def run_round(trainer):
            trainer._start_round()
            (trainer._run_batched if trainer.execution == "batched" else trainer._run_sequential)()
            trainer._end_round()

        times = {name: [] for name in trainers}
        peak = {}
        for repeat in range(args.repeats + 1):
            for name, trainer in trainers.items():
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                run_round(trainer)
                if cuda:
                    torch.cuda.synchronize()
                    peak[name] = torch.cuda.max_memory_allocated() / 2**30
                if repeat:
                    times[name].append(time.perf_counter() - start)
        trainer = trainers["one after another"]
        adapter, base = trainer.flat.numel, sum(p.numel() for p in trainer.unet.parameters())

    base_time = statistics.median(times["one after another"])
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"one IET-AGC round of K={args.shards} LoRA proxies (rank {args.rank}, {adapter:,} adapter weights over "
          f"{base / 1e6:.2f}M base), {args.local_steps} local steps, batch {args.batch_size}, {args.resolution}px, "
          f"{args.precision}, {device_name}")
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"variant": name, "median_s": median, "speedup_vs_one_after_another": base_time / median,
                     "peak_gib": peak.get(name)})
        memory = f"   peak {peak[name]:.2f} GiB" if name in peak else ""
        print(f"{name:24s} {median:8.3f} s   {base_time / median:5.2f}x{memory}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "device": device_name, "adapter_weights": adapter,
                                           "base_weights": base, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
