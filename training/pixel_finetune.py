"""Recipe: a routed one-step student fine-tuned in pixel space, through its frozen decoder, towards exact edits.

Every earlier stage scores the student in latent space, against a teacher's samples or the encoder's latents of the
exact edit; what people see is the decoder's drawing of its output. This stage decodes the student's one-step output
for training crops and compares pixels with the exact edit (s_T = 1, s_I = 1), or with the input itself for a share
of rows at s_T = 0. It tunes the route table's edit contexts (engines.routing: the one context each edit is fed as)
and, with `train_unet`, the UNet too. A `preserve_share` of rows at random scales in the student's trained ranges keep
the starting student's own output there, so the guidance controls keep the behaviour they had. The decoder, encoder
and the table's phrasings stay as they are; `final/` is the student's folder with the tuned parts.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from engines.config import ROUTES_FILE
from engines.model import UNET_FOLDER
from engines.routing import RouteTable
from engines.sampling import student_start
from engines.unet import GuidedUNet
from training.checkpoint import TrainState
from training.config import TrainConfig, recipe_main
from training.data import CropSampler, DataConfig, load_split
from training.distributed import require_one_process, train_device
from training.draws import sample_scales
from training.edits import get_edits
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
    l1_weight: float = Field(1.0, ge=0, description="Pixel L1.")
    mse_weight: float = Field(1.0, ge=0, description="Pixel MSE (what PSNR measures).")
    context_anchor_weight: float = Field(
        0.0, ge=0, description="Squared distance of each context from where it started, relative to its norm²."
    )


class TunedParts(nn.Module):
    """What the stage trains: the edits' contexts (E, 1, D) and the student's (guided) UNet."""

    def __init__(self, contexts: torch.Tensor, unet: GuidedUNet) -> None:
        super().__init__()
        self.contexts = nn.Parameter(contexts.detach().clone().float())
        self.unet = unet


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
        self.codec = model.codec.requires_grad_(False).eval().to(self.device)
        self.edits = get_edits(list(table.edit_names))
        self.start_contexts = table.edit_contexts.clone().to(self.device)
        # The starting UNet answers the preserved rows; without them no copy is kept.
        self.start_unet: GuidedUNet | None = None
        if config.preserve_share > 0:
            self.start_unet = copy.deepcopy(model.unet).requires_grad_(False).eval().to(self.device)
        unet = model.unet.requires_grad_(config.train_unet).eval().to(self.device)
        self.parts = TunedParts(table.edit_contexts, unet).to(self.device)
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
        self, unet: nn.Module, x_t: torch.Tensor, z_image: torch.Tensor, context: torch.Tensor, scales: torch.Tensor
    ) -> torch.Tensor:
        ts = torch.full((x_t.shape[0],), self.editor.student_timestep, dtype=torch.long, device=self.device)
        out = unet(torch.cat([x_t, z_image], 1), ts, context, scales)
        return self.codec.decode(self.schedule.predict_x0(out.float(), x_t, ts))

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
            z_image = self.codec.encode(x) * self.editor.image_latent_scale
            x_t = student_start(self.schedule, torch.randn(z_image.shape), self.editor.student_timestep, None)
            x_t = x_t.to(self.device)
            if self.start_unet is not None and preserve.any():
                kept = self._decoded(
                    self.start_unet,
                    x_t[preserve],
                    z_image[preserve],
                    self.start_contexts[ids[preserve]],
                    scales[preserve],
                )
                y = y.clone()
                y[preserve] = kept
        decoded = self._decoded(self.parts.unet, x_t, z_image, self.parts.contexts[ids], scales)
        mse = F.mse_loss(decoded, y)
        loss = c.l1_weight * (decoded - y).abs().mean() + c.mse_weight * mse
        start = self.start_contexts
        moved = ((self.parts.contexts - start) ** 2).sum(-1) / (start**2).sum(-1)
        loss = loss + c.context_anchor_weight * moved.mean()
        logged = {"moved": float(moved.detach().mean().sqrt())}
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
    if config.train_unet:
        dtype = torch.float16 if config.save_dtype == "float16" else torch.float32
        shutil.rmtree(tmp / UNET_FOLDER)
        copy.deepcopy(tuned.unet.unet).cpu().to(dtype).save_pretrained(str(tmp / UNET_FOLDER))
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
    if parts.contexts.requires_grad:
        groups.append({"params": [parts.contexts], "lr": config.context_lr, "weight_decay": 0.0})
    if not groups:
        raise ValueError("nothing to train: context_lr is 0 and train_unet is false")
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
