"""EditorModel: the editor's PyTorch parts, loaded from (and saved to) a local diffusers-style folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from engines.attention import use_one_token_cross_attention
from engines.autoencoder import Codec, FrameSkip, KLCodec, TinyCodec
from engines.config import DEFAULT_MODEL_DIR, ROUTES_FILE, EditorConfig, PromptRouting
from engines.routing import RoutedPromptEncoder, RouteTable
from engines.sampling import NoiseSchedule
from engines.text import CLIPPromptEncoder, MiniLMPromptEncoder, PromptEncoder
from engines.unet import GuidedUNet

UNET_FOLDER = "unet"
TAESD_FOLDER = "taesd"
#: An optional part beside taesd/: the decoder's view of the input frame (engines.autoencoder.FrameSkip).
FRAME_SKIP_FOLDER = "frame_skip"
VAE_FOLDER = "vae"
SCHEDULER_FOLDER = "scheduler"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
#: Derived from the weights and keyed by their fingerprint (engines/quantize.py), so left out of it.
INT8_FOLDER = "int8"

#: The model the service runs when no weights path is given; trained by training/make_default.py.


class ModelFolderError(ValueError):
    """A model folder is missing a part, or a part does not fit the others."""


#: The weight files diffusers' from_pretrained reads from a part's folder (plain or sharded).
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)
TRANSFORMERS_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def require_part(path: Path, what: str, weight_names: tuple[str, ...]) -> None:
    """Raise ModelFolderError unless `path` holds a config.json and one of `weight_names`."""
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"{what}: {path / 'config.json'} is missing")
    if not any((path / name).is_file() for name in weight_names):
        raise ModelFolderError(f"{what}: no weights in {path} (expected one of {', '.join(weight_names)})")


def _require_tokenizer(path: Path) -> None:
    has_bpe = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if not has_bpe and not (path / "tokenizer.json").is_file():
        raise ModelFolderError(f"CLIP tokenizer: {path} needs vocab.json + merges.txt, or tokenizer.json")


def load_prompt_encoder(config: EditorConfig, folder: Path) -> PromptEncoder:
    """The folder's prompt encoder, routed through its table (ROUTES_FILE) when editor.json asks for routing."""
    encoder = load_base_prompt_encoder(config, folder)
    return encoder if config.prompt_routing is None else route_prompts(encoder, config.prompt_routing, folder)


def route_prompts(encoder: PromptEncoder, routing: PromptRouting, folder: Path) -> RoutedPromptEncoder:
    """`encoder` routed through `folder`'s table; a missing or broken table is a ModelFolderError."""
    path = folder / ROUTES_FILE
    if not path.is_file():
        raise ModelFolderError(f"editor.json asks for prompt routing but {path} is missing")
    try:
        return RoutedPromptEncoder(encoder, RouteTable.load(path), routing)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"could not load the prompt routes {path}: {exc}") from exc


def load_base_prompt_encoder(config: EditorConfig, folder: Path) -> PromptEncoder:
    if config.prompt_encoder in MiniLMPromptEncoder.CONTEXTS:
        return MiniLMPromptEncoder.named(config.prompt_encoder, config.max_prompt_tokens)
    if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
        raise ModelFolderError(f"{folder} needs text_encoder/ and tokenizer/ for its CLIP prompt encoder")
    require_part(folder / "text_encoder", "CLIP text encoder", TRANSFORMERS_WEIGHT_NAMES)
    _require_tokenizer(folder / "tokenizer")
    try:
        return CLIPPromptEncoder(folder, tokens=config.max_prompt_tokens)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"could not load the CLIP prompt encoder from {folder}: {exc}") from exc


def load_schedule(folder: Path) -> NoiseSchedule:
    """The noise schedule of a model folder's scheduler/ config; the shipped default's where it has none."""
    path = folder / SCHEDULER_FOLDER / SCHEDULER_CONFIG_NAME
    if not path.is_file():
        return NoiseSchedule.default()
    try:
        return NoiseSchedule.from_scheduler_config(json.loads(path.read_text()))
    except ValueError as exc:
        raise ModelFolderError(f"{path}: {exc}") from exc


#: Every diffusers load: never a hub, and plain loading said out loud (accelerate is not a dependency; left unsaid,
#: diffusers prints three lines of advice to install it on every load).
LOAD_OPTIONS = {"local_files_only": True, "low_cpu_mem_usage": False}


