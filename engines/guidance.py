"""Sinusoidal embeddings of the two guidance scales (s_T, s_I) that replace 3-pass classifier-free guidance."""

from __future__ import annotations

import torch


def sinusoidal_embedding(values: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    """Embed scalars (B,) as (B, dim) [sin | cos] features, as LCM embeds its guidance scale w."""
    half = dim // 2
    # The same operations in the same order as diffusers' LCM get_guidance_scale_embedding (bit-identical),
    # made on the values' device: a copy from host memory would break CUDA-graph capture of the UNet.
    exponent = torch.log(torch.full((), 10000.0, device=values.device)) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=values.device) * -exponent)
    args = (values.float() * scale)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def guidance_embedding(scales: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Embed (B, 2) rows of (s_T, s_I) as (B, 2*dim): the UNet's `timestep_cond`, added to its time embedding."""
    if scales.ndim != 2 or scales.shape[1] != 2:
        raise ValueError(f"guidance scales must have shape (B, 2), got {tuple(scales.shape)}")
    return torch.cat(
        [sinusoidal_embedding(scales[:, 0], dim, scale), sinusoidal_embedding(scales[:, 1], dim, scale)], dim=1
    )


def combine_cfg(
    eps_uncond: torch.Tensor,
    eps_image: torch.Tensor,
    eps_full: torch.Tensor,
    text_guidance: torch.Tensor,
    image_guidance: torch.Tensor,
) -> torch.Tensor:
    """InstructPix2Pix's 3-pass guidance: ε(∅,∅) + s_I[ε(c_I,∅) − ε(∅,∅)] + s_T[ε(c_I,c_T) − ε(c_I,∅)]."""
    s_t = text_guidance.view(-1, 1, 1, 1).to(eps_full.dtype)
    s_i = image_guidance.view(-1, 1, 1, 1).to(eps_full.dtype)
    return eps_uncond + s_i * (eps_image - eps_uncond) + s_t * (eps_full - eps_image)
