"""One validated configuration tree for the CLI, the app and saved runs.

Defaults are the reference code's (DDPM on CIFAR-10, IET-AGC): lr 2e-4, grad clip 1.0,
EMA 0.9999, warmup, mem_ratio 2.0 (skip lambda 0.5), bank decay 0.8. `demo_config` gives a
small recipe that trains on CPU in minutes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MODES = ("ddpm", "iet", "iet-agc", "iet-agc+")
SHARD_SPLITS = ("auto", "class", "random")  # auto: class-balanced when the data has labels
RESIZE_FILTERS = ("auto", "lanczos", "bicubic", "bilinear", "box", "nearest")  # auto: lanczos down, bicubic up
MSR_POLICIES = ("least-skipped", "round-robin")
OPTIMIZERS = ("adam", "adamw")
SAMPLERS = ("ddim", "ddpm")
PRECISIONS = ("fp32", "bf16")
EXECUTIONS = ("auto", "sequential", "batched")
TRACKERS = ("tensorboard", "wandb", "trackio")  # experiment trackers reached through accelerate
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")

# Upper bounds for every count a user sets: far above any useful value, low enough that no
# setting can make a run loop for ever, overflow an int64 or exhaust memory before it starts.
MAX_IMAGES = 200_000  # images in a dataset (and so in a subset)
MAX_RESOLUTION = 512
MAX_SHARDS = 256  # K proxies
MAX_ROUNDS = 100_000
MAX_LOCAL_STEPS = 10_000_000
MAX_LOCAL_EPOCHS = 10_000
MAX_TOTAL_STEPS = 1_000_000_000  # rounds x steps per proxy x K
MAX_SAMPLES = 100_000  # generated images in one evaluation
MAX_SAMPLING_STEPS = 1_000
MAX_TIMESTEPS = 10_000
MAX_SEED = 2**32 - 1
MAX_COUNT = 10_000_000  # any other count (warmup, log interval, neighbours, ...)
MAX_NAME_LENGTH = 100


# A generated sample copies its nearest training image when that image is less than a third as
# far as the second nearest (the convention of Carlini et al. 2023 and of the paper's code).
MEMORIZATION_THRESHOLD = 1 / 3


class ConfigError(ValueError):
    """A setting is invalid; the message says which one and what to change."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_skip_lambda(value: float, where: str = "method.agc.skip_lambda") -> float:
    """AGC's threshold as a float, or a ConfigError: it lies in (0, 1] (AGC skips a visit whose
    loss is below lambda times the recent loss at its timestep, so 1 is the most it can skip)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r}: use a number in (0, 1].") from None
    _check(0.0 < value <= 1.0, f"{where}={value}: use a value in (0, 1]; 0.5 is the reference (mem_ratio 2.0), "
                               "smaller skips fewer samples.")
    return value


# Each preset: UNet2DModel keyword arguments (sample_size and channels come from the data).
MODEL_PRESETS: dict[str, dict] = {
    # ~1.1M parameters: trains at useful speed on 2 CPU cores and memorizes small sets quickly.
    "tiny": dict(
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        dropout=0.0,
    ),
    # ~17M parameters: a GPU model for 32x32 data in minutes.
    "small": dict(
        block_out_channels=(64, 128, 128, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1,
    ),
    # The DDPM paper's CIFAR-10 network (~35.7M parameters), as google/ddpm-cifar10-32 converts it:
    # ch 128, mult (1, 2, 2, 2), attention at 16x16, 2 res blocks per level, dropout 0.1.
    "ddpm-cifar10": dict(
        block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    ),
}


def check_resolution(preset: str, resolution: int) -> None:
    levels = len(MODEL_PRESETS[preset]["block_out_channels"]) - 1
    if resolution % 2**levels:
        raise ConfigError(f"data.resolution={resolution} does not suit model preset {preset!r}: it halves the image "
                          f"{levels} times, so use a multiple of {2**levels} (e.g. {max(2**levels, resolution // 2**levels * 2**levels)}).")


def _check_range(value, low, high, where: str, hint: str = "") -> None:
    _check(value is None or low <= value <= high, f"{where}={value}: use between {low:,} and {high:,}{hint}.")


def _check_seed(value: int, where: str) -> None:
    _check_range(value, 0, MAX_SEED, where, " (a seed)")


def check_device_name(device: str) -> None:
    """The syntax of a device setting; whether it exists is checked where it is used."""
    _check(isinstance(device, str) and DEVICE_PATTERN.fullmatch(device) is not None,
           f"device={device!r} is not a device name: use auto, cpu, cuda, cuda:N or mps.")


@dataclass
class DataConfig:
    # A built-in name ("digits"), a folder of images, a .zip of images, an .npz with
    # `images` (and optional `labels`), or "hf:<dataset id or local dataset folder>".
    source: str = "digits"
    resolution: int = 16
    channels: int = 1
    subset: int | None = 64  # number of images to keep (seeded choice); None keeps all
    subset_seed: int = 0
    hf_split: str = "train"
    hf_image_column: str | None = None  # None: the first image column
    hf_label_column: str | None = None  # None: "label" or "labels" when present
    # Captions for text-to-image: the metadata.jsonl field, dataset column or .npz array ("text"
    # by the imagefolder convention; same-name .txt files also count). None: images only.
    caption_column: str | None = None
    # How images are resized to `resolution`; it changes pixel distances, so every result records it.
    resize_filter: str = "auto"

    def validate(self) -> None:
        _check(bool(self.source), "data.source is empty: give a built-in name ('digits'), a folder, a .zip, an .npz or 'hf:<id>'.")
        _check(len(self.source) <= 4096, "data.source is too long: give a shorter path or id.")
        _check_range(self.resolution, 4, MAX_RESOLUTION, "data.resolution", " pixels")
        _check(self.channels in (1, 3), f"data.channels={self.channels}: use 1 (greyscale) or 3 (RGB).")
        _check_range(self.subset, 1, MAX_IMAGES, "data.subset", " images, or none for all")
        _check_seed(self.subset_seed, "data.subset_seed")
        _check(self.caption_column is None or 0 < len(self.caption_column) <= 200,
               "data.caption_column: name a field of up to 200 characters (\"text\" by convention), or none.")
        _check(self.resize_filter in RESIZE_FILTERS, f"data.resize_filter={self.resize_filter!r}: choose one of {', '.join(RESIZE_FILTERS)}.")


@dataclass
class ModelConfig:
    preset: str = "tiny"  # one of MODEL_PRESETS
    pretrained: str | None = None  # diffusers UNet folder (a path) or Hub id (owner/name, iet_core.hub), for fine-tuning
    dropout: float | None = None  # None: the preset's own
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    def validate(self) -> None:
        if self.pretrained is None:
            _check(self.preset in MODEL_PRESETS, f"model.preset={self.preset!r} is unknown: choose one of {', '.join(MODEL_PRESETS)}.")
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout}: use a value in [0, 1).")
        _check_range(self.num_train_timesteps, 2, MAX_TIMESTEPS, "model.num_train_timesteps", "; the reference uses 1000")
        _check(self.beta_schedule in BETA_SCHEDULES, f"model.beta_schedule={self.beta_schedule!r}: choose one of {', '.join(BETA_SCHEDULES)}.")
        _check(0 < self.beta_start < self.beta_end < 1, f"model betas ({self.beta_start}, {self.beta_end}): need 0 < beta_start < beta_end < 1.")


@dataclass
class AGCConfig:
    """Anti-gradient control: skip a sample when loss / bank[t] < skip_lambda."""

    enabled: bool = False
    skip_lambda: float = 0.5  # the reference's mem_ratio 2.0 is lambda = 1 / 2.0
    bank_decay: float = 0.8

    def validate(self) -> None:
        check_skip_lambda(self.skip_lambda)
        _check(0.0 <= self.bank_decay < 1.0, f"method.agc.bank_decay={self.bank_decay}: use a value in [0, 1); the reference uses 0.8.")


@dataclass
class MSRConfig:
    """Memory samples redistribution: after a round, move often-skipped samples to another shard."""

    enabled: bool = False
    threshold: float = 0.5  # move a sample whose skip rate in the round is above this
    min_visits: int = 2  # ... and that was seen at least this often in the round
    policy: str = "least-skipped"  # or "round-robin"

    def validate(self) -> None:
        _check(0.0 <= self.threshold < 1.0, f"method.msr.threshold={self.threshold}: use a skip rate in [0, 1).")
        _check_range(self.min_visits, 1, MAX_COUNT, "method.msr.min_visits")
        _check(self.policy in MSR_POLICIES, f"method.msr.policy={self.policy!r}: choose one of {', '.join(MSR_POLICIES)}.")


@dataclass
class TAAConfig:
    """Threshold-aware augmentation: augment a sample more the lower its running loss ratio sits
    relative to skip_lambda + band (full strength at or below the threshold)."""

    enabled: bool = False
    band: float = 0.5  # ratios above skip_lambda + band get no augmentation
    max_strength: float = 1.0
    max_shift: float = 0.125  # translation at full strength, as a fraction of the image size
    max_scale: float = 0.1  # zoom in/out at full strength
    jitter: float = 0.1  # brightness/contrast jitter at full strength
    flip: bool = True  # random horizontal flip with probability strength / 2
    ratio_decay: float = 0.5  # running ratio per sample: r <- decay * r + (1 - decay) * new

    def validate(self) -> None:
        _check(self.band > 0, "method.taa.band must be positive.")
        _check(0.0 <= self.max_strength <= 1.0, "method.taa.max_strength: use a value in [0, 1].")
        _check(0.0 <= self.max_shift <= 0.5, "method.taa.max_shift: use a fraction in [0, 0.5].")
        _check(0.0 <= self.max_scale <= 0.5, "method.taa.max_scale: use a fraction in [0, 0.5].")
        _check(0.0 <= self.jitter <= 1.0, "method.taa.jitter: use a value in [0, 1].")
        _check(0.0 <= self.ratio_decay < 1.0, "method.taa.ratio_decay: use a value in [0, 1).")


@dataclass
class MethodConfig:
    num_shards: int = 1  # K; 1 with everything off is plain DDPM
    # "auto": class-balanced when the data has labels (as the reference), else random; "class" needs labels
    shard_split: str = "auto"
    agc: AGCConfig = field(default_factory=AGCConfig)
    msr: MSRConfig = field(default_factory=MSRConfig)
    taa: TAAConfig = field(default_factory=TAAConfig)

    @property
    def mode(self) -> str:
        """The paper's name for this combination of switches."""
        if self.msr.enabled or self.taa.enabled:
            return "iet-agc+"
        if self.agc.enabled:
            return "iet-agc"
        return "iet" if self.num_shards > 1 else "ddpm"

    def validate(self) -> None:
        _check_range(self.num_shards, 1, MAX_SHARDS, "method.num_shards", " shards")
        _check(self.shard_split in SHARD_SPLITS, f"method.shard_split={self.shard_split!r}: choose one of {', '.join(SHARD_SPLITS)}.")
        _check(not self.msr.enabled or self.num_shards > 1, "method.msr needs at least 2 shards to move samples between: raise num_shards or turn MSR off.")
        _check(not self.msr.enabled or self.agc.enabled, "method.msr redistributes skipped samples, so it needs AGC on.")
        self.agc.validate()
        self.msr.validate()
        self.taa.validate()


