"""Training throughput of the three real-data UNet recipes at SD1.5 size: samples/s and peak memory of each, at
256² and 512², run through the recipes themselves (data loader, DDP-ready loop, EMA, logging) on random weights
and synthetic triplets made where it runs. Weights do not change speed; nothing is downloaded.

On a CUDA machine, from the repository root (one call, about 6 minutes on an H100-class GPU):
    python bench/bench_recipe_throughput.py --device cuda
Rehearsal on a CPU (tiny UNet, 64², a few steps: checks the script, not a figure):
    .venv/bin/python bench/bench_recipe_throughput.py --device cpu --model tiny --sides 64 --batch 2 --steps 4 \\
        --warmup 1 --precision no
Writes bench/results/recipe_throughput_<device>_<date>.md and .json. Samples/s comes from the recipes' own loss
log (`elapsed_s` at each step), over the steps after `--warmup`; checkpoint writes fall outside that span.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import command_line, machine_info, machine_markdown, table
from diffusers import AutoencoderTiny, UNet2DConditionModel

from engines.config import SD_LATENT_SCALING, EditorConfig
from engines.unet import add_guidance_embedding, convert_to_mobile_pix2pix, sd15_pix2pix_config
from training.adversarial_distill import AdversarialDistillConfig
from training.adversarial_distill import train as train_adversarial
from training.guidance_distill import GuidanceDistillConfig
from training.guidance_distill import train as train_guidance
from training.loop import read_loss_log
from training.teacher import TeacherConfig
from training.teacher import train as train_teacher

RESULTS = Path(__file__).resolve().parent / "results"
GUIDANCE_DIM = 256  # per scale, as training/configs/ip2p_guidance_distill.yaml
TINY_UNET: dict[str, Any] = {
    "block_out_channels": (16, 16, 32, 32),
    "attention_head_dim": 4,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "layers_per_block": 1,
}
SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def write_model(folder: Path, unet: UNet2DConditionModel, taesd: AutoencoderTiny, guidance_dim: int | None) -> Path:
    """A model folder as training/convert_ip2p.py writes one (CLIP aside: the recipes here read hash contexts)."""
    EditorConfig(
        resolution=512,
        prompt_encoder="minilm",
        max_prompt_tokens=77,
        guidance_embedding_dim=guidance_dim,
        image_latent_scale=1 / SD_LATENT_SCALING,
    ).save(folder)
    unet.save_pretrained(str(folder / "unet"))
    taesd.save_pretrained(str(folder / "taesd"))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return folder


def write_models(work: Path, model: str) -> tuple[Path, Path, int]:
    """Random 3-pass and guidance-distilled Mobile-Pix2Pix folders, and the UNet's context width."""
    torch.manual_seed(0)
    config = sd15_pix2pix_config() if model == "sd15" else sd15_pix2pix_config(**TINY_UNET)
    unet, _ = convert_to_mobile_pix2pix(UNet2DConditionModel(**config))
    taesd = (
        AutoencoderTiny()
        if model == "sd15"
        else AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
    )
    plain = write_model(work / "plain", unet, taesd, None)
    distilled = write_model(work / "distilled", add_guidance_embedding(unet, GUIDANCE_DIM), taesd, GUIDANCE_DIM)
    return plain, distilled, int(config["cross_attention_dim"])


