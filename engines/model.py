"""EditorModel: the editor's PyTorch parts, loaded from (and saved to) a local diffusers-style folder."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

from engines.autoencoder import Codec, KLCodec, TinyCodec
from engines.config import EditorConfig
from engines.sampling import NoiseSchedule
from engines.text import CLIPPromptEncoder, MiniLMPromptEncoder, PromptEncoder
from engines.unet import GuidedUNet

UNET_FOLDER = "unet"
TAESD_FOLDER = "taesd"
VAE_FOLDER = "vae"
SCHEDULER_FOLDER = "scheduler"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"

#: The model the service runs when no weights path is given; trained by training/make_default.py.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


class ModelFolderError(ValueError):
    """A model folder is missing a part, or a part does not fit the others."""


def load_prompt_encoder(config: EditorConfig, folder: Path) -> PromptEncoder:
    if config.prompt_encoder == "minilm":
        return MiniLMPromptEncoder(tokens=config.max_prompt_tokens)
    if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
        raise ModelFolderError(f"{folder} needs text_encoder/ and tokenizer/ for its CLIP prompt encoder")
    return CLIPPromptEncoder(folder, tokens=config.max_prompt_tokens)


def load_codec(folder: Path, taesd: str | Path | None, dtype: torch.dtype) -> Codec:
    """TAESD from `taesd`, else folder/taesd/, else folder/vae/ (a TAESD or a full AutoencoderKL)."""
    candidates = [Path(taesd)] if taesd is not None else [folder / TAESD_FOLDER, folder / VAE_FOLDER]
    for path in candidates:
        config_path = path / "config.json"
        if not config_path.is_file():
            continue
        class_name = json.loads(config_path.read_text()).get("_class_name")
        if class_name == "AutoencoderKL":
            return KLCodec(AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype).eval())
        return TinyCodec(AutoencoderTiny.from_pretrained(str(path), torch_dtype=dtype).eval())
    raise ModelFolderError(f"no autoencoder found: looked for {', '.join(str(p) for p in candidates)}")


@dataclass
class EditorModel:
    """Everything an editor runs, as PyTorch modules on one device."""

    config: EditorConfig
    unet: GuidedUNet
    codec: Codec
    schedule: NoiseSchedule
    prompt_encoder: PromptEncoder
    fingerprint: str

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path = DEFAULT_MODEL_DIR,
        *,
        taesd: str | Path | None = None,
        prompt_encoder: PromptEncoder | None = None,
        torch_dtype: torch.dtype = torch.float32,
    ) -> EditorModel:
        """Load a diffusers InstructPix2Pix folder or one of ours; never touches a hub."""
        folder = Path(folder)
        if not (folder / UNET_FOLDER / "config.json").is_file():
            raise ModelFolderError(f"{folder} is not a model folder: {folder / UNET_FOLDER / 'config.json'} is missing")
        config = EditorConfig.load(folder)
        unet = UNet2DConditionModel.from_pretrained(str(folder / UNET_FOLDER), torch_dtype=torch_dtype).eval()
        if unet.config.in_channels != 8:
            raise ModelFolderError(
                f"an InstructPix2Pix UNet takes 8 input channels, this one {unet.config.in_channels}"
            )
        proj = unet.config.time_cond_proj_dim
        wanted = None if config.guidance_embedding_dim is None else 2 * config.guidance_embedding_dim
        if proj != wanted:
            raise ModelFolderError(f"unet time_cond_proj_dim={proj} but editor.json implies {wanted}")
        scheduler_path = folder / SCHEDULER_FOLDER / SCHEDULER_CONFIG_NAME
        schedule = (
            NoiseSchedule.from_scheduler_config(json.loads(scheduler_path.read_text()))
            if scheduler_path.is_file()
            else NoiseSchedule.default()
        )
        encoder = prompt_encoder or load_prompt_encoder(config, folder)
        if encoder.dim != unet.config.cross_attention_dim:
            raise ModelFolderError(
                f"prompt encoder gives {encoder.dim}-d tokens, the UNet attends to {unet.config.cross_attention_dim}-d"
            )
        return cls(
            config=config,
            unet=GuidedUNet(unet, config.guidance_embedding_dim, config.guidance_embedding_scale),
            codec=load_codec(folder, taesd, torch_dtype),
            schedule=schedule,
            prompt_encoder=encoder,
            fingerprint=folder_fingerprint(folder, taesd),
        )

    def save_pretrained(self, folder: str | Path) -> None:
        """Write editor.json, unet/, taesd/ (or vae/) and scheduler/ so from_pretrained reads them back."""
        folder = Path(folder)
        self.config.save(folder)
        self.unet.unet.save_pretrained(str(folder / UNET_FOLDER))
        if isinstance(self.codec, TinyCodec):
            self.codec.taesd.save_pretrained(str(folder / TAESD_FOLDER))
        else:
            self.codec.vae.save_pretrained(str(folder / VAE_FOLDER))
        (folder / SCHEDULER_FOLDER).mkdir(parents=True, exist_ok=True)
        (folder / SCHEDULER_FOLDER / SCHEDULER_CONFIG_NAME).write_text(
            json.dumps(self.schedule.scheduler_config, indent=2, default=list) + "\n"
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> EditorModel:
        self.unet.to(device=device, dtype=dtype)
        self.codec.to(device=device, dtype=dtype)
        return self


def folder_fingerprint(folder: Path, taesd: str | Path | None = None) -> str:
    """A short hash of every config and weight file the model is made of (the engine cache's model key)."""
    digest = hashlib.sha256()
    roots = [folder] + ([Path(taesd)] if taesd is not None else [])
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".json", ".safetensors", ".bin"}):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]
