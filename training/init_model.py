"""Build an untrained editor of the shipped default's architecture (the starting point of every recipe)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, UNet2DConditionModel

from engines.autoencoder import DEFAULT_TAESD_CONFIG, TinyCodec
from engines.config import EditorConfig
from engines.model import EditorModel, folder_fingerprint
from engines.sampling import NoiseSchedule
from engines.text import MiniLMPromptEncoder, PromptEncoder
from engines.unet import GuidedUNet, default_editor_unet_config

DEFAULT_GUIDANCE_EMBEDDING_DIM = 64


def init_default_model(
    seed: int = 0, distilled: bool = True, prompt_encoder: PromptEncoder | None = None
) -> EditorModel:
    """Random weights in the default's layout; `distilled` adds the (s_T, s_I) embedding input."""
    torch.manual_seed(seed)
    dim = DEFAULT_GUIDANCE_EMBEDDING_DIM if distilled else None
    config = EditorConfig(resolution=256, prompt_encoder="minilm", max_prompt_tokens=16, guidance_embedding_dim=dim)
    unet = UNet2DConditionModel.from_config(default_editor_unet_config(dim)).eval()
    taesd = AutoencoderTiny(**DEFAULT_TAESD_CONFIG).eval()  # type: ignore[arg-type]
    return EditorModel(
        config=config,
        unet=GuidedUNet(unet, dim, config.guidance_embedding_scale),
        codec=TinyCodec(taesd),
        schedule=NoiseSchedule.default(),
        prompt_encoder=prompt_encoder or MiniLMPromptEncoder(tokens=config.max_prompt_tokens),
        fingerprint="untrained",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path, help="model folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", action="store_true", help="no guidance embedding (a 3-pass CFG teacher)")
    args = parser.parse_args(argv)
    model = init_default_model(args.seed, distilled=not args.teacher)
    model.unet.unet.to(torch.float16)
    model.codec.to(torch.float16)
    model.save_pretrained(args.output)
    print(f"wrote {args.output} ({folder_fingerprint(args.output)})")


if __name__ == "__main__":
    main()
