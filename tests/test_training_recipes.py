"""The four recipes on tiny configs: losses fall, runs survive a crash and resume exactly, outputs load in engines/."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image

import training.loop
from engines.backends.torch_backend import TorchBackend
from engines.editor import Editor, EditRequest
from engines.model import EditorModel, load_codec
from engines.params import EditParams
from engines.temporal import StreamState
from engines.text import CachedPromptEncoder
from training.adversarial_distill import AdversarialDistillConfig, build_step, logit_normal_timesteps
from training.adversarial_distill import train as train_adversarial
from training.autoencoder import AutoencoderConfig
from training.autoencoder import train as train_autoencoder
from training.batches import keep_first_token, mix_contexts
from training.checkpoint import checkpoint_paths
from training.config import UNetSpec, load_raw_config
from training.data import DEFAULT_MEDIA_DIR
from training.discriminator import DiscriminatorHeads, FrozenUNetEncoder, r1_penalty
from training.draws import row_weighted_mse, row_weights, sample_timesteps
from training.edits import EDITS as ALL_EDITS
from training.edits import get_edits
from training.evaluate import EvaluateConfig, evaluate, psnr, ssim, trained_unseen_clips
from training.guidance_distill import GuidanceDistillConfig
from training.guidance_distill import train as train_guidance
from training.loop import read_loss_log, unet_train_state
from training.model_card import main as model_card
from training.model_card import starts_from
from training.paraphrases import load_unseen_phrasings
from training.probe import main as probe
from training.prompts import HashPromptEncoder
from training.ship_default import ship
from training.stage_configs import STAGE_CONFIG_FILES, stage_configs
from training.teacher import TeacherConfig, conditioning_dropout
from training.teacher import train as train_teacher

C = TypeVar("C")

PROMPTS: dict[str, Any] = {"encoder": "hash", "hash_dim": 16, "tokens": 8}
EDITS = ["negative", "black_and_white"]
CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
TINY_UNET: dict[str, Any] = {"block_out_channels": [16, 32], "attention_head_dim": 2, "norm_num_groups": 8}


def tiny(output_dir: Path, steps: int, **fields: Any) -> dict[str, Any]:
    """Shared fields of every tiny config: 32² crops, batch 2, a loss line every step."""
    return {
        "output_dir": output_dir,
        "steps": steps,
        "batch_size": 2,
        "warmup_steps": 2,
        "log_every": 1,
        "checkpoint_every": steps // 2,
        "threads": 1,
        "ema_decay": 0.9,
        "save_dtype": "float32",
        "progress_interval": 60.0,
        "data": {
            "photos": ["astronaut"],
            "clips": ["asl_eat.mkv"],
            "max_frames_per_clip": 4,
            "val_photos": ["chelsea"],
            "val_clips": [],
            "val_tail": 0.25,
            "crop_size": 32,
        },
        **fields,
    }


def hash_encoder() -> HashPromptEncoder:
    return HashPromptEncoder(PROMPTS["hash_dim"], PROMPTS["tokens"])


class Crash(Exception):
    """Stands in for the process dying right after a checkpoint was written."""


@contextlib.contextmanager
def crash_after_checkpoint(at_step: int) -> Iterator[None]:
    real = training.loop.save_checkpoint

    def save_then_crash(output_dir: Path, state: Any, keep: int) -> Path:
        path = real(output_dir, state, keep)
        if state.step == at_step:
            raise Crash(f"crashed after the checkpoint at step {at_step}")
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.loop, "save_checkpoint", save_then_crash)
        yield


def interrupted_then_resumed(train: Callable[[C], Path], config: C, at_step: int) -> Path:
    """Run until a crash after the checkpoint at `at_step`, then run the same command again to the end."""
    with crash_after_checkpoint(at_step), pytest.raises(Crash):
        train(config)
    out = Path(config.output_dir)  # type: ignore[attr-defined]
    assert not (out / "final").exists(), "an interrupted run must not write a final model"
    assert [p.name for p in checkpoint_paths(out)][-1] == f"step-{at_step:08d}.pt"
    return train(config)


def assert_falls(output_dir: Path, key: str, factor: float = 0.8) -> None:
    values = [row[key] for row in read_loss_log(output_dir)]
    k = max(3, len(values) // 4)
    first, last = float(np.mean(values[:k])), float(np.mean(values[-k:]))
    assert last < factor * first, f"{key} did not fall: first {k} steps {first:.4g}, last {k} {last:.4g}"


def assert_log_is_contiguous(output_dir: Path, steps: int) -> None:
    assert [row["step"] for row in read_loss_log(output_dir)] == list(range(1, steps + 1))


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The whole pipeline at toy scale; every stage is interrupted halfway and resumed."""
    if not (DEFAULT_MEDIA_DIR / "asl_eat.mkv").is_file():
        pytest.skip(f"shared clips not found at {DEFAULT_MEDIA_DIR}")
    root = tmp_path_factory.mktemp("recipes")
    out: dict[str, Path] = {}
    ae = AutoencoderConfig.model_validate(tiny(root / "autoencoder", 40, lr=3e-3, taesd={"width": 8}))
    out["autoencoder"] = interrupted_then_resumed(train_autoencoder, ae, 20)
    teacher = TeacherConfig.model_validate(
        tiny(
            root / "teacher",
            40,
            lr=2e-3,
            autoencoder=root / "autoencoder",
            sentence_only_probability=0.3,
            unet=TINY_UNET,
            prompts=PROMPTS,
            edits=EDITS,
            resolution=64,
        )
    )
    out["teacher"] = interrupted_then_resumed(train_teacher, teacher, 20)
    gd = GuidanceDistillConfig.model_validate(
        tiny(
            root / "guidance_distill",
            30,
            lr=2e-3,
            teacher=root / "teacher",
            guidance_embedding_dim=8,
            anchor_probability=0.25,
            relative_text_scale_loss=True,
            sentence_only_probability=0.3,
            context_mix_probability=0.3,
            prompts=PROMPTS,
            edits=EDITS,
            resolution=64,
        )
    )
    out["guidance_distill"] = interrupted_then_resumed(train_guidance, gd, 15)
    ad = AdversarialDistillConfig.model_validate(
        tiny(
            root / "adversarial_distill",
            30,
            lr=2e-3,
            student_init=root / "guidance_distill",
            target_steps=2,
            disc_hidden=8,
            r1_every=2,
            anchor_probability=0.5,
            relative_text_scale_loss=True,
            sentence_only_probability=0.3,
            context_mix_probability=0.3,
            prompts=PROMPTS,
            edits=EDITS,
            resolution=64,
        )
    )
    out["adversarial_distill"] = interrupted_then_resumed(train_adversarial, ad, 15)
    return out


