"""Supervised InstructPix2Pix fine-tuning (`spie sft`): the warm start before RL.

The objective is InstructPix2Pix's (Brooks et al. 2023, Sec. 3.2; diffusers'
`examples/instruct_pix2pix/train_instruct_pix2pix.py`), written anew here:

1. z_0 = scale * E(target) (a VAE posterior sample), c_I = E(source) (the posterior mode, unscaled,
   as the pipeline conditions on it), c_T = CLIP(instruction);
2. t ~ U{0, ..., T-1}, eps ~ N(0, I), z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps;
3. conditioning dropout: with probability p each, drop the text only (c_T = CLIP("")), the image only
   (c_I = 0) or both, so classifier-free guidance over both inputs works at sampling time;
4. loss = || eps - eps_theta([z_t, c_I], t, c_T) ||^2 (or the v target for v-prediction models).

For the seeded tiny model the VAE is first fitted to the training images (`sft.vae_steps`), so that
edits decode to what they encode, and the random text encoder may be trained too
(`sft.train_text_encoder`). The result is written with `save_pretrained` in the diffusers pipeline
layout, so RL loads it with `model.pretrained: <folder>` like any InstructPix2Pix.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sampler.models import Components, load_components, resolve_pretrained
from sampler.tiny import fit_vae
from trainer.config import Config, dump_config
from trainer.data.inputs import Inputs, load_inputs
from trainer.engine.policy import resolve_device
from trainer.errors import UserError

RECIPE_FILE = "spie_sft.json"


def dropout_masks(batch: int, p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_text, drop_image), each (B,) bool: text only with prob p, both with p, image only with p."""
    u = torch.rand(batch, generator=generator)
    drop_text = u < 2 * p  # [0, p): text only, [p, 2p): both
    drop_image = (u >= p) & (u < 3 * p)  # [p, 2p): both, [2p, 3p): image only
    return drop_text, drop_image


