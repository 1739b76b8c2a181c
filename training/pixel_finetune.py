"""Recipe: a routed one-step student fine-tuned in pixel space, through its frozen decoder, towards exact edits.

Every earlier stage scores the student in latent space, against a teacher's samples or the encoder's latents of the
exact edit; what people see is the decoder's drawing of its output. This stage decodes the student's one-step output
for training crops and compares pixels with the exact edit (s_T = 1, s_I = 1), or with the input itself for a share
of rows at s_T = 0. It tunes the route table's edit contexts (engines.routing: the one context each edit is fed as),
with `train_unet` the UNet too, and with `decoder_lr` the TAESD decoder, which `frame_skip` first gives a view of the
input frame (engines.autoencoder.FrameSkip, zero-initialised: training starts from the student's exact output). A
`preserve_share` of rows at random scales in the student's trained ranges keep the starting student's own output
there, so the guidance controls keep the behaviour they had. The encoder and the table's phrasings stay as they are;
`final/` is the student's folder with the tuned parts.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from engines.autoencoder import FRAME_SKIP_KERNEL, Codec, FrameSkip, TinyCodec
from engines.config import ROUTES_FILE
from engines.model import FRAME_SKIP_FOLDER, TAESD_FOLDER, UNET_FOLDER
from engines.routing import RouteTable
from engines.sampling import student_start
from engines.unet import GuidedUNet
from training.checkpoint import TrainState
from training.config import TrainConfig, recipe_main
from training.data import CropSampler, DataConfig, load_split
from training.decoder_blocks import without_decoder_blocks
from training.distributed import require_one_process, train_device
from training.draws import sample_scales
from training.edits import gaussian_blur, get_edits
from training.image_metrics import ssim_map
from training.loop import EMA, clip_and_step, run_training
from training.models import COMMITTED_STAGE_CONFIG, FINAL_FOLDER, load_editor_model, model_folder
from training.prompts import PromptSpec


class PixelFinetuneConfig(TrainConfig):
    """Which routed student, on which crops, what it may change and how fast. `lr` is the UNet's."""

    student: Path = Field(..., description="A routed one-step student: model folder or a recipe's output_dir.")
    data: DataConfig = Field(default_factory=DataConfig, description="Its training split's crops are edited.")
    prompts: PromptSpec = Field(default_factory=PromptSpec, description="The student's prompt encoder.")
    train_unet: bool = Field(False, description="Train the UNet's weights too (else only the edits' contexts).")
    context_lr: float = Field(3e-3, ge=0, description="Peak learning rate of the edit contexts (0: kept).")
    decoder_lr: float = Field(
        0.0, ge=0, description="Peak learning rate of the TAESD decoder and its frame skip (0: kept)."
    )
    frame_skip: bool = Field(
        False,
        description="Give the decoder a zero-initialised frame skip (the input frame joins its full-resolution "
        "features) if the student has none; trained at decoder_lr.",
    )
    frame_skip_kernel: int = Field(FRAME_SKIP_KERNEL, ge=1, description="The frame skip's kernel size (odd).")
    drop_decoder_blocks: list[int] = Field(
        default_factory=list,
        description="Residual blocks of the TAESD decoder (indices in its layer list: "
        "training.decoder_blocks.decoder_block_levels) removed before training, to buy back their frame cost; "
        "needs decoder_lr > 0.",
    )
    identity_share: float = Field(
        0.2, ge=0, le=1, description="Share of rows at s_T = 0, whose target is the input (the edit off)."
    )
    preserve_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of rows at random (s_T, s_I) in the trained ranges whose target is the starting "
        "student's own output there (same noise, its starting contexts).",
    )
    preserve_lowpass_sigma: float = Field(
        0.0,
        ge=0,
        description="When > 0, preserved rows match the starting output only after a Gaussian blur of this σ (its "
        "colours and strength, not its softness), and are left out of the SSIM term: for a decoder that is meant "
        "to draw sharper than the one it starts from.",
    )
    order_rows: int = Field(
        0,
        ge=0,
        description="Rows a batch also edits at two text scales s_T < s_T + order_step (drawn in the trained range, "
        "same crop, noise and edit), to keep edit strength rising with s_T: the stronger one must move the frame "
        "further (mean |output − input|) by order_margin levels.",
    )
    order_step: float = Field(0.25, gt=0, description="The s_T gap of an ordered pair.")
    order_margin: float = Field(0.5, ge=0, description="Levels (0..255) the higher s_T must move the frame further.")
    order_weight: float = Field(1.0, ge=0, description="Weight of the ordered pairs' hinge loss.")
    steady_rows: int = Field(
        0,
        ge=0,
        description="Rows a batch also edits from a copy of their frame with camera-like noise added (same noise "
        "draw, edit and scales): the mean |difference| of the two outputs is a loss, so the noise of a still scene "
        "does not flicker through the decoder and its frame skip.",
    )
    steady_noise: float = Field(
        2.0,
        ge=0,
        description="Largest standard deviation in levels (0..255) of a steady row's added noise; each row draws its "
        "own in [0, steady_noise], half of it pixel-fine and half smooth over 8-pixel cells.",
    )
    steady_weight: float = Field(0.1, ge=0, description="Weight of the steadiness loss, per level of mean |change|.")
    l1_weight: float = Field(1.0, ge=0, description="Pixel L1.")
    mse_weight: float = Field(1.0, ge=0, description="Pixel MSE (what PSNR measures).")
    ssim_weight: float = Field(0.0, ge=0, description="1 − SSIM (the evaluation's, training.image_metrics): structure.")
    context_anchor_weight: float = Field(
        0.0, ge=0, description="Squared distance of each context from where it started, relative to its norm²."
    )

    @model_validator(mode="after")
    def _pruned_decoder_is_trained(self) -> PixelFinetuneConfig:
        if self.drop_decoder_blocks and self.decoder_lr <= 0:
            raise ValueError("drop_decoder_blocks needs decoder_lr > 0: a pruned decoder must be trained and saved")
        for name in ("order_rows", "steady_rows"):
            if getattr(self, name) > self.batch_size:
                raise ValueError(f"{name} ({getattr(self, name)}) exceeds batch_size ({self.batch_size})")
        return self


