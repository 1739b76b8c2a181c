"""Quick look at a running stage: its newest checkpoint's one-step edits scored on a few held-out frames."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny, UNet2DConditionModel

from engines.autoencoder import TinyCodec
from engines.model import EditorModel
from engines.unet import GuidedUNet, add_guidance_embedding
from training.checkpoint import checkpoint_paths
from training.config import TAESDSpec, load_config
from training.data import DataConfig, load_split, validation_frames
from training.edits import EDITS
from training.evaluate import apply_edit, one_step_method, psnr
from training.models import editor_config, load_editor_model, load_taesd, training_schedule
from training.prompts import LazyPromptEncoder, PromptSpec

STAGE_DIRS = ("autoencoder", "teacher", "guidance_distill", "adversarial_distill")


def _weights(checkpoint: dict, name: str) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    """The EMA weights of module `name` when the run keeps an EMA, else the raw ones."""
    modules = checkpoint["modules"]
    if "ema" in modules:
        return {k[len("shadow.") :]: v for k, v in modules["ema"].items() if k.startswith("shadow.")}
    return modules[name]


def model_from_checkpoint(
    stage: str, output_dir: Path, prompts: PromptSpec
) -> tuple[TinyCodec, EditorModel | None, int]:
    """The codec, the editor (None for the autoencoder stage) and the step of a stage's newest checkpoint."""
    paths = checkpoint_paths(output_dir)
    if not paths:
        raise FileNotFoundError(f"no checkpoint in {output_dir}")
    checkpoint = torch.load(paths[-1], map_location="cpu", weights_only=False)
    config = json.loads((output_dir / "config.json").read_text())
    schedule = training_schedule()
    if stage == "autoencoder":
        taesd = AutoencoderTiny(**TAESDSpec.model_validate(config["taesd"]).diffusers_kwargs())
        taesd.load_state_dict(_weights(checkpoint, "taesd"))
        return TinyCodec(taesd.eval()), None, checkpoint["step"]
    if stage == "teacher":
        from training.teacher import TeacherConfig

        teacher_config = load_config(TeacherConfig, output_dir / "config.json")
        taesd = load_taesd(teacher_config.autoencoder)
        unet = UNet2DConditionModel.from_config(teacher_config.unet.diffusers_config(prompts.dim))
        editor = editor_config(prompts, 256, None)
    else:
        init_key = "teacher" if stage == "guidance_distill" else "student_init"
        base = load_editor_model(Path(config[init_key]), prompts)
        taesd = base.codec.taesd
        unet = copy.deepcopy(base.unet.unet)
        dim = config.get("guidance_embedding_dim", base.config.guidance_embedding_dim)
        if stage == "guidance_distill":
            unet = add_guidance_embedding(unet, dim)
        editor = base.config.model_copy(update={"guidance_embedding_dim": dim, "resolution": 256})
    unet.load_state_dict(_weights(checkpoint, "unet"))
    model = EditorModel(
        editor,
        GuidedUNet(unet.eval(), editor.guidance_embedding_dim, editor.guidance_embedding_scale),
        TinyCodec(taesd.eval()),
        schedule,
        LazyPromptEncoder(prompts),
        "probe",
    )
    return model.codec, model, checkpoint["step"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=STAGE_DIRS)
    parser.add_argument("--root", type=Path, default=Path("artifacts/default"), help="folder of the stage dirs")
    parser.add_argument("--frames", type=int, default=4, help="held-out frames per edit")
    parser.add_argument("--text-guidance", type=float, default=1.0)
    parser.add_argument("--image-guidance", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trained-phrasing", action="store_true", help="prompt with a training phrasing instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = args.root / args.stage
    raw = json.loads((output_dir / "config.json").read_text())
    prompts = PromptSpec.model_validate(raw.get("prompts", {}))
    data = DataConfig.model_validate(raw.get("data", {}))
    codec, model, step = model_from_checkpoint(args.stage, output_dir, prompts)
    split = load_split(data)
    frames = [f for _, f in validation_frames(split, 256)]
    frames = [frames[i] for i in np.linspace(0, len(frames) - 1, args.frames).round().astype(int)]
    method = None if model is None else one_step_method(model, 0)
    print(f"{args.stage} at step {step}: PSNR dB on {len(frames)} held-out frames (s_T={args.text_guidance})")
    print(f"{'edit':16s} {'input':>7s} {'codec':>7s} {'1-step':>7s}")
    for edit in EDITS:
        targets = apply_edit(edit, frames)
        with torch.inference_mode():
            images = torch.from_numpy(np.stack(targets)).permute(0, 3, 1, 2).float() / 127.5 - 1
            recon = ((codec.decode(codec.encode(images)).clamp(-1, 1) + 1) * 127.5).round()
        recon_frames = list(recon.to(torch.uint8).permute(0, 2, 3, 1).numpy())
        base = np.mean([psnr(f, t) for f, t in zip(frames, targets, strict=True)])
        ceiling = np.mean([psnr(r, t) for r, t in zip(recon_frames, targets, strict=True)])
        line = f"{edit.name:16s} {base:7.2f} {ceiling:7.2f}"
        if method is not None:
            prompt = edit.phrasings[0] if args.trained_phrasing else edit.held_out[0]
            outputs = method.run(frames, prompt, args.text_guidance, args.image_guidance)
            line += f" {np.mean([psnr(o, t) for o, t in zip(outputs, targets, strict=True)]):7.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
