"""int8 against fp32 ONNX Runtime graphs of the shipped default: each graph and the whole frame, side by side.

Run from the repository root:  .venv/bin/python bench/bench_int8.py
Writes bench/results/int8_cpu_<date>.md and .json. Times are medians of round-robin repetitions (fp32 and int8
alternate), for 1 and 2 engine threads and batches of 1 and 2 frames. int8 speed depends on the CPU's integer
dot-product instructions, so the report names those the machine has. The quality side is
training/report/int8.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import (
    command_line,
    interleaved,
    machine_info,
    machine_markdown,
    mark_end,
    median_ms,
    table,
    write_results,
)

from engines.backends.onnxruntime_backend import OnnxRuntimeBackend
from engines.editor import Editor, EditRequest
from engines.export import GRAPH_NAMES, example_inputs
from engines.model import DEFAULT_MODEL_DIR, EditorModel
from engines.params import EditParams
from engines.temporal import StreamState
from engines.text import CachedPromptEncoder

PRECISIONS = ("fp32", "int8")
# The x86 instructions ONNX Runtime's int8 kernels use where present (MLAS picks the best at run time).
INT8_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def int8_isa() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(flags.split(":", 1)[1].split())
    return [f for f in INT8_ISA if f in have]


def measure(model: EditorModel, cache: Path, threads: int, batch: int, reps: int) -> dict[str, dict[str, float]]:
    """Median ms of each graph and of Editor.edit, per precision, at this thread count and batch size."""
    resolution = model.config.resolution
    backends = {
        p: OnnxRuntimeBackend(model, resolution, cache, threads=threads, precision=p)  # type: ignore[arg-type]
        for p in PRECISIONS
    }
    inputs = example_inputs(model, resolution, batch)
    calls: dict[str, dict[str, Callable[[], object]]] = {}
    for p, b in backends.items():
        calls[p] = {
            "encoder": lambda b=b: b.encode(*inputs["encoder"]),
            "unet": lambda b=b: b.denoise(*inputs["unet"]),
            "decoder": lambda b=b: b.decode(*inputs["decoder"]),
        }
    prompts = CachedPromptEncoder(model.prompt_encoder)
    params = EditParams()
    context = prompts(params.prompt)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8) for _ in range(batch)]
    for p, b in backends.items():
        editor = Editor(b, model.config, model.schedule, prompts)
        states = [StreamState(i) for i in range(batch)]
        calls[p]["frame"] = lambda e=editor, s=states: e.edit(
            [EditRequest(f, context, params, st) for f, st in zip(frames, s, strict=True)]
        )
    out: dict[str, dict[str, float]] = {}
    for part in (*GRAPH_NAMES, "frame"):
        times = interleaved({p: calls[p][part] for p in PRECISIONS}, reps, warmup=2)
        out[part] = {p: median_ms(t) for p, t in times.items()}
        ratio = out[part]["int8"] / out[part]["fp32"]
        print(
            f"threads {threads} batch {batch} {part:8s} fp32 {out[part]['fp32']:6.1f} ms  "
            f"int8 {out[part]['int8']:6.1f} ms  ratio {ratio:.2f}",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    machine = machine_info()
    machine["int8_isa"] = int8_isa()
    command = command_line()
    model = EditorModel.from_pretrained(DEFAULT_MODEL_DIR)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as cache:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                parts = measure(model, Path(cache), threads, batch, args.reps)
                results.append({"threads": threads, "batch": batch, "ms": parts})
    mark_end(machine, started)
    rows = [
        [
            str(r["threads"]),
            str(r["batch"]),
            part,
            f"{ms['fp32']:.1f}",
            f"{ms['int8']:.1f}",
            f"**{ms['int8'] / ms['fp32']:.2f}**",
        ]
        for r in results
        for part, ms in r["ms"].items()
    ]
    markdown = "\n".join(
        [
            machine_markdown(machine, command),
            f"- int8 instructions this CPU has: {', '.join(machine['int8_isa']) or 'none found'}",
            "",
            f"The shipped default ({DEFAULT_MODEL_DIR.name}, fingerprint {model.fingerprint}) at "
            f"{model.config.resolution}², ONNX Runtime's CPU provider, fp32 graphs against the int8 graphs built "
            "from the model's calibrated ranges (engines/quantize.py; quality: training/report/int8.md). "
            "*frame* is the whole Editor.edit (encode, one UNet pass, decode, conversions).",
            "",
            table(["engine threads", "batch", "part", "fp32 ms", "int8 ms", "int8 / fp32"], rows),
        ]
    )
    md, js = write_results(
        "int8_cpu",
        "int8 against fp32 graphs (CPU)",
        markdown,
        {"machine": machine, "command": command, "fingerprint": model.fingerprint, "results": results},
    )
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
