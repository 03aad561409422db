"""The `sft` section: supervised InstructPix2Pix fine-tuning (`spie sft`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SFTConfig:
    """Supervised InstructPix2Pix fine-tuning (`spie sft`): the warm start before RL."""

    # Optimizer steps on the UNet (plus the text encoder with `train_text_encoder`).
    steps: int = 1000
    # (source, instruction, target) triplets per step.
    batch_size: int = 32
    # AdamW learning rate (constant after `warmup_steps` of linear warm-up).
    learning_rate: float = 1e-4
    # Linear learning-rate warm-up steps.
    warmup_steps: int = 50
    # AdamW weight decay.
    weight_decay: float = 1e-2
    # Gradient-norm clipping (0 = off).
    max_grad_norm: float = 1.0
    # InstructPix2Pix conditioning dropout: each of "text only", "image only" and "both" is dropped
    # with this probability (the paper's 5 % each), so classifier-free guidance works on both inputs.
    conditioning_dropout: float = 0.05
    # Exponential moving average of the UNet weights (0 = off); the saved model uses the EMA weights.
    ema_decay: float = 0.0
    # Also train the text encoder (the toy model's random one); InstructPix2Pix keeps CLIP frozen.
    train_text_encoder: bool = False
    # Steps that fit the VAE to the training images before the UNet (the toy model only; 0 = off).
    vae_steps: int = 0
    # VAE learning rate for `vae_steps`.
    vae_learning_rate: float = 2e-3
    # Encode every source and target with the (then frozen) VAE once, before the UNet steps: faster
    # when the data fits in memory (the toy model), instead of encoding each batch.
    cache_latents: bool = False
    # Where the fine-tuned model is written, in the diffusers pipeline layout.
    output_dir: str = "models/sft"
    # Print/log the loss every this many steps.
    log_every: int = 50
