"""Time one training step side by side: a plain DDPM step (torch.optim.Adam, F.mse_loss), our
trainer's step without AGC, and with AGC (IET-AGC). Variants are interleaved round-robin so
that machine load affects them alike; we report medians and ratios, and model FLOP utilisation:
the step's FLOPs (counted by torch's FlopCounterMode) per second against the measured matmul
peak of the same device (bf16 on a GPU, float32 on a CPU).

    python bench/train_step.py --preset tiny --resolution 16 --batch-size 64 --repeats 30
    python bench/train_step.py --device cuda --preset small --resolution 32 --channels 3 --batch-size 128 \
        --precision bf16 --channels-last
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iet_core.config import demo_config  # noqa: E402
from iet_core.models import build_unet, count_parameters, training_scheduler  # noqa: E402
from iet_core.train import Trainer, create_run  # noqa: E402


def make_trainer(mode: str, args, root: Path) -> Trainer:
    config = demo_config(mode)
    config.model.preset = args.preset
    config.data.resolution = args.resolution
    config.data.channels = args.channels
    config.train.batch_size = args.batch_size
    config.train.device = args.device
    config.train.preview_samples = 0
    config.train.record_samples = True
    config.train.precision, config.train.channels_last, config.train.compile = args.precision, args.channels_last, args.compile
    run, dataset = create_run(config, root / mode)
    trainer = Trainer(run, dataset)
    trainer._start_round()
    trainer.flat.bind(trainer.weights[0], trainer.grads[0])  # proxy 0 trains, as in a sequential round
    return trainer


def plain_step_fn(trainer: Trainer, batch_size: int):
    """The textbook DDPM step on the same model and data, for reference."""
    model = build_unet(trainer.config.model, trainer.config.data.resolution, trainer.config.data.channels).to(trainer.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    alphas = training_scheduler(trainer.config.model).alphas_cumprod.float().to(trainer.device)
    images = trainer.images

    def step():
        x0 = images[torch.randint(0, len(images), (batch_size,), device=trainer.device)]
        t = torch.randint(0, 1000, (batch_size,), device=trainer.device)
        noise = torch.randn_like(x0)
        x_t = alphas[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - alphas[t]).sqrt().view(-1, 1, 1, 1) * noise
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.config.train.precision == "bf16"):
            prediction = model(x_t, t).sample
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return step


def trainer_step_fn(trainer: Trainer, batch_size: int):
    def step():
        trainer._step([0], torch.randint(0, len(trainer.images), (1, batch_size), device=trainer.device))
    return step


def matmul_peak(device: torch.device, size: int = 4096, repeats: int = 10) -> tuple[float, str]:
    """Measured FLOP/s of a large matmul: bf16 on a GPU, float32 on a CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - start), str(dtype).removeprefix("torch.")


def step_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1, help="3: the digits as colour images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile our step's UNet (warm-up compiles)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="bench/results/train_step.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        ddpm = make_trainer("ddpm", args, Path(tmp))
        agc = make_trainer("iet-agc", args, Path(tmp))
        variants = {"plain DDPM step (torch Adam)": plain_step_fn(ddpm, args.batch_size),
                    "ours, ddpm mode (no AGC)": trainer_step_fn(ddpm, args.batch_size),
                    "ours, IET-AGC step": trainer_step_fn(agc, args.batch_size)}
        sync = torch.cuda.synchronize if ddpm.device.type == "cuda" else (lambda: None)
        times = {name: [] for name in variants}
        for i in range(args.warmup + args.repeats):
            for name, step in variants.items():
                sync()
                start = time.perf_counter()
                step()
                sync()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        params = count_parameters(ddpm.unet)
        flops = step_flops(variants["ours, IET-AGC step"])
        peak, peak_dtype = matmul_peak(ddpm.device)

    base = statistics.median(times["plain DDPM step (torch Adam)"])
    rows = [{"variant": name, "median_ms": 1000 * statistics.median(t), "ratio_to_plain": statistics.median(t) / base}
            for name, t in times.items()]
    agc_over_ours = statistics.median(times["ours, IET-AGC step"]) / statistics.median(times["ours, ddpm mode (no AGC)"])
    device = torch.cuda.get_device_name() if ddpm.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"preset {args.preset} ({params / 1e6:.2f}M params), {args.resolution}x{args.resolution}, batch {args.batch_size}, "
          f"{args.repeats} interleaved repeats, device {device}")
    print(f"{'variant':34s} {'median ms':>10s} {'x plain':>8s}")
    for row in rows:
        print(f"{row['variant']:34s} {row['median_ms']:10.1f} {row['ratio_to_plain']:8.3f}")
    print(f"AGC overhead over our no-AGC step: {100 * (agc_over_ours - 1):+.1f}%")
    agc_seconds = statistics.median(times["ours, IET-AGC step"])
    mfu = flops / agc_seconds / peak
    print(f"model FLOP utilisation of our IET-AGC step: {flops / 1e9:.2f} GFLOP per step, {flops / agc_seconds / 1e12:.3f} "
          f"TFLOP/s against a measured {peak_dtype} matmul peak of {peak / 1e12:.2f} TFLOP/s = {100 * mfu:.1f}%")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "device": device, "params": params, "rows": rows,
                                           "agc_over_no_agc": agc_over_ours, "flops_per_step": flops,
                                           "matmul_peak_flops": peak, "peak_dtype": peak_dtype, "mfu": mfu}, indent=2))


if __name__ == "__main__":
    main()
