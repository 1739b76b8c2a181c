"""Decoder layouts through ONNX Runtime: what a frame skip, a removed block or a narrower decoder costs.

Run from the repository root:  .venv/bin/python bench/bench_decoder_layout.py [--threads 2] [--reps 200]
Each layout is a TAESD decoder with random weights (time does not depend on them) exported as the editor exports it
(CodecDecoder, with the frames input where it has a frame skip) and run one 256² frame per call, all layouts
interleaved in a fresh order each round; the ratios are against the v4 layout (16 wide, blocks (3, 3, 3, 1), no
skip). Writes bench/results/decoder_layout_cpu_<date>.md and .json. The choice it informed: v8's layout (1×1 skip,
one 128² block removed; training/README.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from benchlib import command_line, interleaved, machine_info, machine_markdown, mark_end, median_ms, publish, table
from diffusers import AutoencoderTiny

from engines.autoencoder import CodecDecoder, FrameSkip, TinyCodec
from engines.export import FRAMES_INPUT, ONNX_OPSET

RESOLUTION = 256
LATENT = RESOLUTION // 8
# name: (decoder width, blocks per level, frame skip kernel or None)
LAYOUTS: dict[str, tuple[int, tuple[int, ...], int | None]] = {
    "v4: 16 wide, (3, 3, 3, 1), no skip": (16, (3, 3, 3, 1), None),
    "v7: 3×3 skip": (16, (3, 3, 3, 1), 3),
    "1×1 skip": (16, (3, 3, 3, 1), 1),
    "3×3 skip, (3, 3, 2, 1)": (16, (3, 3, 2, 1), 3),
    "v8: 1×1 skip, (3, 3, 2, 1)": (16, (3, 3, 2, 1), 1),
    "v9: 1×1 skip, (3, 3, 1, 1)": (16, (3, 3, 1, 1), 1),
    "1×1 skip, (3, 3, 2, 0)": (16, (3, 3, 2, 0), 1),
    "1×1 skip, 14 wide": (14, (3, 3, 3, 1), 1),
    "1×1 skip, 12 wide": (12, (3, 3, 3, 1), 1),
}


def export_layout(width: int, blocks: tuple[int, ...], kernel: int | None, path: Path) -> list[str]:
    """Export one layout's decoder to `path`; returns its input names."""
    generator = torch.Generator().manual_seed(0)
    taesd = AutoencoderTiny(
        encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(width,) * 4, num_decoder_blocks=blocks
    ).eval()
    skip = None
    if kernel is not None:
        skip = FrameSkip(feature_channels=width, kernel_size=kernel)
        with torch.no_grad():  # a zero skip could be folded away; a trained one is not zero
            skip.proj.weight.copy_(torch.randn(skip.proj.weight.shape, generator=generator) * 0.1)
    names = ["latents", *([FRAMES_INPUT] if skip is not None else [])]
    inputs = (torch.randn(1, 4, LATENT, LATENT, generator=generator),)
    if skip is not None:
        inputs += (torch.rand(1, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1,)
    torch.onnx.export(
        CodecDecoder(TinyCodec(taesd, skip)).eval(),
        inputs,
        str(path),
        input_names=names,
        opset_version=ONNX_OPSET,
        dynamo=False,
    )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--reps", type=int, default=200, help="calls per layout")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    machine = machine_info()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = args.threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the backend runs it
    rng = np.random.default_rng(0)
    feed = {
        "latents": rng.standard_normal((1, 4, LATENT, LATENT), dtype=np.float32),
        FRAMES_INPUT: rng.uniform(-1, 1, (1, 3, RESOLUTION, RESOLUTION)).astype(np.float32),
    }
    calls = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, (width, blocks, kernel)) in enumerate(LAYOUTS.items()):
            path = Path(scratch) / f"{index}.onnx"
            names = export_layout(width, blocks, kernel, path)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            own = {k: feed[k] for k in names}
            calls[name] = lambda session=session, own=own: session.run(None, own)
        times = interleaved(calls, args.reps, warmup=3)
    mark_end(machine, started)
    ms = {name: median_ms(samples) for name, samples in times.items()}
    base = ms[next(iter(LAYOUTS))]
    rows = [[name, f"{ms[name]:.2f}", f"**{ms[name] / base:.3f}**"] for name in LAYOUTS]
    parts = [
        machine_markdown(machine, command_line()),
        f"TAESD decoders with random weights, one {RESOLUTION}² frame a call through ONNX Runtime "
        f"(ORT_ENABLE_ALL, {args.threads} threads, no spinning, as `engines/backends/onnxruntime_backend.py`), "
        f"{args.reps} calls each, interleaved in a fresh order each round; median ms.\n",
        table(["layout", "ms", "vs v4's layout"], rows),
    ]
    data: dict[str, Any] = {"machine": machine, "layouts": {k: list(map(str, v)) for k, v in LAYOUTS.items()}}
    data |= {"ms": ms, "samples_s": times, "threads": args.threads, "reps": args.reps}
    return publish("decoder_layout_cpu", "", "Decoder layouts: frame skip, removed blocks, width (CPU)", parts, data)


if __name__ == "__main__":
    raise SystemExit(main())
