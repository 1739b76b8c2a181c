"""Calibrate a model's int8 graphs on training clips and keep them only if held-out PSNR drops at most a bar.

Run from the repository root (the shipped default: reads ../shared/media, writes engines/default_model/int8/ and
training/report/int8.md):

    .venv/bin/python -m training.quantize

Calibration frames come from the training split of the evaluation's data (never its held-out frames), each edited
once with a training phrasing at guidance drawn from the trained ranges. The gate edits the evaluation's held-out
frames with its held-out phrasings at s_T = s_I = 1 (exactly the evaluation report's table) on fp32 and on int8
ONNX Runtime graphs, and compares their PSNR against the edits' exact targets.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from engines.backends.onnxruntime_backend import OnnxRuntimeBackend
from engines.export import GRAPH_NAMES
from engines.model import DEFAULT_MODEL_DIR, INT8_FOLDER, EditorModel
from engines.params import EditParams
from engines.quantize import (
    DEFAULT_RECIPE,
    RECORD_NAME,
    calibrate,
    cpuinfo_field,
    ranges_name,
    this_cpu_saturates_int8,
)
from training.config import load_config
from training.data import MEDIA_ATTRIBUTION, load_split, service_view, validation_frames
from training.edits import get_edits
from training.evaluate import EvaluateConfig, apply_edit, one_step_method, psnr

DEFAULT_EVALUATE_CONFIG = Path("training/configs/default_evaluate.yaml")
MAX_DROP_DB = 0.3  # issue 16's bar on the evaluation's mean PSNR
# A mean over frames hides a blot. On a CPU that saturated int8 sums (engines.quantize.int8_saturation), the worst
# 8×8 patch of a held-out edit was 50-81 levels off fp32 on average (a purple blot on an orange hoodie under "black
# and white"); exact int8 kernels left 12-19 on the hardest edits (cartoon, emboss, pop art). 24 levels (a tenth of
# the range) lies between the two.
MAX_PATCH_DEVIATION = 24.0
PATCH = 8


def worst_patch_deviation(a: np.ndarray, b: np.ndarray, patch: int = PATCH) -> float:
    """The largest mean |a − b| (8-bit levels, over channels) of any patch × patch tile of two RGB frames."""
    diff = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=-1)
    h, w = (diff.shape[0] // patch) * patch, (diff.shape[1] // patch) * patch
    tiles = diff[:h, :w].reshape(h // patch, patch, w // patch, patch).mean(axis=(1, 3))
    return float(tiles.max())


def calibration_set(
    config: EvaluateConfig, frames: int, seed: int, trained: tuple[list[float], list[float]]
) -> tuple[list[np.ndarray], list[EditParams], list[str]]:
    """Frames of the training split's clips (service view) and one edit each: training phrasing, random guidance."""
    split = load_split(config.data)
    clips = [s for s in split.train if s.kind == "clip"]
    if not clips:
        raise ValueError("the data config's training split holds no clip frames to calibrate on")
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(clips)), min(frames, len(clips))))
    edits = get_edits(config.edits)
    text_range, image_range = trained
    params = [
        EditParams(
            prompt=rng.choice(edits[i % len(edits)].phrasings),
            text_guidance=rng.uniform(*text_range),
            image_guidance=rng.uniform(*image_range),
            seed=i,
        )
        for i in range(len(picked))
    ]
    views = [service_view(clips[i].pixels, config.resolution) for i in picked]
    return views, params, [clips[i].name for i in picked]


