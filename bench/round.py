"""One IET-AGC round with K proxies, side by side in one process: ours (sequential and batched
proxies) against a faithful re-implementation of the reference approach (each proxy a
deep-copied model loaded from the global state dict, the memory bank updated in a Python loop
with one device sync per sample, state-dict averaging). Same model, data (in memory for all),
batch size and steps. Rounds alternate between variants so machine load hits them alike.

    python bench/round.py --shards 10 --local-steps 5 --repeats 3
    python bench/round.py --device cuda --preset small --resolution 32 --channels 3 --batch-size 128
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iet_core.config import MAX_ROUNDS, demo_config  # noqa: E402
from iet_core.models import count_parameters, training_scheduler  # noqa: E402
from iet_core.train import Trainer, create_run  # noqa: E402


class ReferenceRound:
    """The reference code's round, minus its DataLoader (data is in memory for every variant)."""

    def __init__(self, trainer: Trainer, batch_size: int, steps: int, mem_ratio: float = 2.0):
        self.trainer, self.batch_size, self.steps, self.mem_ratio = trainer, batch_size, steps, mem_ratio
        self.global_model = copy.deepcopy(trainer.unet)
        self.global_ema = copy.deepcopy(trainer.unet)
        # The same precision as ours, so the ratio measures the approach, not the number format.
        self.autocast = torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.config.train.precision == "bf16")
        self.alphas = training_scheduler(trainer.config.model).alphas_cumprod.float().to(trainer.device)
        k = trainer.config.method.num_shards
        self.clients = []
        for _ in range(k):
            model = copy.deepcopy(self.global_model)
            self.clients.append({"model": model, "ema": copy.deepcopy(model),
                                 "optim": torch.optim.Adam(model.parameters(), lr=2e-4),
                                 "bank": torch.zeros(1000, device=trainer.device)})

    def run(self) -> None:
        trainer, states = self.trainer, []
        for k, client in enumerate(self.clients):
            client["model"].load_state_dict(copy.deepcopy(self.global_model.state_dict()))
            client["ema"].load_state_dict(copy.deepcopy(self.global_ema.state_dict()))
            shard = torch.from_numpy((trainer.shard_of == k).nonzero()[0]).to(trainer.device)
            for _ in range(self.steps):
                x0 = trainer.images[shard[torch.randint(0, len(shard), (self.batch_size,), device=trainer.device)]]
                t = torch.randint(0, 1000, (self.batch_size,), device=trainer.device)
                noise = torch.randn_like(x0)
                x_t = self.alphas[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - self.alphas[t]).sqrt().view(-1, 1, 1, 1) * noise
                with self.autocast:
                    prediction = client["model"](x_t, t).sample
                loss = F.mse_loss(prediction.float(), noise, reduction="none").mean(dim=(1, 2, 3))
                mask = loss * self.mem_ratio >= client["bank"][t]
                total = max(mask.sum().item(), 1)
                mean_loss = ((loss * mask) * (self.batch_size / total)).mean()
                for i, step in enumerate(t):  # one host sync per sample, as in the reference
                    client["bank"][step] = 0.8 * client["bank"][step] + 0.2 * loss[i].item()
                client["optim"].zero_grad()
                mean_loss.backward()
                torch.nn.utils.clip_grad_norm_(client["model"].parameters(), 1.0)
                client["optim"].step()
                source, target = client["model"].state_dict(), client["ema"].state_dict()
                for key in source:
                    target[key].data.copy_(target[key].data * 0.9999 + source[key].data * 0.0001)
            states.append((len(shard), client["model"].state_dict(), client["ema"].state_dict()))
        total = sum(n for n, _, _ in states)
        for model, index in ((self.global_model, 1), (self.global_ema, 2)):
            averaged = {key: sum(s[index][key] * (s[0] / total) for s in states) for key in states[0][1]}
            model.load_state_dict(averaged)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--subset", type=int, default=640)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench/results/round.json")
    args = parser.parse_args(argv)

    def trainer_for(execution: str, root: Path) -> Trainer:
        config = demo_config("iet-agc")
        config.method.num_shards = args.shards
        config.model.preset, config.data.resolution, config.data.channels = args.preset, args.resolution, args.channels
        config.data.subset = args.subset
        for key, value in dict(local_steps=args.local_steps, batch_size=args.batch_size, device=args.device,
                               precision=args.precision, execution=execution, rounds=MAX_ROUNDS, preview_samples=0,
                               checkpoint_every_rounds=MAX_ROUNDS, record_samples=True).items():
            setattr(config.train, key, value)
        run, dataset = create_run(config, root / execution)
        return Trainer(run, dataset)

    with tempfile.TemporaryDirectory() as tmp:
        ours = {name: trainer_for(name, Path(tmp)) for name in ("sequential", "batched")}
        reference = ReferenceRound(ours["sequential"], args.batch_size, args.local_steps)
        device = ours["sequential"].device

        def our_round(trainer: Trainer):
            def run_round():
                trainer._start_round()
                (trainer._run_batched if trainer.execution == "batched" else trainer._run_sequential)()
                trainer._end_round()
            return run_round

        variants = {"reference approach": reference.run, "ours, sequential proxies": our_round(ours["sequential"]),
                    "ours, batched proxies (vmap)": our_round(ours["batched"])}
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = {name: [] for name in variants}
        for repeat in range(args.repeats + 1):  # the first pass warms up
            for name, run_round in variants.items():
                sync()
                start = time.perf_counter()
                run_round()
                sync()
                if repeat:
                    times[name].append(time.perf_counter() - start)
        params = count_parameters(ours["sequential"].unet)

    base = statistics.median(times["reference approach"])
    name_of_device = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"one IET-AGC round: K={args.shards}, {args.local_steps} local steps, batch {args.batch_size}, preset {args.preset} "
          f"({params / 1e6:.2f}M), {args.resolution}x{args.resolution}x{args.channels}, {args.precision}, {name_of_device}")
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"variant": name, "median_s": median, "speedup_vs_reference": base / median})
        print(f"{name:32s} {median:8.2f} s   {base / median:5.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "device": name_of_device, "params": params, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
