"""The adversarial stage's discriminator: a frozen UNet encoder's features scored by small conditioned heads (LADD)."""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from engines.guidance import guidance_embedding, sinusoidal_embedding


class FrozenUNetEncoder(nn.Module):
    """The down blocks and mid block of a frozen UNet; returns each level's output features.

    Gradients still flow to the input sample (the generator needs them); the weights never change.
    """

    def __init__(self, unet: UNet2DConditionModel, guidance_embedding_dim: int | None, guidance_scale: float) -> None:
        super().__init__()
        self.unet = unet.requires_grad_(False).eval()
        self.guidance_embedding_dim = guidance_embedding_dim
        self.guidance_scale = guidance_scale

    @property
    def channels(self) -> list[int]:
        """Channels of each returned feature map: one per down block, then the mid block's."""
        blocks = list(self.unet.config.block_out_channels)
        return [*blocks, blocks[-1]]

    def train(self, mode: bool = True) -> FrozenUNetEncoder:
        super().train(mode)
        self.unet.eval()  # frozen: never in training mode (no dropout)
        return self

    def forward(
        self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor
    ) -> list[torch.Tensor]:
        unet = self.unet
        cond = None
        if self.guidance_embedding_dim is not None:
            cond = guidance_embedding(guidance, self.guidance_embedding_dim, self.guidance_scale).to(sample.dtype)
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), cond)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        x = unet.conv_in(sample)
        features = []
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                x, _ = block(hidden_states=x, temb=emb, encoder_hidden_states=context)
            else:
                x, _ = block(hidden_states=x, temb=emb)
            features.append(x)
        if getattr(unet.mid_block, "has_cross_attention", False):
            x = unet.mid_block(x, emb, encoder_hidden_states=context)
        else:
            x = unet.mid_block(x, emb)
        features.append(x)
        return features


def pooled_prompt(context: torch.Tensor) -> torch.Tensor:
    """Mean of a context's non-padding tokens (B, D); zeros for the empty prompt."""
    mask = (context.abs().sum(-1, keepdim=True) > 0).to(context.dtype)
    return (context * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class ConditionEmbedding(nn.Module):
    """Embeds (t, s_T, s_I, pooled prompt) into one vector the heads condition on."""

    def __init__(self, prompt_dim: int, dim: int, frequencies: int = 32) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(3 * frequencies + prompt_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timesteps: torch.Tensor, guidance: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        parts = [
            sinusoidal_embedding(timesteps.float(), self.frequencies, 1.0),
            sinusoidal_embedding(guidance[:, 0], self.frequencies, 100.0),
            sinusoidal_embedding(guidance[:, 1], self.frequencies, 100.0),
            pooled_prompt(context),
        ]
        return self.mlp(torch.cat(parts, 1))


class DiscriminatorHead(nn.Module):
    """Scores one feature map: a small conv body, an unconditional logit plus a projection onto the condition."""

    def __init__(self, channels: int, hidden: int, cond_dim: int) -> None:
        super().__init__()
        groups = math.gcd(8, hidden)
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.GroupNorm(groups, hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GroupNorm(groups, hidden),
            nn.SiLU(),
        )
        self.out = nn.Conv2d(hidden, 1, 1)
        self.project = nn.Linear(cond_dim, hidden)
        self.hidden = hidden

    def forward(self, features: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.body(features)
        projection = (h.mean((2, 3)) * self.project(cond)).sum(1) / math.sqrt(self.hidden)
        return self.out(h).mean((1, 2, 3)) + projection


class DiscriminatorHeads(nn.Module):
    """One conditioned head per encoder level; the only trainable part of the discriminator."""

    def __init__(self, channels: list[int], prompt_dim: int, hidden: int = 64, cond_dim: int = 128) -> None:
        super().__init__()
        self.condition = ConditionEmbedding(prompt_dim, cond_dim)
        self.heads = nn.ModuleList(DiscriminatorHead(c, hidden, cond_dim) for c in channels)

    def forward(
        self,
        features: list[torch.Tensor],
        timesteps: torch.Tensor,
        guidance: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        """(B, levels) logits."""
        if len(features) != len(self.heads):
            raise ValueError(f"{len(features)} feature maps for {len(self.heads)} heads")
        cond = self.condition(timesteps, guidance, context)
        return torch.stack([head(f, cond) for head, f in zip(self.heads, features, strict=True)], 1)


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()


def r1_penalty(logits: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of ‖∂ΣD/∂inputs‖² (inputs must require grad; keeps the graph for backward)."""
    grads = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return sum(g.pow(2).flatten(1).sum(1).mean() for g in grads)  # type: ignore[return-value]
