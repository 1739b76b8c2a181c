"""Recipe 1: train a TAESD-architecture autoencoder (AutoencoderTiny) on raw and edited crops."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from pydantic import Field

from training.config import TAESDSpec, TrainConfig, recipe_main
from training.data import CropSampler, DataConfig, load_split
from training.distributed import require_one_process, train_device
from training.edits import Edit, get_edits
from training.loop import clip_and_step, module_train_state, run_training
from training.models import FINAL_FOLDER, load_taesd, save_taesd
from training.triplets import TripletConfig, TripletStream


class AutoencoderConfig(TrainConfig):
    """Reconstruction training of the editor's codec; its latents must also suit diffusion."""

    data: DataConfig = Field(default_factory=DataConfig)
    triplets: TripletConfig | None = Field(
        None, description="Real (input, instruction, edited) triplets: both images are reconstructed."
    )
    taesd: TAESDSpec = Field(default_factory=TAESDSpec)
    init_from: Path | None = Field(None, description="Start from this TAESD folder instead of random weights.")
    edits: list[str] | None = Field(None, description="Edits whose outputs are also reconstructed (None = all).")
    edit_probability: float = Field(
        0.5, ge=0, le=1, description="Chance a crop is replaced by an edit's output: the decoder must draw those too."
    )
    l1_weight: float = Field(1.0, ge=0, description="Pixel L1.")
    mse_weight: float = Field(1.0, ge=0, description="Pixel MSE (what PSNR measures).")
    edge_weight: float = Field(0.5, ge=0, description="L1 between image gradients (keeps edges sharp).")
    latent_reg_weight: float = Field(
        0.01, ge=0, description="Pulls each latent channel to mean 0, std 1, the scale the noise schedule assumes."
    )
    latent_noise: float = Field(
        0.05, ge=0, description="Max σ of noise added to latents before decoding (a decoder robust to UNet error)."
    )


def edited_crops(
    crops: CropSampler, edits: tuple[Edit, ...], rng: np.random.Generator, batch_size: int, probability: float
) -> torch.Tensor:
    """`batch_size` crops in [-1, 1], each replaced by a random edit's output with `probability`: a decoder must
    draw the edits too."""
    x = crops.sample(batch_size)
    edit_rows = torch.from_numpy(rng.random(batch_size) < probability)
    choice = torch.from_numpy(rng.integers(len(edits), size=batch_size))
    for i in choice[edit_rows].unique().tolist():
        rows = edit_rows & (choice == i)
        x[rows] = edits[i](x[rows])
    return x * 2 - 1


def image_source(
    config: AutoencoderConfig, rng: np.random.Generator, progress: dict[str, Any]
) -> Callable[[], torch.Tensor]:
    """What the autoencoder recipes train on, a batch a call in [-1, 1]: edited crops of the data section's
    images; or with `config.triplets`, a real triplet's input or (with edit_probability) its edited image,
    mixed batch by batch with the edited crops below `triplets.share` (its draw counted in `progress`)."""
    triplets, crops = None, None
    if config.triplets is not None:
        triplets = TripletStream(config.triplets, config.data.crop_size, config.batch_size, config.seed, 0, 1, progress)
    if config.triplets is None or config.triplets.share < 1:
        crops = CropSampler(load_split(config.data).train, config.data, rng)
    edits = get_edits(config.edits)

    def images() -> torch.Tensor:
        if triplets is not None and (crops is None or rng.random() < triplets.config.share):
            b = triplets.next()
            edited = torch.from_numpy(rng.random(b.images.shape[0]) < config.edit_probability)
            return torch.where(edited[:, None, None, None], b.targets, b.images)
        assert crops is not None
        return edited_crops(crops, edits, rng, config.batch_size, config.edit_probability)

    return images


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical forward differences of (B, C, H, W) images."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def reconstruction_losses(recon: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1, MSE and gradient-L1 between reconstructions and images (both in [-1, 1])."""
    gx_r, gy_r = image_gradients(recon)
    gx_i, gy_i = image_gradients(images)
    return {
        "l1": (recon - images).abs().mean(),
        "mse": F.mse_loss(recon, images),
        "edge": 0.5 * ((gx_r - gx_i).abs().mean() + (gy_r - gy_i).abs().mean()),
    }


