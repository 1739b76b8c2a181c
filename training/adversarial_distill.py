"""Recipe 4: adversarial distillation to a one-step student at t=999 that keeps its (s_T, s_I) controls."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny
from pydantic import Field, model_validator

from engines.config import EditorConfig
from engines.model import EditorModel
from engines.sampling import NoiseSchedule, student_start, teacher_sample
from engines.unet import GuidedUNet
from training.batches import BatchSource, keep_first_token, make_batch_source, mix_contexts
from training.checkpoint import TrainState
from training.config import EditTrainConfig, recipe_main
from training.discriminator import DiscriminatorHeads, FrozenUNetEncoder, hinge_discriminator_loss, r1_penalty
from training.distributed import Ranks, average_gradients, data_parallel, init_ranks, replicate, train_device
from training.draws import row_mask, row_weighted_mse, row_weights, sample_scales
from training.loop import EMA, clip_and_step, make_adamw, run_training, unet_precision
from training.models import load_editor_model, save_final_editor


class AdversarialDistillConfig(EditTrainConfig):
    """MoViE's last stage (after LADD): targets from a few-step teacher, a frozen-encoder discriminator."""

    student_init: Path = Field(..., description="The guidance-distilled model folder the student starts from.")
    target_model: Path | None = Field(
        None,
        description="Model whose few-step samples are the targets (None = student_init's weights, frozen). "
        "A guidance-distilled target costs 1 pass a step, a 3-pass teacher 3.",
    )
    target_steps: int = Field(4, ge=1, description="DDIM steps of the target sampler (MoViE: 5 LCM steps).")
    discriminator_backbone: Path | None = Field(
        None, description="Model whose frozen UNet encoder feeds the heads (None = the target model)."
    )
    text_guidance_range: tuple[float, float] = Field((0.0, 2.0), description="s_T ~ U[lo, hi] (as distilled).")
    image_guidance_range: tuple[float, float] = Field((0.75, 1.5), description="s_I ~ U[lo, hi] (as distilled).")
    empty_prompt_probability: float = Field(0.05, ge=0, le=1, description="Rows with the empty prompt.")
    anchor_probability: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Rows set to the operating point s_T = s_I = 1 whose target is the exact edit (the input for "
        "an empty prompt) instead of the teacher's sample: real data anchoring the student where it is used.",
    )
    relative_text_scale_loss: bool = Field(
        False, description="Weigh each row's reconstruction error by 1/max(1, s_T)² (as in guidance_distill)."
    )
    logit_normal_mean: float = Field(-1.0, description="Re-noising t = 999·sigmoid(N(mean, std)) (LADD: -1, 1).")
    logit_normal_std: float = Field(1.0, gt=0, description="See logit_normal_mean.")
    mse_weight: float = Field(1.0, ge=0, description="λ_mse on ‖x̂0 − x0_target‖² (latents).")
    adversarial_weight: float = Field(0.05, ge=0, description="λ_gen on the generator's hinge term.")
    r1_weight: float = Field(1e-3, ge=0, description="γ of the R1 penalty γ/2·‖∇D(real)‖² (on encoder features).")
    r1_every: int = Field(4, ge=1, description="Lazy R1: every N steps, scaled by N.")
    disc_lr: float = Field(1e-4, gt=0, description="Discriminator-head learning rate.")
    disc_hidden: int = Field(64, ge=4, description="Channels of each head's conv body.")
    disc_betas: tuple[float, float] = Field((0.0, 0.99), description="AdamW betas of the heads (GAN-style).")

    @model_validator(mode="after")
    def _check(self) -> AdversarialDistillConfig:
        for name in ("text_guidance_range", "image_guidance_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must satisfy 0 <= lo <= hi, got ({lo}, {hi})")
        return self