@contextlib.contextmanager
def diffusers_errors_only() -> Iterator[None]:
    """Quiet diffusers' warnings for one load: AutoencoderTiny registers `block_out_channels` into the config it
    saves and then warns, on every load, that the key is unexpected."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def codec_folder(folder: Path, taesd: str | Path | None) -> Path:
    """Where the autoencoder is: `taesd`, else folder/taesd/, else folder/vae/; ModelFolderError if none."""
    candidates = [Path(taesd)] if taesd is not None else [folder / TAESD_FOLDER, folder / VAE_FOLDER]
    for path in candidates:
        if (path / "config.json").is_file():
            require_part(path, "autoencoder", DIFFUSERS_WEIGHT_NAMES)
            return path
    raise ModelFolderError(f"no autoencoder found: looked for {', '.join(str(p / 'config.json') for p in candidates)}")


def load_codec(folder: Path, taesd: str | Path | None, dtype: torch.dtype) -> Codec:
    """TAESD from `taesd`, else folder/taesd/ (with folder/frame_skip/ when there is one), else folder/vae/ (a TAESD
    or a full AutoencoderKL)."""
    path = codec_folder(folder, taesd)
    class_name = json.loads((path / "config.json").read_text()).get("_class_name", "AutoencoderTiny")
    try:
        if class_name == "AutoencoderKL":
            return KLCodec(AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, **LOAD_OPTIONS).eval())
        if class_name == "AutoencoderTiny":
            with diffusers_errors_only():
                tiny = AutoencoderTiny.from_pretrained(str(path), torch_dtype=dtype, **LOAD_OPTIONS).eval()
            # A frame skip was trained with the folder's own decoder: another TAESD (`taesd`) runs without it.
            return TinyCodec(tiny, load_frame_skip(folder, dtype) if taesd is None else None)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"could not load the autoencoder from {path}: {exc}") from exc
    raise ModelFolderError(f"{path} holds a {class_name}; expected AutoencoderTiny or AutoencoderKL")


def load_frame_skip(folder: Path, dtype: torch.dtype) -> FrameSkip | None:
    """folder/frame_skip/ when the model has one (its TAESD decoder then reads the input frame), else None."""
    path = folder / FRAME_SKIP_FOLDER
    if not path.is_dir():
        return None
    require_part(path, "frame skip", DIFFUSERS_WEIGHT_NAMES)
    return FrameSkip.from_pretrained(str(path), torch_dtype=dtype, **LOAD_OPTIONS).eval()


@dataclass
class EditorModel:
    """Everything an editor runs, as PyTorch modules on one device."""

    config: EditorConfig
    unet: GuidedUNet
    codec: Codec
    schedule: NoiseSchedule
    prompt_encoder: PromptEncoder
    fingerprint: str
    folder: Path | None = None  # where it was loaded from (int8 calibration ranges live there)

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
        require_part(folder / UNET_FOLDER, "UNet", DIFFUSERS_WEIGHT_NAMES)
        codec_folder(folder, taesd)  # fail on a missing autoencoder before the slow loads
        try:
            config = EditorConfig.load(folder)
        except ValueError as exc:
            raise ModelFolderError(f"{folder}: invalid editor config: {exc}") from exc
        try:
            unet = UNet2DConditionModel.from_pretrained(
                str(folder / UNET_FOLDER), torch_dtype=torch_dtype, **LOAD_OPTIONS
            ).eval()
        except (OSError, ValueError) as exc:
            raise ModelFolderError(f"could not load the UNet from {folder / UNET_FOLDER}: {exc}") from exc
        if unet.config.in_channels != 8:
            raise ModelFolderError(
                f"an InstructPix2Pix UNet takes 8 input channels, this one {unet.config.in_channels}"
            )
        proj = unet.config.time_cond_proj_dim
        wanted = None if config.guidance_embedding_dim is None else 2 * config.guidance_embedding_dim
        if proj != wanted:
            raise ModelFolderError(f"unet time_cond_proj_dim={proj} but editor.json implies {wanted}")
        schedule = load_schedule(folder)
        encoder = prompt_encoder or load_prompt_encoder(config, folder)
        if encoder.dim != unet.config.cross_attention_dim:
            raise ModelFolderError(
                f"prompt encoder gives {encoder.dim}-d tokens, the UNet attends to {unet.config.cross_attention_dim}-d"
            )
        if encoder.tokens == 1:
            use_one_token_cross_attention(unet)
        return cls(
            config=config,
            unet=GuidedUNet(unet, config.guidance_embedding_dim, config.guidance_embedding_scale),
            codec=load_codec(folder, taesd, torch_dtype),
            schedule=schedule,
            prompt_encoder=encoder,
            fingerprint=folder_fingerprint(folder, taesd),
            folder=folder,
        )

    def save_pretrained(self, folder: str | Path) -> None:
        """Write editor.json, unet/, taesd/ (or vae/) and scheduler/ so from_pretrained reads them back."""
        folder = Path(folder)
        self.config.save(folder)
        self.unet.unet.save_pretrained(str(folder / UNET_FOLDER))
        if isinstance(self.codec, TinyCodec):
            self.codec.taesd.save_pretrained(str(folder / TAESD_FOLDER))
            if self.codec.frame_skip is not None:
                self.codec.frame_skip.save_pretrained(str(folder / FRAME_SKIP_FOLDER))
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
        parts = (p for p in root.rglob("*") if p.is_file() and p.suffix in {".json", ".safetensors", ".bin"})
        for path in sorted(p for p in parts if p.relative_to(root).parts[0] != INT8_FOLDER):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]
