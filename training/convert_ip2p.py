"""Convert a stock InstructPix2Pix folder into the Mobile-Pix2Pix model folder MoViE's recipes start from.

    python -m training.convert_ip2p --weights /models/instruct-pix2pix --taesd /models/taesd --output runs/mobile

The UNet loses its attention at the highest resolution (engines.unet.convert_to_mobile_pix2pix); TAESD takes the
VAE's place; the CLIP text encoder, tokenizer and scheduler are copied as they are. The result serves as it is
(a 3-pass model, `streamedit serve --weights`) and is the teacher recipe's `init_from`, `autoencoder` and
`prompts.clip_folder` (training/configs/ip2p_teacher.yaml).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from engines.config import EDITOR_CONFIG_NAME, EditorConfig
from engines.model import EditorModel
from engines.unet import convert_to_mobile_pix2pix
from training.models import load_taesd

COPIED_PARTS = ("text_encoder", "tokenizer", "scheduler")


def convert(weights: Path, taesd: Path, output: Path, resolution: int = 512) -> Path:
    """Write the converted folder at `output` (atomically) and return it; ValueError/FileNotFoundError say why not."""
    weights, output = Path(weights), Path(output)
    if (weights / EDITOR_CONFIG_NAME).is_file():
        raise ValueError(f"{weights} has an {EDITOR_CONFIG_NAME}: it is already a StreamEdit model")
    for part in ("unet", *COPIED_PARTS):
        if not (weights / part).is_dir():
            raise FileNotFoundError(f"{weights} is not an InstructPix2Pix folder: {part}/ is missing")
    if output.exists():
        raise FileExistsError(f"{output} exists; choose a new --output")
    stock = EditorConfig.load(weights)  # a stock folder's conventions: CLIP, 77 tokens, unscaled image latents
    if stock.distilled:
        raise ValueError(f"{weights} already has guidance embeddings; convert a 3-pass InstructPix2Pix")
    converted = EditorConfig.model_validate({**stock.model_dump(), "resolution": resolution})
    unet = UNet2DConditionModel.from_pretrained(str(weights / "unet"), torch_dtype=torch.float32, local_files_only=True)
    if unet.config.in_channels != 8:
        raise ValueError(f"an InstructPix2Pix UNet takes 8 input channels, this one {unet.config.in_channels}")
    mobile, dropped = convert_to_mobile_pix2pix(unet)
    autoencoder = load_taesd(taesd)

    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    converted.save(tmp)
    mobile.save_pretrained(str(tmp / "unet"))
    autoencoder.save_pretrained(str(tmp / "taesd"))
    for part in COPIED_PARTS:
        shutil.copytree(weights / part, tmp / part)
    EditorModel.from_pretrained(tmp)  # it must load as the engine loads it before it is called done
    tmp.rename(output)
    before = sum(p.numel() for p in unet.parameters())
    after = sum(p.numel() for p in mobile.parameters())
    print(
        f"{output}: Mobile-Pix2Pix UNet {after / 1e6:.1f} M parameters (stock {before / 1e6:.1f} M; "
        f"{len(dropped)} tensors of highest-resolution attention dropped), TAESD, CLIP, {resolution}px"
    )
    return output


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="a diffusers InstructPix2Pix folder")
    parser.add_argument("--taesd", type=Path, required=True, help="a TAESD (AutoencoderTiny) folder")
    parser.add_argument("--output", type=Path, required=True, help="the new model folder")
    parser.add_argument("--resolution", type=int, default=512, help="frame side the model serves at (default 512)")
    args = parser.parse_args(argv)
    try:
        return convert(args.weights, args.taesd, args.output, args.resolution)
    except (OSError, ValueError) as exc:  # FileNotFoundError and FileExistsError are OSErrors
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
