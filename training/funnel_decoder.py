"""Recipe: the autoencoder's decoder trained wide, funnelled back to its served width (MobileVD), merged exactly.

Three phases, each resumable under output_dir: `wide/` trains a decoder widened from the starting one (same
function at step 0), `funnel/` trains the served width as funnels around the wide weights (coupled singular
initialisation), and `final/taesd/` is the starting encoder with the merged narrow decoder. The encoder stays
frozen, so its latents, and every UNet trained on them, keep working.

With `student`, a share of the batches are a one-step student's own outputs (its x̂0 latents for a random edit
and phrasing) decoded towards the exact edit: the served decoder reads the student's latents, which are softer
than the encoder's, so it learns to redraw those, not only to invert the encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderTiny
from pydantic import Field
from torch import nn

from engines.model import EditorModel
from engines.sampling import student_start
from training.autoencoder import AutoencoderConfig, image_source, reconstruction_losses, train_on_edited_crops
from training.batches import make_edit_sampler
from training.config import recipe_main
from training.distributed import train_device
from training.funnel import Funnelled, FunnelPlan, coupled_singular_init, funnel, merge, widen
from training.models import FINAL_FOLDER, load_editor_model, load_taesd, save_taesd
from training.prompts import PromptSpec

WIDE_FOLDER = "wide"
FUNNEL_FOLDER = "funnel"


class FunnelDecoderConfig(AutoencoderConfig):
    """A wider decoder's capacity at the served decoder's cost, trained with the autoencoder recipe's loss and
    data (its encoder frozen, so no latent regulariser). `steps` counts the funnel phase."""

    init_from: Path = Field(..., description="The TAESD folder to start from (its encoder is kept as it is).")
    wide_channels: int = Field(32, ge=1, description="Channels of every block of the wide decoder.")
    wide_steps: int = Field(..., ge=1, description="Steps of the wide phase.")
    widen_noise: float = Field(1e-2, ge=0, description="Std of the new channels' writers when widening.")
    student: Path | None = Field(
        None,
        description="A one-step student (model folder or a recipe's output_dir) whose outputs the decoder also "
        "learns to draw; its autoencoder's encoder must be init_from's.",
    )
    prompts: PromptSpec = Field(default_factory=PromptSpec, description="The student's prompt encoder.")
    student_share: float = Field(0.5, ge=0, le=1, description="Share of batches that decode the student's output.")
    student_identity_share: float = Field(
        0.2, ge=0, le=1, description="Share of a student batch's rows at s_T = 0, whose target is the input itself."
    )


# A decoder's batch: the latents it reads and the images (in [-1, 1]) it should draw from them.
DecoderBatch = tuple[torch.Tensor, torch.Tensor]


class StudentOutputs:
    """Batches of a frozen one-step student's x̂0 for random crops, edits and training phrasings (s_I = 1; s_T = 1,
    or 0 for an identity share of the rows), paired with the exact edit (or the input). Its draws come from the
    recipe's numpy RNG and torch's global one, so a resumed phase replays them."""

    def __init__(
        self,
        config: FunnelDecoderConfig,
        student: EditorModel,
        encoder: nn.Module,
        rng: np.random.Generator,
        device: torch.device,
    ) -> None:
        if not student.config.distilled:
            raise ValueError(f"{config.student} has no guidance embedding: not a distilled one-step student")
        self.config = config
        self.editor = student.config
        self.schedule = student.schedule
        self.unet = student.unet.requires_grad_(False).eval().to(device)
        self.encoder = encoder
        self.rng = rng
        self.device = device
        self.sampler, _ = make_edit_sampler(config.data, config.prompts, config.edits, config.output_dir, rng)

    @torch.no_grad()
    def sample(self, batch_size: int) -> DecoderBatch:
        b = self.sampler.sample(batch_size).to(self.device)
        identity = torch.from_numpy(self.rng.random(batch_size) < self.config.student_identity_share).to(self.device)
        scales = torch.ones(batch_size, 2, device=self.device)
        scales[identity, 0] = 0.0
        z_image = self.encoder(b.images)
        t = self.editor.student_timestep
        x_t = student_start(self.schedule, torch.randn(z_image.shape), t, None).to(self.device)
        ts = torch.full((batch_size,), t, dtype=torch.long, device=self.device)
        out = self.unet(torch.cat([x_t, z_image * self.editor.image_latent_scale], 1), ts, b.context, scales)
        x0 = self.schedule.predict_x0(out.float(), x_t, ts)
        return x0, torch.where(identity[:, None, None, None], b.images, b.targets)


def decoder_batches(
    config: FunnelDecoderConfig,
    encoder: nn.Module,
    student: EditorModel | None,
    rng: np.random.Generator,
    progress: dict[str, Any],
) -> Callable[[], DecoderBatch]:
    """The phase's batches: the encoder's latents of (edited) crops, and with a student, its outputs in
    `student_share` of the batches (one draw a batch, made only when there is a student)."""
    device = train_device(config.device)
    images = image_source(config, rng, progress)
    outputs = None if student is None else StudentOutputs(config, student, encoder, rng, device)

    def batch() -> DecoderBatch:
        if outputs is not None and rng.random() < config.student_share:
            return outputs.sample(config.batch_size)
        x = images().to(device)
        with torch.no_grad():
            return encoder(x), x

    return batch


def _sequential_plan(
    layers: nn.Sequential, prefix: str, reads: str | None, last_writes: str | None, plan: FunnelPlan
) -> None:
    """Add the channel spaces of a TAESD encoder's or decoder's layers to `plan`: the stream between blocks
    (identity skips share it) and each block's inner spaces. The first conv reads `reads`, the last writes
    `last_writes` (None: not funnelled, like RGB)."""
    convs = [n for n, m in layers.named_modules() if isinstance(m, nn.Conv2d)]
    stream = reads

    def new_space(width: int) -> str:
        name = f"s{len(plan.widths)}"
        plan.widths[name] = width
        return name

    for name, module in layers.named_children():
        path = f"{prefix}.{name}"
        if isinstance(module, nn.Conv2d):
            out = last_writes if name == convs[-1] else new_space(module.out_channels)
            plan.layers[path] = (stream, out)
            stream = out
        elif hasattr(module, "conv") and hasattr(module, "skip"):
            if not isinstance(module.skip, nn.Identity):
                raise ValueError(f"{path}: only blocks with identity skips share their stream")
            inner = [(i, m) for i, m in module.conv.named_children() if isinstance(m, nn.Conv2d)]
            block_reads = stream
            for k, (i, conv) in enumerate(inner):
                out = stream if k == len(inner) - 1 else new_space(conv.out_channels)
                plan.layers[f"{path}.conv.{i}"] = (block_reads, out)
                block_reads = out


def decoder_plan(decoder: nn.Module) -> FunnelPlan:
    """Channel spaces of a TAESD decoder; the latent input and the RGB output are not funnelled. Widths are
    `decoder`'s own."""
    plan = FunnelPlan({}, {})
    _sequential_plan(decoder.layers, "layers", None, None, plan)
    return plan


