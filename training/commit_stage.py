"""Copy stages' final weights into training/weights/<stage>/ with the config each ran, ready to commit.

    python -m training.commit_stage --root artifacts/v3 teacher guidance_distill

The next stage and the next person start from these (make_default --start-from training/weights); the
adversarial student is shipped by training.ship_default instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from training.models import COMMITTED_STAGE_CONFIG, COMMITTED_WEIGHTS, FINAL_FOLDER, ran_config

COMMITTABLE = ("autoencoder", "teacher", "guidance_distill")


def commit_stage(root: Path, stage: str, weights_dir: Path = COMMITTED_WEIGHTS) -> Path:
    """Replace weights_dir/<stage> with root/<stage>/final plus the config that run recorded; returns it."""
    final = root / stage / FINAL_FOLDER
    if not final.is_dir():
        raise SystemExit(f"commit_stage: {final} does not exist (has the {stage} stage finished?)")
    record = ran_config(final)
    if record is None:
        raise SystemExit(f"commit_stage: no config.json beside {final}: what the stage ran would be lost")
    target = weights_dir / stage
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # A committed stage carries no MODEL_CARD or loss log: only what a later stage loads, and its record.
    shutil.copytree(final, tmp, ignore=shutil.ignore_patterns(COMMITTED_STAGE_CONFIG, "*.md"))
    (tmp / COMMITTED_STAGE_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="+", choices=COMMITTABLE)
    parser.add_argument("--root", type=Path, required=True, help="folder of the stage dirs (make_default --root)")
    parser.add_argument("--weights-dir", type=Path, default=COMMITTED_WEIGHTS)
    args = parser.parse_args(argv)
    for stage in args.stages:
        print(f"[commit_stage] {stage}: {commit_stage(args.root, stage, args.weights_dir)}")


if __name__ == "__main__":
    main()
