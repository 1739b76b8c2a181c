"""Recipe 2: InstructPix2Pix-style training of the Mobile-Pix2Pix teacher UNet on frozen TAESD latents."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from pydantic import Field, model_validator

from engines.unet import GuidedUNet
from training.batches import keep_first_token, make_batch_source
from training.config import EditTrainConfig, UNetSpec, recipe_main
from training.distributed import data_parallel, init_ranks, train_device
from training.draws import row_mask, sample_timesteps
from training.loop import clip_and_step, run_training, unet_precision, unet_train_state
from training.models import (
    editor_config,
    load_taesd,
    model_conventions,
    model_folder,
    native_target,
    save_final_editor,
    training_schedule,
)


class TeacherConfig(EditTrainConfig):
    """The teacher: a UNet without guidance embedding, queried 3 times per step for CFG."""

    autoencoder: Path = Field(..., description="The autoencoder stage's output (a folder holding taesd/).")
    unet: UNetSpec = Field(default_factory=UNetSpec)
    init_from: Path | None = Field(None, description="Start from this teacher model folder's UNet.")
    drop_text: float = Field(0.05, ge=0, le=1, description="Rows with only the text dropped (InstructPix2Pix: 5%).")
    drop_image: float = Field(0.05, ge=0, le=1, description="Rows with only the image dropped (5%).")
    drop_both: float = Field(0.05, ge=0, le=1, description="Rows with text and image dropped (5%).")
    null_text_target: Literal["identity", "edit"] = Field(
        "identity",
        description="Target of rows whose text is dropped: 'edit' keeps the edited image (InstructPix2Pix, "
        "for datasets of diverse real edits); 'identity' uses the input, so 'no instruction' means 'no change' "
        "and s_T becomes an edit-strength dial (0 = input, 1 = the edit).",
    )
    high_t_probability: float = Field(
        0.1, ge=0, le=1, description="Rows trained at t=999 exactly, where the one-step student works."
    )

    @model_validator(mode="after")
    def _check_dropout(self) -> TeacherConfig:
        total = self.drop_text + self.drop_image + self.drop_both
        if total > 1:
            raise ValueError(f"drop_text + drop_image + drop_both = {total} > 1")
        if self.context_mix_probability > 0:
            raise ValueError("context_mix_probability is for distillation: a blend of prompts has no exact target")
        return self


def conditioning_dropout(
    rng: np.random.Generator, batch: int, text: float, image: float, both: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (B,) masks of rows whose text / image condition is dropped, with the three disjoint rates."""
    r = torch.from_numpy(rng.random(batch))
    text_only = r < text
    image_only = (r >= text) & (r < text + image)
    both_dropped = (r >= text + image) & (r < text + image + both)
    return text_only | both_dropped, image_only | both_dropped


def train(config: TeacherConfig) -> Path:
    """Train (or resume) the teacher; writes an EditorModel folder to output_dir/final and returns it."""
    ranks = init_ranks()
    device = train_device(config.device)
    torch.manual_seed(ranks.seed(config.seed))
    rng = np.random.default_rng(ranks.seed(config.seed))
    taesd = load_taesd(config.autoencoder).requires_grad_(False).to(device)
    if config.init_from is not None:
        # A fine-tune keeps the schedule and image-latent scale its UNet was trained with (a converted stock
        # model's differ from ours). Only the UNet is taken: a fine-tune may change the prompt encoder.
        schedule, image_latent_scale = model_conventions(config.init_from)
        unet = UNet2DConditionModel.from_pretrained(model_folder(config.init_from) / "unet", torch_dtype=torch.float32)
        if unet.config.time_cond_proj_dim is not None:
            raise ValueError(f"{config.init_from} is guidance-distilled; a teacher starts from a 3-pass model")
    else:
        schedule, image_latent_scale = training_schedule(), 1.0
        unet_config = config.unet.diffusers_config(config.prompts.dim, taesd.config.latent_channels)
        unet = UNet2DConditionModel.from_config(unet_config)
    num_train = len(schedule.alphas_cumprod)
    unet.to(device).train()
    model = data_parallel(ranks, GuidedUNet(unet, None, 1.0))
    editor = editor_config(config.prompts, config.resolution, None, image_latent_scale)
    params, optimizer, ema, state = unet_train_state(config, unet, rng, ranks)
    sampler = make_batch_source(config, rng, state.extra, ranks)
    null = sampler.table.null.to(device)

    def step(_: int) -> dict[str, float]:
        b = sampler.sample(config.batch_size).to(device)
        with torch.no_grad():
            z_image = taesd.encode(b.images).latents
            z_target = taesd.encode(b.targets).latents
        n = z_image.shape[0]
        text_dropped, image_dropped = (
            mask.to(device)
            for mask in conditioning_dropout(rng, n, config.drop_text, config.drop_image, config.drop_both)
        )
        context = torch.where(text_dropped[:, None, None], null.expand_as(b.context), b.context)
        if config.sentence_only_probability > 0:  # off: no draw, so the RNG stream matches runs made before it
            # Text-dropped rows keep the whole null context: it is what CFG's unconditional passes feed.
            sentence_only = row_mask(rng, n, config.sentence_only_probability, device) & ~text_dropped
            context = keep_first_token(context, sentence_only)
        if config.null_text_target == "identity":
            z_target = torch.where(text_dropped[:, None, None, None], z_image, z_target)
        cond = z_image * editor.image_latent_scale * (~image_dropped).float()[:, None, None, None]
        t = sample_timesteps(rng, n, num_train, config.high_t_probability).to(device)
        noise = torch.randn_like(z_target)
        x_t = schedule.add_noise(z_target, noise, t)
        with unet_precision(config):
            prediction = model(torch.cat([x_t, cond], 1), t, context, torch.zeros(n, 2, device=device))
        loss = F.mse_loss(prediction.float(), native_target(schedule, z_target, noise, t))
        loss.backward()
        norm = clip_and_step(optimizer, params, config.grad_clip)
        if ema is not None:
            ema.update(unet)
        return {"loss": float(loss.detach()), "grad_norm": norm}

    run_training(config, state, step, "teacher")
    return save_final_editor(config, editor, unet, ema, taesd, schedule, ranks)


def main(argv: list[str] | None = None) -> Path:
    return recipe_main(TeacherConfig, train, argv, __doc__ or "")


if __name__ == "__main__":
    main()
