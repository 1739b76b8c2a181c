"""The random draws and loss weights the distillation recipes share: timesteps, guidance scales, row weights."""

from __future__ import annotations

import numpy as np
import torch


def row_mask(
    rng: np.random.Generator, batch: int, probability: float, device: torch.device | None = None
) -> torch.Tensor:
    """A (batch,) boolean mask of rows chosen with `probability`, one uniform draw a row, on `device`."""
    return torch.from_numpy(rng.random(batch) < probability).to(device)


def sample_timesteps(rng: np.random.Generator, batch: int, num_train: int, high_t_probability: float) -> torch.Tensor:
    """Uniform timesteps, with a share set to the last one (the one-step student's)."""
    t = rng.integers(0, num_train, size=batch)
    t[rng.random(batch) < high_t_probability] = num_train - 1
    return torch.from_numpy(t).long()


def sample_scales(
    rng: np.random.Generator, batch: int, text_range: tuple[float, float], image_range: tuple[float, float]
) -> torch.Tensor:
    """(B, 2) rows of (s_T, s_I), each uniform in its range."""
    s_t = rng.uniform(text_range[0], text_range[1], batch)
    s_i = rng.uniform(image_range[0], image_range[1], batch)
    return torch.from_numpy(np.stack([s_t, s_i], 1)).float()


def row_weights(scales: torch.Tensor, relative_text_scale: bool) -> torch.Tensor:
    """(B,) loss weights: 1/max(1, s_T)² per row when `relative_text_scale`, else ones."""
    if not relative_text_scale:
        return torch.ones(scales.shape[0], device=scales.device)
    return 1.0 / scales[:, 0].clamp(min=1.0) ** 2


def row_weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over rows of weight × the row's mean squared error (equal weights: plain MSE)."""
    per_row = (prediction - target).pow(2).flatten(1).mean(1)
    return (per_row * weights).sum() / weights.numel()
