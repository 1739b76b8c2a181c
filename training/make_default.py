"""Produce the shipped default editor: run every recipe stage in order, resuming or skipping finished ones.

The committed commands (run from the repository root; the 2 CPU cores are shared, so always niced):

    nohup nice -n 19 .venv/bin/python -m training.make_default > artifacts/train.log 2>&1 &
    tail -f artifacts/train.log                      # progress bars and stage starts
    tail -n 3 artifacts/default/*/loss_log.jsonl     # latest losses of every stage
    .venv/bin/python -m training.make_default --dry-run   # what is done, what would run next

`--root artifacts/other` runs the whole chain in another folder (a second run beside the first);
`--set key=value` overrides a field in every stage (e.g. `--set steps=500` for a short trial).
`--start-from training/weights` takes the committed final weights of every stage not yet done here that
comes before the first stage named by --only (all of them without --only; each stage's folder there is what
its final/ would be), so a run can begin at any later stage.

Re-running the same command after an interruption skips finished stages (their final/ folder exists)
and resumes the current one from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from training.config import load_raw_config
from training.models import COMMITTED_WEIGHTS, FINAL_FOLDER

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: a recipe module run with one config file, done once `marker` exists."""

    name: str
    module: str
    config: str
    marker: str = FINAL_FOLDER  # relative to the config's output_dir
    folder: str = ""  # its output_dir's name under --root (default: the stage's name)
    inputs: tuple[tuple[str, str], ...] = ()  # (config key, folder under --root it reads)

    def done_marker(self, config_dir: Path, overrides: list[str]) -> Path:
        return Path(load_raw_config(config_dir / self.config, overrides)["output_dir"]) / self.marker

    def root_overrides(self, root: Path | None) -> list[str]:
        """Point the stage's output and inputs into `root` (a separate run that leaves the configs' paths alone)."""
        if root is None:
            return []
        return [f"output_dir={root / (self.folder or self.name)}"] + [f"{k}={root / v}" for k, v in self.inputs]


_REPORT_INPUTS = (("student", "adversarial_distill"), ("guidance_student", "guidance_distill"), ("teacher", "teacher"))
STAGES = (
    Stage("autoencoder", "training.autoencoder", "default_autoencoder.yaml"),
    Stage("teacher", "training.teacher", "default_teacher.yaml", inputs=(("autoencoder", "autoencoder"),)),
    Stage(
        "guidance_distill",
        "training.guidance_distill",
        "default_guidance_distill.yaml",
        inputs=(("teacher", "teacher"),),
    ),
    Stage(
        "adversarial_distill",
        "training.adversarial_distill",
        "default_adversarial_distill.yaml",
        inputs=(("student_init", "guidance_distill"),),
    ),
    Stage("evaluate", "training.evaluate", "default_evaluate.yaml", "report.md", "report", _REPORT_INPUTS),
    Stage("model_card", "training.model_card", "default_evaluate.yaml", "MODEL_CARD.md", "report", _REPORT_INPUTS),
)


def stage_command(stage: Stage, config_dir: Path, overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", stage.module, "--config", str(config_dir / stage.config)]
    for item in overrides:
        command += ["--set", item]
    return command


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=CONFIG_DIR, help="folder of the default_*.yaml configs")
    parser.add_argument("--only", choices=[s.name for s in STAGES], action="append", help="run just these stages")
    parser.add_argument("--force", action="store_true", help="run stages even when their final output exists")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's state and command, run nothing")
    parser.add_argument(
        "--root", type=Path, default=None, help="put every stage under this folder instead of the configs' paths"
    )
    parser.add_argument(
        "--start-from",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"copy DIR/<stage> in as the final weights of stages not done yet (committed: {COMMITTED_WEIGHTS})",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override for every stage"
    )
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Idle OpenMP threads sleep instead of spinning: the cores are shared and this job runs niced.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Committed weights stand in only for stages before the first one asked for: `--only teacher` must
    # retrain the teacher, not find it done, and must leave later stages to be trained from it.
    names = [s.name for s in STAGES]
    first_asked = min(names.index(n) for n in args.only) if args.only else len(STAGES)
    for index, stage in enumerate(STAGES):
        overrides = stage.root_overrides(args.root) + args.overrides
        marker = stage.done_marker(args.configs, overrides)
        committed = args.start_from / stage.name if args.start_from is not None else None
        if committed is not None and committed.is_dir() and not marker.exists() and index < first_asked:
            if args.dry_run:
                print(f"[make_default] {stage.name}: would take the committed weights {committed}", flush=True)
                continue
            shutil.copytree(committed, marker)
            print(f"[make_default] {stage.name}: took the committed weights {committed}", flush=True)
        if args.only and stage.name not in args.only:
            continue
        command = stage_command(stage, args.configs, overrides)
        if marker.exists() and not args.force:
            print(f"[make_default] {stage.name}: done ({marker})", flush=True)
            continue
        print(f"[make_default] {stage.name}: {'would run' if args.dry_run else 'running'}: {' '.join(command)}")
        if args.dry_run:
            continue
        started = time.monotonic()
        result = subprocess.run(command, env=env, check=False)
        minutes = (time.monotonic() - started) / 60
        if result.returncode != 0:
            print(f"[make_default] {stage.name} failed (exit {result.returncode}) after {minutes:.1f} min", flush=True)
            sys.exit(result.returncode)
        print(f"[make_default] {stage.name} finished in {minutes:.1f} min", flush=True)
    print("[make_default] all stages done", flush=True)


if __name__ == "__main__":
    main()
