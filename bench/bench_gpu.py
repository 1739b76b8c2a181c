"""GPU benchmark: frames per second of the editor, batched, per torch-backend variant, and against matmul peak.

Run from the repository root on a CUDA machine:  .venv/bin/python bench/bench_gpu.py --model sd15
Two models: `sd15`, the full SD1.5-size Mobile-Pix2Pix editor (fp16, stock TAESD, random weights: weights
do not change speed) at 512², and `default`, the shipped default editor at its 256². Each variant (eager,
cuda_graph, compile) runs every batch size in the same run. Writes bench/results/engine_gpu_<model>_<date>.md
and .json (`--tag` adds a suffix).
`--device cpu --model sd15 --resolution 64 --batches 1 2 --variants eager` smoke-tests the script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from benchlib import (
    RandomPromptEncoder,
    command_line,
    count_flops,
    machine_info,
    machine_markdown,
    publish,
    table,
)
from diffusers import AutoencoderTiny, UNet2DConditionModel

from engines.autoencoder import TinyCodec
from engines.backends.base import Backend
from engines.backends.torch_backend import TorchBackend
from engines.config import EditorConfig
from engines.editor import Editor, EditRequest
from engines.model import DEFAULT_MODEL_DIR, EditorModel
from engines.params import EditParams
from engines.sampling import NoiseSchedule
from engines.temporal import StreamState
from engines.text import CachedPromptEncoder, MiniLMPromptEncoder
from engines.unet import GuidedUNet, mobile_pix2pix_config, sd15_pix2pix_config

GUIDANCE_DIM = 64
VARIANTS = ("eager", "cuda_graph", "compile")
#: frames per second each session needs (the product's bar)
TARGET_FPS = 12.0


def build_sd15_model(resolution: int) -> EditorModel:
    """SD1.5-size Mobile-Pix2Pix with (s_T, s_I) embeddings, the stock TAESD and CLIP-shaped contexts; random."""
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
        prompt_encoder=RandomPromptEncoder(768, 77),
        fingerprint="bench-random",
    )


def load_default_model() -> EditorModel:
    """The shipped editor with its real weights; only MiniLM is stood in for (it runs when a prompt changes)."""
    config = EditorConfig.load(DEFAULT_MODEL_DIR)
    encoder = RandomPromptEncoder(MiniLMPromptEncoder.dim, config.max_prompt_tokens)
    return EditorModel.from_pretrained(DEFAULT_MODEL_DIR, prompt_encoder=encoder)


def frame_flops(backend: Backend, model: EditorModel, resolution: int) -> int:
    """FLOPs of one frame (TAESD encode, one UNet pass, TAESD decode), counted on an eager backend."""
    device = backend.device
    latent = resolution // 8
    images = torch.zeros(1, 3, resolution, resolution, device=device)
    noise = torch.zeros(1, 4, latent, latent, device=device)
    context = model.prompt_encoder.encode([""]).to(device)
    timestep, guidance = torch.full((1,), 999, device=device), torch.ones(1, 2, device=device)

    def frame() -> None:
        image_latent = backend.encode(images)
        backend.decode(
            backend.denoise(torch.cat([noise.to(image_latent.dtype), image_latent], 1), timestep, context, guidance),
            images,
        )

    return count_flops(frame)


def matmul_peak_tflops(device: torch.device, size: int, reps: int) -> float:
    """Measured bf16 matmul throughput on random data: the denominator of 'fraction of peak'."""
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
    """Frames per second when `batch` streams are edited together, one batched call per step.

    Each call is the worker's whole step: uint8 frames in from the host, edited uint8 frames back on it.
    """
    rng = np.random.default_rng(batch)
    pictures = [rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8) for _ in range(batch)]
    params = [EditParams(prompt=f"make it style {i}", seed=i) for i in range(batch)]
    contexts = [editor.encode_prompt(p.prompt) for p in params]
    states = [StreamState(p.seed) for p in params]
    requests = [EditRequest(f, c, p, s) for f, c, p, s in zip(pictures, contexts, params, states, strict=True)]
    for _ in range(3):
        editor.edit(requests)
    calls = max(5, frames // batch)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        editor.edit(requests)  # returns uint8 frames on the CPU: the GPU work is finished
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {
        "batch": batch,
        "ms_per_call": 1000 * seconds,
        "ms_per_call_p90": 1000 * float(np.percentile(times, 90)),
        "frames_per_s": batch / seconds,
        "calls": calls,
    }


def build_backend(model: EditorModel, device: torch.device, variant: str) -> Backend:
    return TorchBackend(model, device, compile=variant == "compile", cuda_graph=variant == "cuda_graph")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sd15", "default"), default="sd15")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, help="frame side (default: 512 for sd15, the model's own else)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--frames", type=int, default=64, help="frames timed per batch size (at least 5 calls)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["eager", "cuda_graph"])
    parser.add_argument("--tensorrt", action="store_true", help="also measure the TensorRT backend")
    parser.add_argument("--tag", default="", help="suffix of the result files' stem (a second run the same day)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: torch sees no CUDA device; nothing measured (use --device cpu for a smoke test)")
        return 1
    if device.type != "cuda" and args.variants != ["eager"]:
        parser.error("cuda_graph and compile need --device cuda")

    machine = machine_info()
    if device.type == "cuda":
        machine["device"] = torch.cuda.get_device_name(device)
        machine["cuda"] = torch.version.cuda
    else:
        machine["device"] = "cpu"
    command = command_line()

    def load() -> EditorModel:
        return build_sd15_model(args.resolution or 512) if args.model == "sd15" else load_default_model()

    resolution = args.resolution or (512 if args.model == "sd15" else EditorConfig.load(DEFAULT_MODEL_DIR).resolution)
    peak = matmul_peak_tflops(device, 8192 if device.type == "cuda" else 512, 20 if device.type == "cuda" else 2)
    flops = 0
    results: dict[str, list[dict[str, float]]] = {}
    names = list(args.variants) + (["tensorrt"] if args.tensorrt else [])
    for name in names:
        model = load()
        if name == "tensorrt":
            from engines.backends.tensorrt_backend import TensorRTBackend

            backend: Backend = TensorRTBackend(model, resolution, max_batch=max(args.batches))
        else:
            backend = build_backend(model, device, name)
            if name == "eager" and not flops:
                flops = frame_flops(backend, model, resolution)
        prompts = CachedPromptEncoder(model.prompt_encoder)
        editor = Editor(backend, model.config.model_copy(update={"resolution": resolution}), model.schedule, prompts)
        results[name] = []
        started = time.perf_counter()
        for batch in args.batches:
            row = throughput(editor, batch, args.frames, resolution)
            results[name].append(row)
            print(
                f"{name} batch {batch}: {row['frames_per_s']:.1f} frames/s, {row['ms_per_call']:.2f} ms per call",
                flush=True,
            )
        print(f"{name}: {time.perf_counter() - started:.0f} s including warm-up and compilation", flush=True)
        del editor, backend, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for rows in results.values():
        for row in rows:
            row["achieved_tflops"] = flops * row["frames_per_s"] / 1e12
            row["fraction_of_bf16_peak"] = row["achieved_tflops"] / peak
            row["sessions_at_12fps"] = row["frames_per_s"] // TARGET_FPS
    machine["loadavg_at_end"] = list(os.getloadavg())
    described = (
        "SD1.5-size Mobile-Pix2Pix with (s_T, s_I) embeddings + stock TAESD, random weights"
        if args.model == "sd15"
        else "The shipped default editor (its own UNet and 16-wide TAESD; MiniLM replaced by random one-token "
        "contexts, since it runs only when a prompt changes)"
    )
    parts = [
        machine_markdown(machine, command),
        f"Device: {machine['device']}. {described}, {resolution}², torch backend fp16 channels_last. "
        f"One frame = TAESD encode + one UNet pass + TAESD decode = {flops / 1e9:.2f} GFLOPs (FlopCounterMode). "
        f"Measured bf16 matmul peak: {peak:.1f} TFLOP/s. A call is the batching worker's step: uint8 frames "
        "from the host in, edited uint8 frames back; ms are medians (p90 beside). 'Sessions at 12 FPS' is "
        "frames/s ÷ 12: what the engine alone could feed, before video coding and networking.\n",
    ]
    for name, rows in results.items():
        parts.append(f"## {name}\n")
        parts.append(
            table(
                ["batch", "frames/s", "ms per call (p90)", "sessions at 12 FPS", "TFLOP/s", "of bf16 peak"],
                [
                    [
                        str(r["batch"]),
                        f"{r['frames_per_s']:.1f}",
                        f"{r['ms_per_call']:.2f} ({r['ms_per_call_p90']:.2f})",
                        f"{r['sessions_at_12fps']:.0f}",
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
    return publish(
        f"engine_gpu_{args.model}",
        args.tag,
        f"Engine benchmark (GPU): {args.model}",
        parts,
        {
            "machine": machine,
            "command": command,
            "model": args.model,
            "resolution": resolution,
            "frame_flops": flops,
            "bf16_peak_tflops": peak,
            "results": results,
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
