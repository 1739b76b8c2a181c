"""Training data: the exact edits, their phrasings, the image split, augmented crops and the prompt cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.batches import EditBatchSampler
from training.data import (
    DEFAULT_MEDIA_DIR,
    CropSampler,
    DataConfig,
    SourceImage,
    load_split,
    read_clip,
    service_view,
    validation_frames,
)
from training.edits import EDITS, all_prompts, gaussian_blur, get_edits, luma, negative, pencil_sketch, thermal
from training.prompts import HashPromptEncoder, PromptSpec, build_prompt_table


def _images(seed: int = 0, n: int = 3, size: int = 24) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_edit_keeps_shape_and_range_and_changes_the_image() -> None:
    x = _images()
    assert len(EDITS) >= 10
    for edit in EDITS:
        y = edit(x)
        assert y.shape == x.shape, edit.name
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0, edit.name
        assert float((y - x).abs().mean()) > 0.05, f"{edit.name} barely changes a random image"


def test_edits_are_the_classical_operations() -> None:
    x = _images()
    torch.testing.assert_close(negative(negative(x)), x)
    grey = get_edits(["black_and_white"])[0](x)
    torch.testing.assert_close(grey[:, 0], grey[:, 1])
    torch.testing.assert_close(grey[:, 1], grey[:, 2])
    # Blur keeps a flat image flat; the colour dodge of a flat grey image is white.
    flat = torch.full((1, 3, 16, 16), 0.4)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    torch.testing.assert_close(pencil_sketch(flat), torch.ones_like(flat))
    # Thermal: black maps to the ramp's cold end, white to its hot end.
    cold, hot = thermal(torch.zeros(1, 3, 8, 8)), thermal(torch.ones(1, 3, 8, 8))
    torch.testing.assert_close(cold[0, :, 4, 4], torch.tensor([0.0, 0.0, 0.02]))
    torch.testing.assert_close(hot[0, :, 4, 4], torch.tensor([1.0, 1.0, 0.85]))
    # Luma uses Rec. 601 weights.
    torch.testing.assert_close(luma(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)).flatten(), torch.tensor([0.299]))


def test_phrasings_are_many_distinct_and_held_out_ones_unseen() -> None:
    seen: dict[str, str] = {}
    for edit in EDITS:
        assert len(edit.phrasings) >= 8, edit.name
        assert edit.held_out and not set(edit.held_out) & set(edit.phrasings), edit.name
        for prompt in (*edit.phrasings, *edit.held_out):
            assert prompt not in seen, f"{prompt!r} belongs to both {seen.get(prompt)} and {edit.name}"
            seen[prompt] = edit.name
    prompts = all_prompts(EDITS)
    assert prompts[0] == "" and len(prompts) == len(seen) + 1
    with pytest.raises(ValueError, match="unknown edits"):
        get_edits(["no_such_edit"])


@pytest.fixture(scope="module")
def small_split_config() -> DataConfig:
    if not (DEFAULT_MEDIA_DIR / "asl_eat.mkv").is_file():
        pytest.skip(f"shared clips not found at {DEFAULT_MEDIA_DIR}")
    return DataConfig(
        photos=["astronaut", "coffee"],
        clips=["asl_eat.mkv", "asl_help.mkv"],
        max_frames_per_clip=8,
        val_photos=["coffee"],
        val_clips=["asl_help.mkv"],
        val_tail=0.25,
        val_frames_per_clip=2,
        crop_size=32,
    )


def test_split_holds_out_photos_clips_and_clip_tails(small_split_config: DataConfig) -> None:
    split = load_split(small_split_config)
    train = {i.name for i in split.train}
    val = {i.name for i in split.val}
    assert not train & val
    assert "coffee" in val and "coffee" not in train and "astronaut" in train
    assert not any(n.startswith("asl_help.mkv") for n in train)
    assert sum(n.startswith("asl_help.mkv") for n in val) == 2
    # asl_eat keeps its first 6 of 8 frames for training; its validation frame comes from the last two.
    eat_train = sorted(int(n.split("#")[1]) for n in train if n.startswith("asl_eat.mkv"))
    eat_val = [int(n.split("#")[1]) for n in val if n.startswith("asl_eat.mkv")]
    assert eat_train == list(range(6)) and eat_val and min(eat_val) >= 6
    frames = validation_frames(split, 64)
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for _, f in frames)


def test_crops_are_seeded_augmented_and_in_range(small_split_config: DataConfig) -> None:
    split = load_split(small_split_config)
    a = CropSampler(split.train, small_split_config, np.random.default_rng(3)).sample(6)
    b = CropSampler(split.train, small_split_config, np.random.default_rng(3)).sample(6)
    c = CropSampler(split.train, small_split_config, np.random.default_rng(4)).sample(6)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert float(a.std(0).mean()) > 0.02  # six different crops, not one repeated


def test_opencv_decodes_the_clips_to_pyavs_frames() -> None:
    """The lent GPU machine's image has OpenCV but not PyAV; a run there must train on the frames a run here does."""
    pytest.importorskip("cv2", reason="OpenCV is not a dependency here; the check runs where it is installed")
    clip = DEFAULT_MEDIA_DIR / "asl_eat.mkv"
    if not clip.is_file():
        pytest.skip(f"shared clips not found at {DEFAULT_MEDIA_DIR}")
    pyav, opencv = read_clip(clip, 40), read_clip(clip, 40, "opencv")
    assert len(pyav) == len(opencv) == 40
    assert all(np.array_equal(a, b) for a, b in zip(pyav, opencv, strict=True))


