"""What each stage ran, read through the stage's own config class (never as an untyped dict)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.adversarial_distill import AdversarialDistillConfig
from training.autoencoder import AutoencoderConfig
from training.config import load_raw_config
from training.guidance_distill import GuidanceDistillConfig
from training.models import FINAL_FOLDER, ran_config
from training.teacher import TeacherConfig

#: The committed config of each stage of the shipped default, in pipeline order.
STAGE_CONFIG_FILES = (
    ("autoencoder", "default_autoencoder.yaml"),
    ("teacher", "default_teacher.yaml"),
    ("guidance_distill", "default_guidance_distill.yaml"),
    ("adversarial_distill", "default_adversarial_distill.yaml"),
)


@dataclass(frozen=True)
class StageConfigs:
    """The four stages' configs, each as its recipe validates it."""

    autoencoder: AutoencoderConfig
    teacher: TeacherConfig
    guidance_distill: GuidanceDistillConfig
    adversarial_distill: AdversarialDistillConfig
    #: The stages whose run left a record (a saved config.json, or the copy committed weights carry); the others
    #: show their committed config file, which may not be what made the model.
    recorded: frozenset[str] = frozenset()

    def by_name(
        self, name: str
    ) -> AutoencoderConfig | TeacherConfig | GuidanceDistillConfig | AdversarialDistillConfig:
        return getattr(self, name)


def stage_configs(stage_dirs: dict[str, Path], config_dir: Path, committed: Path | None = None) -> StageConfigs:
    """Per stage: what its final weights really ran (the config.json beside them, or the copy committed weights
    carry, in its folder or else in `committed`/<stage>), else its committed config file."""
    found, recorded = {}, set()
    for name, file in STAGE_CONFIG_FILES:
        ran = ran_config(stage_dirs[name] / FINAL_FOLDER)
        if ran is None and committed is not None:
            ran = ran_config(committed / name)
        if ran is not None:
            recorded.add(name)
        found[name] = ran or load_raw_config(config_dir / file)
    return StageConfigs(
        AutoencoderConfig.model_validate(found["autoencoder"]),
        TeacherConfig.model_validate(found["teacher"]),
        GuidanceDistillConfig.model_validate(found["guidance_distill"]),
        AdversarialDistillConfig.model_validate(found["adversarial_distill"]),
        frozenset(recorded),
    )


def student_stage(student: Path, config_dir: Path) -> AdversarialDistillConfig:
    """What the one-step student's stage really ran (--set overrides included), else the committed config."""
    raw = ran_config(student)
    if raw is None or "text_guidance_range" not in raw:
        raw = load_raw_config(config_dir / "default_adversarial_distill.yaml")
    return AdversarialDistillConfig.model_validate(raw)
