"""The Backend interface: the three tensor programs an editor runs (encode, denoise, decode), one ABC."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (a missing package, no CUDA); the message says what is missing."""


class Backend(abc.ABC):
    """Runs a batch of B rows through the editor's networks; every method takes and returns torch tensors.

    Images are (B, 3, H, W) in [-1, 1]; latents (B, 4, H/8, W/8) in Stable Diffusion's scaled space.
    """

    name: ClassVar[str]
    device: torch.device
    dtype: torch.dtype

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image → latent (TAESD encoder)."""

    @abc.abstractmethod
    def denoise(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor
    ) -> torch.Tensor:
        """One UNet pass: sample (B,8,h,w), timestep (B,), context (B,L,D), guidance (B,2) = (s_T, s_I)."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Latent → image (TAESD decoder). `frames`: the images that were encoded, which a decoder with a frame
        skip reads (engines.autoencoder.FrameSkip) and any other ignores."""
