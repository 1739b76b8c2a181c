"""Cross-attention over a one-token context without the attention: every query gets that token's value."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention


class OneTokenCrossAttnProcessor:
    """A diffusers attention processor for cross-attention whose context is a single token.

    Softmax over one key is 1 whatever the query, so the output is out(v(token)) at every position: the query
    and key projections, their norms and the attention product are skipped, exactly (MobileVD's optimised
    cross-attention). Query-side parts (spatial or group norm) touch only the query, so they drop out too.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] != 1 or attention_mask is not None:
            got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"one-token cross-attention needs an unmasked (batch, 1, dim) context, got {got}")
        residual = hidden_states
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        value = attn.to_out[1](attn.to_out[0](attn.to_v(encoder_hidden_states)))  # (batch, 1, channels)
        if hidden_states.ndim == 4:
            out = value.transpose(1, 2)[..., None].expand_as(hidden_states)
        else:
            out = value.expand(-1, hidden_states.shape[1], -1)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_one_token_cross_attention(unet: UNet2DConditionModel) -> int:
    """Give every cross-attention of `unet` the one-token processor; returns how many it changed."""
    changed = 0
    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            module.set_processor(OneTokenCrossAttnProcessor())
            changed += 1
    return changed
