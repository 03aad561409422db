"""A seeded tiny FLUX.1 Kontext, built from small configs with no network access.

The sizes follow diffusers' own Kontext tests (`tests/pipelines/flux/test_pipeline_flux_kontext.py`,
`get_dummy_components`: a one-double-block, one-single-block `FluxTransformer2DModel` with 2 heads of
16, a 5-layer CLIP and a tiny T5), with guidance embedding on (Kontext is guidance-distilled) and
a 4-channel VAE that halves the resolution, warmed up on synthetic scenes as the tiny InstructPix2Pix's
is (`sampler.tiny.warm_up_vae`), so the latents carry colour. The VAE's `shift_factor` and
`scaling_factor` are then set to the latents' mean and inverse std, as FLUX's were. Both tokenizers
are made locally: the byte-level CLIP tokenizer of `sampler.tiny` and a character-level T5 (Unigram)
tokenizer. Saved with `save_pretrained` as a `FluxKontextPipeline`, so it loads back through the same
`from_pretrained` path as `black-forest-labs/FLUX.1-Kontext-dev`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_TEXT_LENGTH = 32


def tiny_t5_tokenizer():
    """A T5 tokenizer over single characters and word-initial characters (192 pieces)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(chr(c), -1.0) for c in range(32, 127)]
    pieces += [("\u2581" + chr(c), -1.0) for c in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=_TEXT_LENGTH)


def build_tiny_kontext(seed: int = 0) -> dict:
    """Seeded tiny Kontext components (the `FluxKontextPipeline` constructor's arguments)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from sampler.tiny import tiny_clip_text_encoder, tiny_tokenizer, tiny_vae

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2 x 2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(seed + 1)
    vae = tiny_vae(sample_size=32, use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(seed + 2)
    text_encoder = tiny_clip_text_encoder(intermediate_size=37, num_hidden_layers=5, projection_dim=32)
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=192, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0)
    )
    # FLUX.1's scheduler config: resolution-dependent shift between 0.5 and 1.15.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_tokenizer(),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tiny_t5_tokenizer(),
        "transformer": transformer,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _normalise_vae(vae, seed: int) -> None:
    """Set the VAE's shift_factor / scaling_factor to its latents' mean and 1 / std on seeded scenes."""
    from sampler.scenes import shapes_batch

    scenes = torch.from_numpy(shapes_batch(seed + 7, 128, 32)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(scenes).latent_dist.mode()
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))


def save_tiny_kontext(path: str | Path, seed: int = 0, vae_warmup_steps: int = 200) -> Path:
    """Build the tiny Kontext, warm up and normalise its VAE, and save it (idempotent per recipe)."""
    from diffusers import FluxKontextPipeline

    from sampler.tiny import TINY_MARKER, built_with, warm_up_vae

    path = Path(path)
    recipe = {"family": "flux_kontext", "seed": seed, "vae_warmup_steps": vae_warmup_steps}
    if built_with(path, recipe):
        return path
    components = build_tiny_kontext(seed)
    vae_loss = warm_up_vae(components["vae"], seed, vae_warmup_steps)
    _normalise_vae(components["vae"], seed)
    path.mkdir(parents=True, exist_ok=True)
    FluxKontextPipeline(**components).save_pretrained(path, safe_serialization=True)
    (path / TINY_MARKER).write_text(json.dumps({**recipe, "vae_reconstruction_loss": vae_loss}))
    return path