class TunedParts(nn.Module):
    """What the stage may train: the edits' contexts (E, 1, D), the student's (guided) UNet and its codec's decoder
    (with its frame skip); the flags say which parts move."""

    def __init__(self, contexts: torch.Tensor, unet: GuidedUNet, codec: Codec) -> None:
        super().__init__()
        self.contexts = nn.Parameter(contexts.detach().clone().float())
        self.unet = unet
        self.codec = codec


class PixelStep:
    """One batch: crops, random edits and their exact targets (or the input, or the starting student's output),
    the student's decoded one-step output, and the pixel loss between them."""

    def __init__(self, config: PixelFinetuneConfig, folder: Path, table: RouteTable) -> None:
        model = load_editor_model(folder, config.prompts)
        if not model.config.distilled:
            raise ValueError(f"{folder} has no guidance embedding: not a distilled one-step student")
        self.config = config
        self.device = train_device(config.device)
        self.editor = model.config
        self.schedule = model.schedule
        codec = model.codec
        if not isinstance(codec, TinyCodec) and (config.decoder_lr > 0 or config.frame_skip):
            raise ValueError(f"{folder} decodes with an AutoencoderKL; only a TAESD decoder is trained here")
        if config.drop_decoder_blocks and isinstance(codec, TinyCodec):
            codec = TinyCodec(without_decoder_blocks(codec.taesd, config.drop_decoder_blocks), codec.frame_skip)
        if config.frame_skip and isinstance(codec, TinyCodec) and codec.frame_skip is None:
            width = codec.taesd.config.decoder_block_out_channels[-1]
            codec = TinyCodec(codec.taesd, FrameSkip(feature_channels=width, kernel_size=config.frame_skip_kernel))
        codec.requires_grad_(False).eval().to(self.device)
        if isinstance(codec, TinyCodec) and config.decoder_lr > 0:
            codec.taesd.decoder.requires_grad_(True)
            if codec.frame_skip is not None:
                codec.frame_skip.requires_grad_(True)
        self.edits = get_edits(list(table.edit_names))
        self.start_contexts = table.edit_contexts.clone().to(self.device)
        # The starting UNet and decoder answer the preserved rows; without them no copy is kept.
        self.start_unet: GuidedUNet | None = None
        self.start_codec: Codec = codec
        if config.preserve_share > 0:
            self.start_unet = copy.deepcopy(model.unet).requires_grad_(False).eval().to(self.device)
            if config.decoder_lr > 0:
                self.start_codec = copy.deepcopy(codec).requires_grad_(False).eval()
        unet = model.unet.requires_grad_(config.train_unet).eval().to(self.device)
        self.parts = TunedParts(table.edit_contexts, unet, codec).to(self.device)
        self.parts.contexts.requires_grad_(config.context_lr > 0)
        self.rng = np.random.default_rng(config.seed)
        self.crops = CropSampler(load_split(config.data).train, config.data, self.rng)

    def _scales(self, b: int, identity: torch.Tensor, preserve: torch.Tensor) -> torch.Tensor:
        """(B, 2) = (s_T, s_I): the operating point (1, 1); 0 for s_T on identity rows; uniform in the trained
        ranges on preserved rows."""
        scales = torch.ones(b, 2)
        scales[identity, 0] = 0.0
        drawn = sample_scales(self.rng, b, self.editor.trained_text_guidance, self.editor.trained_image_guidance)
        scales[preserve] = drawn[preserve]
        return scales

    def _decoded(
        self,
        unet: nn.Module,
        codec: Codec,
        x_t: torch.Tensor,
        z_image: torch.Tensor,
        frames: torch.Tensor,
        context: torch.Tensor,
        scales: torch.Tensor,
    ) -> torch.Tensor:
        ts = torch.full((x_t.shape[0],), self.editor.student_timestep, dtype=torch.long, device=self.device)
        out = unet(torch.cat([x_t, z_image], 1), ts, context, scales)
        return codec.decode(self.schedule.predict_x0(out.float(), x_t, ts), frames)

    def _order_hinge(
        self, x: torch.Tensor, z_image: torch.Tensor, x_t: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """Mean hinge of the ordered pairs: how far each higher-s_T edit falls short of moving its frame
        order_margin levels further than the lower-s_T one."""
        c, n = self.config, x.shape[0]
        bottom, top = self.editor.trained_text_guidance
        text_range = (bottom, max(bottom, top - c.order_step))  # both of a pair's scales in the trained range
        low = sample_scales(self.rng, n, text_range, self.editor.trained_image_guidance)
        high = low.clone()
        high[:, 0] += c.order_step
        scales = torch.cat([low, high]).to(self.device)
        context = self.parts.contexts[ids[:n].to(self.device)].repeat(2, 1, 1)
        frames = x.repeat(2, 1, 1, 1)
        decoded = self._decoded(
            self.parts.unet,
            self.parts.codec,
            x_t.repeat(2, 1, 1, 1),
            z_image.repeat(2, 1, 1, 1),
            frames,
            context,
            scales,
        )
        strength = (decoded - frames).abs().mean(dim=(1, 2, 3)) * 127.5  # levels, as the report's
        return F.relu(strength[:n] - strength[n:] + c.order_margin).mean()

    def _camera_noise(self, frames: torch.Tensor) -> torch.Tensor:
        """Noise like a still camera's from one frame to the next, in [-1, 1] units: per row a standard deviation
        drawn in [0, steady_noise] levels, split between a pixel-fine part and one smooth over 8-pixel cells (as
        sensor noise and video coding's blocks are). Drawn from the stage's own generator, so a resumed run repeats
        it."""
        n, channels, h, w = frames.shape
        sigma = torch.from_numpy(self.rng.uniform(0, self.config.steady_noise, (n, 1, 1, 1))).float() / 127.5
        fine = torch.from_numpy(self.rng.standard_normal((n, channels, h, w))).float()
        cells = torch.from_numpy(self.rng.standard_normal((n, channels, max(1, h // 8), max(1, w // 8)))).float()
        smooth = F.interpolate(cells, size=(h, w), mode="bilinear", align_corners=False)
        smooth = smooth / smooth.std().clamp_min(1e-6)  # interpolation shrinks the spread: back to unit
        return (sigma * (fine + smooth) / 2**0.5).to(frames.device)

    def _steady_gap(
        self, x: torch.Tensor, x_t: torch.Tensor, decoded: torch.Tensor, context: torch.Tensor, scales: torch.Tensor
    ) -> torch.Tensor:
        """Mean |output(frame + camera noise) − output(frame)| in levels, over the first rows of the batch."""
        noisy = (x + self._camera_noise(x)).clamp(-1, 1)
        with torch.no_grad():
            z_noisy = self.parts.codec.encode(noisy) * self.editor.image_latent_scale
        moved = self._decoded(self.parts.unet, self.parts.codec, x_t, z_noisy, noisy, context, scales)
        return (moved - decoded).abs().mean() * 127.5

    def loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        c, b = self.config, self.config.batch_size
        images = self.crops.sample(b)
        ids = torch.from_numpy(self.rng.integers(len(self.edits), size=b))
        draw = self.rng.random(b)
        preserve = torch.from_numpy(draw < c.preserve_share)
        identity = torch.from_numpy((draw >= c.preserve_share) & (draw < c.preserve_share + c.identity_share))
        exact = ~identity & ~preserve
        targets = images.clone()
        for i in ids[exact].unique().tolist():
            rows = (ids == i) & exact
            targets[rows] = self.edits[i](images[rows])
        x, y = (images * 2 - 1).to(self.device), (targets * 2 - 1).to(self.device)
        scales = self._scales(b, identity, preserve).to(self.device)
        ids, preserve, exact = ids.to(self.device), preserve.to(self.device), exact.to(self.device)
        with torch.no_grad():
            z_image = self.parts.codec.encode(x) * self.editor.image_latent_scale
            x_t = student_start(self.schedule, torch.randn(z_image.shape), self.editor.student_timestep, None)
            x_t = x_t.to(self.device)
            if self.start_unet is not None and preserve.any():
                kept = self._decoded(
                    self.start_unet,
                    self.start_codec,
                    x_t[preserve],
                    z_image[preserve],
                    x[preserve],
                    self.start_contexts[ids[preserve]],
                    scales[preserve],
                )
                y = y.clone()
                y[preserve] = kept
        decoded = self._decoded(self.parts.unet, self.parts.codec, x_t, z_image, x, self.parts.contexts[ids], scales)
        compared, structured = decoded, torch.ones_like(preserve)
        if c.preserve_lowpass_sigma > 0 and preserve.any():
            compared, y = decoded.clone(), y.clone()
            compared[preserve] = gaussian_blur(decoded[preserve], c.preserve_lowpass_sigma)
            y[preserve] = gaussian_blur(y[preserve], c.preserve_lowpass_sigma)
            structured = ~preserve
        mse = F.mse_loss(compared, y)
        loss = c.l1_weight * (compared - y).abs().mean() + c.mse_weight * mse
        if c.ssim_weight > 0 and structured.any():
            similarity = ssim_map((decoded[structured].clamp(-1, 1) + 1) / 2, (y[structured] + 1) / 2)
            loss = loss + c.ssim_weight * (1 - similarity.mean())
        start = self.start_contexts
        moved = ((self.parts.contexts - start) ** 2).sum(-1) / (start**2).sum(-1)
        loss = loss + c.context_anchor_weight * moved.mean()
        logged = {"moved": float(moved.detach().mean().sqrt())}
        if c.order_rows > 0:
            hinge = self._order_hinge(x[: c.order_rows], z_image[: c.order_rows], x_t[: c.order_rows], ids)
            loss = loss + c.order_weight * hinge
            logged["order"] = float(hinge.detach())
        if c.steady_rows > 0:
            k = c.steady_rows
            gap = self._steady_gap(x[:k], x_t[:k], decoded[:k], self.parts.contexts[ids[:k]], scales[:k])
            loss = loss + c.steady_weight * gap
            logged["steady"] = float(gap.detach())
        if exact.any():  # the operating point's own fidelity, as the evaluation measures it (peak-to-peak 2)
            exact_mse = F.mse_loss(decoded.detach()[exact], y[exact])
            logged["psnr_exact"] = float(10 * torch.log10(4.0 / exact_mse.clamp_min(1e-10)))
        return loss, logged


def _save_final(config: PixelFinetuneConfig, folder: Path, table: RouteTable, tuned: TunedParts) -> Path:
    """The student's folder with the tuned contexts (and UNet, when trained), written atomically."""
    final = Path(config.output_dir) / FINAL_FOLDER
    tmp = final.with_name(FINAL_FOLDER + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # int8 graphs are rebuilt by training.quantize; a stage config inside names the stage that made the student.
    shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("int8", COMMITTED_STAGE_CONFIG))
    contexts = tuned.contexts.detach().cpu()
    source = table.contexts_source
    if config.context_lr > 0:
        source = f"tuned in pixel space by training.pixel_finetune ({config.steps} steps from {source})"
    RouteTable(table.phrasings, table.edit_of_phrasing, table.edit_names, contexts, source).save(tmp / ROUTES_FILE)
    dtype = torch.float16 if config.save_dtype == "float16" else torch.float32
    if config.train_unet:
        shutil.rmtree(tmp / UNET_FOLDER)
        copy.deepcopy(tuned.unet.unet).cpu().to(dtype).save_pretrained(str(tmp / UNET_FOLDER))
    if config.decoder_lr > 0:
        assert isinstance(tuned.codec, TinyCodec)  # PixelStep refuses anything else
        # The encoder is saved too, unchanged: fp16 weights read as fp32 and written back are the same bytes.
        taesd = copy.deepcopy(tuned.codec.taesd).cpu().to(dtype)
        shutil.rmtree(tmp / TAESD_FOLDER)
        taesd.save_pretrained(str(tmp / TAESD_FOLDER))
        if tuned.codec.frame_skip is not None:
            shutil.rmtree(tmp / FRAME_SKIP_FOLDER, ignore_errors=True)
            copy.deepcopy(tuned.codec.frame_skip).cpu().to(dtype).save_pretrained(str(tmp / FRAME_SKIP_FOLDER))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def train(config: PixelFinetuneConfig) -> Path:
    """Run (or resume) the fine-tune; writes output_dir/final/ and returns it."""
    require_one_process("pixel_finetune")
    folder = model_folder(config.student)
    if not (folder / ROUTES_FILE).is_file():
        raise ValueError(f"{folder} has no {ROUTES_FILE}: route it first (python -m training.prompt_routes)")
    table = RouteTable.load(folder / ROUTES_FILE)
    torch.manual_seed(config.seed)
    step = PixelStep(config, folder, table)
    parts = step.parts
    groups = []
    unet_params = [p for p in parts.unet.parameters() if p.requires_grad]
    if unet_params:
        groups.append({"params": unet_params, "lr": config.lr, "weight_decay": config.weight_decay})
    decoder_params = [p for p in parts.codec.parameters() if p.requires_grad]
    if decoder_params:
        groups.append({"params": decoder_params, "lr": config.decoder_lr, "weight_decay": config.weight_decay})
    if parts.contexts.requires_grad:
        groups.append({"params": [parts.contexts], "lr": config.context_lr, "weight_decay": 0.0})
    if not groups:
        raise ValueError("nothing to train: context_lr and decoder_lr are 0 and train_unet is false")
    optimizer = torch.optim.AdamW(groups)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]  # run_training scales it by the schedule each step
    params = [p for group in groups for p in group["params"]]
    ema = EMA(parts, config.ema_decay) if config.ema_decay > 0 else None
    modules: dict[str, nn.Module] = {"tuned": parts, **({"ema": ema} if ema is not None else {})}
    state = TrainState(modules, {"tuned": optimizer}, step.rng)

    def one(_: int) -> dict[str, float]:
        loss, logged = step.loss()
        loss.backward()
        norm = clip_and_step(optimizer, params, config.grad_clip)
        if ema is not None:
            ema.update(parts)
        return {"loss": float(loss.detach()), **logged, "grad_norm": norm}

    run_training(config, state, one, "pixel_finetune")
    tuned = ema.shadow if ema is not None else parts
    assert isinstance(tuned, TunedParts)
    return _save_final(config, folder, table, tuned)


def main(argv: list[str] | None = None) -> Path:
    return recipe_main(PixelFinetuneConfig, train, argv, __doc__ or "")


if __name__ == "__main__":
    main()
