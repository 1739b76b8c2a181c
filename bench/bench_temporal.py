"""Temporal-reuse benchmark: flicker and UNet calls per second on real clips, each reuse mechanism on and off.

Run from the repository root:  .venv/bin/python bench/bench_temporal.py
Writes bench/results/temporal_cpu_<date>.md and .json. Clips: Sample videos by Intel Corporation
(intel-iot-devkit/sample-videos), CC BY 4.0.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from benchlib import command_line, machine_info, machine_markdown, table, write_results
from PIL import Image

from engines.editor import Editor, EditRequest
from engines.loader import EngineSpec, default_params, load_editor
from engines.params import EditParams
from engines.temporal import MOTION_LEVELS, MOTION_WINDOW, StreamState, flicker, moving_pixels, region_flicker
from training.edits import Edit, get_edits
from training.evaluate import apply_edit, psnr

ATTRIBUTION = "Sample videos by Intel Corporation (intel-iot-devkit/sample-videos), CC BY 4.0"
DEFAULT_CLIPS = ["asl_book.mkv", "asl_again.mkv", "person_walk.mp4"]
_HERE = Path(__file__).resolve()
MEDIA = next(
    (p for p in (_HERE.parents[2] / "shared" / "media", _HERE.parents[1] / "shared" / "media") if p.is_dir()),
    _HERE.parents[2] / "shared" / "media",
)

# Each mechanism alone, none, fixed noise with the still hold (the service's default), and all together; the rest
# at EditParams' defaults.
MECHANISMS: dict[str, dict[str, Any]] = {
    "all off": {"fixed_noise": False, "latent_feedback": 0.0, "similarity_skip": False, "hold_still": False},
    "fixed noise": {"fixed_noise": True, "latent_feedback": 0.0, "similarity_skip": False, "hold_still": False},
    "latent feedback 0.5": {
        "fixed_noise": False,
        "latent_feedback": 0.5,
        "similarity_skip": False,
        "hold_still": False,
    },
    "similarity skip": {"fixed_noise": False, "latent_feedback": 0.0, "similarity_skip": True, "hold_still": False},
    "still hold": {"fixed_noise": False, "latent_feedback": 0.0, "similarity_skip": False, "hold_still": True},
    "fixed noise + still hold": {
        "fixed_noise": True,
        "latent_feedback": 0.0,
        "similarity_skip": False,
        "hold_still": True,
    },
    "all on": {"fixed_noise": True, "latent_feedback": 0.5, "similarity_skip": True, "hold_still": True},
}


def load_frames(path: Path, count: int, stride: int, size: int) -> tuple[list[np.ndarray], float]:
    """The first `count` frames (every `stride`-th), centre-cropped square and resized; and the clip's fps."""
    frames: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 30)
        for index, frame in enumerate(container.decode(stream)):
            if index % stride:
                continue
            rgb = frame.to_ndarray(format="rgb24")
            h, w = rgb.shape[:2]
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            square = Image.fromarray(rgb[top : top + side, left : left + side])
            frames.append(np.asarray(square.resize((size, size), Image.Resampling.BILINEAR)))
            if len(frames) == count:
                break
    if len(frames) < 2:
        raise ValueError(f"{path} gave {len(frames)} frames; need at least 2")
    return frames, fps


def mean_step_change(frames: list[np.ndarray]) -> float:
    """mean |F_t − F_{t−1}| in 8-bit levels (flicker's numerator for outputs, denominator for inputs)."""
    steps = [
        np.abs(b.astype(np.float32) - a.astype(np.float32)).mean() for a, b in zip(frames, frames[1:], strict=False)
    ]
    return float(np.mean(steps))


def off_target_change(outputs: list[np.ndarray], targets: list[np.ndarray], camera_change: float) -> float:
    """mean |ΔO − ΔT| / mean |ΔI| (`camera_change`, `mean_step_change` of the input frames): the output's
    frame-to-frame change that the exact edit's own change does not explain, relative to the camera's. Flicker counts
    an output that follows the scene's motion as unsteady; this does not (an editor that drew every frame's target
    scores 0)."""
    steps = np.diff(np.stack(outputs).astype(np.float32), axis=0) - np.diff(
        np.stack(targets).astype(np.float32), axis=0
    )
    return float(np.abs(steps).mean()) / camera_change if camera_change > 0 else 0.0