def gate(
    model: EditorModel, config: EvaluateConfig, ranges: Path, cache_dir: Path | None
) -> dict[str, dict[str, float] | float | str]:
    """Held-out PSNR per edit on fp32 and int8 ONNX Runtime graphs (the evaluation report's table, both ways)."""
    frames = [f for _, f in validation_frames(load_split(config.data), config.resolution)]
    methods = {
        "fp32": one_step_method(model, config.seed, OnnxRuntimeBackend(model, config.resolution, cache_dir)),
        "int8": one_step_method(
            model,
            config.seed,
            OnnxRuntimeBackend(model, config.resolution, cache_dir, precision="int8", int8_ranges=ranges),
        ),
    }
    per_edit: dict[str, dict[str, float]] = {}
    for edit in get_edits(config.edits):
        targets = apply_edit(edit, frames)
        prompt = edit.held_out[0]
        per_edit[edit.name] = {}
        outputs = {}
        for name, method in methods.items():
            outputs[name] = method.run(frames, prompt, config.text_guidance, config.image_guidance)
            per_edit[edit.name][name] = float(
                np.mean([psnr(o, t) for o, t in zip(outputs[name], targets, strict=True)])
            )
        row = per_edit[edit.name]
        row["patch_deviation"] = max(
            worst_patch_deviation(a, b) for a, b in zip(outputs["fp32"], outputs["int8"], strict=True)
        )
        print(
            f"[quantize] {edit.name}: fp32 {row['fp32']:.2f} dB, int8 {row['int8']:.2f} dB, "
            f"worst {PATCH}×{PATCH} patch off fp32 by {row['patch_deviation']:.1f} levels",
            flush=True,
        )
    fp32 = float(np.mean([r["fp32"] for r in per_edit.values()]))
    int8 = float(np.mean([r["int8"] for r in per_edit.values()]))
    worst = min(per_edit, key=lambda e: per_edit[e]["int8"] - per_edit[e]["fp32"])
    blotted = max(per_edit, key=lambda e: per_edit[e]["patch_deviation"])
    return {
        "per_edit": per_edit,
        "fp32_psnr": fp32,
        "int8_psnr": int8,
        "drop_db": fp32 - int8,
        "worst_edit": worst,
        "worst_drop_db": per_edit[worst]["fp32"] - per_edit[worst]["int8"],
        "patch_deviation": per_edit[blotted]["patch_deviation"],
        "patch_deviation_edit": blotted,
        "frames": len(frames),
        "cpu": cpu_name(),
        "cpu_saturates": this_cpu_saturates_int8(),
    }


