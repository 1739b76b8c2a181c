"""Mobile-Pix2Pix UNet configs, the SD1.5 → Mobile-Pix2Pix converter, and the guidance-conditioned UNet call."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from engines.guidance import guidance_embedding

# In the SD1.5 layout these hold the self- and cross-attention at the highest resolution (64² latents at
# 512²); Mobile-Pix2Pix drops them (MoViE: -12% UNet FLOPs), keeping the ResNets and the resampling.
HIGHEST_RES_ATTENTION_PREFIXES = ("down_blocks.0.attentions.", "up_blocks.3.attentions.")


def sd15_pix2pix_config(**overrides: Any) -> dict[str, Any]:
    """The UNet config of InstructPix2Pix (SD1.5 layout, 8 input channels: noisy latent ‖ image latent)."""
    config: dict[str, Any] = {
        "sample_size": 64,
        "in_channels": 8,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }
    config.update(overrides)
    return config


def mobile_pix2pix_config(config: dict[str, Any]) -> dict[str, Any]:
    """The same UNet without attention in its outermost down block and its outermost up block."""
    down = list(config["down_block_types"])
    up = list(config["up_block_types"])
    down[0] = down[0].replace("CrossAttnDownBlock2D", "DownBlock2D")
    up[-1] = up[-1].replace("CrossAttnUpBlock2D", "UpBlock2D")
    return {**config, "down_block_types": tuple(down), "up_block_types": tuple(up)}


def default_editor_unet_config(guidance_embedding_dim: int | None = None) -> dict[str, Any]:
    """The shipped default's small Mobile-Pix2Pix UNet (MiniLM's 384-d tokens as cross-attention context)."""
    config = mobile_pix2pix_config(
        {
            "sample_size": 32,
            "in_channels": 8,
            "out_channels": 4,
            "block_out_channels": (48, 96, 192),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "layers_per_block": 1,
            "cross_attention_dim": 384,
            "attention_head_dim": 4,
            "norm_num_groups": 16,
        }
    )
    if guidance_embedding_dim is not None:
        config["time_cond_proj_dim"] = 2 * guidance_embedding_dim
    return config


def highest_res_attention_prefixes(config: dict[str, Any]) -> tuple[str, str]:
    """State-dict prefixes of the outermost blocks' attention: down_blocks.0 and the last up block."""
    return ("down_blocks.0.attentions.", f"up_blocks.{len(config['up_block_types']) - 1}.attentions.")


def mobile_pix2pix_state_dict(
    state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...] = HIGHEST_RES_ATTENTION_PREFIXES
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split an SD1.5-layout state dict into the Mobile-Pix2Pix one and the list of dropped keys.

    `prefixes` defaults to the SD1.5 layout's (4 levels); highest_res_attention_prefixes gives them for others.
    """
    kept = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    dropped = sorted(k for k in state_dict if k.startswith(prefixes))
    return kept, dropped


def unet_config(unet: UNet2DConditionModel) -> dict[str, Any]:
    """A UNet's constructor arguments, without diffusers' bookkeeping keys.

    `_use_default_values` must go: from_config drops every key it lists, which would silently undo an
    override of an argument the original model had left at its default.
    """
    return {k: v for k, v in unet.config.items() if not k.startswith("_")}


def convert_to_mobile_pix2pix(unet: UNet2DConditionModel) -> tuple[UNet2DConditionModel, list[str]]:
    """Build the Mobile-Pix2Pix twin of an SD1.5-layout UNet, copying every weight but the dropped attention."""
    config = mobile_pix2pix_config(unet_config(unet))
    if tuple(config["down_block_types"]) == tuple(unet.config.down_block_types) and tuple(
        config["up_block_types"]
    ) == tuple(unet.config.up_block_types):
        raise ValueError("this UNet has no attention at its highest resolution: it is already Mobile-Pix2Pix")
    mobile = UNet2DConditionModel.from_config(config)
    kept, dropped = mobile_pix2pix_state_dict(unet.state_dict(), highest_res_attention_prefixes(config))
    mobile.load_state_dict(kept, strict=True)
    return mobile.to(dtype=unet.dtype).eval(), dropped


def add_guidance_embedding(unet: UNet2DConditionModel, embedding_dim: int) -> UNet2DConditionModel:
    """A copy of a teacher UNet that also takes (s_T, s_I) embeddings; starts out equal to the teacher."""
    config = {**unet_config(unet), "time_cond_proj_dim": 2 * embedding_dim}
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise ValueError(f"teacher and student layouts differ: missing={missing} unexpected={unexpected}")
    # A zero projection adds nothing to the time embedding until training moves it.
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(dtype=unet.dtype)


class GuidedUNet(nn.Module):
    """One UNet call with plain tensor inputs, so the same graph runs eagerly, in ONNX and in TensorRT.

    `guidance` is (B, 2) rows of (s_T, s_I); the model embeds them itself when it was distilled with
    guidance embeddings, and ignores them otherwise.
    """

    def __init__(self, unet: UNet2DConditionModel, guidance_embedding_dim: int | None, guidance_scale: float) -> None:
        super().__init__()
        self.unet = unet
        self.guidance_embedding_dim = guidance_embedding_dim
        self.guidance_scale = guidance_scale

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        cond = None
        if self.guidance_embedding_dim is not None:
            cond = guidance_embedding(guidance, self.guidance_embedding_dim, self.guidance_scale).to(sample.dtype)
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=cond, return_dict=False
        )[0]
