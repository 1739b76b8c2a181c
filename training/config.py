"""The settings every recipe shares (loop, optimiser, architecture specs) and how a config file is read."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import diffusers
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.unet import mobile_pix2pix_config
from training.data import DataConfig
from training.prompts import PromptSpec
from training.triplets import TripletConfig

C = TypeVar("C", bound=BaseModel)


class UNetSpec(BaseModel):
    """A Mobile-Pix2Pix UNet: cross-attention at every level but the highest-resolution one."""

    model_config = ConfigDict(extra="forbid")

    block_out_channels: list[int] = Field(default_factory=lambda: [48, 96, 192], description="Channels per level.")
    layers_per_block: int = Field(1, ge=1, description="ResNet layers per down block.")
    attention_head_dim: int = Field(4, ge=1, description="Attention heads per transformer (diffusers naming).")
    norm_num_groups: int = Field(16, ge=1, description="GroupNorm groups; divides every channel count.")

    @model_validator(mode="after")
    def _check(self) -> UNetSpec:
        if len(self.block_out_channels) < 2:
            raise ValueError(f"a UNet needs two or more levels, got block_out_channels={self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        return self

    def diffusers_config(self, cross_attention_dim: int, latent_channels: int = 4) -> dict[str, Any]:
        """The UNet2DConditionModel config of this spec (no guidance embedding: a teacher)."""
        levels = len(self.block_out_channels)
        return mobile_pix2pix_config(
            {
                "sample_size": 32,
                "in_channels": 2 * latent_channels,
                "out_channels": latent_channels,
                "block_out_channels": tuple(self.block_out_channels),
                "down_block_types": ("CrossAttnDownBlock2D",) * levels,
                "up_block_types": ("CrossAttnUpBlock2D",) * levels,
                "layers_per_block": self.layers_per_block,
                "cross_attention_dim": cross_attention_dim,
                "attention_head_dim": self.attention_head_dim,
                "norm_num_groups": self.norm_num_groups,
            }
        )


class TAESDSpec(BaseModel):
    """A TAESD-architecture autoencoder (AutoencoderTiny) of uniform width."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(16, ge=4, description="Channels of every encoder and decoder block (stock TAESD: 64).")
    latent_channels: int = Field(4, ge=1, description="Latent channels (4, as Stable Diffusion).")

    def diffusers_kwargs(self) -> dict[str, Any]:
        return {
            "encoder_block_out_channels": (self.width,) * 4,
            "decoder_block_out_channels": (self.width,) * 4,
            "latent_channels": self.latent_channels,
        }


class TrainConfig(BaseModel):
    """The loop every recipe runs: steps, batch, optimiser, checkpoints and logging."""

    model_config = ConfigDict(extra="forbid")

    output_dir: Path = Field(..., description="Checkpoints, loss log and the final model go here.")
    steps: int = Field(..., ge=1, description="Total optimiser steps.")
    batch_size: int = Field(16, ge=1, description="Crops per step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(200, ge=0, description="Linear warm-up steps.")
    final_lr_fraction: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at this fraction of lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of the trained weights (0 = no EMA).")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (older ones are deleted).")
    log_every: int = Field(10, ge=1, description="Steps between loss-log lines.")
    seed: int = Field(0, ge=0, description="Seed of every RNG the recipe uses.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None = torch's default).")
    progress_interval: float = Field(5.0, gt=0, description="Seconds between progress-bar refreshes.")
    save_dtype: str = Field("float16", description="dtype of the final weights ('float16' or 'float32').")
    device: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="Where the networks train: 'cuda' takes the GPU of the process's LOCAL_RANK (torchrun starts "
        "one process a GPU). Data are drawn on the CPU either way, so a seeded CPU run is unchanged.",
    )

    @model_validator(mode="after")
    def _check_dtype(self) -> TrainConfig:
        if self.save_dtype not in ("float16", "float32"):
            raise ValueError(f"save_dtype must be 'float16' or 'float32', got {self.save_dtype!r}")
        return self


class EditTrainConfig(TrainConfig):
    """A recipe that trains on edit pairs: the images, the edits, and the prompt encoder."""

    data: DataConfig = Field(default_factory=DataConfig)
    triplets: TripletConfig | None = Field(
        None, description="Real (input, instruction, edited) triplets, e.g. InstructPix2Pix's parquet shards."
    )
    prompts: PromptSpec = Field(default_factory=PromptSpec)
    edits: list[str] | None = Field(None, description="Edit names to train (None = all of training.edits.EDITS).")
    resolution: int = Field(256, ge=64, description="Frame side written to editor.json (the service's resolution).")
    token_dropout: float = Field(
        0.0, ge=0, lt=1, description="Chance each prompt token's context row is zeroed (paraphrase robustness)."
    )
    sentence_only_probability: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Rows whose trained model reads only the first context token (the sentence embedding, with "
        "the 'minilm+sentence' encoder), so it learns each edit from the prompt's meaning, which carries over to "
        "phrasings it never saw. Distillation targets still read the whole prompt; the teacher's text-dropped "
        "rows keep the whole null context.",
    )

    mixed_precision: Literal["no", "bf16"] = Field(
        "no",
        description="'bf16': UNet passes under bf16 autocast on the config's device (losses in fp32): on a GPU "
        "it saves time and memory, on the CPU memory only; 'no' is fp32 throughout.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the trained UNet's activations during the backward pass: far less memory for "
        "about a third more compute; the losses are the same.",
    )
    context_mix_probability: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Distillation only: rows whose prompt context is blended with another row's (training.batches."
        "mix_contexts), with the frozen model's output on the blend as the target, so the student matches it "
        "between phrasings and edits, where unseen phrasings land. Rows whose target is an exact edit keep theirs.",
    )

    @model_validator(mode="after")
    def _check_one_token(self) -> EditTrainConfig:
        # A one-token context is the whole prompt: dropping its token would be a text drop with a zero context
        # instead of the null prompt's, and "sentence only" would change nothing.
        if self.prompts.tokens == 1 and (self.token_dropout > 0 or self.sentence_only_probability > 0):
            raise ValueError("token_dropout and sentence_only_probability need a context of more than one token")
        return self


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def load_raw_config(path: Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A .yaml/.yml/.json config as a dict, with `key.sub=value` overrides applied (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
        data = dict(loaded or {})
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def load_config(cls: type[C], path: Path | None, overrides: list[str] | None = None) -> C:
    """Read and validate a config file with overrides (see load_raw_config)."""
    return cls.model_validate(load_raw_config(path, overrides))


def recipe_main(cls: type[C], train: Callable[[C], Path], argv: list[str] | None, description: str) -> Path:
    """The CLI every recipe shares: --config FILE plus repeated --set key=value overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, required=True, help="a .yaml or .json config (training/configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(cls, args.config, args.overrides)
    except (OSError, ValueError, yaml.YAMLError) as exc:  # pydantic's ValidationError is a ValueError
        parser.error(f"{args.config}: {exc}")
    diffusers.utils.logging.set_verbosity_error()  # its dtype and config notices would drown the progress bar
    try:
        final = train(config)
    except (FileNotFoundError, ValueError) as exc:  # a missing input or one that doesn't fit: said, not traced
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    print(f"wrote {final}")
    return final