def test_service_view_centre_crops_the_short_side() -> None:
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # the centre square
    view = service_view(image, 20)
    assert view.shape == (20, 20, 3)
    assert view[:, 1:-1].min() == 255  # only the outermost columns blend with the black sides


def test_prompt_table_is_cached_per_encoder_and_prompt_list(tmp_path: Path) -> None:
    spec = PromptSpec(encoder="hash", hash_dim=8, tokens=4)
    cache = tmp_path / "contexts.pt"
    table = build_prompt_table(spec, ["make it red", "sepia please"], cache)
    assert cache.is_file()
    assert table(["sepia please"]).shape == (1, 4, 8)
    torch.testing.assert_close(table.null, torch.zeros(4, 8))

    class Refuses(HashPromptEncoder):
        def encode(self, prompts: list[str]) -> torch.Tensor:
            raise AssertionError("the cache should have answered")

    again = build_prompt_table(spec, ["make it red", "sepia please"], cache, encoder=Refuses(8, 4))
    torch.testing.assert_close(again(["make it red"]), table(["make it red"]))
    with pytest.raises(AssertionError, match="cache should have answered"):
        build_prompt_table(spec, ["a new prompt"], cache, encoder=Refuses(8, 4))
    with pytest.raises(KeyError):
        table(["never encoded"])


def test_batches_pair_each_crop_with_its_edit_and_drop_prompt_tokens() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    config = DataConfig(photos=[], clips=[], val_photos=[], val_clips=[], crop_size=32)
    edits = get_edits(["negative", "black_and_white"])
    table = build_prompt_table(PromptSpec(encoder="hash", hash_dim=8, tokens=6), all_prompts(edits), None)
    plain = EditBatchSampler(CropSampler([SourceImage("p", pixels, "photo")], config, rng), edits, table)
    batch = plain.sample(8)
    for i in range(8):
        expected = edits[int(batch.edit_ids[i])]((batch.images[i : i + 1] + 1) / 2) * 2 - 1
        torch.testing.assert_close(batch.targets[i : i + 1], expected)
        assert batch.prompts[i] in edits[int(batch.edit_ids[i])].phrasings
    torch.testing.assert_close(batch.context, table(batch.prompts))
    dropping = EditBatchSampler(plain.crops, edits, table, token_dropout=0.5)
    batch = dropping.sample(64)
    full = table(batch.prompts)
    present = full.abs().sum(-1) > 0
    kept = batch.context.abs().sum(-1) > 0
    assert not (kept & ~present).any()
    assert 0.35 < float((kept & present).sum() / present.sum()) < 0.65