def latent_regulariser(latents: torch.Tensor) -> torch.Tensor:
    """Σ_c mean_c² + log(std_c)²: zero when every latent channel has mean 0 and std 1 over the batch."""
    mean = latents.mean((0, 2, 3))
    std = latents.std((0, 2, 3)).clamp_min(1e-4)
    return (mean**2 + std.log() ** 2).mean()


def autoencoder_loss(
    config: AutoencoderConfig, taesd: AutoencoderTiny, images: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The recipe's loss on one batch: the weighted reconstruction of noised latents plus the latent
    regulariser. Returns (loss, its reconstruction parts, the regulariser, the latents)."""
    latents = taesd.encode(images).latents
    # Drawn on the CPU whatever the device, so a run draws the same noise scales everywhere.
    sigma = config.latent_noise * torch.rand(latents.shape[0], 1, 1, 1).to(latents)
    recon = taesd.decode(latents + sigma * torch.randn_like(latents)).sample
    parts = reconstruction_losses(recon, images)
    reg = latent_regulariser(latents)
    loss = (
        config.l1_weight * parts["l1"]
        + config.mse_weight * parts["mse"]
        + config.edge_weight * parts["edge"]
        + config.latent_reg_weight * reg
    )
    return loss, parts, reg, latents


def train_on_edited_crops(
    config: AutoencoderConfig,
    module: torch.nn.Module,
    name: str,
    phase: str,
    steps: int,
    seed: int,
    loss_of: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
    source: Callable[[np.random.Generator, dict[str, Any]], Callable[[], Any]] | None = None,
) -> torch.nn.Module:
    """Train (or resume) `module` (checkpointed as `name`) under output_dir/<phase> for `steps`, with
    `loss_of(batch)` giving the loss and its logged parts; returns the EMA (or the module itself). Batches are edited
    crops in [-1, 1] on the device (image_source), or what `source(rng, progress)` makes. The data's RNG is seeded
    here; torch's is the caller's to seed, before or after building `module`."""
    phase_config = config.model_copy(update={"output_dir": Path(config.output_dir) / phase, "steps": steps})
    rng = np.random.default_rng(seed)
    require_one_process(phase)
    device = train_device(config.device)
    params, optimizer, ema, state = module_train_state(config, module.to(device), name, rng)
    if source is None:
        images = image_source(config, rng, state.extra)

        def batches() -> torch.Tensor:
            return images().to(device)
    else:
        batches = source(rng, state.extra)

    def step(_: int) -> dict[str, float]:
        loss, logged = loss_of(batches())
        loss.backward()
        norm = clip_and_step(optimizer, params, config.grad_clip)
        if ema is not None:
            ema.update(module)
        return {"loss": float(loss.detach()), **logged, "grad_norm": norm}

    run_training(phase_config, state, step, phase)
    return (ema.shadow if ema is not None else module).eval()


def train(config: AutoencoderConfig) -> Path:
    """Train (or resume) the autoencoder; writes output_dir/final/taesd/ and returns output_dir/final."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    taesd = (
        load_taesd(config.init_from) if config.init_from else AutoencoderTiny(**config.taesd.diffusers_kwargs())
    ).train()
    require_one_process("autoencoder")
    device = train_device(config.device)
    params, optimizer, ema, state = module_train_state(config, taesd.to(device), "taesd", rng)
    images = image_source(config, rng, state.extra)

    def step(_: int) -> dict[str, float]:
        loss, parts, reg, latents = autoencoder_loss(config, taesd, images().to(device))
        loss.backward()
        norm = clip_and_step(optimizer, params, config.grad_clip)
        if ema is not None:
            ema.update(taesd)
        psnr = 10 * torch.log10(4.0 / parts["mse"].detach().clamp_min(1e-10))  # peak-to-peak 2 in [-1, 1]
        return {
            "loss": float(loss.detach()),
            "l1": float(parts["l1"].detach()),
            "psnr": float(psnr),
            "latent_reg": float(reg.detach()),
            "latent_std": float(latents.detach().std()),
            "grad_norm": norm,
        }

    run_training(config, state, step, "autoencoder")
    final = ema.shadow if ema is not None else taesd
    dtype = torch.float16 if config.save_dtype == "float16" else torch.float32
    return save_taesd(Path(config.output_dir) / FINAL_FOLDER, final.eval(), dtype)


def main(argv: list[str] | None = None) -> Path:
    return recipe_main(AutoencoderConfig, train, argv, __doc__ or "")


if __name__ == "__main__":
    main()