@dataclass
class ClipRun:
    """What one mechanism made of a clip: its outputs, UNet rows, skipped frames and seconds of editing."""

    outputs: list[np.ndarray] = field(default_factory=list)
    calls: int = 0
    skipped: int = 0
    seconds: float = 0.0


def run_clip(
    editor: Editor, frames: list[np.ndarray], settings: dict[str, EditParams], context: torch.Tensor
) -> dict[str, ClipRun]:
    """Edit a clip frame by frame as one session per mechanism would, the mechanisms taking turns on each frame in
    a fresh seeded order, so that their times are measured side by side on a noisy machine."""
    states = {name: StreamState(params.seed) for name, params in settings.items()}
    runs = {name: ClipRun() for name in settings}
    order = list(settings)
    shuffler = random.Random(0)
    for frame in frames:
        shuffler.shuffle(order)
        for name in order:
            run, rows_before = runs[name], editor.unet_rows
            started = time.perf_counter()
            result = editor.edit([EditRequest(frame, context, settings[name], states[name])])[0]
            run.seconds += time.perf_counter() - started
            run.outputs.append(result.frame)
            run.calls += editor.unet_rows - rows_before
            run.skipped += result.skipped
    return runs


def exact_edit(prompt: str) -> Edit | None:
    """The trained edit whose training phrasings include `prompt`, if any: its exact target is the reference."""
    return next((e for e in get_edits() if prompt in e.phrasings), None)