def write_triplets(folder: Path, side: int, rows: int = 64, shards: int = 4) -> Path:
    """Smooth random images and their negatives as InstructPix2Pix-shaped parquet shards."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    data: dict[str, list[Any]] = {"original_image": [], "edit_prompt": [], "edited_image": []}
    for i in range(rows):
        coarse = torch.from_numpy(rng.random((1, 3, 8, 8))).float()
        image = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic").clamp(0, 1)[0]
        pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
        data["original_image"].append(Image.fromarray(pixels))
        data["edit_prompt"].append(f"invert the colours {i % 7}")
        data["edited_image"].append(Image.fromarray(255 - pixels))
    dataset = datasets.Dataset.from_dict(data)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        dataset.shard(shards, k, contiguous=True).to_parquet(str(folder / f"train-{k:05d}.parquet"))
    return folder


def samples_per_second(output_dir: Path, batch: int, warmup: int) -> float:
    log = read_loss_log(output_dir)
    measured = log[warmup:]
    span = measured[-1]["elapsed_s"] - log[warmup - 1]["elapsed_s"] if warmup else measured[-1]["elapsed_s"]
    return batch * len(measured) / span


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(args.work or tempfile.mkdtemp(prefix="recipe-throughput-"))
    plain, distilled, dim = write_models(work, args.model)
    prompts = {"encoder": "hash", "hash_dim": dim, "tokens": 77 if args.model == "sd15" else 8}
    rows = []
    for side in args.sides:
        triplets = write_triplets(work / f"triplets-{side}", side)
        for recipe in args.recipes:
            out = work / f"{recipe}-{side}"
            common: dict[str, Any] = {
                "output_dir": str(out),
                "steps": args.steps,
                "batch_size": args.batch,
                "warmup_steps": 1,
                "log_every": 1,
                "checkpoint_every": 10**6,
                "keep_checkpoints": 1,
                "ema_decay": 0.999,
                "device": args.device,
                "mixed_precision": args.precision,
                "gradient_checkpointing": args.checkpointing,
                "prompts": prompts,
                "resolution": side,
                "data": {"photos": ["astronaut"], "clips": [], "val_clips": [], "crop_size": side},
                "triplets": {"path": str(triplets), "workers": args.workers, "shuffle_buffer": 16, "min_crop": 1.0},
            }
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if recipe == "teacher":
                train_teacher(TeacherConfig.model_validate({**common, "init_from": plain, "autoencoder": plain}))
            elif recipe == "guidance_distill":
                config = {**common, "teacher": plain, "guidance_embedding_dim": GUIDANCE_DIM}
                train_guidance(GuidanceDistillConfig.model_validate(config))
            else:
                config = {**common, "student_init": distilled, "target_steps": args.target_steps, "disc_hidden": 64}
                train_adversarial(AdversarialDistillConfig.model_validate(config))
            rate = samples_per_second(out, args.batch, args.warmup)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
            rows.append({"recipe": recipe, "side": side, "samples_per_s": rate, "peak_gib": peak})
            print(f"{recipe} {side}²: {rate:.2f} samples/s" + (f", peak {peak:.1f} GiB" if peak else ""), flush=True)
            shutil.rmtree(out)  # checkpoints of an SD1.5-size run are many GiB
    return rows


def gib(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--recipes", nargs="+", default=["teacher", "guidance_distill", "adversarial_distill"])
    parser.add_argument("--batch", type=int, default=8, help="samples per step (one process)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the rate")
    parser.add_argument("--precision", choices=["bf16", "no"], default="bf16")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--target-steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be between 1 and --steps - 1")
    rows = run(args)
    stamp = f"{args.device}_{args.model}_{date.today()}"
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"command": command_line(), "machine": info, "settings": settings, "rows": rows}
    (args.out / f"recipe_throughput_{stamp}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    lines = [
        f"# Recipe training throughput ({args.model}, {args.device}, {date.today()})",
        "",
        machine_markdown(info, command_line()),
        "",
        f"Batch {args.batch}, {args.steps} steps of which the first {args.warmup} are left out,",
        f"mixed precision {args.precision}, gradient checkpointing {args.checkpointing}, random weights, synthetic",
        "parquet triplets. One process: multiply by the GPUs for data parallelism's upper bound.",
        "",
        table(
            ["recipe", "side", "samples/s", "peak GiB"],
            [[r["recipe"], f"{r['side']}²", f"{r['samples_per_s']:.2f}", gib(r["peak_gib"])] for r in rows],
        ),
    ]
    (args.out / f"recipe_throughput_{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / f'recipe_throughput_{stamp}.md'}")


if __name__ == "__main__":
    main()
