"""The rollout batch: the one batch type that travels from sampler to scorers to learner."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch


@dataclass
class Rollout:
    """N edits with their denoising trajectories (T steps, latents C x h x w, images 3 x H x W).

    Attributes:
        latents: (N, T + 1, C, h, w) x_T ... x_0 along each trajectory.
        step_index: (N, T) long, position in the scheduler's timesteps of each step taken.
        log_probs: (N, T) log-probability of each step under the behaviour policy.
        stochastic: (T,) bool, steps that drew noise (only those carry a log-probability).
        text_embeds: (N, L, D) instruction embeddings (conditioning, frozen).
        image_latents: (N, C, h, w) source-image latents (VAE mode, unscaled, as InstructPix2Pix).
        images: (N, 3, H, W) float in [0, 1], the decoded edits.
        sources: (N, 3, H, W) float in [0, 1], the source images.
        group: (N,) long, index of the (source, instruction) input an edit belongs to.
        instructions: N instructions.
        exemplar_latents: (N, C, h, w) exemplar latents, or None without exemplar conditioning.
        masks: (N, H, W) bool edit masks, or None.
        metadata: N dicts of per-item facts for the scorers (JSON-safe, e.g. the synthetic ground
            truth an oracle scorer checks), or None.
        policy_version: version of the weights that sampled this batch.
        item_ids: N stable ids, e.g. "e3-b1-i5".
        advantages: (N,) float per-edit advantages, attached by the trainer after scoring (PPO).
        ranks: (N,) long, each edit's place in its group's ranking, 0 = best, attached by the
            trainer after scoring (SPIE ranking). Per-item, so selecting, concatenating and
            splitting the batch keep every signal with its edit.
        pooled_embeds: (N, P) pooled instruction embeddings (FLUX.1 Kontext's CLIP), or None.
        text_mask: (N, K, L) float, 1 where `text_embeds` (then (N, K, L, D): instruction and
            negative prompt, padded) holds a token (Qwen-Image-Edit), or None.
    """

    latents: torch.Tensor
    step_index: torch.Tensor
    log_probs: torch.Tensor
    stochastic: torch.Tensor
    text_embeds: torch.Tensor
    image_latents: torch.Tensor
    images: torch.Tensor
    sources: torch.Tensor
    group: torch.Tensor
    instructions: list[str]
    exemplar_latents: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    metadata: list[dict] | None = None
    policy_version: int = 0
    item_ids: list[str] = field(default_factory=list)
    advantages: torch.Tensor | None = None
    ranks: torch.Tensor | None = None
    pooled_embeds: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> Rollout:
        """The sub-batch of items `index` (a (K,) long tensor or list)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "stochastic" or value is None or isinstance(value, int):
                out[f.name] = value
            elif isinstance(value, torch.Tensor):
                out[f.name] = value[idx.to(value.device)]
            else:
                out[f.name] = [value[i] for i in idx.tolist()]
        return Rollout(**out)

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        """Concatenate rollouts along the item axis (groups are renumbered to stay distinct)."""
        out, offset, groups = {}, 0, []
        for part in parts:
            groups.append(part.group + offset)
            offset += int(part.group.max()) + 1 if len(part) else 0
        for f in fields(Rollout):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "group":
                out[f.name] = torch.cat(groups)
            elif f.name in ("stochastic", "policy_version"):
                out[f.name] = values[0] if f.name == "stochastic" else min(values)
            elif values[0] is None:
                out[f.name] = None
            elif isinstance(values[0], torch.Tensor):
                out[f.name] = torch.cat(values)
            else:
                out[f.name] = [v for vs in values for v in vs]
        return Rollout(**out)

    def edited_uint8(self) -> list[np.ndarray]:
        """The edits as N (H, W, 3) uint8 arrays, the scorers' input format."""
        return to_uint8(self.images)

    def sources_uint8(self) -> list[np.ndarray]:
        return to_uint8(self.sources)


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """(N, 3, H, W) float in [0, 1] -> N arrays (H, W, 3) uint8."""
    arr = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return list(arr)