class EMA:
    """Exponential moving average of a module's parameters: ema <- d * ema + (1 - d) * param."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in module.named_parameters():
            if k in self.shadow:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for k, v in module.named_parameters():
            if k in self.shadow:
                v.copy_(self.shadow[k])


def tokenize(c: Components, texts: list[str], device: torch.device) -> torch.Tensor:
    """N texts -> (N, L) token ids, padded to the tokenizer's length as the pipeline does."""
    tok = c.tokenizer
    return tok(
        list(texts),
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


class SFTTrainer:
    """Holds the model being fine-tuned and does one InstructPix2Pix step at a time.

    Args:
        config: `sft` sizes the run; `model.pretrained` is the starting model.
        inputs: the training triplets; `inputs.targets` must be set.
    """

    def __init__(self, config: Config, inputs: Inputs, device: torch.device | None = None) -> None:
        from diffusers import DDPMScheduler

        if inputs.targets is None:
            raise UserError(
                f"sft: data.source={config.data.source!r} gives no target (edited) images; use "
                "data.source: synthetic, triplets, or a JSONL whose records have a 'target'"
            )
        self.config, self.f = config, config.sft
        self.inputs = inputs
        self.device = device or resolve_device(config.run.device)
        m = config.model
        self.model_path = resolve_pretrained(m.pretrained, m.tiny_dir, seed=config.run.seed)
        try:
            self.c = load_components(self.model_path, m.revision, m.scheduler)
            self.noise_sched = DDPMScheduler.from_pretrained(self.model_path, subfolder="scheduler")
        except (OSError, ValueError) as err:
            raise UserError(
                f"model.pretrained: cannot load {m.pretrained!r}: {str(err).splitlines()[0]}"
            ) from err
        for module in (self.c.unet, self.c.vae, self.c.text_encoder):
            module.to(self.device)
        self.generator = torch.Generator().manual_seed(config.run.seed)
        self.step = 0

    # ------------------------------------------------------------------ phases

    def fit_vae(self, progress: bool = False) -> float:
        """Fit the VAE to the sources and targets for `sft.vae_steps` steps; returns the last loss."""
        images = torch.cat([self.inputs.sources, self.inputs.targets]) * 2 - 1
        return fit_vae(
            self.c.vae,
            images,
            steps=self.f.vae_steps,
            batch_size=self.f.batch_size,
            lr=self.f.vae_learning_rate,
            seed=self.config.run.seed,
            progress=progress,
        )

    def prepare(self) -> None:
        """Make the UNet (and text encoder) trainable and build the optimizer and EMA."""
        unet, text = self.c.unet, self.c.text_encoder
        unet.train().requires_grad_(True)
        params = list(unet.parameters())
        if self.f.train_text_encoder:
            text.train().requires_grad_(True)
            params += list(text.parameters())
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=self.f.learning_rate, weight_decay=self.f.weight_decay)
        warm = max(1, self.f.warmup_steps)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm)
        )
        self.ema = EMA(unet, self.f.ema_decay) if self.f.ema_decay > 0 else None
        with torch.no_grad():
            self.null_ids = tokenize(self.c, [""], self.device)
        self.cache = self._encode_all() if self.f.cache_latents else None

    @torch.no_grad()
    def _encode_all(self, chunk: int = 256) -> dict[str, torch.Tensor]:
        """VAE encodings of every input: target posterior "mean"/"std" and source "mode", (M, 4, h, w)."""
        vae, dev = self.c.vae, self.device
        parts: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "mode": []}
        for start in range(0, len(self.inputs), chunk):
            sl = slice(start, start + chunk)
            post = vae.encode(self.inputs.targets[sl].to(dev) * 2 - 1).latent_dist
            parts["mean"].append(post.mean)
            parts["std"].append(post.std)
            parts["mode"].append(vae.encode(self.inputs.sources[sl].to(dev) * 2 - 1).latent_dist.mode())
        return {k: torch.cat(v) for k, v in parts.items()}

    def loss(self, index: torch.Tensor) -> torch.Tensor:
        """The InstructPix2Pix loss (module docstring) on the B inputs at `index` ((B,) long)."""
        c, g, dev = self.c, self.generator, self.device
        batch = self.inputs.take(index)
        b = len(batch)
        vae = c.vae
        with torch.no_grad():
            if self.cache is not None:
                at = index.to(dev)
                mean, std, image_latents = (self.cache[k][at] for k in ("mean", "std", "mode"))
            else:
                post = vae.encode(batch.targets.to(dev) * 2 - 1).latent_dist
                mean, std = post.mean, post.std
                image_latents = vae.encode(batch.sources.to(dev) * 2 - 1).latent_dist.mode()
            z0 = (mean + std * torch.randn(mean.shape, generator=g).to(dev)) * vae.config.scaling_factor
        drop_text, drop_image = dropout_masks(b, self.f.conditioning_dropout, g)
        ids = tokenize(c, batch.instructions, dev)
        ids[drop_text.to(dev)] = self.null_ids
        text = c.text_encoder(ids)[0]
        image_latents = image_latents * (~drop_image).to(dev, image_latents.dtype).view(b, 1, 1, 1)
        noise = torch.randn(z0.shape, generator=g).to(dev)
        t = torch.randint(0, self.noise_sched.config.num_train_timesteps, (b,), generator=g).to(dev)
        zt = self.noise_sched.add_noise(z0, noise, t)
        pred = c.unet(torch.cat([zt, image_latents], dim=1), t, text).sample
        if self.noise_sched.config.prediction_type == "v_prediction":
            target = self.noise_sched.get_velocity(z0, noise, t)
        else:
            target = noise
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    def train_step(self) -> float:
        """One optimizer step on a random batch; returns the loss."""
        index = torch.randint(len(self.inputs), (self.f.batch_size,), generator=self.generator)
        loss = self.loss(index)
        if not torch.isfinite(loss):
            raise RuntimeError(f"sft: non-finite loss at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.f.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.f.max_grad_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.update(self.c.unet)
        self.step += 1
        return loss.item()

    def save(self, out: Path, extra: dict) -> Path:
        """Write the model (EMA weights when EMA is on) in the diffusers pipeline layout."""
        from diffusers import StableDiffusionInstructPix2PixPipeline

        unet = self.c.unet
        if self.ema is not None:
            unet = copy.deepcopy(unet)
            self.ema.copy_to(unet)
        for module in (unet, self.c.text_encoder, self.c.vae):
            module.eval().requires_grad_(False)
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=self.c.vae,
            text_encoder=self.c.text_encoder,
            tokenizer=self.c.tokenizer,
            unet=unet,
            scheduler=self.noise_sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(out, safe_serialization=True)
        (out / RECIPE_FILE).write_text(json.dumps(extra, indent=2) + "\n")
        return out


def sft(config: Config, progress: bool | None = None) -> Path:
    """Run supervised fine-tuning per `config.sft`; returns the folder of the fine-tuned model."""
    progress = (not config.run.quiet) if progress is None else progress
    out = Path(config.sft.output_dir)
    inputs = load_inputs(config.data, config.model.resolution, seed=config.run.seed)
    trainer = SFTTrainer(config, inputs)
    print(f"[spie] sft: {len(inputs)} training triplets, {config.sft.steps} steps, output {out}")
    t0 = time.perf_counter()
    vae_loss = float("nan")
    if config.sft.vae_steps > 0:
        vae_loss = trainer.fit_vae(progress)
        print(f"[spie] sft: VAE fitted for {config.sft.vae_steps} steps, reconstruction MSE {vae_loss:.4f}")
    t1 = time.perf_counter()
    trainer.prepare()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "sft_log.jsonl"
    log_path.write_text("")
    losses: list[float] = []
    bar = tqdm(range(config.sft.steps), desc="sft", disable=not progress)
    for step in bar:
        losses.append(trainer.train_step())
        if (step + 1) % config.sft.log_every == 0 or step + 1 == config.sft.steps:
            recent = sum(losses[-config.sft.log_every :]) / len(losses[-config.sft.log_every :])
            bar.set_postfix(loss=f"{recent:.4f}")
            with log_path.open("a") as f:
                f.write(
                    json.dumps({"step": step + 1, "loss": recent, "time_s": time.perf_counter() - t0}) + "\n"
                )
    t2 = time.perf_counter()
    final = sum(losses[-50:]) / max(1, len(losses[-50:])) if losses else math.nan
    dump_config(config, out / "sft_config.yaml")
    trainer.save(
        out,
        {
            "base_model": config.model.pretrained,
            "steps": config.sft.steps,
            "items": len(inputs),
            "final_loss": final,
            "vae_reconstruction_mse": vae_loss,
            "time_vae_s": round(t1 - t0, 1),
            "time_unet_s": round(t2 - t1, 1),
        },
    )
    print(f"[spie] sft: done in {t2 - t0:.0f}s, final loss {final:.4f}; model in {out}")
    return out
