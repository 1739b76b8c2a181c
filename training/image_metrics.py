"""SSIM as one differentiable function: the evaluation's score and a training loss read the same formula."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Wang et al.'s constants for images in [0, 1], and their 11-tap Gaussian window of σ = 1.5.
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM (Gaussian window, per channel, no padding) of (B, C, H, W) images in [0, 1]."""
    coords = torch.arange(SSIM_WINDOW, dtype=x.dtype, device=x.device) - SSIM_WINDOW // 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    channels = x.shape[1]
    window = (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return ((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)) / ((mx**2 + my**2 + SSIM_C1) * (vx + vy + SSIM_C2))
