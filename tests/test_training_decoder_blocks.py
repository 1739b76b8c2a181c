"""Removing residual blocks from a tiny TAESD decoder (training.decoder_blocks): the result is a stock
AutoencoderTiny with fewer blocks that computes exactly what the original does with those blocks skipped, keeps the
encoder, saves and loads as it is; anything that is not a residual block is refused with a message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny
from torch import nn

from training.decoder_blocks import decoder_block_levels, without_decoder_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_taesd() -> AutoencoderTiny:
    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4).eval()


def test_a_pruned_decoder_is_the_original_with_those_blocks_skipped(tmp_path: Path) -> None:
    taesd = tiny_taesd()
    levels = decoder_block_levels(taesd)
    assert list(levels.values()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # the (3, 3, 3, 1) default
    drop = [list(levels)[5], list(levels)[8]]  # the last block at the second level, the last at the third
    pruned = without_decoder_blocks(taesd, drop)
    assert tuple(pruned.config.num_decoder_blocks) == (3, 2, 2, 1)
    skipped = AutoencoderTiny.from_config(taesd.config).eval()
    skipped.load_state_dict(taesd.state_dict())
    for index in drop:
        skipped.decoder.layers[index] = nn.Identity()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(pruned.decode(latents).sample, skipped.decode(latents).sample)
        assert torch.equal(pruned.encode(images).latents, taesd.encode(images).latents)
        assert not torch.equal(pruned.decode(latents).sample, taesd.decode(latents).sample)
    pruned.save_pretrained(str(tmp_path / "taesd"))
    loaded = AutoencoderTiny.from_pretrained(str(tmp_path / "taesd")).eval()
    with torch.no_grad():
        assert torch.equal(loaded.decode(latents).sample, pruned.decode(latents).sample)


def test_a_layer_that_is_not_a_residual_block_is_refused() -> None:
    taesd = tiny_taesd()
    upsample = next(i for i, layer in enumerate(taesd.decoder.layers) if isinstance(layer, nn.Upsample))
    for index in (upsample, 99):
        with pytest.raises(ValueError, match=rf"decoder layers \[{index}\] are not residual blocks; the blocks are at"):
            without_decoder_blocks(taesd, [index])
