"""Every CPU runtime of the shipped default side by side: torch eager, ONNX Runtime fp32 and int8, OpenVINO fp32,
bf16 and int8; each graph and the whole frame, at batches 1 and 4, at 256² and 512².

Run from the repository root:  .venv/bin/python bench/bench_cpu_backends.py
Writes bench/results/cpu_backends_<date>.md and .json. Times are medians of round-robin repetitions (every
runtime once a round, in a fresh order), with the engine's default thread count. A runtime or precision this CPU
cannot run (bf16 without AMX or AVX-512 bf16; int8 whose weights would saturate here) is listed with the reason.
The report ends with OpenVINO's per-layer counters for the UNet at batch 1: where its time goes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
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

from engines.backends.base import Backend, BackendUnavailable
from engines.backends.onnxruntime_backend import OnnxRuntimeBackend
from engines.backends.openvino_backend import OpenVinoBackend
from engines.backends.torch_backend import TorchBackend
from engines.editor import Editor, EditRequest
from engines.export import GRAPH_NAMES, example_inputs
from engines.model import DEFAULT_MODEL_DIR, EditorModel
from engines.params import EditParams
from engines.quantize import QuantizationUnavailable
from engines.temporal import StreamState
from engines.text import CachedPromptEncoder

PARTS = (*GRAPH_NAMES, "frame")
RUNTIMES: dict[str, Callable[[EditorModel, int, Path], Backend]] = {
    "torch eager": lambda m, r, c: TorchBackend(m),
    "onnxruntime fp32": lambda m, r, c: OnnxRuntimeBackend(m, r, c),
    "onnxruntime int8": lambda m, r, c: OnnxRuntimeBackend(m, r, c, precision="int8"),
    "openvino fp32": lambda m, r, c: OpenVinoBackend(m, r, c),
    "openvino bf16": lambda m, r, c: OpenVinoBackend(m, r, c, precision="bf16"),
    "openvino int8": lambda m, r, c: OpenVinoBackend(m, r, c, precision="int8"),
}


def build(model: EditorModel, resolution: int, cache: Path) -> tuple[dict[str, Backend], dict[str, str]]:
    """Each runtime that runs here, and why each other one does not."""
    from engines.quantize import require_exact_int8, usable_record

    backends: dict[str, Backend] = {}
    missing: dict[str, str] = {}
    for name, make in RUNTIMES.items():
        try:
            if name.endswith("int8"):
                require_exact_int8(usable_record(model))
            backends[name] = make(model, resolution, cache)
        except (BackendUnavailable, QuantizationUnavailable) as exc:
            missing[name] = str(exc)
    return backends, missing


def measure(
    model: EditorModel, backends: dict[str, Backend], resolution: int, batch: int, reps: int
) -> dict[str, dict[str, float]]:
    """Median ms of each graph and of Editor.edit, per runtime, at this size and batch."""
    inputs = example_inputs(model, resolution, batch)
    prompts = CachedPromptEncoder(model.prompt_encoder)
    params = EditParams()
    context = prompts(params.prompt)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8) for _ in range(batch)]
    calls: dict[str, dict[str, Callable[[], object]]] = {}
    # The networks are convolutional (and attention over any token count): the same weights run at another size.
    config = model.config.model_copy(update={"resolution": resolution})
    for name, b in backends.items():
        editor = Editor(b, config, model.schedule, prompts)
        states = [StreamState(i) for i in range(batch)]
        calls[name] = {
            "encoder": lambda b=b: b.encode(*inputs["encoder"]),
            "unet": lambda b=b: b.denoise(*inputs["unet"]),
            "decoder": lambda b=b: b.decode(*inputs["decoder"]),
            "frame": lambda e=editor, s=states: e.edit(
                [EditRequest(f, context, params, st) for f, st in zip(frames, s, strict=True)]
            ),
        }
    out: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for part in PARTS:
            times = interleaved({n: calls[n][part] for n in backends}, reps, warmup=2)
            out[part] = {n: median_ms(t) for n, t in times.items()}
            print(
                f"{resolution}px batch {batch} {part:8s} " + "  ".join(f"{n} {ms:7.1f}" for n, ms in out[part].items()),
                flush=True,
            )
    return out


def unet_layer_profile(model: EditorModel, backend: OpenVinoBackend, resolution: int, runs: int = 10) -> list:
    """OpenVINO's per-layer counters for the UNet at batch 1, summed by layer type over `runs` inferences:
    (type, ms a run, share)."""
    import openvino as ov

    config = {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "bf16" if backend.precision == "bf16" else "f32"}
    compiled = ov.Core().compile_model(str(backend.graphs.path("unet")), "CPU", config)
    request = compiled.create_infer_request()
    names = {port.get_any_name() for port in compiled.inputs}
    args = example_inputs(model, resolution, 1)["unet"]
    feed = {
        n: a.numpy()
        for n, a in zip(("sample", "timestep", "encoder_hidden_states", "guidance"), args, strict=True)
        if n in names
    }
    by_type: dict[str, float] = defaultdict(float)
    for _ in range(runs):
        request.infer(feed)
        for info in request.profiling_info:
            by_type[f"{info.node_type} ({info.exec_type})"] += info.real_time.total_seconds() * 1000 / runs
    total = sum(by_type.values()) or 1.0
    return [(t, ms, ms / total) for t, ms in sorted(by_type.items(), key=lambda kv: -kv[1])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    machine = machine_info()
    command = command_line()
    model = EditorModel.from_pretrained(DEFAULT_MODEL_DIR)
    results: list[dict[str, Any]] = []
    missing: dict[str, str] = {}
    profile: list = []
    with tempfile.TemporaryDirectory() as cache:
        for resolution in args.resolutions:
            backends, missing = build(model, resolution, Path(cache))
            for batch in args.batches:
                parts = measure(model, backends, resolution, batch, args.reps)
                results.append({"resolution": resolution, "batch": batch, "ms": parts})
            if resolution == args.resolutions[0]:
                fastest = min(
                    (n for n in backends if n.startswith("openvino")),
                    key=lambda n: results[-len(args.batches)]["ms"]["unet"][n],
                )
                profile = unet_layer_profile(model, backends[fastest], resolution)  # type: ignore[arg-type]
                profiled = fastest
    mark_end(machine, started)
    names = list(RUNTIMES)
    rows = []
    for r in results:
        for part, ms in r["ms"].items():
            base = ms["onnxruntime fp32"]
            rows.append(
                [str(r["resolution"]), str(r["batch"]), part]
                + [f"{ms[n]:.1f} ({ms[n] / base:.2f})" if n in ms else "—" for n in names]
            )
    markdown = [
        machine_markdown(machine, command),
        f"The shipped default ({DEFAULT_MODEL_DIR.name}, fingerprint {model.fingerprint}), the engine's default "
        f"threads ({torch.get_num_threads()}), medians of {args.reps} round-robin repetitions; in brackets, the "
        "ratio to ONNX Runtime fp32 in the same row. *frame* is the whole Editor.edit (encode, one UNet pass, "
        "decode, conversions). int8 graphs are the model's calibrated QDQ graphs (engines/quantize.py), run by "
        "each runtime's int8 kernels.",
        "",
        table(["size", "batch", "part", *[f"{n} ms" for n in names]], rows),
        "",
    ]
    for name, why in missing.items():
        markdown.append(f"- {name}: not run here: {why}")
    markdown += [
        "",
        f"OpenVINO's per-layer counters, UNet at {args.resolutions[0]}², batch 1, {profiled}, by layer type:",
        "",
        table(
            ["layer type (kernel)", "ms a run", "share"], [[t, f"{ms:.2f}", f"{s:.0%}"] for t, ms, s in profile[:12]]
        ),
    ]
    md, js = write_results(
        "cpu_backends",
        "CPU runtimes side by side",
        "\n".join(markdown),
        {
            "machine": machine,
            "command": command,
            "fingerprint": model.fingerprint,
            "results": results,
            "not_run": missing,
            "unet_profile": {"runtime": profiled, "by_type": profile},
        },
    )
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
