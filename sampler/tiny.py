"""A seeded tiny InstructPix2Pix, built from small configs with no network access.

The component sizes follow diffusers' own InstructPix2Pix tests (`get_dummy_components`: a UNet with
`in_channels=8` and `block_out_channels=(32, 64)`, a small VAE, a small CLIP text encoder), shrunk a
little further so an RL epoch runs in seconds on a CPU. The tokenizer is a byte-level CLIP tokenizer
with no merges, made locally: every byte is a token.

The model is saved with `save_pretrained` in the diffusers pipeline layout, so it loads back through
the same `from_pretrained` path as `timbrooks/instruct-pix2pix`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_RESOLUTION = 32  # pixels; the VAE downsamples by 2, so latents are 16 x 16
_TEXT_LENGTH = 32


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1))
        + list(range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1))
    )
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_tokenizer():
    """A CLIP tokenizer whose vocabulary is the 256 bytes (plus end-of-word forms): 514 tokens."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    for ch in _byte_alphabet():
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_TEXT_LENGTH)


def build_tiny_components(seed: int = 0) -> dict:
    """Seeded tiny components: unet, vae, text_encoder, tokenizer, scheduler."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2,
        in_channels=8,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=TINY_RESOLUTION,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_TEXT_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # The noise schedule of Stable Diffusion 1.5 / InstructPix2Pix.
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_tokenizer(),
        "scheduler": scheduler,
    }


def save_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny model and save it in the diffusers pipeline layout; returns `path`.

    Idempotent: an existing folder built with the same seed is reused.
    """
    from diffusers import StableDiffusionInstructPix2PixPipeline

    path = Path(path)
    marker = path / "spie_tiny.json"
    if marker.is_file() and json.loads(marker.read_text()).get("seed") == seed:
        return path
    pipe = StableDiffusionInstructPix2PixPipeline(
        **build_tiny_components(seed), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    marker.write_text(json.dumps({"seed": seed, "resolution": TINY_RESOLUTION}))
    return path