def taesd_plan(taesd: AutoencoderTiny, latent: bool) -> FunnelPlan:
    """Channel spaces of a whole TAESD (paths from the AutoencoderTiny); with `latent`, the latent channels
    between encoder and decoder are a space too (so they can be widened)."""
    plan = FunnelPlan({}, {})
    latent_space = None
    if latent:
        latent_space = "latent"
        plan.widths[latent_space] = int(taesd.config.latent_channels)
    _sequential_plan(taesd.encoder.layers, "encoder.layers", None, latent_space, plan)
    _sequential_plan(taesd.decoder.layers, "decoder.layers", latent_space, None, plan)
    return plan


def widened_taesd(
    narrow: AutoencoderTiny, width: int, *, encoder_width: int | None = None, latent_channels: int | None = None
) -> AutoencoderTiny:
    """An AutoencoderTiny like `narrow` whose decoder blocks are `width` channels wide (and its encoder blocks
    `encoder_width`, its latent `latent_channels`, where given); weights unset."""
    config = dict(narrow.config)
    kwargs = {k: config[k] for k in ("in_channels", "out_channels", "act_fn", "upsample_fn")}
    encoder_blocks = len(config["encoder_block_out_channels"])
    return AutoencoderTiny(
        **kwargs,
        latent_channels=latent_channels or config["latent_channels"],
        encoder_block_out_channels=(
            (encoder_width,) * encoder_blocks if encoder_width else tuple(config["encoder_block_out_channels"])
        ),
        decoder_block_out_channels=(width,) * len(config["decoder_block_out_channels"]),
        num_encoder_blocks=tuple(config["num_encoder_blocks"]),
        num_decoder_blocks=tuple(config["num_decoder_blocks"]),
        latent_magnitude=config["latent_magnitude"],
        latent_shift=config["latent_shift"],
        upsampling_scaling_factor=config["upsampling_scaling_factor"],
    )


