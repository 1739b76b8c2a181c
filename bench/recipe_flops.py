"""The work one training sample costs in each real-data recipe, counted (not timed) on an SD1.5-size
Mobile-Pix2Pix UNet: torch's FlopCounterMode over meta tensors, so no weights, GPU or minutes are needed.

    .venv/bin/python bench/recipe_flops.py > bench/results/recipe_flops.md

A training step of a UNet is its forward pass plus a backward pass of about twice the forward; gradient
checkpointing adds one more forward. Time follows only from a measured throughput: none is claimed here.
"""

from __future__ import annotations

import argparse
from datetime import date
from typing import Any

import torch
from diffusers import AutoencoderTiny, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from engines.unet import mobile_pix2pix_config, sd15_pix2pix_config
from training.discriminator import FrozenUNetEncoder

CLIP_TOKENS, CLIP_DIM = 77, 768


def guided_unet(config: dict[str, Any], guidance_dim: int | None) -> UNet2DConditionModel:
    if guidance_dim is not None:
        config = {**config, "time_cond_proj_dim": 2 * guidance_dim}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def forward_flops(module: torch.nn.Module, side: int, guidance_dim: int | None) -> float:
    """TFLOPs of one forward pass of one sample at `side`² pixels (latents side/8), on meta tensors."""
    with torch.device("meta"):
        latent = side // 8
        sample = torch.empty(1, 8, latent, latent)
        context = torch.empty(1, CLIP_TOKENS, CLIP_DIM)
        guidance = torch.empty(1, 2)
        with FlopCounterMode(display=False) as counter:
            if isinstance(module, UNet2DConditionModel):
                cond = None if guidance_dim is None else torch.empty(1, 2 * guidance_dim)
                module(sample, torch.tensor([500]), encoder_hidden_states=context, timestep_cond=cond)
            else:
                module(sample, torch.tensor([500]), context, guidance)
    return counter.get_total_flops() / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-steps", type=int, default=4, help="adversarial stage's sampled targets (4)")
    parser.add_argument("--guidance-dim", type=int, default=256, help="guidance embedding width per scale (256)")
    args = parser.parse_args()
    mobile = mobile_pix2pix_config(sd15_pix2pix_config())
    g = args.guidance_dim
    step = 4  # a trained pass: forward, backward (about 2 forwards), the checkpointed recomputation (1)
    rows: dict[str, tuple[str, list[float]]] = {
        "one UNet forward": ("the unit", []),
        "teacher": ("1 UNet step (with checkpointing)", []),
        "guidance_distill": ("3 frozen teacher passes + 1 student step", []),
        "adversarial_distill": (
            f"{args.target_steps} target passes + 1 student step + the frozen encoder on real and fake (no grad) "
            "and under the generator's loss (forward + backward)",
            [],
        ),
    }
    rows["TAESD encode (stock, 64 wide)"] = ("one image into latents", [])
    for side in (256, 512):
        with torch.device("meta"):
            taesd = AutoencoderTiny()
            with FlopCounterMode(display=False) as counter:
                taesd.encode(torch.empty(1, 3, side, side))
        rows["TAESD encode (stock, 64 wide)"][1].append(counter.get_total_flops() / 1e12)
        plain = forward_flops(guided_unet(mobile, None), side, None)
        guided = forward_flops(guided_unet(mobile, g), side, g)
        encoder = forward_flops(FrozenUNetEncoder(guided_unet(mobile, g), g, 1000.0), side, g)
        rows["one UNet forward"][1].append(plain)
        rows["teacher"][1].append(step * plain)
        rows["guidance_distill"][1].append(3 * plain + step * guided)
        rows["adversarial_distill"][1].append(args.target_steps * guided + step * guided + 2 * encoder + 3 * encoder)
    print(f"# Training FLOPs per sample: SD1.5-size Mobile-Pix2Pix UNet, CLIP context ({date.today()})\n")
    print("Counted by `.venv/bin/python bench/recipe_flops.py` (torch's FlopCounterMode on meta tensors; a")
    print("multiply-add is 2 FLOPs). A trained pass costs 4 forwards (backward ≈ 2, gradient checkpointing 1).")
    print("Each recipe also encodes 1-2 images a sample with TAESD (its row). No time is claimed: that needs a")
    print("measured run on the hardware.\n")
    print("| recipe | one sample's work | 256² TFLOP | 512² TFLOP |")
    print("|---|---|---|---|")
    for name, (what, values) in rows.items():
        print(f"| {name} | {what} | {values[0]:.3f} | {values[1]:.3f} |")


if __name__ == "__main__":
    main()
