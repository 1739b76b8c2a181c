"""EditorConfig: the data that, with the weights beside it, defines an editor (saved as editor.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EDITOR_CONFIG_NAME = "editor.json"
# The shipped default editor, embedded in the package.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
# The prompt encoder whose context is one token, MiniLM's pooled sentence embedding.
POOLED_ENCODER = "minilm-pooled"
# Stable Diffusion's VAE latent scaling factor; TAESD latents are already multiplied by it.
SD_LATENT_SCALING = 0.18215
#: Sampler steps of a model without guidance embeddings (InstructPix2Pix's 3-pass CFG) when its folder names none:
#: diffusers' InstructPix2Pix examples run 10 to 20; at 20 the edit has settled.
DEFAULT_CFG_STEPS = 20
#: The most sampler steps an editor may be asked for (a frame costs 3 UNet rows a step without distillation).
MAX_SAMPLER_STEPS = 100


#: A model folder's prompt routing table (engines.routing), beside editor.json.
ROUTES_FILE = "prompt_routes.safetensors"


class PromptRouting(BaseModel):
    """How a prompt is routed (editor.json `prompt_routing`); the table is ROUTES_FILE."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(3, ge=1, description="An edit's score is the mean cosine similarity of its k nearest phrasings.")
    temperature: float = Field(
        0.02, gt=0, description="Softmax temperature over the edits' scores (lower: closer to the single best edit)."
    )


def default_steps(fields: dict[str, Any]) -> int:
    """A distilled student edits in one step; a model that needs 3-pass CFG runs DEFAULT_CFG_STEPS."""
    return 1 if fields.get("guidance_embedding_dim") is not None else DEFAULT_CFG_STEPS


def require_one_token_exactly_when_pooled(encoder: str, tokens: int, encoder_field: str, tokens_field: str) -> None:
    """A pooled context is one token and every other context longer: a config saying otherwise is an error."""
    if (encoder == POOLED_ENCODER) != (tokens == 1):
        raise ValueError(
            f"{tokens_field} must be 1 exactly when {encoder_field} is '{POOLED_ENCODER}' "
            f"(got {tokens} with '{encoder}')"
        )


class EditorConfig(BaseModel):
    """How the parts of an editor fit together; the parts' own configs live in their subfolders."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(256, ge=64, le=2048, description="Square frame side the editor runs at (pixels).")
    prompt_encoder: Literal["minilm", "minilm+sentence", "minilm-pooled", "clip"] = Field(
        "minilm",
        description="'minilm': the all-MiniLM-L6-v2 package's token embeddings; 'minilm+sentence': the same "
        "after its mean-pooled sentence embedding; 'minilm-pooled': that sentence embedding alone, one token "
        "(the shipped default); 'clip': text_encoder/ + tokenizer/ subfolders (real InstructPix2Pix weights).",
    )
    max_prompt_tokens: int = Field(
        16, ge=1, le=77, description="Prompt tokens fed to cross-attention (padded); 1 for 'minilm-pooled'."
    )
    guidance_embedding_dim: int | None = Field(
        None,
        ge=2,
        description="Sinusoidal embedding width per guidance scale; None for a model that needs 3-pass CFG.",
    )
    guidance_embedding_scale: float = Field(
        1000.0, gt=0, description="Scales s before the sinusoid, as LCM does for w."
    )
    steps: int = Field(
        default_factory=default_steps,
        ge=1,
        le=MAX_SAMPLER_STEPS,
        description="Sampler steps per frame. 1 for a distilled student (the default when guidance_embedding_dim is "
        "set): its one-step edit from t = student_timestep. More than 1 for a distilled model: its guidance-distilled "
        "sampler, one UNet pass a step. Without guidance embeddings: InstructPix2Pix's 3-pass CFG sampler with the "
        f"folder's own scheduler, 3 UNet passes a step (default {DEFAULT_CFG_STEPS}).",
    )
    student_timestep: int = Field(
        999, ge=0, le=999, description="Timestep at which the one-step student denoises pure noise."
    )
    image_latent_scale: float = Field(
        1.0,
        gt=0,
        description="Multiplier from TAESD latents (SD's scaled space) to the UNet's image-conditioning "
        "space: 1/0.18215 for a stock InstructPix2Pix UNet, 1.0 for models trained on TAESD latents.",
    )

    prompt_routing: PromptRouting | None = Field(
        None,
        description="Read every non-empty prompt as a blend of the trained edits (engines.routing), from the table in "
        f"{ROUTES_FILE}; None: the prompt encoder's context as it is.",
    )

    default_text_guidance: float = Field(7.5, ge=0, le=20, description="s_T a new session starts with.")
    default_image_guidance: float = Field(1.5, ge=0, le=5, description="s_I a new session starts with.")
    trained_text_guidance: tuple[float, float] = Field(
        (0.0, 20.0), description="The s_T range the model was trained on (a client's slider range)."
    )
    trained_image_guidance: tuple[float, float] = Field(
        (0.0, 5.0), description="The s_I range the model was trained on (a client's slider range)."
    )

    @model_validator(mode="after")
    def _check(self) -> EditorConfig:
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.guidance_embedding_dim is not None and self.guidance_embedding_dim % 2:
            raise ValueError(f"guidance_embedding_dim must be even, got {self.guidance_embedding_dim}")
        require_one_token_exactly_when_pooled(
            self.prompt_encoder, self.max_prompt_tokens, "prompt_encoder", "max_prompt_tokens"
        )
        return self

    @property
    def distilled(self) -> bool:
        """True when the UNet takes (s_T, s_I) as embeddings and needs one pass a step."""
        return self.guidance_embedding_dim is not None

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / EDITOR_CONFIG_NAME).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> EditorConfig:
        """Read editor.json; a plain diffusers InstructPix2Pix folder has none and gets its conventions."""
        path = Path(folder) / EDITOR_CONFIG_NAME
        if path.is_file():
            return cls.model_validate(json.loads(path.read_text()))
        unet_config = Path(folder) / "unet" / "config.json"
        proj_dim = json.loads(unet_config.read_text()).get("time_cond_proj_dim") if unet_config.is_file() else None
        return cls(
            resolution=512,
            prompt_encoder="clip",
            max_prompt_tokens=77,
            guidance_embedding_dim=proj_dim // 2 if proj_dim else None,
            image_latent_scale=1 / SD_LATENT_SCALING,
        )
