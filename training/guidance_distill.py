"""Recipe 3: multimodal guidance distillation: one pass with (s_T, s_I) embeddings learns the teacher's 3-pass CFG."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator

from engines.sampling import cfg_prediction
from engines.unet import GuidedUNet, add_guidance_embedding, unet_config
from training.batches import keep_first_token, make_batch_source, mix_contexts
from training.config import EditTrainConfig, recipe_main
from training.distributed import data_parallel, init_ranks, train_device
from training.draws import row_mask, row_weighted_mse, row_weights, sample_scales, sample_timesteps
from training.loop import clip_and_step, run_training, unet_precision, unet_train_state
from training.models import editor_config, load_editor_model, save_final_editor


class GuidanceDistillConfig(EditTrainConfig):
    """Student = teacher + zero-initialised (s_T, s_I) embeddings; target = the teacher's guided output.

    Default ranges, for this editor's exact, deterministic edits: the teacher's conditional output is
    already the edit (s_T = 1) and its text-dropped output is the input (see TeacherConfig.null_text_target),
    so s_T in [0, 2] spans "no edit" → "the edit" → "a doubled edit"; s_I in [0.75, 1.5] spans slightly
    washed-out → contrast-boosted renderings of the frame. Wider ranges let the few extreme-scale rows,
    whose targets lie far outside the latent range, dominate the loss. (MoViE's U[2, 14] and U[1, 3] fit
    InstructPix2Pix's diverse, weakly-conditioned real edits, whose guided differences are small.)
    """

    teacher: Path = Field(..., description="The teacher stage's model folder (or its output_dir).")
    student_init: Path | None = Field(
        None,
        description="Start the student from this guidance-distilled model folder instead of the teacher plus a "
        "zero embedding (to refresh a student after its teacher was fine-tuned, at a fraction of the steps). "
        "It may have been trained on another prompt encoder of the same width.",
    )
    guidance_embedding_dim: int = Field(64, ge=2, description="Sinusoidal width per scale (even).")
    text_guidance_range: tuple[float, float] = Field((0.0, 2.0), description="s_T ~ U[lo, hi].")
    image_guidance_range: tuple[float, float] = Field((0.75, 1.5), description="s_I ~ U[lo, hi].")
    high_t_probability: float = Field(0.15, ge=0, le=1, description="Rows at t=999 (the one-step student's t).")
    empty_prompt_probability: float = Field(
        0.05, ge=0, le=1, description="Rows with the empty prompt, so 'no instruction' stays defined."
    )
    anchor_probability: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Rows set to the operating point s_T = s_I = 1 (where the target is the teacher's plain "
        "conditional output), so the scale the service runs at is never traded for the extremes.",
    )
    relative_text_scale_loss: bool = Field(
        False,
        description="Divide each row's squared error by max(1, s_T)²: a target exaggerated by s_T > 1 is "
        "fitted to the same relative accuracy as the edit itself instead of dominating the loss.",
    )

    @model_validator(mode="after")
    def _check(self) -> GuidanceDistillConfig:
        for name in ("text_guidance_range", "image_guidance_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must satisfy 0 <= lo <= hi, got ({lo}, {hi})")
        if self.guidance_embedding_dim % 2:
            raise ValueError(f"guidance_embedding_dim must be even, got {self.guidance_embedding_dim}")
        return self


def _initial_student(config: GuidanceDistillConfig, teacher_unet: torch.nn.Module) -> torch.nn.Module:
    """The teacher's UNet plus a zero-initialised guidance embedding, or student_init's UNet when given."""
    if config.student_init is None:
        return add_guidance_embedding(copy.deepcopy(teacher_unet), config.guidance_embedding_dim)
    init = load_editor_model(config.student_init, config.prompts, same_encoder=False)
    if not init.config.distilled:
        raise ValueError(f"{config.student_init} has no guidance embedding; it cannot initialise a student")
    if init.config.guidance_embedding_dim != config.guidance_embedding_dim:
        raise ValueError(
            f"{config.student_init} embeds each scale in {init.config.guidance_embedding_dim} dims, "
            f"this config in {config.guidance_embedding_dim}"
        )
    student_unet = init.unet.unet

    def layout(unet: torch.nn.Module) -> dict:  # type: ignore[type-arg]
        return {**unet_config(unet), "time_cond_proj_dim": None}  # the guidance embedding aside

    if layout(student_unet) != layout(teacher_unet):
        raise ValueError(f"{config.student_init}'s UNet has a different layout from the teacher's")
    return student_unet.float()


def train(config: GuidanceDistillConfig) -> Path:
    """Train (or resume) the guidance-distilled student; writes output_dir/final and returns it."""
    ranks = init_ranks()
    device = train_device(config.device)
    torch.manual_seed(ranks.seed(config.seed))
    rng = np.random.default_rng(ranks.seed(config.seed))
    teacher_model = load_editor_model(config.teacher, config.prompts)
    if teacher_model.config.distilled:
        raise ValueError(f"{config.teacher} is already guidance-distilled; distil from a 3-pass teacher")
    schedule = teacher_model.schedule
    num_train = len(schedule.alphas_cumprod)
    taesd = teacher_model.codec.taesd.requires_grad_(False).to(device)
    teacher_unet = teacher_model.unet.unet.requires_grad_(False).eval().to(device)
    teacher = GuidedUNet(teacher_unet, None, 1.0)
    editor = editor_config(
        config.prompts, config.resolution, config.guidance_embedding_dim, teacher_model.config.image_latent_scale
    )
    student_unet = _initial_student(config, teacher_unet)
    student_unet.to(device).requires_grad_(True).train()
    student = data_parallel(
        ranks, GuidedUNet(student_unet, editor.guidance_embedding_dim, editor.guidance_embedding_scale)
    )
    params, optimizer, ema, state = unet_train_state(config, student_unet, rng, ranks)
    sampler = make_batch_source(config, rng, state.extra, ranks)
    null = sampler.table.null.to(device)

    def step(_: int) -> dict[str, float]:
        b = sampler.sample(config.batch_size).to(device)
        with torch.no_grad():
            z_image = taesd.encode(b.images).latents
            z_target = taesd.encode(b.targets).latents
        n = z_image.shape[0]
        empty = row_mask(rng, n, config.empty_prompt_probability, device)
        context = torch.where(empty[:, None, None], null.expand_as(b.context), b.context)
        z_target = torch.where(empty[:, None, None, None], z_image, z_target)
        if config.context_mix_probability > 0:  # off: no draw, so the RNG stream matches runs made before it
            context = mix_contexts(context, row_mask(rng, n, config.context_mix_probability, device), rng)
        scales = sample_scales(rng, n, config.text_guidance_range, config.image_guidance_range).to(device)
        scales[row_mask(rng, n, config.anchor_probability, device)] = 1.0
        cond = z_image * editor.image_latent_scale
        t = sample_timesteps(rng, n, num_train, config.high_t_probability).to(device)
        x_t = schedule.add_noise(z_target, torch.randn_like(z_target), t)
        with torch.no_grad(), unet_precision(config):
            guided = cfg_prediction(teacher, schedule, x_t, cond, t, context, null[None], scales[:, 0], scales[:, 1])
        sentence_only = row_mask(rng, n, config.sentence_only_probability, device)
        with unet_precision(config):
            prediction = student(torch.cat([x_t, cond], 1), t, keep_first_token(context, sentence_only), scales)
        weights = row_weights(scales, config.relative_text_scale_loss).to(device)
        loss = row_weighted_mse(prediction.float(), guided.float(), weights)
        loss.backward()
        norm = clip_and_step(optimizer, params, config.grad_clip)
        if ema is not None:
            ema.update(student_unet)
        return {"loss": float(loss.detach()), "grad_norm": norm}

    run_training(config, state, step, "guidance_distill")
    return save_final_editor(config, editor, student_unet, ema, taesd, schedule, ranks)


def main(argv: list[str] | None = None) -> Path:
    return recipe_main(GuidanceDistillConfig, train, argv, __doc__ or "")


if __name__ == "__main__":
    main()