def _decoder_phase(
    config: FunnelDecoderConfig,
    decoder: nn.Module,
    encoder: nn.Module,
    student: EditorModel | None,
    phase: str,
    steps: int,
    seed: int,
) -> nn.Module:
    """Train `decoder` on the frozen encoder's latents of (edited) crops, and the student's outputs where there is
    one; returns its EMA (or itself)."""

    def loss_of(batch: DecoderBatch) -> tuple[torch.Tensor, dict[str, float]]:
        latents, images = batch
        sigma = config.latent_noise * torch.rand(latents.shape[0], 1, 1, 1).to(latents)
        parts = reconstruction_losses(decoder(latents + sigma * torch.randn_like(latents)), images)
        loss = config.l1_weight * parts["l1"] + config.mse_weight * parts["mse"] + config.edge_weight * parts["edge"]
        psnr = 10 * torch.log10(4.0 / parts["mse"].detach().clamp_min(1e-10))  # peak-to-peak 2 in [-1, 1]
        return loss, {"psnr": float(psnr)}

    torch.manual_seed(seed)

    def source(rng: np.random.Generator, progress: dict[str, Any]) -> Callable[[], DecoderBatch]:
        return decoder_batches(config, encoder, student, rng, progress)

    return train_on_edited_crops(config, decoder, "decoder", phase, steps, seed, loss_of, source)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def train(config: FunnelDecoderConfig) -> Path:
    """Run (or resume) the three phases; writes output_dir/final/taesd/ and returns output_dir/final."""
    start = load_taesd(config.init_from)
    encoder = start.encoder.requires_grad_(False).eval().to(train_device(config.device))
    student = None if config.student is None else load_editor_model(config.student, config.prompts)
    if student is not None and not _same_weights(student.codec.taesd.encoder, start.encoder):
        raise ValueError(f"{config.student} reads latents of another encoder than {config.init_from}'s")
    plan = decoder_plan(start.decoder)
    wide_taesd = widened_taesd(start, config.wide_channels)
    wide = widen(
        start.decoder, wide_taesd.decoder, plan, config.widen_noise, torch.Generator().manual_seed(config.seed)
    )
    wide = _decoder_phase(config, wide.train(), encoder, student, WIDE_FOLDER, config.wide_steps, config.seed).cpu()
    # The SVDs and the merge run on the CPU, wherever the phases trained.
    funnelled: Funnelled = funnel(wide, plan, coupled_singular_init(wide, plan))
    funnelled = _decoder_phase(
        config, funnelled.train(), encoder, student, FUNNEL_FOLDER, config.steps, config.seed + 1
    )
    funnelled = funnelled.cpu()
    narrow = load_taesd(config.init_from)
    merge(funnelled, narrow.decoder)
    dtype = torch.float16 if config.save_dtype == "float16" else torch.float32
    return save_taesd(Path(config.output_dir) / FINAL_FOLDER, narrow.eval(), dtype)


def main(argv: list[str] | None = None) -> Path:
    return recipe_main(FunnelDecoderConfig, train, argv, __doc__ or "")


if __name__ == "__main__":
    main()
