"""Runs training.pixel_finetune for as many steps as a time budget allows on the machine it runs on, then packs what
the run changed for the trip back: the lent GPU machine gives one call of minutes, and nobody knows its pace here.

It times `--probe-steps` steps of the config first (in a scratch folder, removed after), then runs the config with
`steps` cut to what `--budget-s` holds, rounded down to a multiple of `--round-to` (never more than the config's own
`steps`). The run's config.json records the step count like any other setting, so the same run is
`python -m training.pixel_finetune --config ... --set steps=N` anywhere. The pack (.tar.gz) holds the run's
config.json and loss log and the files of its final folder that differ from the student's (a decoder fine-tune
brings back its TAESD and frame skip, not the unchanged UNet); each is listed with its sha256.

On the lent GPU machine, from the repository root (training/README.md says how its data and wheels travel):
    python3 -m training.budgeted_finetune --config training/configs/v10_pixel_steady.yaml --budget-s 240 \\
        --set device=cuda --set threads=8 --set data.video_reader=opencv --pack "$OUT/v10_pixel_steady.tar.gz"
Rehearsed here with a small budget:
    .venv/bin/python -m training.budgeted_finetune --config training/configs/v10_pixel_steady.yaml --budget-s 30 \\
        --probe-steps 4 --round-to 10 --set output_dir=artifacts/rehearsal --pack artifacts/rehearsal.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tarfile
import time
from pathlib import Path

import yaml

from training.config import load_config
from training.data import load_split
from training.loop import LOSS_LOG, read_loss_log
from training.models import FINAL_FOLDER, model_folder
from training.pixel_finetune import PixelFinetuneConfig, train

#: Of the budget, the share the main run's steps may take: its checkpoints and final save fall outside the steps.
STEP_SHARE = 0.9


def data_digest(config: PixelFinetuneConfig) -> tuple[int, str]:
    """The training split's image count and the sha256 of its names and pixels: equal digests on two machines mean
    the runs trained on the same images (the GPU machine decodes the clips with another library)."""
    digest = hashlib.sha256()
    train_images = load_split(config.data).train
    for image in train_images:
        digest.update(image.name.encode())
        digest.update(image.pixels.tobytes())
    return len(train_images), digest.hexdigest()


def seconds_per_step(config: PixelFinetuneConfig, probe_steps: int) -> float:
    """Time `probe_steps` steps of the config in a scratch folder beside its output_dir; the first third of them
    (start-up, kernel choice) is left out of the mean."""
    scratch = Path(f"{config.output_dir}.timing")
    shutil.rmtree(scratch, ignore_errors=True)
    probe = PixelFinetuneConfig.model_validate(
        {
            **config.model_dump(),
            "output_dir": scratch,
            "steps": probe_steps,
            "warmup_steps": min(config.warmup_steps, probe_steps),
            "log_every": 1,
            "checkpoint_every": probe_steps,
        }
    )
    try:
        train(probe)
        rows = read_loss_log(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    first = rows[len(rows) // 3]
    last = rows[-1]
    if last["step"] <= first["step"]:
        raise ValueError(f"--probe-steps {probe_steps} is too few to time (use 3 or more)")
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def budgeted_steps(config_steps: int, budget_s: float, per_step_s: float, round_to: int) -> int:
    """What the budget holds, rounded down to `round_to`, at most the config's own steps."""
    fitting = int(budget_s * STEP_SHARE / per_step_s) // round_to * round_to
    if fitting < round_to:
        raise ValueError(
            f"a budget of {budget_s:g} s holds {budget_s * STEP_SHARE / per_step_s:.0f} steps at {per_step_s:.3f} s "
            f"a step: fewer than --round-to {round_to}"
        )
    return min(config_steps, fitting)


def pack(config: PixelFinetuneConfig, destination: Path) -> list[tuple[str, str]]:
    """Write the run's config, loss log and changed final files into a .tar.gz; (name, sha256) of each."""
    run = Path(config.output_dir)
    student = model_folder(config.student)
    final = run / FINAL_FOLDER
    names = ["config.json", LOSS_LOG]
    for path in sorted(p for p in final.rglob("*") if p.is_file()):
        relative = path.relative_to(final)
        kept = student / relative
        if not kept.is_file() or kept.read_bytes() != path.read_bytes():
            names.append(f"{FINAL_FOLDER}/{relative}")
    listed = []
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(destination, "w:gz") as tar:
        for name in names:
            tar.add(run / name, arcname=name)
            listed.append((name, hashlib.sha256((run / name).read_bytes()).hexdigest()))
    return listed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="a training.pixel_finetune config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--budget-s", type=float, required=True, help="seconds the main run's steps may take")
    parser.add_argument("--probe-steps", type=int, default=30, help="steps timed before the main run")
    parser.add_argument("--round-to", type=int, default=250, help="the step count is a multiple of this")
    parser.add_argument("--pack", type=Path, required=True, help="the .tar.gz to write")
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.probe_steps < 3 or args.round_to < 1:
        parser.error("--budget-s must be > 0, --probe-steps ≥ 3 and --round-to ≥ 1")
    try:
        config = load_config(PixelFinetuneConfig, args.config, args.overrides)
        count, digest = data_digest(config)
        print(f"training images: {count}, sha256 of names and pixels {digest}", flush=True)
        started = time.monotonic()
        per_step = seconds_per_step(config, args.probe_steps)
        steps = budgeted_steps(config.steps, args.budget_s, per_step, args.round_to)
        print(
            f"timed {args.probe_steps} steps in {time.monotonic() - started:.0f} s: {per_step:.3f} s a step; "
            f"running {steps}",
            flush=True,
        )
        config = PixelFinetuneConfig.model_validate({**config.model_dump(), "steps": steps})
        started = time.monotonic()
        train(config)
        print(f"{steps} steps and the final save took {time.monotonic() - started:.0f} s", flush=True)
        for name, sha in pack(config, args.pack):
            print(f"packed {name}  sha256 {sha}")
    except (OSError, ValueError, yaml.YAMLError) as exc:  # pydantic's ValidationError is a ValueError
        print(f"budgeted_finetune: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.pack}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