def report(machine: dict[str, Any], command: str, data: dict[str, Any]) -> str:
    parts = [machine_markdown(machine, command)]
    if data["weights_status"] != "trained":
        parts.append(
            "> **The weights are UNTRAINED PLACEHOLDERS** (`engines/default_model` as of this run, fingerprint "
            f"`{data['fingerprint']}`). This run is a smoke test of the measuring machinery: the flicker numbers "
            "say nothing about the edit's quality and will be re-measured when trained weights land. UNet calls "
            "per second do not depend on the weights, except through the similarity skip's latents.\n"
        )
    parts.append(
        f"Clips: {', '.join(data['clips'])} from `shared/media` — {ATTRIBUTION}. {data['frames']} frames each "
        f"(every {data['stride']}), centre-cropped and resized to {data['resolution']}², edited one at a time as "
        f"one session would, backend `{data['backend']}` (precision {data.get('precision', 'fp32')}), "
        f'prompt "{data["prompt"]}", s_T {data["text_guidance"]}, '
        f"s_I {data['image_guidance']}, seed {data['seed']}.\n\n"
        "Flicker (`engines.temporal.flicker`): mean |O_t − O_{t−1}| / mean |I_t − I_{t−1}|; 1 = the output "
        "changes as much as the camera frame, lower is steadier. UNet calls per video second: UNet rows run / "
        "seconds of video covered. The mechanisms take turns on every frame, in a fresh seeded order, so their times "
        "are side by side. Mechanisms not named are off; the similarity skip uses the default threshold "
        f"{EditParams().skip_threshold} and at most {EditParams().max_skipped_frames} skips in a row; the still "
        f"hold (`StreamState.hold_still`) redraws a pixel once the camera there has changed by "
        f"{EditParams().hold_threshold:g} levels since it was drawn.\n"
    )
    reference = data.get("exact_edit")
    if reference:
        per_clip = ", ".join(f"{clip} {value:.4g}" for clip, value in reference["flicker"].items())
        parts.append(
            f"The exact edit itself ({reference['edit']}, `training/edits.py`, applied to each frame) flickers "
            f"{per_clip}: what an editor that drew every frame's target would score. Off-target change "
            "(`off_target_change`): mean |ΔO − ΔT| / mean |ΔI|, the output's frame-to-frame change that the exact "
            "edit's own change T_t − T_{t−1} does not explain; 0 for that editor. Flicker also counts an output "
            "that follows the scene's motion; this does not. PSNR vs exact: each output frame against that frame's "
            "exact edit, the report's measure, averaged over the clip.\n"
        )
        regions = reference.get("regions") or {}
        if regions:
            split = ", ".join(f"{clip} {still:.3g} / {moving:.3g}" for clip, (still, moving) in regions.items())
            parts.append(
                f"Still / moving flicker (`region_flicker`): flicker within the pixels where the camera frame is "
                f"still and within those where it moves (its change, averaged over {MOTION_WINDOW}×{MOTION_WINDOW} "
                f"pixels and the channels, above {MOTION_LEVELS:g} levels). The still part is the shimmer of a steady "
                f"scene; the moving part is how far the output follows the motion. The exact edit scores {split}.\n"
            )
    off = bool(reference)  # the off-target column exists when the prompt has an exact edit
    baseline = data["summary"]["all off"]["flicker_mean"]
    rows = []
    for name, s in data["summary"].items():
        rows.append(
            [
                name,
                f"{s['flicker_mean']:.4g}",
                f"{s['still_flicker_mean']:.4g}",
                f"{s['moving_flicker_mean']:.4g}",
                *([f"{s['off_target_mean']:.4g}", f"{s['psnr_exact_mean']:.2f}"] if off else []),
                f"{s['flicker_mean'] / baseline:.4g}" if baseline > 0 else "n/a",
                f"{s['unet_calls']}/{s['frames']}",
                f"{s['unet_calls_per_video_s']:.1f}",
                f"{s['unet_calls_per_wall_s']:.1f}",
                f"{s['ms_per_frame']:.1f}",
            ]
        )
    parts.append("## Summary (mean over clips)\n")
    parts.append(
        table(
            [
                "mechanism",
                "flicker",
                "still",
                "moving",
                *(["off-target change", "PSNR vs exact (dB)"] if off else []),
                "vs all off",
                "UNet calls / frames",
                "UNet calls per video s",
                "UNet calls per wall s",
                "ms per frame",
            ],
            rows,
        )
        + "\n"
    )
    parts.append("## Per clip\n")
    rows = [
        [
            r["clip"],
            r["mechanism"],
            f"{r['flicker']:.4g}",
            f"{r['still_flicker']:.4g}",
            f"{r['moving_flicker']:.4g}",
            *([f"{r['off_target_change']:.4g}", f"{r['psnr_exact']:.2f}"] if off else []),
            f"{r['input_step_change']:.2f}",
            f"{r['moving_share']:.3f}",
            f"{r['output_step_change']:.3g}",
            f"{r['unet_calls']}/{r['frames']}",
            str(r["skipped"]),
            f"{r['unet_calls_per_video_s']:.1f}",
            f"{1000 * r['seconds'] / r['frames']:.1f}",
        ]
        for r in data["runs"]
    ]
    parts.append(
        table(
            [
                "clip",
                "mechanism",
                "flicker",
                "still",
                "moving",
                *(["off-target change", "PSNR vs exact (dB)"] if off else []),
                "mean abs ΔI",
                "moving pixels",
                "mean abs ΔO",
                "UNet calls / frames",
                "skipped",
                "calls per video s",
                "ms/frame",
            ],
            rows,
        )
    )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="model folder (default: the shipped default)")
    parser.add_argument(
        "--weights-status",
        choices=("untrained-placeholder", "trained"),
        default="untrained-placeholder",
        help="say which in the results (the shipped default holds placeholders until training lands)",
    )
    parser.add_argument("--media", type=Path, default=MEDIA, help="folder of the clips")
    parser.add_argument("--clips", nargs="+", default=DEFAULT_CLIPS)
    parser.add_argument("--frames", type=int, default=24, help="frames per clip")
    parser.add_argument("--stride", type=int, default=1, help="use every n-th frame of the clip")
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="onnxruntime")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "int8"),
        default="auto",
        help="ONNX Runtime graphs: auto (what the service runs: int8 where the model has ranges), fp32 or int8",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 suits a shared machine)")
    parser.add_argument("--prompt", default=EditParams().prompt)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    machine = machine_info()
    command = command_line()
    spec = EngineSpec(weights=args.weights, backend=args.backend, threads=args.threads, precision=args.precision)
    editor = load_editor(spec)
    from engines.model import DEFAULT_MODEL_DIR, folder_fingerprint

    fingerprint = folder_fingerprint(args.weights or DEFAULT_MODEL_DIR)
    context = editor.encode_prompt(args.prompt)
    base = default_params(editor.config)  # the model's own operating point (s_T, s_I)
    runs: list[dict[str, Any]] = []
    edit = exact_edit(args.prompt)
    exact: dict[str, float] = {}
    exact_regions: dict[str, tuple[float, float]] = {}
    for clip in args.clips:
        frames, fps = load_frames(args.media / clip, args.frames, args.stride, editor.resolution)
        video_s = len(frames) * args.stride / fps
        targets = None if edit is None else apply_edit(edit, frames)
        camera_change = mean_step_change(frames)
        moving = moving_pixels(frames)
        if targets is not None:
            exact[clip] = flicker(frames, targets)
            exact_regions[clip] = region_flicker(frames, targets, moving)
        settings = {
            name: base.model_copy(update={"prompt": args.prompt, **switches}) for name, switches in MECHANISMS.items()
        }
        for name, run in run_clip(editor, frames, settings, context).items():
            outputs, calls, skipped, seconds = run.outputs, run.calls, run.skipped, run.seconds
            still, motion = region_flicker(frames, outputs, moving)
            runs.append(
                {
                    "clip": clip,
                    "mechanism": name,
                    "frames": len(frames),
                    "fps": fps,
                    "flicker": flicker(frames, outputs),
                    "still_flicker": still,
                    "moving_flicker": motion,
                    "moving_share": float(moving.mean()),
                    "off_target_change": None
                    if targets is None
                    else off_target_change(outputs, targets, camera_change),
                    "psnr_exact": None
                    if targets is None
                    else float(np.mean([psnr(o, t) for o, t in zip(outputs, targets, strict=True)])),
                    "input_step_change": camera_change,
                    "output_step_change": mean_step_change(outputs),
                    "unet_calls": calls,
                    "skipped": skipped,
                    "seconds": seconds,
                    "unet_calls_per_video_s": calls / video_s,
                    "unet_calls_per_wall_s": calls / seconds,
                }
            )
            print(
                f"{clip:16s} {name:20s} flicker {runs[-1]['flicker']:.4g}  UNet {calls}/{len(frames)}  "
                f"{1000 * seconds / len(frames):.0f} ms/frame",
                flush=True,
            )
    summary = {}
    for name in MECHANISMS:
        mine = [r for r in runs if r["mechanism"] == name]
        calls, frames_n = sum(r["unet_calls"] for r in mine), sum(r["frames"] for r in mine)
        seconds = sum(r["seconds"] for r in mine)
        summary[name] = {
            "flicker_mean": statistics.mean(r["flicker"] for r in mine),
            "still_flicker_mean": statistics.mean(r["still_flicker"] for r in mine),
            "moving_flicker_mean": statistics.mean(r["moving_flicker"] for r in mine),
            "off_target_mean": None if edit is None else statistics.mean(r["off_target_change"] for r in mine),
            "psnr_exact_mean": None if edit is None else statistics.mean(r["psnr_exact"] for r in mine),
            "unet_calls": calls,
            "frames": frames_n,
            "unet_calls_per_video_s": statistics.mean(r["unet_calls_per_video_s"] for r in mine),
            "unet_calls_per_wall_s": calls / seconds,
            "ms_per_frame": 1000 * seconds / frames_n,
        }
    machine["loadavg_at_end"] = list(os.getloadavg())
    data = {
        "weights_status": args.weights_status,
        "weights": str(args.weights or DEFAULT_MODEL_DIR),
        "fingerprint": fingerprint,
        "clips": args.clips,
        "attribution": ATTRIBUTION,
        "frames": args.frames,
        "stride": args.stride,
        "resolution": editor.resolution,
        "backend": args.backend,
        "precision": args.precision,
        "prompt": args.prompt,
        "text_guidance": base.text_guidance,
        "image_guidance": base.image_guidance,
        "seed": EditParams().seed,
        "mechanisms": MECHANISMS,
        "summary": summary,
        "runs": runs,
        "exact_edit": None if edit is None else {"edit": edit.name, "flicker": exact, "regions": exact_regions},
    }
    md, js = write_results(
        "temporal_cpu",
        "Temporal reuse benchmark (CPU)",
        report(machine, command, data),
        {"machine": machine, "command": command, **data},
    )
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