def method_for_mode(mode: str, num_shards: int = 4) -> MethodConfig:
    """The switches for a paper mode; every other setting keeps its default."""
    _check(mode in MODES, f"mode={mode!r} is unknown: choose one of {', '.join(MODES)}.")
    plus = mode == "iet-agc+"
    return MethodConfig(
        num_shards=1 if mode == "ddpm" else num_shards,
        agc=AGCConfig(enabled=mode in ("iet-agc", "iet-agc+")),
        msr=MSRConfig(enabled=plus),
        taa=TAAConfig(enabled=plus),
    )


@dataclass
class TrainConfig:
    rounds: int = 10
    local_steps: int | None = 100  # optimizer steps per proxy per round ...
    local_epochs: float | None = None  # ... or passes over the proxy's shard (set one of the two)
    batch_size: int = 128
    lr: float = 2e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    # Linear warmup from lr 0, counted per proxy over the whole run. None: as the reference, each
    # proxy warms up over warmup_share of its first round's local steps (15 of 100 local epochs).
    warmup_steps: int | None = None
    warmup_share: float = 0.15
    hflip: bool = True  # random horizontal flip, as in the reference
    reset_optimizer_each_round: bool = False  # the reference keeps each proxy's Adam state
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    precision: str = "fp32"  # "bf16" autocasts the UNet on GPUs that support it
    channels_last: bool = False  # conv weights and inputs in channels-last memory layout (faster on recent GPUs)
    compile: bool = False  # torch.compile the UNet for proxies run one after another (slow first steps)
    # How the K proxies of a round run: one after another, or side by side as one batched
    # (vmapped) computation; "auto" batches on a GPU when the proxies fit in memory.
    execution: str = "auto"
    log_every: int = 10  # steps between telemetry flushes (one host sync each)
    drift_probe: int = 16  # images per shard in the drift telemetry's fixed probe batch (0: no drift telemetry)
    checkpoint_every_rounds: int = 1
    keep_checkpoints: int = 2
    record_samples: bool = True  # per-sample records (id, shard, t, loss, ratio, skipped)
    preview_samples: int = 16  # samples drawn after each round for previews/ (0: none)
    preview_steps: int = 20  # DDIM steps for those previews
    # Minutes the run is meant to take (the classroom demo's): when its first rounds show it
    # would take longer on this machine, the app offers to stop after fewer rounds.
    time_budget_minutes: float | None = None
    trackers: list[str] = field(default_factory=list)  # also report to: tensorboard, wandb, trackio (off: [])

    def steps_for_shard(self, shard_size: int) -> int:
        if self.local_steps is not None:
            return self.local_steps
        return max(1, -(-int(self.local_epochs * shard_size) // self.batch_size))

    def warmup_for_shard(self, first_shard_size: int) -> int:
        """A proxy's warmup steps, given its shard's size in the first round."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_share * self.steps_for_shard(first_shard_size))

    def validate(self) -> None:
        _check_range(self.rounds, 1, MAX_ROUNDS, "train.rounds", " rounds")
        _check((self.local_steps is None) != (self.local_epochs is None), "train: set exactly one of local_steps and local_epochs.")
        _check_range(self.local_steps, 1, MAX_LOCAL_STEPS, "train.local_steps", " steps")
        _check(self.local_epochs is None or 0 < self.local_epochs <= MAX_LOCAL_EPOCHS,
               f"train.local_epochs={self.local_epochs}: use a positive number up to {MAX_LOCAL_EPOCHS:,}.")
        _check(1 <= self.batch_size <= 65536, f"train.batch_size={self.batch_size}: use between 1 and 65536.")
        _check(0 < self.lr < 1, f"train.lr={self.lr}: use a learning rate in (0, 1); the reference uses 2e-4.")
        _check(self.optimizer in OPTIMIZERS, f"train.optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}.")
        _check(self.weight_decay >= 0, "train.weight_decay must be >= 0.")
        _check(self.grad_clip > 0, "train.grad_clip must be positive (the reference uses 1.0).")
        _check(0 <= self.ema_decay < 1, f"train.ema_decay={self.ema_decay}: use a value in [0, 1).")
        _check_range(self.warmup_steps, 0, MAX_COUNT, "train.warmup_steps", ", or none for warmup_share of the first round")
        _check(0.0 <= self.warmup_share <= 1.0, f"train.warmup_share={self.warmup_share}: use a share of the first round's local steps in [0, 1].")
        _check_seed(self.seed, "train.seed")
        check_device_name(self.device)
        _check(self.precision in PRECISIONS, f"train.precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}.")
        _check(self.execution in EXECUTIONS, f"train.execution={self.execution!r}: choose one of {', '.join(EXECUTIONS)}.")
        _check_range(self.log_every, 1, MAX_COUNT, "train.log_every")
        _check_range(self.drift_probe, 0, 256, "train.drift_probe", " images per shard (0 turns the drift telemetry off)")
        _check_range(self.checkpoint_every_rounds, 1, MAX_ROUNDS, "train.checkpoint_every_rounds")
        _check_range(self.keep_checkpoints, 1, 1000, "train.keep_checkpoints")
        _check(0 <= self.preview_samples <= 256, "train.preview_samples: use between 0 and 256.")
        _check(1 <= self.preview_steps <= 1000, "train.preview_steps: use between 1 and 1000.")
        _check(self.time_budget_minutes is None or 0 < self.time_budget_minutes <= 10_000,
               "train.time_budget_minutes: use a positive number of minutes, or none.")
        _check(set(self.trackers) <= set(TRACKERS), f"train.trackers={self.trackers}: choose from {', '.join(TRACKERS)}.")


@dataclass
class EvalConfig:
    num_samples: int = 64
    after_training: bool = False  # the app evaluates the run as soon as its training finishes
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    use_ema: bool = False  # the reference evaluated the raw averaged weights (use_ema=False)
    batch_size: int = 256
    seed: int = 0
    # Copy criteria, each named in results: "ratio" (L2 nearest / second nearest below this),
    # "distance" (L2 nearest below delta = this quantile of the training images' distances to
    # their nearest other training image, Carlini et al.'s (l2, delta) style) and "mq".
    memorization_threshold: float = MEMORIZATION_THRESHOLD
    distance_quantile: float = 0.05
    mq_threshold: float = MEMORIZATION_THRESHOLD  # as experiments' mq_below_1_3
    mq_neighbours: int = 50
    flip_aware: bool | None = None  # None: on when training flipped images (train.hflip or TAA flips)
    nn_margin: int = 16  # extra float32-shortlisted candidates per sample before the exact recompute
    nn_query_chunk: int | None = None  # generated images per chunk of the search (None: by memory budget)
    nn_train_chunk: int | None = None  # training images per chunk of the search (None: by memory budget)
    gallery_pairs: int = 32  # (generated | nearest) pairs in the saved gallery, most memorized first
    fid: bool = False
    fid_weights: str | None = None  # local pt_inception weights file (None: the torch hub cache)
    fid_dims: int = 2048  # Inception block: 2048 is standard FID; 64/192/768 are faster, not comparable
    fid_batch_size: int = 50
    fid_cache: str | None = None  # folder for cached training-set statistics (None: the user cache)

    def validate(self) -> None:
        _check_range(self.num_samples, 1, MAX_SAMPLES, "eval.num_samples", " generated images")
        _check(self.sampler in SAMPLERS, f"eval.sampler={self.sampler!r}: choose one of {', '.join(SAMPLERS)}.")
        _check_range(self.steps, 1, MAX_SAMPLING_STEPS, "eval.steps", " sampling steps")
        _check(0 <= self.eta <= 1, "eval.eta: use a value in [0, 1].")
        _check_range(self.batch_size, 1, 65536, "eval.batch_size")
        _check_seed(self.seed, "eval.seed")
        _check(0 < self.memorization_threshold < 1, f"eval.memorization_threshold: use a value in (0, 1); the convention is {MEMORIZATION_THRESHOLD:.4g}.")
        _check(0 < self.distance_quantile < 1, "eval.distance_quantile: use a quantile in (0, 1); 0.05 is the default.")
        _check(0 < self.mq_threshold < 1, "eval.mq_threshold: use a value in (0, 1).")
        _check_range(self.mq_neighbours, 1, MAX_IMAGES, "eval.mq_neighbours")
        _check_range(self.nn_margin, 0, MAX_IMAGES, "eval.nn_margin", " (16 is a good default)")
        _check_range(self.nn_query_chunk, 1, MAX_SAMPLES, "eval.nn_query_chunk", " images, or none for automatic")
        _check_range(self.nn_train_chunk, 1, MAX_IMAGES, "eval.nn_train_chunk", " images, or none for automatic")
        _check_range(self.gallery_pairs, 0, 1024, "eval.gallery_pairs")
        _check(self.fid_dims in (64, 192, 768, 2048), f"eval.fid_dims={self.fid_dims}: choose 2048 (standard FID), 768, 192 or 64.")
        _check_range(self.fid_batch_size, 1, 4096, "eval.fid_batch_size")


@dataclass
class TextToImageConfig:
    """Fine-tuning a Stable Diffusion pipeline (model.pretrained: a local diffusers folder or a
    Hub id) on captioned images. Only the UNet trains; the VAE's latents and the text encoder's
    embeddings are computed once, so the noise schedule is the pipeline's own, not model.beta_*."""

    enabled: bool = False
    lora_rank: int | None = 4  # LoRA adapters of this rank on the UNet's attention; None: full UNet fine-tune
    lora_alpha: float | None = None  # None: the rank (scale 1), as diffusers' LoRA example
    lora_targets: str = "to_k,to_q,to_v,to_out.0"  # comma-separated module names, as diffusers' example
    guidance_scale: float = 7.5  # classifier-free guidance when generating from the training captions
    images_per_caption: int = 1  # generations per caption in evaluation
    # SSCD TorchScript file, or a DINOv2 / CLIP transformers folder or Hub id; None: a pixel-space stand-in
    feature_extractor: str | None = None
    copy_threshold: float = 0.5  # cosine similarity to the nearest training image above which a generation is a copy
    # A CLIPModel transformers folder or Hub id (with its tokenizer) for the CLIP score of
    # generations against their prompts; None: not measured.
    clip_model: str | None = None
    # Folder for the latents and text embeddings computed once per data, encoders and
    # resolution (None: the user cache, ~/.cache/iet_core/sd-inputs)
    input_cache: str | None = None

    def validate(self) -> None:
        _check(self.lora_rank is None or 1 <= self.lora_rank <= 1024, f"text2image.lora_rank={self.lora_rank}: use 1..1024, or none for a full UNet fine-tune.")
        _check(self.lora_alpha is None or self.lora_alpha > 0, "text2image.lora_alpha must be positive (or none for the rank).")
        _check(all(t.strip() for t in self.lora_targets.split(",")), "text2image.lora_targets: list module names separated by commas, e.g. to_k,to_q,to_v,to_out.0.")
        _check(0 <= self.guidance_scale <= 50, f"text2image.guidance_scale={self.guidance_scale}: use 0..50 (1 turns guidance off; 7.5 is usual).")
        _check(1 <= self.images_per_caption <= 64, f"text2image.images_per_caption={self.images_per_caption}: use 1..64.")
        _check(-1 < self.copy_threshold < 1, f"text2image.copy_threshold={self.copy_threshold}: use a cosine similarity in (-1, 1); 0.5 is the SSCD convention.")


@dataclass
class RunConfig:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    text2image: TextToImageConfig = field(default_factory=TextToImageConfig)

    def validate(self, num_images: int | None = None) -> "RunConfig":
        """Check every setting; with the dataset size, also the settings that depend on it."""
        _check(bool(self.name) and len(self.name) <= MAX_NAME_LENGTH and self.name.isprintable()
               and "/" not in self.name and "\\" not in self.name and self.name not in (".", ".."),
               f"name={self.name[:MAX_NAME_LENGTH]!r}: use a plain name of up to {MAX_NAME_LENGTH} characters without slashes.")
        self.data.validate()
        self.model.validate()
        self.method.validate()
        self.train.validate()
        self.eval.validate()
        self.text2image.validate()
        if self.text2image.enabled:
            _check(bool(self.model.pretrained), "text2image needs model.pretrained: a Stable Diffusion pipeline folder or Hub id.")
            _check(bool(self.data.caption_column), "text2image needs captions: set data.caption_column (\"text\" for metadata.jsonl or .txt captions).")
            _check(self.data.channels == 3, "text2image trains on RGB images: set data.channels=3.")
            # Latents are cached once: pixel-space flips and TAA's pixel augmentations cannot act on them.
            _check(not self.train.hflip, "text2image caches latents, so train.hflip cannot flip images: set it false.")
            _check(not self.method.taa.enabled, "text2image caches latents, so TAA's pixel augmentations cannot act: "
                   "turn method.taa off (MSR still works).")
        elif self.model.pretrained is None:
            check_resolution(self.model.preset, self.data.resolution)
        if self.train.local_steps is not None:
            total = self.train.rounds * self.train.local_steps * self.method.num_shards
            _check(total <= MAX_TOTAL_STEPS, f"train.rounds x train.local_steps x method.num_shards = {total:,} steps: "
                                             f"use at most {MAX_TOTAL_STEPS:,} in all.")
        if num_images is not None:
            _check(num_images >= self.method.num_shards,
                   f"method.num_shards={self.method.num_shards} is larger than the dataset ({num_images} images): "
                   f"use at most {num_images} shards, or more images.")
        return self

    # -- plain data in and out ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return _from_dict(cls, data, "")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"the config is not valid JSON ({err}).") from None
        _check(isinstance(data, dict), "the config must be a JSON object.")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_json(Path(path).read_text())


def _from_dict(cls: type, data: Any, where: str):
    _check(isinstance(data, dict), f"{where or 'config'} must be an object, got {type(data).__name__}.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    _check(not unknown, f"unknown setting(s) {', '.join(where + k for k in unknown)}; known: {', '.join(known)}.")
    kwargs = {}
    for name, value in data.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, known[name].type, f"{where}{name}")
    return cls(**kwargs)


def _coerce(value: Any, annotation: str, where: str):
    """JSON and form values to the annotated type (annotations are strings here)."""
    optional = "None" in annotation
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
        value = None
    if value is None:
        _check(optional, f"{where} cannot be empty.")
        return None
    base = annotation.replace("| None", "").strip()
    try:
        if base == "bool":
            if isinstance(value, str):
                _check(value.lower() in ("true", "false", "1", "0", "yes", "no"), f"{where}={value!r}: use true or false.")
                return value.lower() in ("true", "1", "yes")
            _check(isinstance(value, (bool, int)), f"{where}={value!r}: use true or false.")
            return bool(value)
        if base == "int":
            _check(not isinstance(value, bool), f"{where}={value!r}: use a whole number.")
            number = value if isinstance(value, int) else float(value)
            _check(float(number).is_integer(), f"{where}={value!r}: use a whole number.")
            # Every setting's own bound is far below this; it keeps huge numbers out of int64 code.
            _check(abs(number) < 2**63, f"{where}={value!r} is far too large: use a whole number of sensible size.")
            return int(number)
        if base == "float":
            _check(not isinstance(value, bool), f"{where}={value!r}: use a number.")
            _check(math.isfinite(float(value)), f"{where}={value!r}: use a finite number.")
            return float(value)
        if base == "str":
            _check(isinstance(value, str), f"{where}={value!r}: use text.")
            return value
    except (TypeError, ValueError, OverflowError):
        kind = {"int": "a whole number", "float": "a number"}.get(base, base)
        raise ConfigError(f"{where}={value!r}: use {kind}.") from None
    return value


# Recipes: where a run starts, as plain data: settings over RunConfig's defaults (the paper
# code's), shaped like RunConfig.to_dict(). The CLI's --recipe, the app's Train presets, the
# experiments and the tests start from them. `base`: the recipe this one changes; `name`: the
# run's name ("{mode}" is filled in); `share_steps`: the K proxies share each round's
# `local_steps`, so every mode trains the same number of steps.
RECIPES: dict[str, dict] = {
    "reference": {},
    # Memorizes on 2 CPU cores within minutes: 64 digits at 16x16, tiny UNet, 3,000 steps of
    # batch 64 in every mode. Warmup as the reference (each proxy over 15% of its first round),
    # not a fixed count, which warmed IET's short-round proxies over 4 rounds and the baseline over 1.
    "demo": {"name": "demo-{mode}", "share_steps": True, "model": {"preset": "tiny"},
             "train": {"rounds": 30, "local_steps": 100, "batch_size": 64, "lr": 1e-3, "optimizer": "adamw",
                       "ema_decay": 0.995, "hflip": False}},
    # The Start page's demo, in local epochs (the same compute whatever K is): the digits at their
    # own 8x8 (a step costs 0.37x one at 16x16 on 1 thread), so both runs, trained side by side,
    # finish all 30 rounds within 6 minutes on 2 CPU cores. Each model warms up over its first 100
    # steps (IET's proxies over 4 rounds; the reference: 585 steps), as in the fair test of
    # docs/results.md, where the proportional warmup (4 steps per proxy) left IET-AGC's samples far
    # worse at 3,000 steps (feature FD 6.3 against 3.7, seed 0, 512 samples).
    "classroom": {"base": "demo", "data": {"resolution": 8},
                  "train": {"rounds": 30, "local_steps": None, "local_epochs": 100, "warmup_steps": 100,
                            "time_budget_minutes": 6}},
    "quick": {"base": "demo", "train": {"rounds": 4, "local_steps": None, "local_epochs": 40}},
    "gpu-small": {"base": "demo", "model": {"preset": "small"},
                  "train": {"rounds": 20, "local_steps": None, "local_epochs": 200, "batch_size": 128, "lr": 5e-4}},
    "paper": {"model": {"preset": "ddpm-cifar10"}, "method": {"num_shards": 10},
              "train": {"rounds": 10, "local_steps": None, "local_epochs": 100}},
    # Seconds per run: 12 digits at 8x8, 2 rounds of 3 steps (the tests' recipe).
    "smoke": {"base": "demo", "name": "smoke-{mode}", "share_steps": False, "method": {"num_shards": 2},
              "data": {"resolution": 8, "subset": 12},
              "train": {"rounds": 2, "local_steps": 3, "batch_size": 4, "warmup_steps": 2, "preview_samples": 0,
                        "log_every": 2}},
    # Fine-tuning a Stable Diffusion pipeline (model.pretrained) on captioned images with
    # LoRA: K = 4 adapters, lambda 0.8 (the reference's mem_ratio 1.25), AdamW 1e-4 as diffusers'
    # LoRA example, no EMA (decay 0: the EMA equals the weights). Latents are cached, so TAA's
    # pixel augmentations stay off in every mode (iet-agc+ adds MSR).
    # Defaults: SD 2.1 base (the reference fine-tunes SD 2.1 at 256 px) on a public captioned set.
    "sd-lora": {"name": "sd-lora-{mode}", "model": {"pretrained": "stabilityai/stable-diffusion-2-1-base"},
                "data": {"source": "hf:lambdalabs/naruto-blip-captions", "resolution": 256, "channels": 3, "subset": None,
                         "caption_column": "text"},
                "method": {"agc": {"skip_lambda": 0.8}, "taa": {"enabled": False}},
                "train": {"rounds": 10, "local_steps": 250, "batch_size": 8, "lr": 1e-4, "optimizer": "adamw",
                          "weight_decay": 1e-2, "warmup_steps": 0, "ema_decay": 0.0, "hflip": False,
                          "preview_samples": 4, "preview_steps": 25},
                "eval": {"num_samples": 64, "use_ema": False},
                "text2image": {"enabled": True, "lora_rank": 4}},
    # The authors' IET-AGC_SD: the full UNet, 25 rounds x 2,000 local steps, AdamW 2.5e-6.
    "sd-full": {"base": "sd-lora", "name": "sd-full-{mode}", "train": {"rounds": 25, "local_steps": 2000, "lr": 2.5e-6},
                "text2image": {"lora_rank": None}},
}


def _merged(tree: dict, changes: dict) -> dict:
    out = dict(tree)
    for key, value in changes.items():
        out[key] = _merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _recipe_tree(recipe: str) -> dict:
    _check(recipe in RECIPES, f"recipe={recipe!r} is unknown: choose one of {', '.join(RECIPES)}.")
    own = dict(RECIPES[recipe])
    base = own.pop("base", None)
    return _merged(_recipe_tree(base) if base else {}, own)


def recipe_config(recipe: str, mode: str = "ddpm", num_shards: int | None = None) -> RunConfig:
    """A recipe's config for a paper mode (K = num_shards, else the recipe's, else 4)."""
    tree = _recipe_tree(recipe)
    share_steps = tree.pop("share_steps", False)
    name = tree.pop("name", RunConfig.name).format(mode=mode)
    own_method = tree.pop("method", None) or {}
    method = method_for_mode(mode, num_shards or own_method.get("num_shards") or 4)
    # the recipe's other method settings (lambda, ...) over the mode's switches
    own_method = {key: value for key, value in own_method.items() if key != "num_shards"}
    tree["method"] = _merged(dataclasses.asdict(method), own_method)
    config = RunConfig.from_dict(_merged(RunConfig().to_dict(), tree))
    config.name = name
    if share_steps and config.train.local_steps is not None:
        config.train.local_steps //= config.method.num_shards
    return config


def demo_config(mode: str = "ddpm", **train_overrides: Any) -> RunConfig:
    """The "demo" recipe: memorizes on 2 CPU cores within minutes (64 digits at 16x16, tiny
    UNet, 3,000 steps of batch 64 in every mode)."""
    config = recipe_config("demo", mode)
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config
