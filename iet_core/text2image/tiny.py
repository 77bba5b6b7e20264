"""A tiny Stable Diffusion pipeline with random weights, built from configs: for tests,
benchmarks and trying the fine-tuning workflow offline (it draws noise, not pictures)."""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch


# The text tower of the tiny pipeline's encoder and of the tiny CLIP
TEXT_SETTINGS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32,
                     num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=16)


def tiny_tokenizer():
    """A CLIP tokenizer whose vocabulary is single characters (no merges): enough to tell
    captions apart, small enough to write in a test."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in string.ascii_lowercase + string.digits + string.punctuation:
            vocab[char + suffix] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt", pad_token="<|endoftext|>", model_max_length=16)


def build_tiny_pipeline(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon",
                        num_train_timesteps: int = 1000) -> Path:
    """Save a StableDiffusionPipeline of a few thousand parameters (safetensors) into folder:
    VAE downsampling x2, a two-level cross-attention UNet, a one-layer CLIP text encoder."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_SETTINGS, vocab_size=len(tokenizer), projection_dim=16))
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(str(folder), safe_serialization=True)
    return folder


def build_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 16) -> Path:
    """Save a CLIPModel of a few thousand parameters with its processor (tokenizer and image
    processor) into folder, as CLIPModel / CLIPProcessor.save_pretrained write a real one: the
    CLIP score's loading path offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(
        text_config=dict(**TEXT_SETTINGS, vocab_size=len(tokenizer)),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                           image_size=image_size, patch_size=8),
        projection_dim=16))
    model.save_pretrained(str(folder), safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder
