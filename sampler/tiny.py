"""A seeded tiny InstructPix2Pix, built from small configs with no network access.

The component sizes follow diffusers' own InstructPix2Pix tests (`get_dummy_components`: a UNet with
`in_channels=8` and `block_out_channels=(32, 64)`, a small VAE, a small CLIP text encoder), shrunk a
little further so an RL epoch runs in seconds on a CPU. The tokenizer is a byte-level CLIP tokenizer
with no merges, made locally: every byte is a token.

A VAE with random weights maps every latent to the same grey blur (its GroupNorms absorb any
shift), so no reward could be learned through it. `warm_up_vae` therefore fits the tiny VAE to
reconstruct seeded synthetic scenes for a few hundred steps (about half a minute on 2 CPU cores):
afterwards latents carry colour and layout, and a reward such as brightness is learnable.

The model is saved with `save_pretrained` in the diffusers pipeline layout, so it loads back through
the same `from_pretrained` path as `timbrooks/instruct-pix2pix`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_RESOLUTION = 32  # pixels; the VAE downsamples by 2, so latents are 16 x 16
_TEXT_LENGTH = 32
TINY_MARKER = "spie_tiny.json"  # the recipe a saved tiny model was built from (`built_with`)


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


def tiny_vae(**overrides):
    """The tiny 4-channel `AutoencoderKL` (16 and 32 channels, one layer per block) that halves the
    resolution; `overrides` replace or add constructor arguments. Seed torch before calling."""
    from diffusers import AutoencoderKL

    config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 16,
        "sample_size": TINY_RESOLUTION,
    }
    return AutoencoderKL(**{**config, **overrides})


def tiny_clip_text_encoder(**overrides):
    """A tiny `CLIPTextModel` (hidden 32, 4 heads) over `tiny_tokenizer`'s 514 tokens and 32
    positions; `overrides` replace or add `CLIPTextConfig` arguments. Seed torch before calling."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = {
        "vocab_size": 514,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": _TEXT_LENGTH,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    return CLIPTextModel(CLIPTextConfig(**{**config, **overrides}))


def build_tiny_components(seed: int = 0) -> dict:
    """Seeded tiny components: unet, vae, text_encoder, tokenizer, scheduler."""
    from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel

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
    vae = tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = tiny_clip_text_encoder()
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


def fit_vae(
    vae,
    images: torch.Tensor,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Fit a VAE to reconstruct `images` (MSE + a tiny KL); returns the last loss.

    Args:
        vae: an `AutoencoderKL`, trained in place and left frozen in eval mode.
        images: (M, 3, H, W) in [-1, 1].
        steps: optimizer steps; 0 leaves the weights as they are.
    """
    if steps <= 0:
        return float("nan")
    from tqdm.auto import tqdm

    device = next(vae.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="vae", leave=False, disable=not progress):
        x = images[torch.randint(len(images), (batch_size,), generator=gen)].to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        loss = ((vae.decode(z).sample - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    return float(loss.detach())


def warm_up_vae(vae, seed: int = 0, steps: int = 200, batch_size: int = 32, lr: float = 2e-3) -> float:
    """Fit the VAE to seeded synthetic scenes (`fit_vae` on 512 `shapes_batch` scenes).

    On one CPU thread, whatever the machine: 200 Adam steps amplify the last-bit differences that the
    order of a multi-threaded sum makes, so with 2 threads the weights (and every test and figure
    measured on the tiny model) came out different from those built with 1.
    """
    from sampler.scenes import shapes_batch

    scenes = (
        torch.from_numpy(shapes_batch(seed, 512, TINY_RESOLUTION)).permute(0, 3, 1, 2).float() / 127.5 - 1
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit_vae(vae, scenes, steps, batch_size, lr, seed)
    finally:
        torch.set_num_threads(threads)


def built_with(path: Path, recipe: dict) -> bool:
    """Whether the tiny model at `path` was saved from `recipe`: its `TINY_MARKER` holds every entry."""
    marker = path / TINY_MARKER
    return marker.is_file() and all(json.loads(marker.read_text()).get(k) == v for k, v in recipe.items())


def save_tiny_model(path: str | Path, seed: int = 0, vae_warmup_steps: int = 200) -> Path:
    """Build the tiny model, warm up its VAE and save it in the diffusers pipeline layout.

    Idempotent: an existing folder built with the same seed and warm-up is reused.
    """
    from diffusers import StableDiffusionInstructPix2PixPipeline

    path = Path(path)
    recipe = {
        "seed": seed,
        "resolution": TINY_RESOLUTION,
        "vae_warmup_steps": vae_warmup_steps,
        "vae_threads": 1,
    }
    if built_with(path, recipe):
        return path
    components = build_tiny_components(seed)
    vae_loss = warm_up_vae(components["vae"], seed, vae_warmup_steps)
    pipe = StableDiffusionInstructPix2PixPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / TINY_MARKER).write_text(json.dumps({**recipe, "vae_reconstruction_loss": vae_loss}))
    return path
