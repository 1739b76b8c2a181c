"""make_default's stage bookkeeping, config overrides and the model card's time accounting (nothing trains here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines.model import DEFAULT_MODEL_DIR
from training.autoencoder import AutoencoderConfig
from training.commit_stage import main as commit_stage
from training.config import load_config
from training.make_default import STAGES
from training.make_default import main as make_default
from training.model_card import training_hours
from training.models import load_editor_model
from training.prompts import PromptSpec
from training.teacher import TeacherConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"


def test_committed_default_configs_validate() -> None:
    for stage in STAGES:
        assert (CONFIGS / stage.config).is_file(), stage.config
    teacher = load_config(TeacherConfig, CONFIGS / "default_teacher.yaml")
    assert teacher.unet.block_out_channels == [48, 96, 192]
    assert (teacher.drop_text, teacher.drop_image, teacher.drop_both) == (0.05, 0.05, 0.05)
    assert teacher.prompts.encoder == "minilm-pooled" and teacher.prompts.tokens == 1
    assert teacher.data.crop_size == 128
    # One token is the whole prompt: dropping it would be a text drop without the null prompt's context.
    with pytest.raises(ValueError, match="need a context of more than one token"):
        load_config(TeacherConfig, CONFIGS / "default_teacher.yaml", ["token_dropout=0.1"])


def test_overrides_are_parsed_as_yaml_and_checked(tmp_path: Path) -> None:
    config = load_config(
        AutoencoderConfig,
        CONFIGS / "tiny_autoencoder.yaml",
        ["steps=7", "taesd.width=12", f"output_dir={tmp_path}", "data.val_clips=[]"],
    )
    assert config.steps == 7 and config.taesd.width == 12 and config.output_dir == tmp_path
    with pytest.raises(ValueError, match="key=value"):
        load_config(AutoencoderConfig, CONFIGS / "tiny_autoencoder.yaml", ["steps"])
    with pytest.raises(ValueError, match="steps"):
        load_config(AutoencoderConfig, CONFIGS / "tiny_autoencoder.yaml", ["steps=0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_a_gpu_asked_for_without_one_or_torchrun_for_a_one_process_recipe_is_said_not_traced(tmp_path: Path) -> None:
    def recipe(module: str, *sets: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        config = ["--config", str(CONFIGS / "tiny_autoencoder.yaml"), "--set", f"output_dir={tmp_path / module}"]
        command = [sys.executable, "-m", module, *config, *(a for s in sets for a in ("--set", s))]
        return subprocess.run(
            command, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120
        )

    no_gpu = recipe("training.autoencoder", "device=cuda")
    assert no_gpu.returncode == 1 and "torch sees no CUDA GPU" in no_gpu.stderr and "Traceback" not in no_gpu.stderr
    two_ranks = recipe("training.autoencoder", env={"WORLD_SIZE": "2"})
    assert two_ranks.returncode == 1 and "runs on one process" in two_ranks.stderr
    assert not (tmp_path / "training.autoencoder" / "final").exists()


def test_make_default_skips_finished_stages_and_runs_the_rest_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "artifacts"
    make_default(["--dry-run", "--set", f"output_dir={root}/x"])  # every stage shares one dir: nothing done
    lines = [line for line in capsys.readouterr().out.splitlines() if "would run" in line]
    assert [line.split(":")[0].split()[-1] for line in lines] == [s.name for s in STAGES]
    (root / "x" / "final").mkdir(parents=True)
    make_default(["--dry-run", "--set", f"output_dir={root}/x"])
    out = capsys.readouterr().out
    assert "autoencoder: done" in out and "adversarial_distill: done" in out
    assert "evaluate: would run" in out


def test_make_default_root_moves_every_stage_and_its_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "full"
    (root / "autoencoder" / "final").mkdir(parents=True)
    make_default(["--dry-run", "--root", str(root)])
    out = capsys.readouterr().out
    assert f"autoencoder: done ({root}/autoencoder/final)" in out
    assert f"--set output_dir={root}/teacher --set autoencoder={root}/autoencoder" in out
    assert f"--set output_dir={root}/adversarial_distill --set student_init={root}/guidance_distill" in out
    assert f"--set output_dir={root}/report --set student={root}/adversarial_distill" in out


def test_training_hours_add_up_resumed_segments(tmp_path: Path) -> None:
    rows = [
        {"step": 10, "elapsed_s": 600.0},
        {"step": 20, "elapsed_s": 1800.0},  # crash, then resumed from step 20
        {"step": 30, "elapsed_s": 900.0},
        {"step": 40, "elapsed_s": 1800.0},
    ]
    (tmp_path / "loss_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert training_hours(tmp_path) == pytest.approx(1.0)


def test_make_default_starts_from_committed_stage_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    committed = tmp_path / "weights"
    (committed / "autoencoder" / "taesd").mkdir(parents=True)
    (committed / "autoencoder" / "taesd" / "config.json").write_text("{}")
    (committed / "teacher" / "unet").mkdir(parents=True)
    (committed / "guidance_distill" / "unet").mkdir(parents=True)
    root = tmp_path / "run"
    # Asking for a stage retrains it from the committed stages before it, never takes it or a later one.
    make_default(["--dry-run", "--root", str(root), "--start-from", str(committed), "--only", "teacher"])
    out = capsys.readouterr().out
    assert "autoencoder: would take the committed weights" in out and "teacher: would run" in out
    assert "teacher: would take" not in out and "guidance_distill" not in out
    assert not root.exists(), "a dry run copied weights"
    (root / "teacher" / "final" / "unet").mkdir(parents=True)  # as if that run had finished
    make_default(["--root", str(root), "--start-from", str(committed), "--only", "teacher"])
    out = capsys.readouterr().out
    assert (root / "autoencoder" / "final" / "taesd" / "config.json").read_text() == "{}"
    assert "autoencoder: took the committed weights" in out and "teacher: done" in out
    assert not (root / "guidance_distill" / "final").exists()
    make_default(["--dry-run", "--root", str(root), "--start-from", str(committed)])
    out = capsys.readouterr().out
    assert "guidance_distill: would take the committed weights" in out and "adversarial_distill: would run" in out


def test_a_model_is_not_loaded_with_another_prompt_encoder_than_it_was_trained_with() -> None:
    # The shipped default reads one pooled token; a config asking for token contexts must fail before any prompt
    # is encoded, not silently feed the UNet a context it never saw.
    with pytest.raises(ValueError, match="'minilm-pooled' prompt encoder, the config asks for 'minilm\\+sentence'"):
        load_editor_model(DEFAULT_MODEL_DIR, PromptSpec(encoder="minilm+sentence"))
    assert load_editor_model(DEFAULT_MODEL_DIR, PromptSpec(encoder="minilm-pooled", tokens=1)).config.distilled


def test_commit_stage_copies_final_weights_with_the_config_they_ran(tmp_path: Path) -> None:
    root, weights = tmp_path / "run", tmp_path / "weights"
    final = root / "teacher" / "final"
    (final / "unet").mkdir(parents=True)
    (final / "unet" / "config.json").write_text('{"new": true}')
    (final / "MODEL_CARD.md").write_text("not a stage's business")
    (root / "teacher" / "config.json").write_text(json.dumps({"steps": 3000, "init_from": "training/weights/teacher"}))
    (weights / "teacher" / "unet").mkdir(parents=True)
    (weights / "teacher" / "unet" / "stale.safetensors").write_text("old")
    commit_stage(["--root", str(root), "--weights-dir", str(weights), "teacher"])
    committed = weights / "teacher"
    assert sorted(p.name for p in committed.rglob("*")) == ["config.json", "stage_config.json", "unet"]
    assert json.loads((committed / "stage_config.json").read_text())["steps"] == 3000
    assert json.loads((committed / "unet" / "config.json").read_text()) == {"new": True}
    # An unfinished stage, or one whose record is missing, leaves the committed weights as they are.
    (root / "teacher" / "config.json").unlink()
    with pytest.raises(SystemExit, match="what the stage ran would be lost"):
        commit_stage(["--root", str(root), "--weights-dir", str(weights), "teacher"])
    with pytest.raises(SystemExit, match="has the guidance_distill stage finished"):
        commit_stage(["--root", str(root), "--weights-dir", str(weights), "guidance_distill"])
    assert (committed / "stage_config.json").is_file()
