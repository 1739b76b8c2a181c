"""Scoring a tiny student's decoder blocks for pruning (training.block_scores): each block's score is what the
student scores with that block really removed (training.decoder_blocks), the model is left as it was, the costs
follow the levels' resolutions, and bad input is answered with a message."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.autoencoder import TinyCodec
from engines.config import EditorConfig
from engines.model import EditorModel
from tests.test_engine_loading import make_tiny_pix2pix_folder, mobile_pix2pix_config, tiny_sd15_unet_config
from training.block_scores import block_gflops, main, mean_one_step_psnr, score_blocks
from training.data import DataConfig, load_split, validation_frames
from training.decoder_blocks import decoder_block_levels, without_decoder_blocks
from training.edits import get_edits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EDITS = get_edits(["sepia", "pencil_sketch"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    unet = mobile_pix2pix_config(tiny_sd15_unet_config(time_cond_proj_dim=16, cross_attention_dim=384))
    editor = EditorConfig(resolution=64, prompt_encoder="minilm-pooled", max_prompt_tokens=1, guidance_embedding_dim=8)
    return make_tiny_pix2pix_folder(tmp_path_factory.mktemp("model"), unet_config=unet, editor_config=editor)


def frames() -> list:  # type: ignore[type-arg]
    split = load_split(DataConfig(photos=["astronaut"], clips=[], val_photos=["chelsea", "coffee"], val_clips=[]))
    return [frame for _, frame in validation_frames(split, 64)]


def test_each_score_is_the_student_with_that_block_removed_and_the_model_is_left_whole(folder: Path) -> None:
    model = EditorModel.from_pretrained(folder)
    assert isinstance(model.codec, TinyCodec)
    held_out = frames()
    before = mean_one_step_psnr(model, held_out, EDITS)
    full, scores = score_blocks(model, held_out, EDITS)

    assert full == before == mean_one_step_psnr(model, held_out, EDITS)  # every block was put back
    assert [s.layer for s in scores] == list(decoder_block_levels(model.codec.taesd))
    assert all(s.psnr_without != full for s in scores), "a removed block changed nothing"
    last = scores[-1]
    pruned = EditorModel.from_pretrained(folder)
    pruned.codec = TinyCodec(without_decoder_blocks(model.codec.taesd, [last.layer]), None)
    assert mean_one_step_psnr(pruned, held_out, EDITS) == last.psnr_without

    only, chosen = score_blocks(model, held_out, EDITS, [last.layer])
    assert only == full and chosen == [last]
    with pytest.raises(ValueError, match=r"decoder layers \[0\] are not residual blocks; the blocks are at"):
        score_blocks(model, held_out, EDITS, [0])


def test_a_blocks_cost_grows_with_the_square_of_its_levels_side(folder: Path) -> None:
    taesd = EditorModel.from_pretrained(folder).codec.taesd  # type: ignore[union-attr]
    costs = block_gflops(taesd, 64)
    assert [side for side, _ in costs.values()] == [8, 16, 32, 64]  # latents 8², upsampled ×2 three times
    flops = [gflops for _, gflops in costs.values()]
    assert flops[-1] == pytest.approx(2 * 3 * 8 * 8 * 9 * 64 * 64 / 1e9)  # three 8-wide 3×3 convolutions at 64²
    assert all(b == pytest.approx(4 * a) for a, b in zip(flops, flops[1:], strict=False))


def test_bad_input_is_answered_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "block_scores:" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--resolution", "100"]) == 2
    assert "--resolution must be a multiple of 8 from 64, got 100" in capsys.readouterr().err
