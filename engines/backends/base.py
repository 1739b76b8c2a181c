"""The Backend interface: the three tensor programs an editor runs (encode, denoise, decode), one ABC."""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np
import torch

#: The decoder's second input when it has a frame skip (engines.export names its graphs' inputs).
FRAMES_INPUT = "frames"


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


class ExportedGraphBackend(Backend):
    """A backend that runs the exported ONNX graphs by input name (ONNX Runtime, OpenVINO): the three programs
    in terms of one `_run`, and which inputs each graph takes (`_inputs`; export.input_names)."""

    _inputs: dict[str, set[str]]

    @abc.abstractmethod
    def _run(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        """Run graph `name` on the inputs it takes (others are left out); its first output, float32 on the CPU."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("encoder", images=images)

    def denoise(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor
    ) -> torch.Tensor:
        return self._run(
            "unet", sample=sample, timestep=timestep.float(), encoder_hidden_states=context, guidance=guidance
        )

    def decode(self, latents: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        if frames is None:
            if FRAMES_INPUT in self._inputs["decoder"]:
                raise ValueError("this model's decoder reads the input frame (it has a frame skip): pass the frames")
            return self._run("decoder", latents=latents)
        return self._run("decoder", latents=latents, **{FRAMES_INPUT: frames})


def float_feed(inputs: dict[str, torch.Tensor], taken: set[str]) -> dict[str, np.ndarray]:
    """The inputs a graph takes, as contiguous float32 arrays."""
    return {
        k: np.ascontiguousarray(v.detach().to("cpu", torch.float32).numpy()) for k, v in inputs.items() if k in taken
    }
