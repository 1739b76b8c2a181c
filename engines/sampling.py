"""The noise schedule and the samplers: the one-step student edit and multi-step sampling (3-pass CFG or distilled)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from engines.guidance import combine_cfg

# A UNet call: (sample (B,8,h,w), timestep (B,), context (B,L,D), guidance (B,2)) -> prediction (B,4,h,w).
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process a UNet was trained with, and what its output means."""

    alphas_cumprod: torch.Tensor
    prediction_type: str
    scheduler_config: dict[str, Any]
    #: The sampler the model's folder names: scheduler_config.json's diffusers class (_class_name; DDIM, as the
    #: teacher sampler, where it names none) ...
    sampler_class: str = "DDIMScheduler"
    #: ... built from the keys the file gives, so that the class fills in its own defaults (Euler's "linspace"
    #: timestep spacing, not DDPM's "leading"), as diffusers' pipelines do.
    sampler_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        scheduler = DDPMScheduler.from_config(config)
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        # Keep keys only other schedulers know (DDIM's set_alpha_to_one): the teacher sampler rebuilds DDIM from it.
        full_config = {k: v for k, v in {**scheduler.config, **config}.items() if not k.startswith("_")}
        sampler_class = str(config.get("_class_name", "DDIMScheduler"))
        scheduler_class(sampler_class)  # an unknown class fails at load, not at the first frame
        own_keys = {k: v for k, v in config.items() if not k.startswith("_")}
        return cls(scheduler.alphas_cumprod.clone().float(), prediction_type, full_config, sampler_class, own_keys)

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

    def make_sampler(self, steps: int, device: torch.device | str | None = None) -> SchedulerMixin:
        """A new instance of the model's own scheduler, set to `steps` (one per sampling run: it keeps step state)."""
        scheduler = scheduler_class(self.sampler_class).from_config(self.sampler_config or self.scheduler_config)
        scheduler.set_timesteps(steps, device=device)
        return scheduler

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


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class called `name`; ValueError if diffusers has no such scheduler."""
    found = getattr(diffusers, name, None)
    if not (isinstance(found, type) and issubclass(found, SchedulerMixin)):
        raise ValueError(f"scheduler class {name!r} is not a diffusers scheduler")
    return found


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


@dataclass
class SamplerLane:
    """One sampling run: a scheduler (its own step state) and the generator its noisy steps draw from."""

    scheduler: SchedulerMixin
    generator: torch.Generator | None = None

    def step(self, prediction: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # As diffusers' pipelines do (prepare_extra_step_kwargs): only schedulers that draw noise take a generator.
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        extra = {"generator": self.generator} if takes_generator else {}
        return self.scheduler.step(prediction, t, x, **extra).prev_sample


def sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    lanes: Sequence[SamplerLane],
    x: torch.Tensor,
    image_latent: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor,
    text_guidance: torch.Tensor,
    image_guidance: torch.Tensor,
    guidance_distilled: bool = False,
) -> torch.Tensor:
    """Run the lanes' schedulers from x (their start, noise already scaled) to the edit's clean latent.

    The rows of x are split evenly between the lanes, in order: one lane steps the whole batch, one lane a row
    keeps each row's draws its own (a stream's frames do not depend on what else is in the batch). All lanes
    step through the same timesteps, with one batched UNet call a step: 3B rows of InstructPix2Pix's
    classifier-free guidance, or with `guidance_distilled` B rows that receive (s_T, s_I).
    """
    timesteps = lanes[0].scheduler.timesteps
    if any(not torch.equal(lane.scheduler.timesteps, timesteps) for lane in lanes):
        raise ValueError("every lane of one sampling call must step through the same timesteps")
    if x.shape[0] % len(lanes):
        raise ValueError(f"{x.shape[0]} rows do not split evenly between {len(lanes)} lanes")
    rows = x.shape[0] // len(lanes)
    guidance = torch.stack([text_guidance, image_guidance], 1).to(x.dtype)
    for t in timesteps:
        parts = x.split(rows)
        model_input = torch.cat([lane.scheduler.scale_model_input(p, t) for lane, p in zip(lanes, parts, strict=True)])
        ts = t.reshape(1).repeat(x.shape[0]).to(x.device)
        if guidance_distilled:
            out = denoise(torch.cat([model_input, image_latent], 1), ts, context, guidance)
        else:
            out = cfg_prediction(
                denoise, schedule, model_input, image_latent, ts, context, null_context, text_guidance, image_guidance
            )
        outs = out.split(rows)
        x = torch.cat([lane.step(o, t, p) for lane, o, p in zip(lanes, outs, parts, strict=True)])
    return x


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
    """Multi-step DDIM sampling of an edit's clean latent (training's teacher, whatever the folder's scheduler).

    With `guidance_distilled`, each step is one pass that receives (s_T, s_I); otherwise each step is
    the 3-pass classifier-free guidance of InstructPix2Pix.
    """
    scheduler = DDIMScheduler.from_config(schedule.scheduler_config)
    scheduler.set_timesteps(steps)
    x = torch.randn(image_latent.shape, generator=generator).to(image_latent)
    return sample(
        denoise,
        schedule,
        [SamplerLane(scheduler)],
        x,
        image_latent,
        context,
        null_context,
        text_guidance,
        image_guidance,
        guidance_distilled,
    )
