"""One-token cross-attention (engines.attention) against diffusers' attention on the shipped default's UNet pass.

The shipped default reads a one-token prompt context, so its cross-attention needs no softmax (MobileVD's
optimised cross-attention). This times the UNet pass at 256² both ways, through eager PyTorch and through
ONNX Runtime, round-robin in one run, and checks that the outputs agree. Run on an idle machine:

    .venv/bin/python bench/bench_cross_attention.py
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from benchlib import (
    count_flops,
    interleaved,
    machine_markdown,
    median_ms,
    table,
    thread_sweep_main,
)
from diffusers.models.attention_processor import AttnProcessor2_0

from engines.attention import OneTokenCrossAttnProcessor
from engines.backends.onnxruntime_backend import OnnxRuntimeBackend
from engines.backends.torch_backend import TorchBackend
from engines.model import DEFAULT_MODEL_DIR, EditorModel

VARIANTS = ("one-token", "softmax attention")


def models() -> dict[str, EditorModel]:
    """The shipped default as loaded (one-token processors) and a copy with diffusers' processors throughout."""
    shipped = EditorModel.from_pretrained(DEFAULT_MODEL_DIR)
    processors = {type(p) for p in shipped.unet.unet.attn_processors.values()}
    if OneTokenCrossAttnProcessor not in processors:
        raise SystemExit(f"{DEFAULT_MODEL_DIR} does not read a one-token context; nothing to compare")
    plain = copy.deepcopy(shipped)
    plain.unet.unet.set_attn_processor(AttnProcessor2_0())
    return dict(zip(VARIANTS, (shipped, plain), strict=True))


def run(reps: int, threads: int) -> dict[str, Any]:
    variants = models()
    shipped = variants[VARIANTS[0]]
    latent = shipped.config.resolution // 8
    generator = torch.Generator().manual_seed(0)
    args = (
        torch.randn(1, 8, latent, latent, generator=generator),
        torch.tensor([shipped.config.student_timestep]),
        shipped.prompt_encoder.encode(["make it a pencil sketch"]),
        torch.tensor([[1.0, 1.0]]),
    )
    with tempfile.TemporaryDirectory() as cache:
        backends: dict[str, TorchBackend | OnnxRuntimeBackend] = {}
        for name, model in variants.items():
            backends[f"torch, {name}"] = TorchBackend(model)
            # Each variant exports into its own cache: the cache is keyed by weights, which both share.
            backends[f"onnxruntime, {name}"] = OnnxRuntimeBackend(
                model, model.config.resolution, Path(cache) / name, threads=threads
            )
        outputs = {n: b.denoise(*args) for n, b in backends.items()}
        reference = outputs[f"torch, {VARIANTS[1]}"]
        max_diff = {n: float((o - reference).abs().amax()) for n, o in outputs.items()}
        flops = {n: count_flops(lambda m=m: TorchBackend(m).denoise(*args)) for n, m in variants.items()}
        times = interleaved({n: (lambda b=b: b.denoise(*args)) for n, b in backends.items()}, reps, warmup=3)
    ms = {n: median_ms(v) for n, v in times.items()}
    print(" | ".join(f"{n} {v:.2f} ms" for n, v in ms.items()), flush=True)
    return {
        "threads": threads,
        "resolution": shipped.config.resolution,
        "ms": ms,
        "flops": flops,
        "max_abs_diff": max_diff,
        "samples_s": times,
    }


def report(machine: dict[str, Any], command: str, runs: dict[int, dict[str, Any]]) -> str:
    rows = []
    for r in runs.values():
        for backend in ("torch", "onnxruntime"):
            one, full = (r["ms"][f"{backend}, {v}"] for v in VARIANTS)
            diff = max(r["max_abs_diff"][f"{backend}, {v}"] for v in VARIANTS)
            rows.append(
                [str(r["threads"]), backend, f"{full:.2f}", f"{one:.2f}", f"**{one / full:.3f}**", f"{diff:.1e}"]
            )
    first = next(iter(runs.values()))
    flops = first["flops"]
    return (
        machine_markdown(machine, command)
        + f"\nThe shipped default's UNet pass at {first['resolution']}² (batch 1, one-token prompt context), "
        f"median of round-robin repetitions; {flops[VARIANTS[1]] / 1e9:.3f} GFLOPs with softmax attention, "
        f"{flops[VARIANTS[0]] / 1e9:.3f} with the one-token processor (torch's count).\n\n"
        + table(
            ["threads", "backend", "softmax attention ms", "one-token ms", "one-token / softmax", "max |Δ| vs torch"],
            rows,
        )
        + "\n\nmax |Δ| is the largest difference of either variant's output from eager PyTorch with softmax "
        "attention: the processor is exact up to float rounding.\n"
    )


def main(argv: list[str] | None = None) -> int:
    title = "One-token cross-attention on the shipped default (CPU)"
    return thread_sweep_main(argv, __doc__ or "", ("cross_attention_cpu", title), run, report, 60)


if __name__ == "__main__":
    raise SystemExit(main())
