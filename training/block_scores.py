"""Which decoder block a pruning stage should remove: the one-step student's PSNR on the held-out frames with each
residual block of its TAESD decoder removed in turn, untrained, beside what each block costs a frame.

MobileVD prunes the blocks a fine-tune can most easily do without. Before any training, a block whose removal loses
little is one the rest of the decoder barely relies on; `pixel_finetune`'s `drop_decoder_blocks` then removes it
and repairs the rest. Each block's cost is its three 3×3 convolutions at its level's resolution.

    .venv/bin/python -m training.block_scores --model engines/default_model
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny
from torch import nn

from engines.autoencoder import TinyCodec
from engines.model import EditorModel
from training.data import DataConfig, load_split, validation_frames
from training.decoder_blocks import decoder_block_levels, require_blocks
from training.edits import Edit, get_edits
from training.evaluate import apply_edit, one_step_method, psnr

#: A residual block's convolutions (conv, ReLU, conv, ReLU, conv) and their kernel area.
BLOCK_CONVS = 3
KERNEL_AREA = 9


@dataclass(frozen=True)
class BlockScore:
    """One decoder block: its layer index, level side (pixels), cost (GFLOPs a frame) and the mean one-step PSNR
    without it."""

    layer: int
    side: int
    gflops: float
    psnr_without: float


def block_gflops(taesd: AutoencoderTiny, resolution: int) -> dict[int, tuple[int, float]]:
    """Each decoder block's layer index → (the side of the features it runs on, its GFLOPs for one frame)."""
    levels = decoder_block_levels(taesd)
    top = len(taesd.config.num_decoder_blocks) - 1
    widths = taesd.config.decoder_block_out_channels
    costs = {}
    for layer, level in levels.items():
        side = resolution >> (top - level)
        macs = BLOCK_CONVS * widths[level] ** 2 * KERNEL_AREA * side**2
        costs[layer] = (side, 2 * macs / 1e9)
    return costs


@contextmanager
def without_block(taesd: AutoencoderTiny, layer: int) -> Iterator[None]:
    """The decoder with one residual block replaced by the identity (what `without_decoder_blocks` computes,
    tests/test_training_decoder_blocks.py), put back on exit."""
    kept = taesd.decoder.layers[layer]
    taesd.decoder.layers[layer] = nn.Identity()
    try:
        yield
    finally:
        taesd.decoder.layers[layer] = kept


def mean_one_step_psnr(
    model: EditorModel,
    frames: list[np.ndarray],
    edits: Sequence[Edit],
    targets: dict[str, list[np.ndarray]] | None = None,
    seed: int = 0,
) -> float:
    """The evaluation report's headline: each edit's one-step PSNR (first held-out phrasing, s_T = s_I = 1) over
    the frames, averaged over the edits. `targets`: each edit's exact targets of the frames, when already made."""
    method = one_step_method(model, seed)
    per_edit = []
    for edit in edits:
        outputs = method.run(frames, edit.held_out[0], 1.0, 1.0)
        exact = targets[edit.name] if targets is not None else apply_edit(edit, frames)
        per_edit.append(np.mean([psnr(o, t) for o, t in zip(outputs, exact, strict=True)]))
    return float(np.mean(per_edit))


def score_blocks(
    model: EditorModel, frames: list[np.ndarray], edits: Sequence[Edit], layers: Sequence[int] | None = None
) -> tuple[float, list[BlockScore]]:
    """The mean one-step PSNR of the whole model, and with each of `layers` (default: every block) removed alone."""
    codec = model.codec
    if not isinstance(codec, TinyCodec):
        raise ValueError("this model decodes with an AutoencoderKL; only a TAESD decoder's blocks are scored")
    costs = block_gflops(codec.taesd, frames[0].shape[0])
    chosen = list(costs) if layers is None else list(layers)
    require_blocks(decoder_block_levels(codec.taesd), chosen)
    targets = {edit.name: apply_edit(edit, frames) for edit in edits}  # the same for every removed block
    full = mean_one_step_psnr(model, frames, edits, targets)
    scores = []
    for layer in chosen:
        with without_block(codec.taesd, layer):
            scores.append(BlockScore(layer, *costs[layer], mean_one_step_psnr(model, frames, edits, targets)))
    return full, scores


def render(full: float, scores: Sequence[BlockScore]) -> str:
    lines = [
        f"whole decoder: {full:.2f} dB",
        "",
        "| layer | features | GFLOPs a frame | PSNR without it (dB) | lost (dB) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {s.layer} | {s.side}² | {s.gflops:.3f} | {s.psnr_without:.2f} | {full - s.psnr_without:.2f} |"
        for s in scores
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model folder whose TAESD decoder is scored")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers (default: every block)")
    parser.add_argument("--resolution", type=int, default=256, help="frame side (the service's)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.resolution < 64 or args.resolution % 8:
            raise ValueError(f"--resolution must be a multiple of 8 from 64, got {args.resolution}")
        model = EditorModel.from_pretrained(args.model)
        frames = [frame for _, frame in validation_frames(load_split(DataConfig()), args.resolution)]
        full, scores = score_blocks(model, frames, get_edits(), args.layers)
    except (OSError, ValueError) as exc:  # a missing or unfit folder (ModelFolderError is a ValueError)
        print(f"block_scores: {exc}", file=sys.stderr)
        return 2
    print(render(full, scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
