"""IET-AGC fine-tuning of a Stable Diffusion UNet on captioned images.

The engine's round loop (iet_core.train.Trainer) runs unchanged: the same AGC bank and skip
rule, shards and MSR, telemetry events, run folder and bit-identical resume. What changes:
- x0 are the VAE's latents and the conditioning is the text encoder's embeddings of the
  captions, both computed once (the encoders stay frozen), so a step runs only the UNet;
- what trains is a LoRA adapter (peft, added as diffusers does) or the whole UNet. With LoRA
  the K proxies are K adapter weight vectors over one frozen base: each round they start from
  the global adapter and are averaged by shard size, and side by side (train.execution
  'batched') the base's weights are shared by all K.
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..models import seeded_global_rng
from ..train import Trainer
from .model import Components, encode_captions, encode_images, load_components, trainable_unet


class TextToImageTrainer(Trainer):
    components: Components

    def build_model(self) -> torch.nn.Module:
        if self.dataset.captions is None:
            raise ConfigError("text-to-image fine-tuning needs captions: set data.caption_column and give a captioned set.")
        self.components = load_components(self.config.model.pretrained)
        with seeded_global_rng(self.config.train.seed):  # peft draws the adapters' first weights from it
            return trainable_unet(self.components, self.config.text2image)

    def noise_scheduler(self):
        return self.components.scheduler

    def training_inputs(self) -> torch.Tensor:
        c, resolution = self.components, self.config.data.resolution
        step = c.vae_scale * 2 ** (len(c.unet.config.block_out_channels) - 1)
        if resolution % step:
            raise ConfigError(f"data.resolution={resolution}: this pipeline needs a multiple of {step} pixels "
                              f"(e.g. {max(step, resolution // step * step)}).")
        c.vae.to(self.device).requires_grad_(False).eval()
        c.text_encoder.to(self.device).requires_grad_(False).eval()
        self.text_embeddings = encode_captions(c.tokenizer, c.text_encoder, self.dataset.captions, self.device)
        return encode_images(c.vae, self.dataset.images, self.device)

    def conditioning(self, batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.text_embeddings[batches],)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.components.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":  # v = sqrt(ab) * eps - sqrt(1 - ab) * x0, as diffusers' get_velocity
            return self.sqrt_ab[t][..., None, None, None] * noise - self.sqrt_one_minus_ab[t][..., None, None, None] * x0
        raise ConfigError(f"the pipeline's scheduler predicts {kind!r}: fine-tuning supports epsilon and v_prediction.")

    def _state_dict(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Only what trains (the adapter, or the UNet's weights): the frozen base stays in model.pretrained."""
        return {name: value[0] for name, value in self.flat.unflatten(vector[None]).items()}

    def preview_images(self, count: int) -> torch.Tensor:
        from .evaluate import generate

        captions = [self.dataset.captions[i % len(self.dataset)] for i in range(count)]
        return generate(self.components, captions, resolution=self.config.data.resolution,
                        guidance_scale=self.config.text2image.guidance_scale, steps=self.config.train.preview_steps,
                        device=self.device, seed=self.config.train.seed)
