"""SPIE's optional exemplar (style) image conditioning.

SPIE (arXiv 2504.12833, code: ebenarous/SPIE `diffusion_pipeline/architecture.py`) feeds the UNet four
extra input channels computed by a cross-attention "pre-conv" module: queries come from the exemplar
latents concatenated with the noisy latents (8 channels per pixel), keys and values from the text
embedding, and the output is projected back to 4 channels. The UNet's `conv_in` grows by 4 input
channels whose weights start at zero, so a fresh module leaves the base model's output unchanged.
Written here from that description.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ExemplarPreconv(nn.Module):
    """Cross-attention from latent pixels to text tokens, producing 4 extra UNet input channels.

    Args:
        text_dim: width D of the text embeddings.
        inner_dim: attention width (a multiple of `heads`).
        heads: number of attention heads.
    """

    def __init__(self, text_dim: int, inner_dim: int = 320, heads: int = 8) -> None:
        super().__init__()
        if inner_dim % heads:
            raise ValueError(f"inner_dim {inner_dim} must be a multiple of heads {heads}")
        self.heads = heads
        self.to_q = nn.Linear(8, inner_dim, bias=False)
        self.to_k = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, 4, bias=False)

    def forward(
        self, exemplar_latents: torch.Tensor, latents: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """(B, 4, h, w) exemplar latents, (B, 4, h, w) noisy latents, (B, L, D) text -> (B, 4, h, w)."""
        b, _, h, w = latents.shape
        x = torch.cat([exemplar_latents, latents], dim=1).flatten(2).transpose(1, 2)  # (B, h*w, 8)

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, S, H*d) -> (B, H, S, d)
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split(self.to_q(x)), split(self.to_k(text)), split(self.to_v(text))
        )
        attended = attended.transpose(1, 2).reshape(b, h * w, -1)
        return self.to_out(attended).transpose(1, 2).reshape(b, 4, h, w)


def expand_conv_in(unet, extra_channels: int = 4) -> None:
    """Grow `unet.conv_in` by `extra_channels` zero-initialised input channels, in place."""
    old = unet.conv_in
    new = nn.Conv2d(
        old.in_channels + extra_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)
