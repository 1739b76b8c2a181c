"""The PyTorch backend: eager modules on CPU or CUDA (fp16, channels_last, optional torch.compile on CUDA)."""

from __future__ import annotations

import torch

from engines.backends.base import Backend
from engines.model import EditorModel


class TorchBackend(Backend):
    """Runs EditorModel's modules directly; the reference every other backend is checked against."""

    name = "torch"

    def __init__(
        self,
        model: EditorModel,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        compile: bool = False,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("the torch backend was asked for CUDA, but torch sees no CUDA device")
        # fp16 pays on a GPU; CPU kernels for it are slow, so CPU stays fp32 unless asked.
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device, self.dtype)
        self._unet = self.model.unet
        self._encode = self.model.codec.encode
        self._decode = self.model.codec.decode
        if self.device.type == "cuda":
            self.model.unet.to(memory_format=torch.channels_last)
            self.model.codec.to(memory_format=torch.channels_last)
            if compile:
                self._unet = torch.compile(self._unet, mode="max-autotune", fullgraph=False)
                self._encode = torch.compile(self._encode)
                self._decode = torch.compile(self._decode)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images.to(self.device, self.dtype))

    @torch.inference_mode()
    def denoise(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor
    ) -> torch.Tensor:
        return self._unet(
            sample.to(self.device, self.dtype),
            timestep.to(self.device),
            context.to(self.device, self.dtype),
            guidance.to(self.device, torch.float32),
        )

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents.to(self.device, self.dtype))
