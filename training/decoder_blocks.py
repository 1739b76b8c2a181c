"""Removing residual blocks from a TAESD decoder: the rest keep their weights, and the result is a stock
AutoencoderTiny with fewer blocks at those levels, so every loader, backend and export reads it as it is.

MobileVD buys back inference cost by pruning blocks and fine-tuning; TAESD's decoder blocks are residual
(relu(conv(x) + x)), so one removed is a perturbation that fine-tuning repairs, not a new network.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import AutoencoderTiny
from diffusers.models.autoencoders.vae import AutoencoderTinyBlock
from torch import nn


def decoder_block_levels(taesd: AutoencoderTiny) -> dict[int, int]:
    """Each residual block's index in the decoder's layer list → its level (0: the latent's resolution)."""
    levels, level = {}, 0
    for index, layer in enumerate(taesd.decoder.layers):
        if isinstance(layer, AutoencoderTinyBlock):
            levels[index] = level
        elif isinstance(layer, nn.Upsample):
            level += 1
    return levels


def require_blocks(levels: dict[int, int], layers: Sequence[int]) -> None:
    """Refuse, with a message, any of `layers` that is not a residual block of `levels` (`decoder_block_levels`)."""
    unknown = sorted(set(layers) - set(levels))
    if unknown:
        raise ValueError(f"decoder layers {unknown} are not residual blocks; the blocks are at {sorted(levels)}")


def without_decoder_blocks(taesd: AutoencoderTiny, drop: Sequence[int]) -> AutoencoderTiny:
    """A copy of `taesd` without the decoder blocks at these layer indices (`decoder_block_levels` lists them)."""
    levels = decoder_block_levels(taesd)
    require_blocks(levels, drop)
    removed = set(drop)
    counts = list(taesd.config.num_decoder_blocks)
    for index in removed:
        counts[levels[index]] -= 1
    config = {k: v for k, v in taesd.config.items() if not k.startswith("_")}
    pruned = AutoencoderTiny.from_config({**config, "num_decoder_blocks": tuple(counts)})
    pruned.encoder.load_state_dict(taesd.encoder.state_dict())
    kept = [layer for i, layer in enumerate(taesd.decoder.layers) if i not in removed]
    if len(kept) != len(pruned.decoder.layers):
        raise AssertionError("the pruned decoder's layout does not follow DecoderTiny's")  # a diffusers change
    for source, target in zip(kept, pruned.decoder.layers, strict=True):
        if type(source) is not type(target):
            raise AssertionError(f"layer {type(source).__name__} landed on a {type(target).__name__}")
        target.load_state_dict(source.state_dict())
    return pruned.to(dtype=taesd.dtype, device=taesd.device)
