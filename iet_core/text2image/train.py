"""IET-AGC fine-tuning of a Stable Diffusion UNet on captioned images.

The engine's round loop (iet_core.train.Trainer) runs unchanged: the same AGC bank and skip
rule, shards and MSR, telemetry events, run folder and bit-identical resume. What changes:
- x0 are the VAE's latents and the conditioning is the text encoder's embeddings of the
  captions, both computed once (the encoders stay frozen) and kept on disk
  (iet_core.text2image.cache, in text2image.input_cache), so a step runs only the UNet and a
  resumed or repeated run encodes nothing;
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
from .cache import cache_key, cached, weights_digest
from .model import Components, check_resolution_fits, encode_images, encode_tokens, load_components, tokenize, trainable_unet


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
        check_resolution_fits(c.unet.config, c.vae.config, resolution)
        folder, images, n = self.config.text2image.input_cache, self.dataset.images, len(self.dataset)
        ids = tokenize(c.tokenizer, self.dataset.captions)
        text_key = cache_key("text", weights_digest(c.text_encoder), ids)  # hashed where loaded, before moving
        latent_key = cache_key("latents", weights_digest(c.vae), images, {"scaling_factor": c.vae.config.scaling_factor})
        c.vae.to(self.device).requires_grad_(False).eval()
        c.text_encoder.to(self.device).requires_grad_(False).eval()
        # how each was had ("read", "computed", "recomputed"), for whoever checks the cache worked
        self.input_sources = {}
        text, self.input_sources["text_embeddings"] = cached(
            "text", text_key, n, lambda: encode_tokens(c.text_encoder, ids, self.device), folder)
        latents, self.input_sources["latents"] = cached(
            "latents", latent_key, n, lambda: encode_images(c.vae, images, self.device), folder)
        self.text_embeddings = text.to(self.device)
        return latents.to(self.device)

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