def test_autoencoder_learns_resumes_and_writes_a_loadable_taesd(stages: dict[str, Path]) -> None:
    final = stages["autoencoder"]
    assert_falls(final.parent, "l1")
    assert_log_is_contiguous(final.parent, 40)
    codec = load_codec(final, None, torch.float32)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = codec.encode(images)
    assert latents.shape == (1, 4, 4, 4)
    assert codec.decode(latents).shape == images.shape


def test_teacher_learns_resumes_and_loads_as_a_3_pass_editor(stages: dict[str, Path]) -> None:
    final = stages["teacher"]
    assert_falls(final.parent, "loss")
    assert_log_is_contiguous(final.parent, 40)
    model = EditorModel.from_pretrained(final, prompt_encoder=hash_encoder())
    assert not model.config.distilled
    assert model.schedule.prediction_type == "sample"
    assert model.schedule.scheduler_config["timestep_spacing"] == "trailing"
    assert model.schedule.scheduler_config["clip_sample"] is False
    assert model.unet.unet.config.cross_attention_dim == PROMPTS["hash_dim"]


def test_guidance_distill_learns_resumes_and_loads_as_a_one_pass_editor(stages: dict[str, Path]) -> None:
    final = stages["guidance_distill"]
    assert_falls(final.parent, "loss")
    assert_log_is_contiguous(final.parent, 30)
    model = EditorModel.from_pretrained(final, prompt_encoder=hash_encoder())
    assert model.config.distilled and model.config.guidance_embedding_dim == 8
    assert model.unet.unet.config.time_cond_proj_dim == 16


def test_guidance_distill_can_refresh_an_existing_student(stages: dict[str, Path], tmp_path: Path) -> None:
    def config(out: Path, **fields: Any) -> GuidanceDistillConfig:
        base = {"lr": 1e-9, "teacher": stages["teacher"], "guidance_embedding_dim": 8, "prompts": PROMPTS}
        return GuidanceDistillConfig.model_validate(
            tiny(out, 2, **(base | {"edits": EDITS, "resolution": 64} | fields))
        )

    refreshed = train_guidance(config(tmp_path / "refresh", student_init=stages["guidance_distill"]))
    before = EditorModel.from_pretrained(stages["guidance_distill"], prompt_encoder=hash_encoder()).unet.unet
    after = EditorModel.from_pretrained(refreshed, prompt_encoder=hash_encoder()).unet.unet
    # At a vanishing learning rate the student must still be the one it started from, embedding included.
    for key, value in before.state_dict().items():
        torch.testing.assert_close(after.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="has no guidance embedding"):
        train_guidance(config(tmp_path / "from_teacher", student_init=stages["teacher"]))
    with pytest.raises(ValueError, match="embeds each scale in 8 dims, this config in 4"):
        train_guidance(
            config(tmp_path / "wrong_dim", student_init=stages["guidance_distill"], guidance_embedding_dim=4)
        )


