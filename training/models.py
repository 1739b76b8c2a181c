"""Building, loading and saving the recipes' networks in exactly the folder layout engines/ loads."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderTiny, UNet2DConditionModel

from engines.autoencoder import TinyCodec
from engines.config import EditorConfig
from engines.model import TAESD_FOLDER, EditorModel, load_schedule
from engines.sampling import NoiseSchedule
from engines.unet import GuidedUNet
from training.distributed import Ranks, barrier
from training.prompts import LazyPromptEncoder, PromptSpec

if TYPE_CHECKING:
    from training.config import EditTrainConfig
    from training.loop import EMA

FINAL_FOLDER = "final"
# Inside committed stage weights (training/weights/<stage>/): the config.json that stage really ran.
COMMITTED_STAGE_CONFIG = "stage_config.json"
#: The committed final weights of the default's stages, one folder per stage.
COMMITTED_WEIGHTS = Path(__file__).resolve().parent / "weights"


def ran_config(final: Path) -> dict | None:  # type: ignore[type-arg]
    """The config a stage's final weights were trained with (overrides included): the config.json its recipe
    saved beside the checkpoints, or the copy committed weights carry inside; None when neither exists."""
    for path in (Path(final).parent / "config.json", Path(final) / COMMITTED_STAGE_CONFIG):
        if path.is_file():
            return json.loads(path.read_text())
    return None


def training_schedule() -> NoiseSchedule:
    """SD's scaled-linear schedule predicting x0, with DDIM settings that suit unit-variance TAESD latents.

    'trailing' spacing makes a few-step DDIM start at t=999 (where the one-step student lives), and
    clip_sample=False keeps x0 estimates unclipped (TAESD latents reach beyond ±1).
    """
    return NoiseSchedule.from_scheduler_config(
        {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": "sample",
            "timestep_spacing": "trailing",
            "clip_sample": False,
        }
    )


def load_taesd(path: Path) -> AutoencoderTiny:
    """A TAESD from an AutoencoderTiny folder, or from the taesd/ subfolder of a model or stage folder."""
    path = Path(path)
    for candidate in (path, path / TAESD_FOLDER, path / FINAL_FOLDER / TAESD_FOLDER):
        config_path = candidate / "config.json"
        # A recipe's output_dir also holds a config.json (the training config): check what it describes.
        if config_path.is_file() and json.loads(config_path.read_text()).get("_class_name") == "AutoencoderTiny":
            return AutoencoderTiny.from_pretrained(str(candidate), torch_dtype=torch.float32).eval()
    raise FileNotFoundError(f"no TAESD (AutoencoderTiny) folder at {path}, {path / TAESD_FOLDER}")


def model_folder(path: Path) -> Path:
    """A stage's model folder: `path` itself, or `path/final` when `path` is a recipe's output_dir."""
    path = Path(path)
    if (path / "unet" / "config.json").is_file():
        return path
    if (path / FINAL_FOLDER / "unet" / "config.json").is_file():
        return path / FINAL_FOLDER
    raise FileNotFoundError(f"no model folder (unet/config.json) at {path} or {path / FINAL_FOLDER}")


def load_editor_model(path: Path, prompts: PromptSpec, *, same_encoder: bool = True) -> EditorModel:
    """An EditorModel in float32 whose prompt encoder is built only if a prompt must really be encoded.

    `same_encoder=False` lets a model trained on another prompt encoder of the same width start a stage
    (its weights are fine-tuned to the new contexts; the UNet's own config still has to fit).
    """
    model = EditorModel.from_pretrained(model_folder(path), prompt_encoder=LazyPromptEncoder(prompts))
    if same_encoder and prompts.encoder != "hash" and model.config.prompt_encoder != prompts.encoder:
        raise ValueError(
            f"{path} was trained with the '{model.config.prompt_encoder}' prompt encoder, "
            f"the config asks for '{prompts.encoder}'"
        )
    return model


def editor_config(
    prompts: PromptSpec, resolution: int, guidance_embedding_dim: int | None, image_latent_scale: float = 1.0
) -> EditorConfig:
    return EditorConfig(
        resolution=resolution,
        # The hash encoder exists only in tests, which pass their encoder explicitly.
        prompt_encoder="minilm" if prompts.encoder == "hash" else prompts.encoder,
        max_prompt_tokens=prompts.tokens,
        guidance_embedding_dim=guidance_embedding_dim,
        image_latent_scale=image_latent_scale,
    )


def model_conventions(path: Path) -> tuple[NoiseSchedule, float]:
    """The noise schedule and image-latent scale a model folder's UNet was trained with, so a fine-tune keeps
    them: ours predict x0 on TAESD latents; a converted stock InstructPix2Pix predicts noise and reads its image
    condition unscaled."""
    folder = model_folder(path)
    return load_schedule(folder), EditorConfig.load(folder).image_latent_scale


def save_editor(
    folder: Path,
    config: EditorConfig,
    unet: UNet2DConditionModel,
    taesd: AutoencoderTiny,
    schedule: NoiseSchedule,
    prompts: PromptSpec,
    dtype: torch.dtype,
) -> Path:
    """Write an EditorModel folder (via save_pretrained) atomically: into a temp folder, then renamed."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet_copy = copy.deepcopy(unet).to(dtype)
    model = EditorModel(
        config=config,
        unet=GuidedUNet(unet_copy, config.guidance_embedding_dim, config.guidance_embedding_scale),
        codec=TinyCodec(copy.deepcopy(taesd).to(dtype)),
        schedule=schedule,
        prompt_encoder=LazyPromptEncoder(prompts),
        fingerprint="",
    )
    model.save_pretrained(tmp)
    if prompts.clip_folder is not None:  # the folder must carry the text encoder its editor.json names
        for part in ("tokenizer", "text_encoder"):
            shutil.copytree(prompts.clip_folder / part, tmp / part)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def save_final_editor(
    config: EditTrainConfig,
    editor: EditorConfig,
    unet: UNet2DConditionModel,
    ema: EMA | None,
    taesd: AutoencoderTiny,
    schedule: NoiseSchedule,
    ranks: Ranks | None = None,
) -> Path:
    """Every UNet recipe's last act: its EMA weights (else the raw ones) as <output_dir>/final/, in save_dtype,
    written by rank 0 while the other ranks wait for it."""
    final_unet = ema.shadow if ema is not None else unet
    dtype = torch.float16 if config.save_dtype == "float16" else torch.float32
    folder = Path(config.output_dir) / FINAL_FOLDER
    ranks = ranks or Ranks()
    if ranks.is_main:
        save_editor(folder, editor, final_unet.eval(), taesd, schedule, config.prompts, dtype)
    barrier(ranks)
    return folder


def save_taesd(folder: Path, taesd: AutoencoderTiny, dtype: torch.dtype) -> Path:
    """Write folder/taesd/ (what EditorModel.from_pretrained(taesd=...) and every later stage load), atomically."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy.deepcopy(taesd).to(dtype).save_pretrained(str(tmp / TAESD_FOLDER))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def native_target(
    schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What a UNet of this schedule's prediction type should output for x_t = add_noise(x0, noise, t)."""
    if schedule.prediction_type == "sample":
        return x0
    if schedule.prediction_type == "epsilon":
        return noise
    sa, sb = schedule.coefficients(timesteps, x0)
    return sa * noise - sb * x0  # v_prediction
