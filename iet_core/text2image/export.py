"""A fine-tuned run's weights in the forms people load: a LoRA file for
`StableDiffusionPipeline.load_lora_weights`, or (full fine-tune) a whole pipeline folder."""
from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from ..runs import Run
from .model import Components, load_components, load_trained, save_lora, trainable_unet


def trained_components(run: Run, use_ema: bool, checkpoint: Path | None = None) -> Components:
    """The run's base pipeline with its trained UNet weights (adapter or full) loaded."""
    config = run.config
    if not config.text2image.enabled:
        raise ConfigError(f"run {run.id} is not a text-to-image fine-tune.")
    components = load_components(config.model.pretrained)
    tensors, _ = run.load_checkpoint(checkpoint)
    load_trained(trainable_unet(components, config.text2image), tensors["ema" if use_ema else "model"])
    components.unet.eval()
    return components


def export_text_to_image(run: Run, folder: Path, use_ema: bool) -> Path:
    """LoRA: folder/pytorch_lora_weights.safetensors. Full: a StableDiffusionPipeline folder."""
    components = trained_components(run, use_ema)
    if run.config.text2image.lora_rank is None:
        components.pipeline().save_pretrained(str(folder), safe_serialization=True)
        return folder
    return save_lora(components.unet, folder)