def _edit(editor: Editor, frame: np.ndarray, text_guidance: float) -> np.ndarray:
    params = EditParams(prompt="invert the colors", text_guidance=text_guidance, image_guidance=1.0)
    request = EditRequest(frame, editor.encode_prompt(params.prompt), params, StreamState(seed=1))
    return editor.edit([request])[0].frame


def test_adversarial_student_learns_resumes_and_runs_in_the_service_editor(stages: dict[str, Path]) -> None:
    final = stages["adversarial_distill"]
    assert_falls(final.parent, "mse")
    assert_log_is_contiguous(final.parent, 30)
    log = read_loss_log(final.parent)
    assert all(np.isfinite(row["d_loss"]) for row in log)
    assert any(row["r1"] > 0 for row in log), "the lazy R1 penalty never ran"
    model = EditorModel.from_pretrained(final, prompt_encoder=hash_encoder())
    assert model.config.distilled and model.config.resolution == 64
    editor = Editor(TorchBackend(model), model.config, model.schedule, CachedPromptEncoder(model.prompt_encoder))
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    weak, strong = _edit(editor, frame, 0.0), _edit(editor, frame, 3.0)
    assert weak.shape == frame.shape and weak.dtype == np.uint8
    assert not np.array_equal(weak, strong), "s_T has no effect on the one-step student"


def test_one_adversarial_step_on_its_own(stages: dict[str, Path], tmp_path: Path) -> None:
    config = AdversarialDistillConfig.model_validate(
        tiny(
            tmp_path / "step",
            4,
            student_init=stages["guidance_distill"],
            target_steps=2,
            disc_hidden=8,
            r1_every=2,
            anchor_probability=1.0,  # every row anchored: its target is the exact edit's latents
            prompts=PROMPTS,
            edits=EDITS,
            resolution=64,
        )
    )
    step, _ = build_step(config)
    rows = step.draw()
    assert bool(rows.anchored.all()) and torch.equal(rows.scales, torch.ones_like(rows.scales))
    with torch.no_grad():
        exact = step.taesd.encode(rows.targets).latents
    targets = step.distillation_targets(rows)
    expected = torch.where(rows.empty[:, None, None, None], rows.z_image, exact)
    assert torch.allclose(targets, expected, atol=1e-5)
    heads_before = [p.detach().clone() for p in step.heads.parameters()]
    student_before = [p.detach().clone() for p in step.student.unet.parameters()]
    with_r1, without_r1 = step(0), step(1)  # r1_every=2: the lazy penalty runs on even steps only
    assert with_r1["r1"] > 0 and without_r1["r1"] == 0
    assert list(with_r1) == ["mse", "g_adv", "d_loss", "d_real", "d_fake", "r1", "grad_norm"]
    assert all(np.isfinite(v) for v in (*with_r1.values(), *without_r1.values()))
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, step.heads.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(student_before, step.student.unet.parameters(), strict=True))
    assert all(p.grad is None for p in step.heads.parameters()), "the student's pass left gradients on the heads"


