"""Image ↔ latent codecs with one convention: images in [-1, 1], latents in Stable Diffusion's scaled space."""

from __future__ import annotations

from diffusers import AutoencoderKL, AutoencoderTiny
from torch import Tensor, nn

# The default model's TAESD: 16 channels wide (the stock one is 64) so encode+decode fit a CPU frame budget.
DEFAULT_TAESD_CONFIG: dict[str, object] = {
    "encoder_block_out_channels": (16, 16, 16, 16),
    "decoder_block_out_channels": (16, 16, 16, 16),
    "latent_channels": 4,
}


class TinyCodec(nn.Module):
    """TAESD (AutoencoderTiny): its latents are already in SD's scaled space."""

    def __init__(self, taesd: AutoencoderTiny) -> None:
        super().__init__()
        self.taesd = taesd

    def encode(self, images: Tensor) -> Tensor:
        return self.taesd.encode(images).latents

    def decode(self, latents: Tensor) -> Tensor:
        return self.taesd.decode(latents).sample


class KLCodec(nn.Module):
    """Stable Diffusion's AutoencoderKL, scaled to match TAESD (for comparisons and benchmarks)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def encode(self, images: Tensor) -> Tensor:
        return self.vae.encode(images).latent_dist.mode() * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
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
    """The decode half of a codec as its own module (one exported graph)."""

    def __init__(self, codec: Codec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, latents: Tensor) -> Tensor:
        return self.codec.decode(latents)
