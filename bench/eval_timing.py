"""Time the evaluation of N generated images against a training set (default: the 846-image
CIFAR-10 subset next to the repository), without a model: the nearest-neighbour search and the
metrics, i.e. `evaluate_images`. Two stand-ins for generated images: fresh uniform noise, and
near-copies (training images, mirrored or not, with +-1 grey-level noise; the case the exact
recompute exists for). Side by side, our search against a naive one (one generated image at a
time against the whole training set, as a per-sample loop would) on the first --naive-count
images. Sampling time is measured per image and step on untrained UNets of the given presets,
and reported as images per second for DDIM at --eval-steps.

    python bench/eval_timing.py --num-generated 10000 --device cpu
    python bench/eval_timing.py --device cuda --synthetic-training 50000   # 10k x 50k at 32x32x3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iet_core.config import DataConfig, EvalConfig, ModelConfig  # noqa: E402
from iet_core.data import load_dataset  # noqa: E402
from iet_core.data import ImageDataset  # noqa: E402
from iet_core.evaluate import evaluate_images  # noqa: E402
from iet_core.neighbours import nearest_neighbours  # noqa: E402
from iet_core.models import build_unet, count_parameters, training_scheduler  # noqa: E402
from iet_core.sample import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def stand_ins(training: torch.Tensor, count: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.integers(0, 256, (count, *training.shape[1:]), dtype=np.uint8))
    picks = torch.from_numpy(rng.integers(0, len(training), count))
    copies = training[picks].clone()
    mirror = torch.from_numpy(rng.random(count) < 0.5)
    copies[mirror] = copies[mirror].flip(-1)
    jitter = torch.from_numpy(rng.integers(-1, 2, copies.shape, dtype=np.int16))
    copies = (copies.to(torch.int16) + jitter).clamp(0, 255).to(torch.uint8)
    return {"noise": noise, "near-copies": copies}


def time_metrics(args, dataset) -> list[dict]:
    rows = []
    for name, generated in stand_ins(dataset.images, args.num_generated, args.seed).items():
        for flip_aware in (False, True):
            started = time.perf_counter()
            result = evaluate_images(generated, dataset, EvalConfig(), flip_aware=flip_aware, device=args.device)
            rows.append({"generated": name, "flip_aware": flip_aware, "seconds": time.perf_counter() - started,
                         "neighbour_seconds": result.summary["seconds"]["neighbours"],
                         "exhaustive_rows": result.summary["exhaustive_rows"],
                         "memorized_fraction": result.summary["memorized_fraction"]})
            print(f"{name:>12}  flip-aware {flip_aware!s:>5}: {rows[-1]['seconds']:7.2f} s "
                  f"(search {rows[-1]['neighbour_seconds']:.2f} s, rows searched again {rows[-1]['exhaustive_rows']}, "
                  f"memorized {100 * rows[-1]['memorized_fraction']:.1f}%)", flush=True)
    return rows


def time_naive_search(args, dataset) -> dict:
    """Two nearest training images of each of the first --naive-count noise images: a naive
    per-sample search against ours, on the same device."""
    device = torch.device(args.device)
    generated = stand_ins(dataset.images, args.naive_count, args.seed)["noise"]
    training = dataset.images.to(device).flatten(1).double() / 255
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    naive = []
    for image in generated.to(device).flatten(1).double() / 255:
        naive.append(((training - image) ** 2).sum(dim=1).topk(2, largest=False).indices.cpu())
    sync()
    naive_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ours = nearest_neighbours(generated, dataset.images, k=2, device=device)
    ours_seconds = time.perf_counter() - started
    agree = bool((torch.stack(naive).numpy() == ours.index).all())
    print(f"nearest 2 of {args.naive_count} images: naive per-sample search {naive_seconds:.2f} s, ours {ours_seconds:.2f} s "
          f"({naive_seconds / ours_seconds:.1f}x faster; same neighbours: {agree})", flush=True)
    return {"count": args.naive_count, "naive_seconds": naive_seconds, "ours_seconds": ours_seconds,
            "speedup": naive_seconds / ours_seconds, "same_neighbours": agree}


def time_sampling(args, dataset) -> list[dict]:
    rows = []
    for preset in args.presets:
        model = ModelConfig(preset=preset)
        unet = build_unet(model, dataset.resolution, dataset.channels).to(args.device)
        scheduler = training_scheduler(model)
        generate(unet, scheduler, 2, steps=1, device=args.device)  # warm-up
        started = time.perf_counter()
        generate(unet, scheduler, args.sample_batch, steps=args.sample_steps, batch_size=args.sample_batch, device=args.device)
        per_image_step = (time.perf_counter() - started) / (args.sample_batch * args.sample_steps)
        rows.append({"preset": preset, "parameters": count_parameters(unet), "seconds_per_image_step": per_image_step,
                     "images_per_second": 1 / (per_image_step * args.eval_steps),
                     "extrapolated_seconds": per_image_step * args.num_generated * args.eval_steps})
        print(f"sampling {preset:>12} ({count_parameters(unet) / 1e6:.1f}M): {per_image_step * 1e3:.2f} ms per image "
              f"and step = {rows[-1]['images_per_second']:.1f} images/s with DDIM {args.eval_steps} steps -> "
              f"{args.num_generated} images ~ {rows[-1]['extrapolated_seconds'] / 60:.1f} min", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10_test_subset.npz"))
    parser.add_argument("--synthetic-training", type=int, help="random 32x32x3 training images instead of --data")
    parser.add_argument("--num-generated", type=int, default=10_000)
    parser.add_argument("--naive-count", type=int, default=200, help="images for the naive-search comparison")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--presets", nargs="*", default=["tiny", "ddpm-cifar10"], help="UNets to time sampling for")
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=3, help="steps actually run (the time is per step)")
    parser.add_argument("--eval-steps", type=int, default=50, help="steps to extrapolate to")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.synthetic_training:
        images = np.random.default_rng(args.seed + 1).integers(0, 256, (args.synthetic_training, 3, 32, 32), dtype=np.uint8)
        dataset = ImageDataset(torch.from_numpy(images), None, torch.arange(args.synthetic_training))
    else:
        dataset = load_dataset(DataConfig(source=args.data, resolution=32, channels=3, subset=None))
    print(f"{args.num_generated} generated vs {len(dataset)} training images "
          f"{tuple(dataset.images.shape[1:])} on {args.device}, {torch.get_num_threads()} threads", flush=True)
    figures = {"num_generated": args.num_generated, "num_training": len(dataset), "device": args.device,
               "threads": torch.get_num_threads(), "metrics": time_metrics(args, dataset),
               "naive_search": time_naive_search(args, dataset),
               "sampling": time_sampling(args, dataset)}
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