def test_gradient_checkpointing_changes_no_loss_and_bf16_stays_close(stages: dict[str, Path], tmp_path: Path) -> None:
    def run(name: str, **switches: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
        config = TeacherConfig.model_validate(
            tiny(tmp_path / name, 3, autoencoder=stages["autoencoder"], unet=TINY_UNET, prompts=PROMPTS, edits=EDITS)
            | switches
        )
        final = train_teacher(config)
        weights = EditorModel.from_pretrained(final, prompt_encoder=hash_encoder()).unet.unet.state_dict()
        return [row["loss"] for row in read_loss_log(tmp_path / name)], weights

    switched = TeacherConfig.model_validate(
        tiny(tmp_path / "x", 2, autoencoder=stages["autoencoder"], unet=TINY_UNET, gradient_checkpointing=True)
    )
    unet = UNet2DConditionModel.from_config(switched.unet.diffusers_config(PROMPTS["hash_dim"]))
    unet_train_state(switched, unet, np.random.default_rng(0))
    assert unet.is_gradient_checkpointing
    plain, plain_weights = run("plain")
    checkpointed, checkpointed_weights = run("checkpointed", gradient_checkpointing=True)
    # Recomputing activations in the backward pass gives the very same numbers on the CPU.
    assert checkpointed == plain
    assert all(torch.equal(v, checkpointed_weights[k]) for k, v in plain_weights.items())
    bf16, _ = run("bf16", mixed_precision="bf16")
    assert all(np.isfinite(bf16)) and bf16 != plain
    assert abs(bf16[0] - plain[0]) < 0.05 * plain[0], (bf16[0], plain[0])  # the same first batch, in bf16


def test_resumed_run_matches_an_uninterrupted_one_exactly(stages: dict[str, Path], tmp_path: Path) -> None:
    def config(out: Path) -> TeacherConfig:
        return TeacherConfig.model_validate(
            tiny(out, 6, autoencoder=stages["autoencoder"], unet=TINY_UNET, prompts=PROMPTS, edits=EDITS)
        )

    train_teacher(config(tmp_path / "straight"))
    interrupted_then_resumed(train_teacher, config(tmp_path / "resumed"), 3)
    a = torch.load(checkpoint_paths(tmp_path / "straight")[-1], weights_only=False)
    b = torch.load(checkpoint_paths(tmp_path / "resumed")[-1], weights_only=False)
    assert a["step"] == b["step"] == 6
    for name in ("unet", "ema"):
        for key, value in a["modules"][name].items():
            assert torch.equal(value, b["modules"][name][key]), f"{name}.{key} differs after resuming"
    assert [r["loss"] for r in read_loss_log(tmp_path / "straight")] == [
        r["loss"] for r in read_loss_log(tmp_path / "resumed")
    ]
    saved = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert saved["steps"] == 6


def test_conditioning_dropout_rates_are_disjoint_5_5_5() -> None:
    text, image = conditioning_dropout(np.random.default_rng(0), 200_000, 0.05, 0.05, 0.05)
    both = text & image
    assert abs(float(both.float().mean()) - 0.05) < 0.003
    assert abs(float((text & ~image).float().mean()) - 0.05) < 0.003
    assert abs(float((image & ~text).float().mean()) - 0.05) < 0.003
    t = sample_timesteps(np.random.default_rng(0), 100_000, 1000, 0.1)
    assert 0 <= int(t.min()) and int(t.max()) == 999
    assert abs(float((t == 999).float().mean()) - 0.1) < 0.005


def test_relative_text_scale_loss_weighs_exaggerated_rows_by_their_size() -> None:
    scales = torch.tensor([[0.0, 1.0], [1.0, 0.8], [2.0, 1.5]])
    torch.testing.assert_close(row_weights(scales, True), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(row_weights(scales, False), torch.ones(3))
    prediction, target = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    target[2] *= 2.0  # a doubled edit is twice as far away: four times the squared error, a quarter the weight
    torch.testing.assert_close(row_weighted_mse(prediction, target, torch.ones(3)), F.mse_loss(prediction, target))
    torch.testing.assert_close(row_weighted_mse(prediction, target, row_weights(scales, True)), torch.tensor(1.0))


def test_sentence_only_rows_keep_just_the_first_context_token() -> None:
    context = torch.randn(3, 5, 4)
    out = keep_first_token(context, torch.tensor([False, True, False]))
    torch.testing.assert_close(out[[0, 2]], context[[0, 2]])
    torch.testing.assert_close(out[1, 0], context[1, 0])
    assert (out[1, 1:] == 0).all()


def test_mixed_rows_blend_their_context_with_another_row() -> None:
    context = torch.randn(6, 1, 4)
    rows = torch.tensor([True, False, True, True, False, False])
    out = mix_contexts(context, rows, np.random.default_rng(0))
    torch.testing.assert_close(out[~rows], context[~rows])
    assert not torch.allclose(out[rows], context[rows])
    for i in rows.nonzero().flatten().tolist():
        # On the segment from the row to some row of the batch: out = w·c_i + (1 − w)·c_j, w in [0, 1].
        fits = []
        for j in range(len(context)):
            d = context[i] - context[j]
            w = float(((out[i] - context[j]) * d).sum() / (d * d).sum()) if d.abs().sum() > 0 else 1.0
            fits.append(0 <= w <= 1 and torch.allclose(w * context[i] + (1 - w) * context[j], out[i], atol=1e-6))
        assert any(fits), f"row {i} is not a blend of two rows"
    with pytest.raises(ValueError, match="a blend of prompts has no exact target"):
        TeacherConfig.model_validate(tiny(Path("unused"), 4, autoencoder=Path("unused"), context_mix_probability=0.1))


def test_logit_normal_renoising_favours_low_noise() -> None:
    t = logit_normal_timesteps(np.random.default_rng(0), 100_000, 1000, -1.0, 1.0)
    assert 0 <= int(t.min()) and int(t.max()) <= 999
    assert abs(float(t.float().median()) - 999 / (1 + np.e)) < 10  # sigmoid(-1) of the range


def test_discriminator_sees_the_unets_own_encoder_features_and_trains_only_its_heads() -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNetSpec(**TINY_UNET).diffusers_config(16))
    captured: list[torch.Tensor] = []
    unet.mid_block.register_forward_hook(lambda _m, _i, out: captured.append(out))
    sample, t, ctx = torch.randn(2, 8, 8, 8), torch.tensor([10, 900]), torch.randn(2, 4, 16)
    guidance = torch.tensor([[1.0, 1.0], [2.0, 1.5]])
    unet(sample, t, encoder_hidden_states=ctx)
    encoder = FrozenUNetEncoder(unet, None, 1000.0)
    features = encoder(sample, t, ctx, guidance)
    assert [f.shape[1] for f in features] == encoder.channels == [16, 32, 32]
    torch.testing.assert_close(features[-1], captured[0])
    heads = DiscriminatorHeads(encoder.channels, prompt_dim=16, hidden=8)
    real = [f.detach().requires_grad_(True) for f in features]
    logits = heads(real, t, guidance, ctx)
    assert logits.shape == (2, 3)
    penalty = r1_penalty(logits, real)
    assert float(penalty.detach()) > 0
    penalty.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())


