"""Image ↔ latent codecs with one convention: images in [-1, 1], latents in Stable Diffusion's scaled space."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

# The default model's TAESD: 16 channels wide (the stock one is 64) so encode+decode fit a CPU frame budget.
DEFAULT_TAESD_CONFIG: dict[str, object] = {
    "encoder_block_out_channels": (16, 16, 16, 16),
    "decoder_block_out_channels": (16, 16, 16, 16),
    "latent_channels": 4,
}


#: The frame skip's kernel when none is named (a 1×1 projection: the cheapest, and what v8–v10 ship; v7 had a 3×3).
FRAME_SKIP_KERNEL = 1


class FrameSkip(ModelMixin, ConfigMixin):
    """The input frame, through one small convolution, added to the TAESD decoder's features just after its last
    upsampling.

    An edit is decoded from 4×32×32 latents at 256², which cannot hold the frame's fine structure (the decoder's own
    round trip of a frame scores SSIM 0.84, where a colour-only edit keeps the input's 0.85–0.93); the frame itself
    is at hand when the editor decodes, so the decoder may read it. Zero-initialised: a fresh skip leaves the
    decoder's output exactly as it was, and training decides how much of the frame each edit keeps.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 3, feature_channels: int = 16, kernel_size: int = FRAME_SKIP_KERNEL) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same-size output), got {kernel_size}")
        self.proj = nn.Conv2d(in_channels, feature_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, frames: Tensor) -> Tensor:
        return self.proj(frames)


def last_upsample_end(taesd: AutoencoderTiny) -> int:
    """Index in the decoder's layer list just after its last upsampling: where full-resolution features begin."""
    layers = list(taesd.decoder.layers)
    ups = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Upsample)]
    if not ups:
        raise ValueError("this TAESD decoder never upsamples: a frame skip has no full-resolution features to join")
    return ups[-1] + 1


class TinyCodec(nn.Module):
    """TAESD (AutoencoderTiny): its latents are already in SD's scaled space. With a FrameSkip, decoding also
    reads the input frame (the images that were encoded), at the decoder's output size."""

    def __init__(self, taesd: AutoencoderTiny, frame_skip: FrameSkip | None = None) -> None:
        super().__init__()
        self.taesd = taesd
        self.frame_skip = frame_skip
        if frame_skip is not None:
            width = taesd.config.decoder_block_out_channels[-1]
            if frame_skip.config.feature_channels != width:
                raise ValueError(
                    f"the frame skip feeds {frame_skip.config.feature_channels} channels, the decoder's last "
                    f"stage is {width} wide"
                )
            self._join = last_upsample_end(taesd)

    @property
    def reads_frames(self) -> bool:
        return self.frame_skip is not None

    def encode(self, images: Tensor) -> Tensor:
        return self.taesd.encode(images).latents

    def decode(self, latents: Tensor, frames: Tensor | None = None) -> Tensor:
        if self.frame_skip is None:
            return self.taesd.decode(latents).sample
        if frames is None:
            raise ValueError("this decoder reads the input frame (it has a frame skip): pass the frames")
        decoder = self.taesd.decoder
        # DecoderTiny.forward, split where the frame joins: its clamp, its layers, its [0, 1] → [-1, 1].
        hidden = decoder.layers[: self._join](torch.tanh(latents / 3) * 3)
        hidden = hidden + self.frame_skip(frames.to(hidden.dtype))
        return decoder.layers[self._join :](hidden).mul(2).sub(1)


class KLCodec(nn.Module):
    """Stable Diffusion's AutoencoderKL, scaled to match TAESD (for comparisons and benchmarks)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def encode(self, images: Tensor) -> Tensor:
        return self.vae.encode(images).latent_dist.mode() * self.scaling_factor

    reads_frames = False

    def decode(self, latents: Tensor, frames: Tensor | None = None) -> Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample


Codec = TinyCodec | KLCodec


class CodecEncoder(nn.Module):
    """The encode half of a codec as its own module (one exported graph)."""

    def __init__(self, codec: Codec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, images: Tensor) -> Tensor:
        return self.codec.encode(images)


class CodecDecoder(nn.Module):
    """The decode half of a codec as its own module (one exported graph; it takes the frames when it reads them)."""

    def __init__(self, codec: Codec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, latents: Tensor, frames: Tensor | None = None) -> Tensor:
        return self.codec.decode(latents, frames)