def cpu_name() -> str:
    """The CPU's model name (the gate's figures hold for CPUs whose int8 kernels sum alike)."""
    import platform

    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def render(result: dict, record: dict, command: str, kept: bool, bar: float, patch_bar: float) -> str:  # type: ignore[type-arg]
    """training/report/int8.md."""
    lines = [
        "# int8 graphs of the default editor: the quality gate",
        "",
        f"Command: `{command}`. The int8 graphs are ONNX QDQ graphs that ONNX Runtime builds from the ranges in "
        f"`engines/default_model/{INT8_FOLDER}/` (recipe in `{RECORD_NAME}`, `engines/quantize.py`). Calibrated "
        f"on {record['calibration']['frames']} frames of the training split's clips, one edit each (a training "
        "phrasing, guidance drawn from the trained ranges); gated on the evaluation report's "
        f"{result['frames']} held-out frames and held-out phrasings at s_T = s_I = 1. {MEDIA_ATTRIBUTION}",
        "",
        f"Weights in {7 if record['recipe']['reduce_range'] else 8} bits. Gated on: {result['cpu']}; "
        + (
            "its int8 kernels sum exactly."
            if result["cpu_saturates"] is None
            else f"{result['cpu_saturates']}, which "
            + ("7-bit weights fit." if record["recipe"]["reduce_range"] else "full-range weights overflow.")
        ),
        "",
        f"| edit | fp32 PSNR (dB) | int8 PSNR (dB) | int8 − fp32 | worst {PATCH}×{PATCH} patch off fp32 (levels) |",
        "|---|---|---|---|---|",
    ]
    for edit, row in result["per_edit"].items():
        lines.append(
            f"| {edit} | {row['fp32']:.2f} | {row['int8']:.2f} | {row['int8'] - row['fp32']:+.2f} "
            f"| {row['patch_deviation']:.1f} |"
        )
    lines += [
        f"| **mean** | **{result['fp32_psnr']:.2f}** | **{result['int8_psnr']:.2f}** | **{-result['drop_db']:+.2f}** "
        f"| **{result['patch_deviation']:.1f}** (worst) |",
        "",
        f"- Mean drop {result['drop_db']:.3f} dB against a bar of {bar} dB, and no {PATCH}×{PATCH} patch of any "
        f"held-out edit off its fp32 output by more than {patch_bar:g} levels on average (worst "
        f"{result['patch_deviation']:.1f}, {result['patch_deviation_edit']}): "
        + ("**kept** (the service's `--precision auto` runs int8)." if kept else "**not kept**."),
        f"- Largest drop of one edit: {result['worst_edit']} ({result['worst_drop_db']:.2f} dB).",
        "- Speed, side by side: `bench/bench_int8.py` (bench/results/).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_MODEL_DIR, help="model folder (default: shipped)")
    parser.add_argument("--config", type=Path, default=DEFAULT_EVALUATE_CONFIG, help="evaluation config (data)")
    parser.add_argument("--frames", type=int, default=48, help="calibration frames (default 48)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-drop-db", type=float, default=MAX_DROP_DB, help="gate on the mean PSNR drop")
    parser.add_argument(
        "--max-patch-deviation",
        type=float,
        default=MAX_PATCH_DEVIATION,
        help=f"gate on the worst {PATCH}×{PATCH} patch's mean |int8 − fp32| in 8-bit levels",
    )
    parser.add_argument("--report", type=Path, default=Path("training/report"), help="where int8.md/json go")
    parser.add_argument("--cache-dir", type=Path, default=None, help="engine cache (default ~/.cache/streamedit)")
    parser.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit weights: exact on x86 CPUs without VNNI, where 8-bit ones saturate (engines/quantize.py)",
    )
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error(f"--frames must be at least 1, got {args.frames}")
    try:
        config = load_config(EvaluateConfig, args.config)
        model = EditorModel.from_pretrained(args.weights)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    trained = (list(model.config.trained_text_guidance), list(model.config.trained_image_guidance))
    try:
        frames, edits, names = calibration_set(config, args.frames, args.seed, trained)
    except (OSError, ValueError) as exc:
        print(f"error: no calibration frames: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        ranges = Path(scratch)
        record = calibrate(
            model,
            frames,
            edits,
            ranges,
            resolution=config.resolution,
            recipe=DEFAULT_RECIPE.model_copy(update={"reduce_range": args.reduce_range}),
            cache_dir=args.cache_dir,
            description={"sources": names, "seed": args.seed},
        )
        print(f"[quantize] calibrated on {len(frames)} frames; gating on held-out frames", flush=True)
        result = gate(model, config, ranges, args.cache_dir)
        kept = (
            result["drop_db"] <= args.max_drop_db  # type: ignore[operator]
            and result["patch_deviation"] <= args.max_patch_deviation  # type: ignore[operator]
        )
        record.evaluation = {k: v for k, v in result.items() if k != "per_edit"}
        (ranges / RECORD_NAME).write_text(record.model_dump_json(indent=2) + "\n")
        command = " ".join(["python -m training.quantize", *(argv if argv is not None else sys.argv[1:])]).strip()
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / "int8.md").write_text(
            render(result, record.model_dump(), command, kept, args.max_drop_db, args.max_patch_deviation)
        )
        (args.report / "int8.json").write_text(
            json.dumps(
                {"kept": kept, "bar_db": args.max_drop_db, "bar_patch_deviation": args.max_patch_deviation, **result},
                indent=2,
            )
            + "\n"
        )
        target = args.weights / INT8_FOLDER
        if not kept:
            print(
                f"[quantize] mean drop {result['drop_db']:.3f} dB (bar {args.max_drop_db}), worst patch "
                f"{result['patch_deviation']:.1f} levels (bar {args.max_patch_deviation:g}): not kept",
                flush=True,
            )
            return 1
        target.mkdir(exist_ok=True)
        for name in [RECORD_NAME, *(ranges_name(g) for g in GRAPH_NAMES)]:
            shutil.copyfile(ranges / name, target / name)
    print(f"[quantize] mean drop {result['drop_db']:.3f} dB: kept in {target}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