def test_psnr_and_ssim_score_identity_best() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    noisy = np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    assert psnr(image, image) == 100.0 and abs(ssim(image, image) - 1.0) < 1e-9
    assert 20 < psnr(image, noisy) < 40
    assert ssim(image, 255 - image) < ssim(image, noisy) < 1.0


def test_a_models_unseen_clips_include_those_its_starting_models_read(tmp_path: Path) -> None:
    """A stage that held a clip out still started from a model that read it: the report must not call it unseen."""

    def stage(name: str, clips: list[str], val_clips: list[str], **starts: Path) -> Path:
        (tmp_path / name / "final" / "unet").mkdir(parents=True)
        (tmp_path / name / "final" / "unet" / "config.json").write_text("{}")
        ran = {"data": {"clips": clips, "val_clips": val_clips}, **{k: str(v) for k, v in starts.items()}}
        (tmp_path / name / "config.json").write_text(json.dumps(ran))
        return tmp_path / name

    both = ["asl_eat.mkv", "asl_bird.mkv"]
    first = stage("first", both, ["asl_bird.mkv"])
    later = stage("later", both, both, student=first)
    clean = stage("clean", both, both, student_init=tmp_path / "nowhere")
    config = EvaluateConfig(output_dir=tmp_path, student=later, unseen_clips=["asl_eat.mkv", "asl_bird.mkv"])
    found = trained_unseen_clips({"later": later, "clean": clean, "untrained": None}, config)
    assert found == {"later": ["asl_eat.mkv"], "clean": []}


def test_evaluation_report_covers_every_edit_and_stage(stages: dict[str, Path], tmp_path: Path) -> None:
    config = EvaluateConfig.model_validate(
        {
            "output_dir": tmp_path / "report",
            "student": stages["adversarial_distill"],
            "guidance_student": stages["guidance_distill"],
            "teacher": stages["teacher"],
            # The stages trained on asl_eat.mkv alone: calling it unseen must be flagged, asl_bird.mkv's tail is seen.
            "data": {**tiny(tmp_path, 2)["data"], "clips": ["asl_eat.mkv", "asl_bird.mkv"]},
            "unseen_clips": ["asl_eat.mkv"],
            "prompts": PROMPTS,
            "edits": EDITS,
            "resolution": 64,
            "guidance_student_steps": 2,
            "teacher_steps": 2,
            "sweep_text_guidance": [0.0, 1.0, 2.0],
            "sweep_image_guidance": [1.0, 2.0],
            "grid_tile": 32,
            "timing_repeats": 1,
            "threads": 1,
        }
    )
    report = evaluate(config)
    results = json.loads((report.parent / "results.json").read_text())
    assert set(results["per_edit"]) == set(EDITS)
    assert results["methods"] == [
        "one-step student",
        "guidance-distilled, 2 steps",
        "teacher, 2 steps x 3 passes",
    ]
    for row in results["per_edit"].values():
        for method in ("input", *results["methods"]):
            assert 0 < row[method]["psnr"] <= 100 and -1 <= row[method]["ssim"] <= 1
    assert results["timings"]["teacher, 2 steps x 3 passes"]["unet_calls"] == 2
    assert results["timings"]["one-step student"]["passes"] == 1
    for name in EDITS:
        assert len(results["sweep"]["strength_by_text_guidance"][name]) == 3
        with Image.open(report.parent / "grids" / f"{name}.png") as grid:
            assert grid.size == (4 * 32, config.grid_frames * 32)
    assert results["splits"] == [
        "unseen" if n == "chelsea" or n.startswith("asl_eat") else "seen" for n in results["frames"]
    ]
    assert set(results["splits"]) == {"unseen", "seen"}
    assert results["trained_unseen_clips"]["teacher"] == ["asl_eat.mkv"]
    unseen = load_unseen_phrasings()
    for name, row in results["per_edit"].items():
        for method in ("input", "autoencoder round trip", *results["methods"]):
            assert set(row[method]["by_split"]) == {"unseen", "seen"} and row[method]["sharpness"] > 0
        paraphrases = row["paraphrases"]
        assert list(paraphrases["psnr"]) == list(unseen.by_edit[name])
        assert paraphrases["worst"] <= paraphrases["mean"] <= paraphrases["best"]
        assert paraphrases["spread"] == pytest.approx(paraphrases["best"] - paraphrases["worst"])
    # The input's own round trip through a barely trained autoencoder: finite, below a perfect copy.
    assert 0 < results["autoencoder_input"]["psnr"] < 100
    text = report.read_text()
    for section in ("Acceptance checks", "Two splits", "Paraphrase spread", "The ceiling", "Targets of a sharper"):
        assert section in text
    assert "Not unseen for the teacher" in text and "negative" in text


