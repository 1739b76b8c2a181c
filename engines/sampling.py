"""The noise schedule and the two samplers: the one-step student edit and the multi-step 3-pass CFG teacher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from engines.guidance import combine_cfg

# A UNet call: (sample (B,8,h,w), timestep (B,), context (B,L,D), guidance (B,2)) -> prediction (B,4,h,w).
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process a UNet was trained with, and what its output means."""

    alphas_cumprod: torch.Tensor
    prediction_type: str
    scheduler_config: dict[str, Any]

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        scheduler = DDPMScheduler.from_config(config)
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        # Keep keys only other schedulers know (DDIM's set_alpha_to_one): the teacher sampler rebuilds DDIM from it.
        full_config = {k: v for k, v in {**scheduler.config, **config}.items() if not k.startswith("_")}
        return cls(scheduler.alphas_cumprod.clone().float(), prediction_type, full_config)

    @classmethod
    def default(cls) -> NoiseSchedule:
        """Stable Diffusion's scaled-linear schedule; the shipped default predicts x0 directly ('sample')."""
        return cls.from_scheduler_config(
            {
                "num_train_timesteps": 1000,
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "prediction_type": "sample",
                "clip_sample": False,  # TAESD latents exceed ±1
                "timestep_spacing": "trailing",  # few-step sampling starts at t = 999, as the student does
            }
        )

    def coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(ᾱ_t), sqrt(1 − ᾱ_t) shaped to broadcast against `like`."""
        a = self.alphas_cumprod.to(like.device)[timesteps.long()].view(-1, 1, 1, 1).to(like.dtype)
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sa, sb = self.coefficients(timesteps, x0)
        return sa * x0 + sb * noise

    def predict_x0(self, prediction: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The clean latent implied by a UNet output at x_t, whatever the model predicts."""
        sa, sb = self.coefficients(timesteps, x_t)
        if self.prediction_type == "sample":
            return prediction
        if self.prediction_type == "epsilon":
            return (x_t - sb * prediction) / sa
        return sa * x_t - sb * prediction  # v_prediction

    def predict_eps(self, prediction: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise implied by a UNet output at x_t (what guidance is combined over)."""
        sa, sb = self.coefficients(timesteps, x_t)
        if self.prediction_type == "epsilon":
            return prediction
        if self.prediction_type == "sample":
            return (x_t - sa * prediction) / sb.clamp_min(1e-4)
        return sb * x_t + sa * prediction  # v_prediction

    def eps_to_prediction(self, eps: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The inverse of predict_eps: a model output of this schedule's kind from a noise estimate."""
        sa, sb = self.coefficients(timesteps, x_t)
        if self.prediction_type == "epsilon":
            return eps
        x0 = (x_t - sb * eps) / sa
        if self.prediction_type == "sample":
            return x0
        return sa * eps - sb * x0  # v_prediction


def student_start(
    schedule: NoiseSchedule, noise: torch.Tensor, timestep: int, guess: torch.Tensor | None
) -> torch.Tensor:
    """The one-step student's input x_t: noise, forward-diffused from a guess of the output when given."""
    t = torch.full((noise.shape[0],), timestep, dtype=torch.long)
    x0 = torch.zeros_like(noise) if guess is None else guess
    return schedule.add_noise(x0, noise, t)


def cfg_prediction(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    image_latent: torch.Tensor,
    timesteps: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor,
    text_guidance: torch.Tensor,
    image_guidance: torch.Tensor,
) -> torch.Tensor:
    """InstructPix2Pix's 3-pass guided output, as one batched call of 3B rows, in the model's own kind."""
    b = x_t.shape[0]
    null = null_context.expand(b, -1, -1).to(context.dtype)
    sample = torch.cat(
        [
            torch.cat([x_t, image_latent], 1),
            torch.cat([x_t, image_latent], 1),
            torch.cat([x_t, torch.zeros_like(image_latent)], 1),
        ]
    )
    ctx = torch.cat([context, null, null])
    ts = timesteps.repeat(3)
    unused = torch.zeros(3 * b, 2, dtype=x_t.dtype, device=x_t.device)
    full, image_only, uncond = denoise(sample, ts, ctx, unused).chunk(3)
    x3 = torch.cat([x_t] * 3)
    eps_full, eps_image, eps_uncond = schedule.predict_eps(torch.cat([full, image_only, uncond]), x3, ts).chunk(3)
    eps = combine_cfg(eps_uncond, eps_image, eps_full, text_guidance, image_guidance)
    return schedule.eps_to_prediction(eps, x_t, timesteps)


def teacher_sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    image_latent: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor,
    text_guidance: torch.Tensor,
    image_guidance: torch.Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    guidance_distilled: bool = False,
) -> torch.Tensor:
    """Multi-step DDIM sampling of an edit's clean latent.

    With `guidance_distilled`, each step is one pass that receives (s_T, s_I); otherwise each step is
    the 3-pass classifier-free guidance of InstructPix2Pix.
    """
    scheduler = DDIMScheduler.from_config(schedule.scheduler_config)
    scheduler.set_timesteps(steps)
    x = torch.randn(image_latent.shape, generator=generator).to(image_latent)
    guidance = torch.stack([text_guidance, image_guidance], 1).to(x.dtype)
    for t in scheduler.timesteps:
        ts = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        if guidance_distilled:
            out = denoise(torch.cat([x, image_latent], 1), ts, context, guidance)
        else:
            out = cfg_prediction(
                denoise, schedule, x, image_latent, ts, context, null_context, text_guidance, image_guidance
            )
        x = scheduler.step(out, t, x).prev_sample
    return x
