"""Text-to-image fine-tuning with IET-AGC: Stable Diffusion pipelines, LoRA (through peft,
as diffusers does it) or the full UNet, trained by the engine's round loop, with copy
detection in a feature space (iet_core.features)."""
