"""Real triplet datasets (parquet shards, a saved `datasets` folder) and data parallelism: the three UNet recipes
train from parquet on one process and on two torchrun/gloo processes, which end with identical weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny

from engines.model import EditorModel
from tests.test_training_recipes import PROMPTS, TINY_UNET
from training.adversarial_distill import AdversarialDistillConfig
from training.adversarial_distill import train as train_adversarial
from training.autoencoder import AutoencoderConfig
from training.autoencoder import train as train_autoencoder
from training.config import TAESDSpec
from training.data import PHOTOS
from training.edits import get_edits
from training.guidance_distill import GuidanceDistillConfig
from training.guidance_distill import train as train_guidance
from training.loop import read_loss_log
from training.models import load_taesd
from training.prompts import HashPromptEncoder
from training.teacher import TeacherConfig
from training.teacher import train as train_teacher
from training.triplets import BATCHES_DRAWN, TripletConfig, TripletStream, open_triplets

REPO = Path(__file__).resolve().parents[1]
INSTRUCTIONS = {
    "negative": ["invert the colours", "make a photo negative of it"],
    "black_and_white": ["remove the colour", "make it a grey photograph"],
}


def write_triplets(folder: Path, shards: int = 4, rows_per_shard: int = 6, names: tuple[str, str, str] | None = None):
    """InstructPix2Pix-shaped parquet shards (PNG images as datasets writes them) of crops of a bundled photo
    and an exact procedural edit of each; `names` renames (image, prompt, edited)."""
    import datasets
    from PIL import Image

    image_col, prompt_col, edited_col = names or ("original_image", "edit_prompt", "edited_image")
    photo = PHOTOS["astronaut"][0]()
    edits = {e.name: e for e in get_edits(list(INSTRUCTIONS))}
    rng = np.random.default_rng(0)
    rows: dict[str, list[Any]] = {image_col: [], prompt_col: [], edited_col: []}
    for i in range(shards * rows_per_shard):
        top, left = rng.integers(0, photo.shape[0] - 40), rng.integers(0, photo.shape[1] - 48)
        crop = photo[top : top + 40, left : left + 48]
        name = list(INSTRUCTIONS)[i % 2]
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
        edited = (edits[name](x)[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        rows[image_col].append(Image.fromarray(crop))
        rows[prompt_col].append(INSTRUCTIONS[name][i % 4 // 2])
        rows[edited_col].append(Image.fromarray(edited))
    features = datasets.Features(
        {image_col: datasets.Image(), prompt_col: datasets.Value("string"), edited_col: datasets.Image()}
    )
    dataset = datasets.Dataset.from_dict(rows, features=features)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        dataset.shard(shards, k, contiguous=True).to_parquet(str(folder / f"train-{k:05d}-of-{shards:05d}.parquet"))
    return dataset


@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("triplets") / "data"
    write_triplets(folder)
    return folder


@pytest.fixture(scope="module")
def taesd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random TAESD: the recipes only need latents of the right shape here."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("autoencoder")
    AutoencoderTiny(**TAESDSpec(width=8).diffusers_kwargs()).save_pretrained(str(folder / "taesd"))
    return folder


def tiny(output_dir: Path, steps: int, parquet: Path, **fields: Any) -> dict[str, Any]:
    """A tiny config trained on the parquet triplets only (warm-up longer than the run, so a run stopped
    early and one run to the end take the same learning rates)."""
    return {
        "output_dir": str(output_dir),
        "steps": steps,
        "batch_size": 2,
        "warmup_steps": 20,
        "log_every": 1,
        "checkpoint_every": 3,
        "threads": 1,
        "ema_decay": 0.9,
        "save_dtype": "float32",
        "progress_interval": 60.0,
        "prompts": PROMPTS,
        "resolution": 64,
        "data": {"photos": ["astronaut"], "clips": [], "val_photos": ["chelsea"], "val_clips": [], "crop_size": 32},
        "triplets": {"path": str(parquet), "workers": 2, "shuffle_buffer": 8},
        **fields,
    }


def teacher_fields(taesd: Path) -> dict[str, Any]:
    return {"lr": 2e-3, "autoencoder": str(taesd), "unet": TINY_UNET}


def guidance_fields(teacher: Path) -> dict[str, Any]:
    return {"lr": 2e-3, "teacher": str(teacher), "guidance_embedding_dim": 8}


def adversarial_fields(student: Path) -> dict[str, Any]:
    return {"lr": 2e-3, "student_init": str(student), "target_steps": 2, "disc_hidden": 8, "r1_every": 2}


def stream(parquet: Path, rank: int = 0, world_size: int = 1, drawn: int = 0, **fields: Any) -> TripletStream:
    config = TripletConfig.model_validate({"path": parquet, "workers": 2, "shuffle_buffer": 8, **fields})
    return TripletStream(config, 32, 2, seed=0, rank=rank, world_size=world_size, progress={BATCHES_DRAWN: drawn})


def test_a_resumed_stream_continues_with_the_next_batch_and_ranks_read_different_rows(parquet: Path) -> None:
    whole = stream(parquet)
    batches = [whole.next() for _ in range(7)]  # past the 24 rows: the second epoch, reshuffled
    assert whole.progress[BATCHES_DRAWN] == 7
    assert batches[0].images.shape == (2, 3, 32, 32) and batches[0].images.dtype == torch.float32
    assert -1 <= float(batches[0].images.min()) and float(batches[0].images.max()) <= 1
    resumed = stream(parquet, drawn=3)
    for expected in batches[3:]:
        got = resumed.next()
        assert got.prompts == expected.prompts
        assert torch.equal(got.images, expected.images) and torch.equal(got.targets, expected.targets)
    assert batches[0].prompts + batches[1].prompts != batches[6].prompts + batches[5].prompts

    def first_epoch(rank: int) -> list[bytes]:
        s = stream(parquet, rank=rank, world_size=2, min_crop=1.0)
        return [row.numpy().tobytes() for _ in range(3) for row in s.next().images]

    rank0, rank1 = first_epoch(0), first_epoch(1)
    assert len(set(rank0) & set(rank1)) <= 1, "two ranks read the same rows (a whole-image crop only flips)"


def test_a_saved_datasets_folder_with_other_column_names_is_read(tmp_path: Path) -> None:
    dataset = write_triplets(tmp_path / "shards", shards=1, names=("before", "instruction", "after"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    s = stream(tmp_path / "saved", image_column="before", prompt_column="instruction", edited_column="after")
    batch = s.next()
    assert set(batch.prompts) <= {p for ps in INSTRUCTIONS.values() for p in ps}
    # The edit is really in the pairs: a negative's edited crop is about 1 − the input (in [-1, 1]: −input).
    for prompt, image, target in zip(batch.prompts, batch.images, batch.targets, strict=True):
        if prompt in INSTRUCTIONS["negative"]:
            assert float((image + target).abs().mean()) < 0.05


def test_missing_data_or_columns_are_clear_errors(parquet: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no parquet shards"):
        open_triplets(TripletConfig(path=tmp_path / "nothing"))
    with pytest.raises(ValueError, match=r"no column \['prompt'\].*edit_prompt"):
        open_triplets(TripletConfig(path=parquet, prompt_column="prompt"))
    with pytest.raises(ValueError, match="must differ"):
        TripletConfig(path=parquet, edited_column="original_image")
    out = subprocess.run(
        [sys.executable, "-m", "training.teacher", "--config", "/dev/null", "--set", f"triplets.path={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "output_dir" in out.stderr  # the config's missing fields, named


def test_each_recipe_trains_from_parquet_on_one_process(parquet: Path, taesd: Path, tmp_path: Path) -> None:
    teacher_config = TeacherConfig.model_validate(tiny(tmp_path / "teacher", 4, parquet, **teacher_fields(taesd)))
    teacher = train_teacher(teacher_config)
    # Half the distillation's batches are procedural edits of the data section's photo.
    gd_config = tiny(tmp_path / "gd", 4, parquet, **guidance_fields(teacher))
    gd_config["triplets"]["share"] = 0.5
    student = train_guidance(GuidanceDistillConfig.model_validate(gd_config))
    ad_config = AdversarialDistillConfig.model_validate(
        tiny(tmp_path / "ad", 4, parquet, **adversarial_fields(student))
    )
    final = train_adversarial(ad_config)
    for folder in (tmp_path / "teacher", tmp_path / "gd", tmp_path / "ad"):
        log = read_loss_log(folder)
        assert [row["step"] for row in log] == [1, 2, 3, 4]
    model = EditorModel.from_pretrained(final, prompt_encoder=HashPromptEncoder(16, 8))
    assert model.config.distilled
    # The triplets' instructions were encoded on the fly and cached with the run.
    assert (tmp_path / "teacher" / "prompt_contexts.pt").is_file()


def test_the_autoencoder_recipe_reconstructs_real_triplets_too(parquet: Path, tmp_path: Path) -> None:
    fields = tiny(tmp_path / "ae", 4, parquet, lr=3e-3, taesd={"width": 8})
    for key in ("prompts", "resolution"):  # an autoencoder has no prompts and serves no resolution
        del fields[key]
    final = train_autoencoder(AutoencoderConfig.model_validate(fields))
    assert [row["step"] for row in read_loss_log(tmp_path / "ae")] == [1, 2, 3, 4]
    assert load_taesd(final).config.latent_channels == 4


def torchrun(recipe: str, config: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f"{folder.name}.json"
    path.write_text(json.dumps(config))
    # gloo over loopback only; one thread a rank on a 2-core machine.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "tests" / "ddp_recipe.py"),
        recipe,
        str(path),
    ]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


def rank_weights(folder: Path) -> list[dict[str, Any]]:
    return [json.loads((folder / f"weights-rank{r}.json").read_text()) for r in range(2)]


def test_two_ddp_ranks_end_with_identical_weights_and_a_resumed_run_continues_the_loss_curve(
    parquet: Path, taesd: Path, tmp_path: Path
) -> None:
    straight = tmp_path / "straight"
    torchrun("teacher", tiny(straight, 6, parquet, **teacher_fields(taesd)), straight)
    ranks = rank_weights(straight)
    assert ranks[0]["world_size"] == 2
    assert ranks[0] == ranks[1], "the two ranks' weights (UNet and EMA) differ"
    checkpoint = torch.load(straight / "checkpoints" / "step-00000006.pt", weights_only=False)
    assert len(checkpoint["ranks"]) == 2 and checkpoint["ranks"][0]["rng"] != checkpoint["ranks"][1]["rng"]

    resumed = tmp_path / "resumed"
    torchrun("teacher", tiny(resumed, 3, parquet, **teacher_fields(taesd)), resumed)
    torchrun("teacher", tiny(resumed, 6, parquet, **teacher_fields(taesd)), resumed)
    assert [row["loss"] for row in read_loss_log(resumed)] == [row["loss"] for row in read_loss_log(straight)]
    assert rank_weights(resumed) == ranks

    # The same data on one process is another run: two ranks really drew twice the rows.
    single = tmp_path / "single"
    train_teacher(TeacherConfig.model_validate(tiny(single, 6, parquet, **teacher_fields(taesd))))
    assert [row["loss"] for row in read_loss_log(single)] != [row["loss"] for row in read_loss_log(straight)]
    model = EditorModel.from_pretrained(straight / "final", prompt_encoder=HashPromptEncoder(16, 8))
    assert not model.config.distilled


def test_guidance_and_adversarial_distillation_run_on_two_ddp_ranks(parquet: Path, taesd: Path, tmp_path: Path) -> None:
    teacher_config = TeacherConfig.model_validate(tiny(tmp_path / "teacher", 3, parquet, **teacher_fields(taesd)))
    teacher = train_teacher(teacher_config)
    gd = tmp_path / "gd"
    torchrun("guidance_distill", tiny(gd, 3, parquet, **guidance_fields(teacher)), gd)
    ad = tmp_path / "ad"
    torchrun("adversarial_distill", tiny(ad, 3, parquet, **adversarial_fields(gd)), ad)
    for folder in (gd, ad):
        ranks = rank_weights(folder)
        assert ranks[0] == ranks[1], f"{folder.name}: the two ranks' weights differ"
        assert [row["step"] for row in read_loss_log(folder)] == [1, 2, 3]
    assert set(rank_weights(ad)[0]) == {"world_size", "unet", "heads", "ema"}
    shutil.rmtree(tmp_path / "teacher" / "checkpoints")
