"""Text-to-image fine-tuning with IET-AGC: Stable Diffusion pipelines, LoRA (through peft,
as diffusers does it) or the full UNet, trained by the engine's round loop, with copy
detection in a feature space (iet_core.features). Captioned sets load through
iet_core.data. Registered here as the engine's text-to-image family (iet_core.families)."""
from ..families import TEXT_TO_IMAGE, Family, register
from .evaluate import CopyResult, copies_of_run, format_copy_summary
from .export import export_text_to_image
from .model import check_pipeline
from .train import TextToImageTrainer

register(TEXT_TO_IMAGE, Family(trainer=TextToImageTrainer, export=export_text_to_image, evaluate=copies_of_run,
                               result=CopyResult, format_summary=format_copy_summary, check=check_pipeline))
