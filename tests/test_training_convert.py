"""The real-data chain's first two commands on tiny weights: a stock InstructPix2Pix folder converted to
Mobile-Pix2Pix, then the teacher recipe's committed real-data config run on parquet triplets from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny

from engines.config import SD_LATENT_SCALING
from engines.model import EditorModel
from tests.test_engine_loading import make_tiny_pix2pix_folder
from tests.test_training_triplets import write_triplets
from training.loop import read_loss_log

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("convert")
    stock = make_tiny_pix2pix_folder(root / "stock", autoencoder="vae")
    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).save_pretrained(root / "taesd")
    write_triplets(root / "triplets", shards=2)
    return {"root": root, "stock": stock, "taesd": root / "taesd", "triplets": root / "triplets"}


def test_a_stock_folder_converts_and_the_real_data_teacher_starts_from_it(folders: dict[str, Path]) -> None:
    mobile = folders["root"] / "mobile"
    out = run(
        "training.convert_ip2p",
        "--weights",
        str(folders["stock"]),
        "--taesd",
        str(folders["taesd"]),
        "--output",
        str(mobile),
        "--resolution",
        "64",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Mobile-Pix2Pix UNet" in out.stdout
    editor = json.loads((mobile / "editor.json").read_text())
    assert editor["prompt_encoder"] == "clip" and editor["max_prompt_tokens"] == 77
    assert editor["image_latent_scale"] == pytest.approx(1 / SD_LATENT_SCALING)
    converted = EditorModel.from_pretrained(mobile)
    assert not converted.config.distilled and converted.schedule.prediction_type == "epsilon"
    # MoViE's cut: no attention at the highest resolution, the other levels keep theirs.
    blocks = converted.unet.unet.down_blocks
    assert not hasattr(blocks[0], "attentions") and hasattr(blocks[1], "attentions")

    teacher = folders["root"] / "teacher"
    overrides = {
        "output_dir": teacher,
        "init_from": mobile,
        "autoencoder": mobile,
        "prompts.clip_folder": mobile,
        "triplets.path": folders["triplets"],
        "triplets.workers": 1,
        "triplets.shuffle_buffer": 4,
        "device": "cpu",
        "data.crop_size": 64,
        "resolution": 64,
        "steps": 2,
        "batch_size": 2,
        "warmup_steps": 1,
        "threads": 1,
        "save_dtype": "float32",
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    out = run("training.teacher", "--config", "training/configs/ip2p_teacher.yaml", *sets)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [row["step"] for row in read_loss_log(teacher)] == [2]
    trained = EditorModel.from_pretrained(teacher / "final")  # CLIP travelled with it: it loads on its own
    assert trained.config.prompt_encoder == "clip"
    assert trained.config.image_latent_scale == pytest.approx(1 / SD_LATENT_SCALING)
    assert trained.schedule.prediction_type == "epsilon"
    changed = [
        name
        for name, p in trained.unet.unet.state_dict().items()
        if not torch.equal(p, converted.unet.unet.state_dict()[name])
    ]
    assert changed, "the teacher did not train the converted UNet"


def test_the_converter_refuses_what_it_cannot_convert(folders: dict[str, Path], tmp_path: Path) -> None:
    args = ("training.convert_ip2p", "--taesd", str(folders["taesd"]))
    missing = run(*args, "--weights", str(tmp_path / "nothing"), "--output", str(tmp_path / "a"))
    assert missing.returncode == 2 and "unet/ is missing" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "taken").mkdir()
    taken = run(*args, "--weights", str(folders["stock"]), "--output", str(tmp_path / "taken"))
    assert taken.returncode == 2 and "exists" in taken.stderr
    ours = run(*args, "--weights", str(REPO / "engines" / "default_model"), "--output", str(tmp_path / "b"))
    assert ours.returncode == 2 and "already a StreamEdit model" in ours.stderr
    odd = run(*args, "--weights", str(folders["stock"]), "--output", str(tmp_path / "c"), "--resolution", "100")
    assert odd.returncode == 2 and "multiple of 8" in odd.stderr and not (tmp_path / "c").exists()
