"""Copy the final one-step student into engines/default_model with its presets, operating point and model card."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from engines.config import EditorConfig
from engines.loader import PRESETS_NAME
from engines.model import DEFAULT_MODEL_DIR
from training.adversarial_distill import AdversarialDistillConfig
from training.config import load_raw_config
from training.edits import get_edits
from training.model_card import CARD_NAME
from training.models import FINAL_FOLDER
from training.stage_configs import student_stage

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# The operating point the distillation ranges are centred on: s_T = 1 is the exact edit, s_I = 1 the input's
# own weight (training/README.md, "Guidance ranges").
OPERATING_POINT = {"default_text_guidance": 1.0, "default_image_guidance": 1.0}


def preset_title(name: str) -> str:
    return name.replace("_", " ").capitalize()


def trained_ranges(stage: AdversarialDistillConfig) -> dict[str, tuple[float, float]]:
    """The (s_T, s_I) ranges the student was last trained on."""
    return {
        "trained_text_guidance": tuple(stage.text_guidance_range),
        "trained_image_guidance": tuple(stage.image_guidance_range),
    }


def presets(stage: AdversarialDistillConfig) -> list[dict[str, str]]:
    """One preset per edit the student was trained on, prompted with the edit's canonical phrasing."""
    return [{"name": preset_title(e.name), "prompt": e.phrasings[0]} for e in get_edits(stage.edits)]


def ship(student: Path, target: Path, config_dir: Path = CONFIG_DIR) -> Path:
    """Replace `target` with the student's folder plus editor.json defaults, presets.json and the model card."""
    if not (student / "unet" / "config.json").is_file():
        raise SystemExit(f"ship_default: {student} holds no trained student (run training.make_default first)")
    stage = student_stage(student, config_dir)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(student, tmp)
    config = EditorConfig.load(tmp).model_copy(update={**OPERATING_POINT, **trained_ranges(stage)})
    config.save(tmp)
    (tmp / PRESETS_NAME).write_text(json.dumps(presets(stage), indent=2) + "\n")
    card = Path(load_raw_config(config_dir / "default_evaluate.yaml")["output_dir"]) / CARD_NAME
    if card.is_file():
        shutil.copy(card, tmp / CARD_NAME)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    stage = load_raw_config(CONFIG_DIR / "default_adversarial_distill.yaml")["output_dir"]
    parser.add_argument("--student", type=Path, default=Path(stage) / FINAL_FOLDER)
    parser.add_argument("--target", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args(argv)
    print(f"shipped {ship(args.student, args.target)}")


if __name__ == "__main__":
    main()
