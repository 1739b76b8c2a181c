"""Which part of the autoencoder limits the editor's ceiling: its width or its latent. A measurement, not a stage.

Each variant starts from the same autoencoder, widened so that it computes exactly what the start does (wider
blocks, more latent channels, or neither), trains encoder and decoder together with the autoencoder recipe's own
loss for the same steps, and has its round trip scored on the evaluation's held-out frames and their edits'
exact targets. The unchanged variant is the control: what the extra steps alone buy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny
from pydantic import BaseModel, ConfigDict, Field

from engines.autoencoder import TinyCodec
from training.autoencoder import AutoencoderConfig, autoencoder_loss, train_on_edited_crops
from training.config import recipe_main
from training.data import load_split, validation_frames
from training.edits import get_edits
from training.evaluate import apply_edit, autoencoder_round_trip, scores
from training.funnel import widen
from training.funnel_decoder import taesd_plan, widened_taesd
from training.models import load_taesd


class Variant(BaseModel):
    """One autoencoder shape to try: block width and latent channels (None: the start's)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    width: int | None = Field(None, ge=1, description="Channels of every encoder and decoder block.")
    latent_channels: int | None = Field(None, ge=1, description="Latent channels.")


class CapacityConfig(AutoencoderConfig):
    """The start, the variants, and the autoencoder recipe's own loss and data; `steps` is per variant."""

    init_from: Path = Field(..., description="The TAESD folder every variant starts from.")
    variants: list[Variant] = Field(..., min_length=1)
    widen_noise: float = Field(1e-2, ge=0, description="Std of new channels' writers when widening.")
    resolution: int = Field(256, ge=32, description="Side of the scored held-out frames.")


def widened_start(start: AutoencoderTiny, variant: Variant, noise: float, seed: int) -> AutoencoderTiny:
    """`start` widened to the variant's shape, computing exactly what `start` does."""
    width = variant.width or int(start.config.decoder_block_out_channels[0])
    wide = widened_taesd(start, width, encoder_width=width, latent_channels=variant.latent_channels)
    plan = taesd_plan(start, latent=variant.latent_channels is not None)
    return widen(start, wide, plan, noise, torch.Generator().manual_seed(seed))


def train_variant(config: CapacityConfig, variant: Variant) -> AutoencoderTiny:
    """Train (or resume) one variant under output_dir/<name>; returns its EMA (or itself)."""
    torch.manual_seed(config.seed)
    taesd = widened_start(load_taesd(config.init_from), variant, config.widen_noise, config.seed).train()

    def loss_of(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss, parts, _, _ = autoencoder_loss(config, taesd, images)
        return loss, {"mse": float(parts["mse"].detach())}

    return train_on_edited_crops(config, taesd, "taesd", variant.name, config.steps, config.seed, loss_of)


def measure(config: CapacityConfig) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant (and the untouched start): round-trip PSNR, SSIM and sharpness on frames and edit targets."""
    if config.threads:
        torch.set_num_threads(config.threads)
    names_frames = validation_frames(load_split(config.data), config.resolution)
    frames = [f for _, f in names_frames]
    splits = ["all"] * len(frames)
    sets = {"frames": frames, **{e.name: apply_edit(e, frames) for e in get_edits(config.edits)}}
    models = {"start (not trained further)": load_taesd(config.init_from).eval()}
    for variant in config.variants:
        models[variant.name] = train_variant(config, variant)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, taesd in models.items():
        results[name] = {}
        for set_name, targets in sets.items():
            s = scores(autoencoder_round_trip(TinyCodec(taesd), targets), targets, splits)
            results[name][set_name] = {k: float(s[k]) for k in ("psnr", "ssim", "sharpness")}  # type: ignore[arg-type]
    return results


def render(results: dict[str, dict[str, dict[str, float]]], config: CapacityConfig) -> str:
    sets = list(next(iter(results.values())))
    lines = [
        "# Autoencoder capacity: width or latent",
        "",
        f"Each variant: {config.steps} steps of the autoencoder recipe's loss from `{config.init_from}`, batch "
        f"{config.batch_size}, {config.data.crop_size}² crops. Scored on the evaluation's held-out frames at "
        f"{config.resolution}²: round-trip PSNR (dB) / SSIM / sharpness (output's mean luma gradient over the "
        "target's).",
        "",
        "| set | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for set_name in sets:
        cells = [
            f"{r[set_name]['psnr']:.2f} / {r[set_name]['ssim']:.3f} / {r[set_name]['sharpness']:.2f}"
            for r in results.values()
        ]
        lines.append(f"| {set_name} | " + " | ".join(cells) + " |")
    means = [f"{np.mean([v['psnr'] for v in r.values()]):.2f}" for r in results.values()]
    lines += ["| **mean PSNR** | " + " | ".join(means) + " |", ""]
    return "\n".join(lines)


def run(config: CapacityConfig) -> Path:
    """Measure every variant; write results.json and report.md into output_dir; returns the report."""
    results = measure(config)
    out = Path(config.output_dir)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report = out / "report.md"
    report.write_text(render(results, config))
    print(report.read_text())
    return report


def main(argv: list[str] | None = None) -> Path:
    return recipe_main(CapacityConfig, run, argv, __doc__ or "")


if __name__ == "__main__":
    main()