def logit_normal_timesteps(
    rng: np.random.Generator, batch: int, num_train: int, mean: float, std: float
) -> torch.Tensor:
    """t = round((T−1)·sigmoid(u)), u ~ N(mean, std): LADD's re-noising distribution (biased to low noise)."""
    u = 1.0 / (1.0 + np.exp(-rng.normal(mean, std, batch)))
    return torch.from_numpy(np.round(u * (num_train - 1))).long()


def _frozen_copy(model: EditorModel) -> EditorModel:
    frozen = copy.deepcopy(model)
    frozen.unet.requires_grad_(False).eval()
    return frozen


@dataclass
class DistillationRows:
    """One batch as the stage sees it: image latents, contexts, guidance scales, and which rows are anchored
    (target: the exact edit) or have the empty prompt."""

    z_image: torch.Tensor
    cond: torch.Tensor
    context: torch.Tensor
    scales: torch.Tensor
    anchored: torch.Tensor
    empty: torch.Tensor
    targets: torch.Tensor  # the exact edits in pixels, [-1, 1]


@dataclass
class AdversarialStep:
    """One optimisation step of the stage: draw rows, make their targets, predict them in one step, update the
    discriminator heads on real vs fake, then the student. Every RNG is drawn in one fixed order, so a seeded
    run (and a resumed one) repeats bit for bit."""

    config: AdversarialDistillConfig
    rng: np.random.Generator
    sampler: BatchSource
    schedule: NoiseSchedule
    editor: EditorConfig
    taesd: AutoencoderTiny
    student: GuidedUNet
    student_pass: torch.nn.Module  # the student as its forward pass runs: itself, or its DDP wrapper
    target: EditorModel
    encoder: FrozenUNetEncoder
    heads: DiscriminatorHeads
    optimizer: torch.optim.Optimizer
    disc_optimizer: torch.optim.Optimizer
    ema: EMA | None
    ranks: Ranks

    def __call__(self, i: int) -> dict[str, float]:
        rows = self.draw()
        x0_target = self.distillation_targets(rows)
        x0 = self.one_step_prediction(rows)
        # Real and fake re-noised at the same logit-normal t with the same noise.
        num_train = len(self.schedule.alphas_cumprod)
        c = self.config
        t_d = logit_normal_timesteps(self.rng, x0.shape[0], num_train, c.logit_normal_mean, c.logit_normal_std)
        t_d = t_d.to(self.device)
        noise_d = torch.randn_like(x0)
        real_t = self.schedule.add_noise(x0_target, noise_d, t_d)
        fake_t = self.schedule.add_noise(x0, noise_d, t_d)
        disc = self.update_discriminator(i, rows, real_t, fake_t, t_d)
        student = self.update_student(rows, x0, x0_target, fake_t, t_d)
        # The loss log's column order, as before the step became a class.
        return {"mse": student["mse"], "g_adv": student["g_adv"], **disc, "grad_norm": student["grad_norm"]}

    @property
    def device(self) -> torch.device:
        return next(self.taesd.parameters()).device

    def draw(self) -> DistillationRows:
        c, rng = self.config, self.rng
        b = self.sampler.sample(c.batch_size).to(self.device)
        n = b.images.shape[0]
        null = self.sampler.table.null.to(self.device)
        with torch.no_grad():
            z_image = self.taesd.encode(b.images).latents
        empty = row_mask(self.rng, n, c.empty_prompt_probability, self.device)
        context = torch.where(empty[:, None, None], null.expand_as(b.context), b.context)
        scales = sample_scales(rng, n, c.text_guidance_range, c.image_guidance_range).to(self.device)
        anchored = row_mask(self.rng, n, c.anchor_probability, self.device)
        scales[anchored] = 1.0
        if c.context_mix_probability > 0:  # off: no draw, so the RNG stream matches runs made before it
            mixed = row_mask(self.rng, n, c.context_mix_probability, self.device) & ~anchored
            context = mix_contexts(context, mixed, rng)
        cond = z_image * self.editor.image_latent_scale
        return DistillationRows(z_image, cond, context, scales, anchored, empty, b.targets)

    @torch.no_grad()
    def distillation_targets(self, rows: DistillationRows) -> torch.Tensor:
        """The target model's few-step samples; anchored rows get the exact edit (the input when empty)."""
        x0_target = torch.empty_like(rows.z_image)
        free = ~rows.anchored
        if free.any():
            with unet_precision(self.config):
                sampled = teacher_sample(
                    self.target.unet,
                    self.schedule,
                    rows.cond[free],
                    rows.context[free],
                    self.sampler.table.null[None].to(self.device),
                    rows.scales[free, 0],
                    rows.scales[free, 1],
                    steps=self.config.target_steps,
                    guidance_distilled=self.target.config.distilled,
                )
            x0_target[free] = sampled.float()
        anchored = rows.anchored
        if anchored.any():  # only the anchored rows' targets are encoded
            exact = self.taesd.encode(rows.targets[anchored]).latents
            x0_target[anchored] = torch.where(rows.empty[anchored, None, None, None], rows.z_image[anchored], exact)
        return x0_target

    def one_step_prediction(self, rows: DistillationRows) -> torch.Tensor:
        """The student's x̂0 from pure noise at its timestep (with gradients)."""
        n = rows.z_image.shape[0]
        t_student = self.editor.student_timestep
        x_start = student_start(self.schedule, torch.randn_like(rows.z_image), t_student, None)
        ts = torch.full((n,), t_student, dtype=torch.long, device=self.device)
        sentence_only = row_mask(self.rng, n, self.config.sentence_only_probability, self.device)
        student_context = keep_first_token(rows.context, sentence_only)
        with unet_precision(self.config):
            out = self.student_pass(torch.cat([x_start, rows.cond], 1), ts, student_context, rows.scales)
        return self.schedule.predict_x0(out.float(), x_start, ts)

    def update_discriminator(
        self, i: int, rows: DistillationRows, real_t: torch.Tensor, fake_t: torch.Tensor, t_d: torch.Tensor
    ) -> dict[str, float]:
        """Hinge loss on the heads only (the encoder's features are fixed inputs), lazy R1 every r1_every."""
        c = self.config
        with torch.no_grad():
            real_features = self.encoder(torch.cat([real_t, rows.cond], 1), t_d, rows.context, rows.scales)
            fake_features = self.encoder(torch.cat([fake_t.detach(), rows.cond], 1), t_d, rows.context, rows.scales)
        lazy_r1 = c.r1_weight > 0 and i % c.r1_every == 0
        if lazy_r1:
            real_features = [f.requires_grad_(True) for f in real_features]
        d_real = self.heads(real_features, t_d, rows.scales, rows.context)
        d_fake = self.heads(fake_features, t_d, rows.scales, rows.context)
        d_loss = hinge_discriminator_loss(d_real, d_fake)
        r1 = torch.zeros(())
        if lazy_r1:
            r1 = r1_penalty(d_real, real_features)
            d_loss = d_loss + 0.5 * c.r1_weight * c.r1_every * r1
        self.disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        average_gradients(self.ranks, list(self.heads.parameters()))
        clip_and_step(self.disc_optimizer, list(self.heads.parameters()), c.grad_clip)
        return {
            "d_loss": float(d_loss.detach()),
            "d_real": float(d_real.detach().mean()),
            "d_fake": float(d_fake.detach().mean()),
            "r1": float(r1.detach()),
        }

    def update_student(
        self,
        rows: DistillationRows,
        x0: torch.Tensor,
        x0_target: torch.Tensor,
        fake_t: torch.Tensor,
        t_d: torch.Tensor,
    ) -> dict[str, float]:
        """Reconstruction towards the target plus fooling the (now fixed) heads."""
        c = self.config
        g_features = self.encoder(torch.cat([fake_t, rows.cond], 1), t_d, rows.context, rows.scales)
        g_adv = -self.heads(g_features, t_d, rows.scales, rows.context).mean()
        mse = row_weighted_mse(x0, x0_target, row_weights(rows.scales, c.relative_text_scale_loss))
        g_loss = c.mse_weight * mse + c.adversarial_weight * g_adv
        g_loss.backward()
        self.disc_optimizer.zero_grad(set_to_none=True)  # the generator's pass left gradients on the heads
        unet = self.student.unet
        norm = clip_and_step(self.optimizer, [p for p in unet.parameters() if p.requires_grad], c.grad_clip)
        if self.ema is not None:
            self.ema.update(unet)
        return {"mse": float(mse.detach()), "g_adv": float(g_adv.detach()), "grad_norm": norm}