@pytest.mark.parametrize("stage", ["autoencoder", "teacher", "guidance_distill", "adversarial_distill"])
def test_probe_scores_each_stages_newest_checkpoint(
    stage: str, stages: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    probe(["--root", str(stages["teacher"].parent.parent), "--frames", "1", stage])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{stage} at step ")
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[2:]}
    assert set(rows) == {e.name for e in ALL_EDITS}
    assert all(len(v) == (2 if stage == "autoencoder" else 3) for v in rows.values())


def test_model_card_reports_what_each_stage_really_ran(stages: dict[str, Path], tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("autoencoder", "teacher", "guidance_distill", "adversarial_distill"):
        (configs / f"default_{name}.yaml").write_text((CONFIGS / f"tiny_{name}.yaml").read_text())
    evaluate_config = configs / "default_evaluate.yaml"
    evaluate_config.write_text(f"output_dir: {tmp_path / 'report'}\nstudent: {stages['adversarial_distill'].parent}\n")
    card = model_card(["--config", str(evaluate_config)]).read_text()
    assert (stages["adversarial_distill"] / "MODEL_CARD.md").read_text() == card
    # Steps come from each stage's saved config.json (what ran), not from the yaml beside it (40 there).
    # Each stage's starting weights come from the same record.
    teacher, gd = stages["teacher"].parent, stages["guidance_distill"].parent
    assert "| teacher | training/configs/default_teacher.yaml | scratch | 40 × 2 |" in card
    assert f"| guidance_distill | training/configs/default_guidance_distill.yaml | {teacher} | 30 × 2 |" in card
    assert f"| adversarial_distill | training/configs/default_adversarial_distill.yaml | {gd} | 30 × 2 |" in card
    assert "hash stand-in of the tests, 8 tokens" in card
    # A stage taken from committed weights reports the run recorded beside them, not the yaml's schedule.
    committed_ae = tmp_path / "run" / "autoencoder" / "final"
    shutil.copytree(stages["autoencoder"].parent / "final", committed_ae)
    ran = json.loads((stages["autoencoder"].parent / "config.json").read_text())
    (committed_ae / "stage_config.json").write_text(json.dumps({**ran, "steps": 7, "batch_size": 3}))
    (tmp_path / "run" / "adversarial_distill").mkdir()
    shutil.copy(stages["adversarial_distill"].parent / "config.json", tmp_path / "run" / "adversarial_distill")
    evaluate_config.write_text(
        f"output_dir: {tmp_path / 'report'}\nstudent: {tmp_path / 'run' / 'adversarial_distill'}\n"
    )
    committed_card = model_card(["--config", str(evaluate_config)]).read_text()
    assert "| autoencoder | training/configs/default_autoencoder.yaml | scratch | 7 × 3 | earlier run" in committed_card
    assert "pixel_finetune" not in committed_card
    # A pixel-space fine-tune beside the stages gets its own row and a line under Architecture.
    pixel = tmp_path / "run" / "pixel_finetune"
    pixel.mkdir()
    ran = {"output_dir": str(pixel), "student": "artifacts/v5/student", "steps": 9, "batch_size": 4, "train_unet": True}
    (pixel / "config.json").write_text(json.dumps(ran))
    pixel_card = model_card(["--config", str(evaluate_config)]).read_text()
    pixel_row = (
        "| pixel_finetune (UNet, edit contexts) | training/configs/v6_pixel_finetune.yaml | artifacts/v5/student |"
    )
    assert f"{pixel_row} 9 × 4 |" in pixel_card
    assert (
        "fine-tuned in pixel space towards the exact edits (training/pixel_finetune.py: its UNet and edit" in pixel_card
    )
    assert "frame skip" not in pixel_card
    # A second one, that gave the decoder a frame skip, follows it with its own row and line.
    decoder = tmp_path / "run" / "pixel_decoder"
    decoder.mkdir()
    ran = {"output_dir": str(decoder), "student": "artifacts/v6/pixel_finetune/final", "steps": 5, "batch_size": 2}
    ran |= {"context_lr": 0.0, "decoder_lr": 1e-3, "frame_skip": True}
    (decoder / "config.json").write_text(json.dumps(ran))
    skip_card = model_card(["--config", str(evaluate_config)]).read_text()
    skip_row = "| pixel_decoder (decoder with a frame skip) | training/configs/v7_pixel_decoder.yaml | artifacts/v6/"
    assert f"{pixel_row} 9 × 4 |" in skip_card and skip_row in skip_card
    assert skip_card.index(pixel_row) < skip_card.index(skip_row)
    assert "its decoder with a frame skip)" in skip_card and "reads the camera frame" in skip_card
    assert "removed" not in skip_card
    # One that removed a decoder block says so in its row and its line.
    pruned = tmp_path / "run" / "pixel_pruned"
    pruned.mkdir()
    (pruned / "config.json").write_text(json.dumps({**ran, "output_dir": str(pruned), "drop_decoder_blocks": [13]}))
    pruned_card = model_card(["--config", str(evaluate_config)]).read_text()
    pruned_row = "| pixel_pruned (decoder with a frame skip, 1 residual block removed) | training/configs/v8_pixel"
    assert pruned_row in pruned_card and "Decoder layers [13] (residual blocks" in pruned_card
    # A further pruning stage on that one gets its own row and line; the frame skip is explained once.
    repruned = tmp_path / "run" / "pixel_repruned"
    repruned.mkdir()
    ran |= {"output_dir": str(repruned), "student": str(pruned / "final"), "drop_decoder_blocks": [12]}
    (repruned / "config.json").write_text(json.dumps(ran))
    repruned_card = model_card(["--config", str(evaluate_config)]).read_text()
    repruned_row = "| pixel_repruned (decoder with a frame skip, 1 residual block removed) | training/configs/v9_pixel_"
    assert pruned_row in repruned_card and repruned_row in repruned_card
    assert repruned_card.index(pruned_row) < repruned_card.index(repruned_row)
    assert "Decoder layers [13] (residual blocks" in repruned_card and "Decoder layers [12]" in repruned_card
    assert repruned_card.count("reads the camera frame") == 1
    shutil.rmtree(pixel)
    shutil.rmtree(decoder)
    shutil.rmtree(pruned)
    shutil.rmtree(repruned)
    # A stage that started from the shipped default descends from the stages shipped before it: those that ran on
    # another machine are described by their committed configs, and v7's, a dead end, is left out.
    for file in ("v5_funnel_decoder", "v6_pixel_finetune", "v7_pixel_decoder", "v8_pixel_pruned", "v9_pixel_repruned"):
        shutil.copy(CONFIGS / f"{file}.yaml", configs)
    steady = tmp_path / "run" / "pixel_steady"
    steady.mkdir()
    ran |= {"output_dir": str(steady), "student": "engines/default_model", "drop_decoder_blocks": []}
    (steady / "config.json").write_text(json.dumps(ran | {"steady_rows": 2, "steady_noise": 2.0}))
    steady_card = model_card(["--config", str(evaluate_config)]).read_text()
    earlier = "| earlier run (committed config) |"
    rows = [
        f"| funnel_decoder | training/configs/v5_funnel_decoder.yaml | training/weights/autoencoder | 800 wide + 4000 "
        f"funnelled × 16 {earlier}",
        f"| pixel_finetune (UNet, edit contexts) | training/configs/v6_pixel_finetune.yaml | artifacts/v5/student | "
        f"2500 × 16 {earlier}",
        f"| pixel_pruned (decoder with a frame skip, 1 residual block removed) | training/configs/v8_pixel_pruned.yaml"
        f" | artifacts/v6/pixel_finetune/final | 2000 × 16 {earlier}",
        f"| pixel_repruned (decoder with a frame skip, 1 residual block removed) | training/configs/v9_pixel_repruned"
        f".yaml | artifacts/v8/pixel_pruned/final | 2000 × 16 {earlier}",
        "| pixel_steady (decoder with a frame skip) | training/configs/v10_pixel_steady.yaml | engines/default_model "
        "| 5 × 2 | 0.00 |",
    ]
    assert all(row in steady_card for row in rows), steady_card
    assert [steady_card.index(row) for row in rows] == sorted(steady_card.index(row) for row in rows)
    assert "pixel_decoder" not in steady_card and "earlier run (committed config)" not in repruned_card
    assert "copies of 2 frames a batch under camera-like noise (up to 2 levels) whose outputs must agree" in steady_card
    shutil.rmtree(steady)
    assert "| negative | The photographic negative: every channel inverted. | make it a negative;" in card
    assert "Not evaluated yet" in card and "gain less than" not in card
    # Once evaluated, every edit below the 3 dB bar is listed among the limitations, and only those.
    row = {"input": {"psnr": 10.0}, "one-step student": {"psnr": 12.5}}
    results = {
        "methods": ["one-step student"],
        "per_edit": {"negative": row, "black_and_white": {**row, "one-step student": {"psnr": 14.0}}},
    }
    (tmp_path / "report" / "results.json").write_text(json.dumps(results))
    card = model_card(["--config", str(evaluate_config)]).read_text()
    assert "these edits gain less than 3 dB over the input: negative (+2.50 dB)." in card
    assert "black_and_white (" not in card


def test_stage_configs_fall_back_to_what_committed_weights_ran(tmp_path: Path) -> None:
    # A machine without the stages' run folders still knows what made the committed weights: the stage_config.json
    # they carry. A stage with no record anywhere shows its config file, and says it has no record.
    configs = tmp_path / "configs"
    configs.mkdir()
    for name, file in STAGE_CONFIG_FILES:
        (configs / file).write_text((CONFIGS / f"tiny_{name}.yaml").read_text())
    committed = tmp_path / "weights"
    (committed / "teacher").mkdir(parents=True)
    ran = load_raw_config(CONFIGS / "tiny_teacher.yaml") | {"steps": 7, "batch_size": 3}
    (committed / "teacher" / "stage_config.json").write_text(json.dumps(ran))
    dirs = {name: tmp_path / "absent" / name for name, _ in STAGE_CONFIG_FILES}
    found = stage_configs(dirs, configs, committed)
    assert (found.teacher.steps, found.teacher.batch_size) == (7, 3)
    assert found.recorded == {"teacher"}
    assert found.guidance_distill.steps == load_raw_config(CONFIGS / "tiny_guidance_distill.yaml")["steps"]
    assert stage_configs(dirs, configs).recorded == frozenset()


def test_model_card_names_both_the_student_and_the_teacher_of_a_refreshed_distillation() -> None:
    fresh = GuidanceDistillConfig.model_validate({"output_dir": "o", "steps": 1, "teacher": "t"})
    assert starts_from("guidance_distill", fresh) == "t"
    refreshed = fresh.model_copy(update={"student_init": Path("s")})
    assert starts_from("guidance_distill", refreshed) == "s (distilling t)"
    scratch = TeacherConfig.model_validate({"output_dir": "o", "steps": 1, "autoencoder": "a"})
    assert starts_from("teacher", scratch) == "scratch"


def test_ship_default_takes_the_ranges_and_edits_that_really_ran(stages: dict[str, Path], tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("teacher", "guidance_distill", "adversarial_distill"):
        (configs / f"default_{name}.yaml").write_text((CONFIGS / f"tiny_{name}.yaml").read_text())
    # The yamls say one range and edit list, the stage's config.json (what ran) another: what ships must follow
    # what ran, or a student trained with --set edits=... would offer presets for edits it never learnt.
    with (configs / "default_adversarial_distill.yaml").open("a") as f:
        f.write("text_guidance_range: [0.0, 9.0]\nedits: [sepia]\n")
    with (configs / "default_teacher.yaml").open("a") as f:
        f.write("edits: [sepia]\n")
    (configs / "default_evaluate.yaml").write_text(f"output_dir: {tmp_path / 'report'}\n")
    ran = json.loads((stages["adversarial_distill"].parent / "config.json").read_text())
    target = ship(stages["adversarial_distill"], tmp_path / "default_model", configs)
    editor = json.loads((target / "editor.json").read_text())
    assert editor["trained_text_guidance"] == ran["text_guidance_range"] != [0.0, 9.0]
    assert editor["trained_image_guidance"] == ran["image_guidance_range"]
    assert (editor["default_text_guidance"], editor["default_image_guidance"]) == (1.0, 1.0)
    presets = json.loads((target / "presets.json").read_text())
    assert [p["prompt"] for p in presets] == [e.phrasings[0] for e in get_edits(ran["edits"])]
    assert presets[0]["prompt"] != get_edits(["sepia"])[0].phrasings[0]
    model = EditorModel.from_pretrained(target, prompt_encoder=hash_encoder())
    assert model.config.distilled
