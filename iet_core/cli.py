"""`python -m iet_core train | resume | export | config | evaluate`."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from pathlib import Path

from .config import MODES, RECIPES, TRACKERS, ConfigError, RunConfig, method_for_mode, recipe_config

# Shortcut flags for the settings people change most; `--set section.name=value` reaches all.
SHORTCUTS = {
    "data": ("data.source", "built-in name (digits), folder, .zip, .npz or hf:<id>"),
    "resolution": ("data.resolution", "image size in pixels"),
    "channels": ("data.channels", "1 or 3"),
    "subset": ("data.subset", "number of images to use ('none' for all)"),
    "preset": ("model.preset", "UNet preset: tiny, small, ddpm-cifar10"),
    "pretrained": ("model.pretrained", "diffusers folder (a path: ./folder) or Hub id (owner/name) to fine-tune"),
    "shards": ("method.num_shards", "K, the number of shards/proxies"),
    "skip-lambda": ("method.agc.skip_lambda", "AGC: skip when loss / bank[t] is below this"),
    "bank-decay": ("method.agc.bank_decay", "AGC: memory bank decay"),
    "rounds": ("train.rounds", "IET rounds"),
    "local-steps": ("train.local_steps", "steps per proxy per round"),
    "local-epochs": ("train.local_epochs", "epochs per proxy per round (instead of local steps)"),
    "batch-size": ("train.batch_size", "batch size"),
    "lr": ("train.lr", "learning rate"),
    "seed": ("train.seed", "random seed"),
    "device": ("train.device", "auto, cpu, cuda, cuda:1, ..."),
    "captions": ("data.caption_column", "text-to-image: caption field of metadata.jsonl or the dataset ('text')"),
    "lora-rank": ("text2image.lora_rank", "text-to-image: LoRA rank ('none' for a full UNet fine-tune)"),
    "guidance-scale": ("text2image.guidance_scale", "text-to-image: classifier-free guidance in evaluation"),
    "feature-extractor": ("text2image.feature_extractor", "text-to-image copy detection: SSCD TorchScript file or DINOv2 / CLIP folder"),
    "clip-model": ("text2image.clip_model", "text-to-image: a local CLIPModel folder for the CLIP score"),
}


def set_setting(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown setting {dotted!r}: sections are data, model, method (agc, msr, taa), train, eval.")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"unknown setting {dotted!r}; settings there: {', '.join(node)}.")
    node[leaf] = value


def apply_settings(tree: dict, items) -> None:
    """Apply "section.name=value" strings (as --set writes them) to a config tree."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"setting {item!r}: write section.name=value, e.g. train.lr=1e-3.")
        key, value = item.split("=", 1)
        set_setting(tree, key.strip(), value.strip())


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Recipe or config file, then --mode, then shortcut flags, then --set, then validation."""
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist: write one with `python -m iet_core config > {path.name}`.")
        config = RunConfig.load(path)
    else:
        config = recipe_config(args.recipe, args.mode or "ddpm")
    tree = config.to_dict()
    if args.mode and args.config:  # the mode's switches over the file's method, keeping its K if it has one
        shards = config.method.num_shards if config.method.num_shards > 1 else 4
        tree["method"] = dataclasses.asdict(method_for_mode(args.mode, shards))
    if args.local_epochs is not None:
        tree["train"]["local_steps"] = None
    if args.local_steps is not None:
        tree["train"]["local_epochs"] = None
    for flag, (dotted, _) in SHORTCUTS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            set_setting(tree, dotted, value)
    apply_settings(tree, args.set or [])
    if args.report_to:
        tree["train"]["trackers"] = sorted(set(args.report_to))
    if args.name:
        tree["name"] = args.name
    return RunConfig.from_dict(tree).validate()


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a JSON config file (see `python -m iet_core config`)")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="demo",
                        help="starting settings when no --config (iet_core.config.RECIPES): 'demo' trains on CPU "
                             "in minutes; 'reference' uses the paper code's defaults; 'sd-lora' / 'sd-full' fine-tune "
                             "a Stable Diffusion pipeline (--pretrained) on captioned images (--data)")
    parser.add_argument("--mode", choices=MODES, help="ddpm (baseline), iet, iet-agc or iet-agc+")
    parser.add_argument("--name", help="run name")
    for flag, (_, help_text) in SHORTCUTS.items():
        parser.add_argument(f"--{flag}", help=help_text)
    parser.add_argument("--report-to", action="append", choices=TRACKERS,
                        help="also log to this experiment tracker (repeatable; TensorBoard files go to RUN/tensorboard)")
    parser.add_argument("--set", action="append", metavar="SECTION.NAME=VALUE",
                        help="any setting, e.g. --set method.msr.threshold=0.6 (repeatable)")


def cmd_config(args: argparse.Namespace) -> int:
    print(config_from_args(args).to_json())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import ProcessGroup
    from .runs import Run
    from .train import create_run

    config = config_from_args(args)
    group = ProcessGroup.from_environment()  # set when launched by torchrun or accelerate launch
    run = dataset = None
    if group is None or group.is_writer:
        run, dataset = create_run(config, args.runs_dir)
        print(f"run folder: {run.path}", file=sys.stderr)
    if group is not None:  # the other processes train the run the writer created
        run = Run.open(group.share_from_writer(str(run.path) if run else None))
    return _fit(run, dataset, resume=False, quiet=args.quiet, group=group)


def cmd_resume(args: argparse.Namespace) -> int:
    from .distributed import ProcessGroup
    from .runs import Run

    return _fit(Run.open(args.run), None, resume=True, quiet=args.quiet, group=ProcessGroup.from_environment())


def _fit(run, dataset, resume: bool, quiet: bool, group=None) -> int:
    import signal

    from .telemetry import ProgressBar
    from .train import TrainControl, prepare_trainer

    control = TrainControl()
    # Ctrl-C stops at the next step (with several processes: at the round's end) with a
    # checkpoint, so `resume` continues exactly.
    signal.signal(signal.SIGINT, lambda *_: control.stop())
    trainer = prepare_trainer(run, dataset, resume, control=control, group=group, holder="the command line")
    if trainer.writer and not quiet:
        trainer.sinks.append(ProgressBar(trainer.total_steps, trainer.global_step))
    state = trainer.fit()
    if group is not None:
        group.close()
    if trainer.writer:
        print(f"{state}: {run.path} (step {trainer.global_step} of {trainer.total_steps})", file=sys.stderr)
        if state == "stopped":
            print(f"continue with: python -m iet_core resume {run.path}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .runs import Run

    folder = Run.open(args.run).export(args.out, ema=not args.no_ema)
    print(folder)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m iet_core", description="Train and measure diffusion models "
                                     "with IET-AGC(+) memorization mitigation.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a new run")
    add_config_arguments(train)
    train.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=cmd_train)

    resume = commands.add_parser("resume", help="continue a stopped run from its last checkpoint")
    resume.add_argument("run", help="the run folder")
    resume.add_argument("--quiet", action="store_true")
    resume.set_defaults(handler=cmd_resume)

    config = commands.add_parser("config", help="print the full config for these flags as JSON")
    add_config_arguments(config)
    config.set_defaults(handler=cmd_config)

    export = commands.add_parser("export", help="write a diffusers DDPMPipeline folder from a run")
    export.add_argument("run", help="the run folder")
    export.add_argument("--out", help="output folder (default: RUN/export)")
    export.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    export.set_defaults(handler=cmd_export)

    from .evaluate import add_evaluate_command

    add_evaluate_command(commands)
    for command in commands.choices.values():
        command.add_argument("--threads", type=int, help="CPU threads for torch's operations (default: torch's choice)")
    return parser


# Errors that mean "the disk cannot take more": full, over quota, or over a file size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def main(argv: list[str] | None = None) -> int:
    """Run a command; expected failures print one line saying what to do (no traceback)."""
    from .runs import CheckpointWriteError
    from .train import TrainingDiverged, TrainingOutOfMemory

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads {args.threads}: use at least 1 thread.")
            import torch

            torch.set_num_threads(args.threads)
        return args.handler(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (CheckpointWriteError, TrainingDiverged, TrainingOutOfMemory) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        where = f" writing {Path(err.filename).name}" if err.filename else ""
        print(f"error: the disk is full (or a size limit was reached){where}: free some space; a run continues "
              "from its last checkpoint with `python -m iet_core resume RUN`.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