def train(config: AdversarialDistillConfig) -> Path:
    """Train (or resume) the one-step student; writes output_dir/final and returns it."""
    step, state = build_step(config)
    run_training(config, state, step, "adversarial_distill")
    return save_final_editor(config, step.editor, step.student.unet, step.ema, step.taesd, step.schedule, step.ranks)


def build_step(config: AdversarialDistillConfig) -> tuple[AdversarialStep, TrainState]:
    """The stage's models, optimisers and data, seeded, as one step and the state a checkpoint holds."""
    ranks = init_ranks()
    device = train_device(config.device)
    torch.manual_seed(ranks.seed(config.seed))
    rng = np.random.default_rng(ranks.seed(config.seed))
    init = load_editor_model(config.student_init, config.prompts)
    if not init.config.distilled:
        raise ValueError(f"{config.student_init} has no guidance embedding; run guidance_distill first")
    target = (
        _frozen_copy(init) if config.target_model is None else load_editor_model(config.target_model, config.prompts)
    )
    target.unet.requires_grad_(False).eval().to(device)
    backbone = (
        target
        if config.discriminator_backbone is None
        else (load_editor_model(config.discriminator_backbone, config.prompts))
    )
    schedule = init.schedule
    editor = init.config.model_copy(update={"resolution": config.resolution})
    taesd = init.codec.taesd.requires_grad_(False).to(device)
    student = init.unet.to(device)
    student_unet = student.unet.requires_grad_(True).train()
    bb = backbone.config
    bb_unet = copy.deepcopy(backbone.unet.unet)
    encoder = FrozenUNetEncoder(bb_unet, bb.guidance_embedding_dim, bb.guidance_embedding_scale).to(device)
    heads = DiscriminatorHeads(encoder.channels, config.prompts.dim, hidden=config.disc_hidden).to(device)
    replicate(ranks, heads)  # trained outside DDP: its gradients are averaged by hand
    student_pass = data_parallel(ranks, student)
    params = [p for p in student_unet.parameters() if p.requires_grad]
    disc_params = list(heads.parameters())
    optimizer = make_adamw(params, config.lr, config.weight_decay)
    disc_optimizer = make_adamw(disc_params, config.disc_lr, 0.0, config.disc_betas)
    modules: dict[str, torch.nn.Module] = {"unet": student_unet, "heads": heads}
    ema = EMA(student_unet, config.ema_decay) if config.ema_decay > 0 else None
    if ema is not None:
        modules["ema"] = ema
    state = TrainState(modules, {"unet": optimizer, "heads": disc_optimizer}, rng, ranks=ranks)
    sampler = make_batch_source(config, rng, state.extra, ranks)
    step = AdversarialStep(
        config,
        rng,
        sampler,
        schedule,
        editor,
        taesd,
        student,
        student_pass,
        target,
        encoder,
        heads,
        optimizer,
        disc_optimizer,
        ema,
        ranks,
    )
    return step, state


def main(argv: list[str] | None = None) -> Path:
    return recipe_main(AdversarialDistillConfig, train, argv, __doc__ or "")


if __name__ == "__main__":
    main()
