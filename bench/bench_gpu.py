"""GPU benchmark: the full SD1.5-size Mobile-Pix2Pix editor (fp16, TAESD) per frame, batched, and against matmul peak.

Run from the repository root on a CUDA machine:  .venv/bin/python bench/bench_gpu.py
Writes bench/results/engine_gpu_<date>.md and .json. Random weights: weights do not change speed.
`--device cpu --resolution 64 --batches 1 2` is a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from benchlib import command_line, count_flops, machine_info, machine_markdown, table, write_results
from diffusers import AutoencoderTiny, UNet2DConditionModel

from engines.autoencoder import TinyCodec
from engines.backends.base import Backend
from engines.backends.torch_backend import TorchBackend
from engines.config import EditorConfig
from engines.editor import Editor, EditRequest
from engines.model import EditorModel
from engines.params import EditParams
from engines.sampling import NoiseSchedule
from engines.temporal import StreamState
from engines.text import CachedPromptEncoder, PromptEncoder
from engines.unet import GuidedUNet, mobile_pix2pix_config, sd15_pix2pix_config

GUIDANCE_DIM = 64


class RandomPromptEncoder(PromptEncoder):
    """CLIP-shaped contexts (77 x 768) from a seeded generator: speed does not depend on what the prompt says."""

    dim, tokens = 768, 77

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack(
            [torch.randn(self.tokens, self.dim, generator=torch.Generator().manual_seed(len(p))) for p in prompts]
        )


def build_model(resolution: int) -> EditorModel:
    """SD1.5-size Mobile-Pix2Pix with (s_T, s_I) embeddings and the stock TAESD, random weights."""
    config = EditorConfig(
        resolution=resolution, prompt_encoder="clip", max_prompt_tokens=77, guidance_embedding_dim=GUIDANCE_DIM
    )
    unet_config = {**mobile_pix2pix_config(sd15_pix2pix_config()), "time_cond_proj_dim": 2 * GUIDANCE_DIM}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        taesd = AutoencoderTiny()
    unet, taesd = unet.to_empty(device="cpu"), taesd.to_empty(device="cpu")
    with torch.no_grad():
        for module in (unet, taesd):
            for name, param in module.named_parameters():
                param.fill_(1.0) if param.ndim == 1 and "norm" in name else param.normal_(0.0, 0.02)
    return EditorModel(
        config=config,
        unet=GuidedUNet(unet.eval(), GUIDANCE_DIM, config.guidance_embedding_scale),
        codec=TinyCodec(taesd.eval()),
        schedule=NoiseSchedule.default(),
        prompt_encoder=RandomPromptEncoder(),
        fingerprint="bench-random",
    )


def frame_flops(resolution: int) -> int:
    """FLOPs of one frame (TAESD encode, one UNet pass, TAESD decode), counted on the meta device."""
    unet_config = {**mobile_pix2pix_config(sd15_pix2pix_config()), "time_cond_proj_dim": 2 * GUIDANCE_DIM}
    latent = resolution // 8
    with torch.device("meta"):
        unet = GuidedUNet(UNet2DConditionModel(**unet_config).eval(), GUIDANCE_DIM, 1000.0)
        codec = TinyCodec(AutoencoderTiny().eval())
        images = torch.empty(1, 3, resolution, resolution)
        noise = torch.empty(1, 4, latent, latent)
        timestep, context, guidance = torch.full((1,), 999), torch.empty(1, 77, 768), torch.ones(1, 2)

    def frame() -> None:
        image_latent = codec.encode(images)
        codec.decode(unet(torch.cat([noise, image_latent], 1), timestep, context, guidance))

    return count_flops(frame)


def matmul_peak_tflops(device: torch.device, size: int, reps: int) -> float:
    """Measured bf16 matmul throughput: the denominator of 'fraction of peak'."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - started) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(editor: Editor, batch: int, frames: int, resolution: int) -> dict[str, float]:
    """Frames per second when `batch` streams are edited together, one batched call per step."""
    rng = np.random.default_rng(batch)
    pictures = [rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8) for _ in range(batch)]
    params = [EditParams(prompt=f"make it style {i}", seed=i) for i in range(batch)]
    contexts = [editor.encode_prompt(p.prompt) for p in params]
    states = [StreamState(p.seed) for p in params]
    requests = [EditRequest(f, c, p, s) for f, c, p, s in zip(pictures, contexts, params, states, strict=True)]
    for _ in range(3):
        editor.edit(requests)
    calls = max(1, frames // batch)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        editor.edit(requests)  # returns uint8 frames on the CPU: the GPU work is finished
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {"batch": batch, "ms_per_call": 1000 * seconds, "frames_per_s": batch / seconds, "calls": calls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--frames", type=int, default=64, help="frames timed per batch size (at least one call)")
    parser.add_argument("--cuda-graph", action="store_true", help="torch backend with CUDA-graph capture")
    parser.add_argument("--compile", action="store_true", help="torch backend with torch.compile (max-autotune)")
    parser.add_argument("--tensorrt", action="store_true", help="also measure the TensorRT backend")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: torch sees no CUDA device; nothing measured (use --device cpu for a smoke test)")
        return 1

    machine = machine_info()
    machine["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    command = command_line()
    model = build_model(args.resolution)
    flops = frame_flops(args.resolution)
    peak = matmul_peak_tflops(device, 8192 if device.type == "cuda" else 512, 20 if device.type == "cuda" else 2)
    backends: dict[str, Backend] = {
        "torch": TorchBackend(model, device, compile=args.compile, cuda_graph=args.cuda_graph)
    }
    if args.tensorrt:
        from engines.backends.tensorrt_backend import TensorRTBackend

        backends["tensorrt"] = TensorRTBackend(model, args.resolution, max_batch=max(args.batches))
    results: dict[str, list[dict[str, float]]] = {}
    prompts = CachedPromptEncoder(model.prompt_encoder)
    for name, backend in backends.items():
        editor = Editor(backend, model.config, model.schedule, prompts)
        results[name] = []
        for batch in args.batches:
            row = throughput(editor, batch, args.frames, args.resolution)
            row["achieved_tflops"] = flops * row["frames_per_s"] / 1e12
            row["fraction_of_bf16_peak"] = row["achieved_tflops"] / peak
            results[name].append(row)
            print(
                f"{name} batch {batch}: {row['frames_per_s']:.1f} frames/s, {row['ms_per_call']:.1f} ms per call, "
                f"{row['fraction_of_bf16_peak']:.1%} of bf16 matmul peak",
                flush=True,
            )
    machine["loadavg_at_end"] = list(os.getloadavg())
    options = ", ".join(o for o, on in (("cuda_graph", args.cuda_graph), ("compile", args.compile)) if on) or "eager"
    parts = [
        machine_markdown(machine, command),
        f"Device: {machine['device']}. SD1.5-size Mobile-Pix2Pix with (s_T, s_I) embeddings + stock TAESD, "
        f"{args.resolution}², random weights, torch backend {backends['torch'].dtype} channels_last ({options}). "
        f"One frame = TAESD encode + one UNet pass + TAESD decode = {flops / 1e9:.0f} GFLOPs (FlopCounterMode). "
        f"Measured bf16 matmul peak: {peak:.1f} TFLOP/s.\n",
    ]
    for name, rows in results.items():
        parts.append(f"## {name}\n")
        parts.append(
            table(
                ["batch", "frames/s", "ms per call", "achieved TFLOP/s", "fraction of bf16 peak"],
                [
                    [
                        str(r["batch"]),
                        f"{r['frames_per_s']:.1f}",
                        f"{r['ms_per_call']:.1f}",
                        f"{r['achieved_tflops']:.2f}",
                        f"{r['fraction_of_bf16_peak']:.1%}",
                    ]
                    for r in rows
                ],
            )
            + "\n"
        )
    if device.type != "cuda":
        print("smoke test on the CPU: results not written")
        return 0
    md, js = write_results(
        "engine_gpu",
        "Engine benchmark (GPU)",
        "\n".join(parts),
        {
            "machine": machine,
            "command": command,
            "frame_flops": flops,
            "bf16_peak_tflops": peak,
            "options": options,
            "results": results,
        },
    )
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
