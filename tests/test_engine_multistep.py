"""A stock (not distilled) InstructPix2Pix served with its own multi-step 3-pass CFG sampler, against diffusers.

The model is a tiny random one saved by diffusers' own StableDiffusionInstructPix2PixPipeline.save_pretrained,
with InstructPix2Pix's EulerAncestralDiscreteScheduler; the reference is that pipeline, loaded back from the same
folder. Stated tolerance: edited frames within 2 uint8 levels of the pipeline's. Both run the same float32 ops
in other orders (images scaled as x/127.5 - 1 vs 2·(x/255) - 1, image latents scaled by 0.18215 and back,
the three CFG terms summed in another order), so latents differ by float rounding only (measured: under 1e-5
of the latents' scale), and rounding to uint8 can turn that into 1 level where a pixel sits on a half level.
Guidance is s_T = 7.5, s_I = 1.5: below s_T = 1 or s_I = 1 the pipeline drops guidance altogether, the service keeps it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from engines.config import DEFAULT_CFG_STEPS, DEFAULT_MODEL_DIR, EditorConfig
from engines.editor import Editor, EditRequest, frames_to_tensor
from engines.loader import EngineSpec, load_editor
from engines.model import EditorModel, ModelFolderError
from engines.params import EditParams
from engines.sampling import teacher_sample
from engines.temporal import StreamState
from tests.conftest import free_port
from tests.test_engine_loading import (
    TINY_IMAGE,
    make_tiny_pix2pix_folder,
    make_tiny_student_folder,
    random_frames,
)

REPO = Path(__file__).resolve().parents[1]
#: Frames served vs diffusers' pipeline, in uint8 levels (see the module docstring).
PIXEL_TOLERANCE = 2
PROMPT, TEXT_GUIDANCE, IMAGE_GUIDANCE, SEED = "make it a sketch", 7.5, 1.5, 11

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_stock_ip2p_folder(root: Path) -> Path:
    """Tiny random parts (UNet with 8 input channels, AutoencoderKL, CLIP text encoder, hand-written tokenizer)
    put together and saved by StableDiffusionInstructPix2PixPipeline, with InstructPix2Pix's Euler ancestral
    scheduler; its scheduler_config.json is then cut to the keys older diffusers wrote, so that the scheduler
    class must fill in its own defaults (a spacing of 'linspace', not DDPM's 'leading')."""
    parts = make_tiny_pix2pix_folder(root / "parts", autoencoder="vae", seed=3)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=AutoencoderKL.from_pretrained(parts / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(parts / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(parts / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(parts / "unet"),
        scheduler=EulerAncestralDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon"
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = root / "ip2p"
    pipe.save_pretrained(folder)
    scheduler_json = folder / "scheduler" / "scheduler_config.json"
    kept = ("_class_name", "beta_end", "beta_schedule", "beta_start", "num_train_timesteps", "prediction_type")
    config = json.loads(scheduler_json.read_text())
    scheduler_json.write_text(json.dumps({k: config[k] for k in kept}))
    return folder


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stock_ip2p_folder(tmp_path_factory.mktemp("stock"))


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return random_frames(1, seed=21)[0]


def pipeline_frame(folder: Path, frame: np.ndarray, steps: int, seed: int = SEED) -> np.ndarray:
    """diffusers' own InstructPix2Pix edit of `frame`, loaded from the folder, as a uint8 frame."""
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPT,
        image=Image.fromarray(frame),
        num_inference_steps=steps,
        guidance_scale=TEXT_GUIDANCE,
        image_guidance_scale=IMAGE_GUIDANCE,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    return (images[0] * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil


def edit(editor: Editor, frame: np.ndarray, params: EditParams, state: StreamState | None = None) -> np.ndarray:
    state = state or StreamState(params.seed)
    [result] = editor.edit([EditRequest(frame, editor.encode_prompt(params.prompt), params, state)])
    return result.frame


def edit_params(**changes: object) -> EditParams:
    # The still hold is off: these tests edit one frame again and again to see what the sampler draws, and the hold
    # would send the first output back for a camera that never moves.
    base = {
        "prompt": PROMPT,
        "text_guidance": TEXT_GUIDANCE,
        "image_guidance": IMAGE_GUIDANCE,
        "seed": SEED,
        "hold_still": False,
    }
    return EditParams.model_validate({**base, **changes})


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def torch_editor(stock_folder: Path) -> Editor:
    return load_editor(EngineSpec(weights=stock_folder, backend="torch", resolution=TINY_IMAGE, threads=1))


def test_steps_default_to_one_for_a_student_and_20_for_cfg_and_are_bounded(tmp_path: Path) -> None:
    assert EditorConfig().steps == DEFAULT_CFG_STEPS == 20
    assert EditorConfig(guidance_embedding_dim=8).steps == 1
    assert EditorConfig(guidance_embedding_dim=8, steps=4).steps == 4
    for bad in (0, 101):
        with pytest.raises(ValueError, match="steps"):
            EditorConfig(steps=bad)
    # an editor.json from before `steps` (as v4's was) gets the default its kind implies, and keeps it when saved
    older = json.loads((DEFAULT_MODEL_DIR / "editor.json").read_text())
    older.pop("steps", None)
    (tmp_path / "editor.json").write_text(json.dumps(older))
    assert EditorConfig.load(tmp_path).steps == 1
    EditorConfig.load(tmp_path).save(tmp_path / "saved")
    assert EditorConfig.load(tmp_path / "saved").steps == 1
    assert EditorConfig.load(DEFAULT_MODEL_DIR).steps == 1


def test_a_stock_folder_runs_20_steps_of_3_pass_cfg_with_its_own_scheduler(torch_editor: Editor) -> None:
    assert torch_editor.config.steps == 20 and not torch_editor.config.distilled
    assert torch_editor.schedule.sampler_class == "EulerAncestralDiscreteScheduler"
    assert torch_editor.rows_per_frame == 60
    assert torch_editor.describe() == (
        "20-step 3-pass CFG sampler (EulerAncestralDiscreteScheduler), 60 UNet rows per frame"
    )


def test_served_frames_equal_the_diffusers_pipeline(
    torch_editor: Editor, stock_folder: Path, frame: np.ndarray
) -> None:
    """The default 20 Euler ancestral steps: start noise and every step's noise come from the session's seed."""
    expected = pipeline_frame(stock_folder, frame, steps=20)
    rows = torch_editor.unet_rows
    ours = edit(torch_editor, frame, edit_params())
    assert torch_editor.unet_rows - rows == 60
    assert max_level_difference(ours, expected) <= PIXEL_TOLERANCE
    # The comparison can fail: another seed is another edit.
    assert max_level_difference(ours, pipeline_frame(stock_folder, frame, steps=20, seed=SEED + 1)) > 10


def test_steps_override_matches_the_pipeline_at_that_many_steps(stock_folder: Path, frame: np.ndarray) -> None:
    editor = load_editor(EngineSpec(weights=stock_folder, backend="torch", resolution=TINY_IMAGE, threads=1, steps=3))
    assert editor.describe().startswith("3-step 3-pass CFG") and editor.rows_per_frame == 9
    ours = edit(editor, frame, edit_params())
    assert max_level_difference(ours, pipeline_frame(stock_folder, frame, steps=3)) <= PIXEL_TOLERANCE


def test_fixed_noise_repeats_the_edit_and_fresh_noise_does_not(torch_editor: Editor, frame: np.ndarray) -> None:
    state = StreamState(SEED)
    first, again = edit(torch_editor, frame, edit_params(), state), edit(torch_editor, frame, edit_params(), state)
    assert np.array_equal(first, again), "fixed noise pins every draw of the sampler to the seed"
    fresh = StreamState(SEED)
    a = edit(torch_editor, frame, edit_params(fixed_noise=False), fresh)
    b = edit(torch_editor, frame, edit_params(fixed_noise=False), fresh)
    assert not np.array_equal(a, b)
    # a new stream with the same seed repeats the same fresh draws
    replay = StreamState(SEED)
    assert np.array_equal(edit(torch_editor, frame, edit_params(fixed_noise=False), replay), a)


def test_latent_feedback_starts_from_the_previous_output(torch_editor: Editor, frame: np.ndarray) -> None:
    """As img2img: the weighted previous output, noised to the first timestep; off at 0, a change when on."""
    plain = edit(torch_editor, frame, edit_params())
    state = StreamState(SEED)
    edit(torch_editor, frame, edit_params(latent_feedback=0.9), state)  # the first frame has nothing to feed back
    fed = edit(torch_editor, frame, edit_params(latent_feedback=0.9), state)
    assert fed.shape == plain.shape and not np.array_equal(fed, plain)


def test_a_batch_of_streams_equals_each_stream_alone(torch_editor: Editor) -> None:
    """One lane a stream: a stream's draws do not depend on what else is in the batch (a batched UNet call
    sums in another order, hence 1 level; a shared generator would give another edit altogether)."""
    frames = random_frames(2, seed=8)
    params = [edit_params(seed=1), edit_params(seed=2, prompt="make it red", text_guidance=3.0)]
    states = [StreamState(p.seed) for p in params]
    requests = [
        EditRequest(f, torch_editor.encode_prompt(p.prompt), p, s)
        for f, p, s in zip(frames, params, states, strict=True)
    ]
    batched = [r.frame for r in torch_editor.edit(requests)]
    for f, p, b in zip(frames, params, batched, strict=True):
        assert max_level_difference(edit(torch_editor, f, p), b) <= 1


def test_onnxruntime_serves_the_stock_folder_like_torch(
    stock_folder: Path, torch_editor: Editor, frame: np.ndarray, tmp_path: Path
) -> None:
    """The UNet graph of a model without guidance embeddings takes no `guidance`, and is fed none."""
    editor = load_editor(
        EngineSpec(weights=stock_folder, backend="onnxruntime", resolution=TINY_IMAGE, threads=1, cache_dir=tmp_path)
    )
    unet_inputs = {i.name for i in editor.backend._sessions["unet"].get_inputs()}  # type: ignore[attr-defined]
    assert unet_inputs == {"sample", "timestep", "encoder_hidden_states"}
    ours = edit(editor, frame, edit_params())
    assert editor.unet_rows == 60
    assert max_level_difference(ours, edit(torch_editor, frame, edit_params())) <= 1
    assert max_level_difference(ours, pipeline_frame(stock_folder, frame, steps=20)) <= PIXEL_TOLERANCE


def test_a_scheduler_diffusers_does_not_have_is_a_model_folder_error(stock_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(stock_folder, folder)
    scheduler_json = folder / "scheduler" / "scheduler_config.json"
    scheduler_json.write_text(json.dumps({**json.loads(scheduler_json.read_text()), "_class_name": "MadeUpScheduler"}))
    with pytest.raises(ModelFolderError, match="'MadeUpScheduler' is not a diffusers scheduler"):
        EditorModel.from_pretrained(folder)


# ---------------------------------------------------------------- distilled models


def test_a_one_step_student_refuses_more_steps_and_keeps_one(tmp_path: Path) -> None:
    folder = make_tiny_student_folder(tmp_path / "student")
    with pytest.raises(ValueError, match="steps=4, but this model is a one-step distilled student"):
        EngineSpec(weights=folder, steps=4)
    editor = load_editor(EngineSpec(weights=folder, backend="torch", threads=1, steps=1))
    assert editor.one_step and editor.rows_per_frame == 1
    assert editor.describe() == "one-step distilled student, 1 UNet row per frame"


def test_a_guidance_distilled_model_runs_its_multi_step_sampler(tmp_path: Path) -> None:
    """editor.json steps > 1 on a distilled model: one guided pass a step with its scheduler (DDIM here),
    which is the teacher sampler of training (teacher_sample, guidance_distilled) for the same seed."""
    folder = make_tiny_student_folder(tmp_path / "gd", seed=2)
    config = json.loads((folder / "editor.json").read_text())
    (folder / "editor.json").write_text(json.dumps({**config, "steps": 4}))
    editor = load_editor(EngineSpec(weights=folder, backend="torch", threads=1))
    assert editor.describe() == "4-step guidance-distilled sampler (DDIMScheduler), 4 UNet rows per frame"
    assert isinstance(editor.schedule.make_sampler(4), DDIMScheduler)
    [image] = random_frames(1, seed=4)
    params = edit_params(seed=5)
    state = StreamState(params.seed)
    edit(editor, image, params, state)
    with torch.inference_mode():
        cond = editor.backend.encode(frames_to_tensor([image])) * editor.config.image_latent_scale
        expected = teacher_sample(
            editor.backend.model.unet,  # type: ignore[attr-defined]
            editor.schedule,
            cond,
            editor.encode_prompt(params.prompt)[None],
            editor.null_context[None],
            torch.tensor([params.text_guidance]),
            torch.tensor([params.image_guidance]),
            steps=4,
            generator=torch.Generator().manual_seed(params.seed),
            guidance_distilled=True,
        )
    assert state.last_output_latent is not None
    torch.testing.assert_close(state.last_output_latent[None], expected, rtol=1e-5, atol=1e-5)
    assert editor.unet_rows == 4
    # the override picks another number of steps for such a model
    assert load_editor(EngineSpec(weights=folder, backend="torch", threads=1, steps=2)).rows_per_frame == 2


# ---------------------------------------------------------------- the server


def test_serve_starts_on_a_stock_folder_and_logs_its_sampler(stock_folder: Path, tmp_path: Path) -> None:
    """`streamedit serve --weights <stock folder> --steps 3` on the default ONNX Runtime backend: ready (the engine
    loaded and made its warm-up edit), and the startup log names the multi-step path and its cost."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "streamedit.cli", "serve", "--port", str(port), "--weights", str(stock_folder)]
    command += ["--steps", "3", "--resolution", str(TINY_IMAGE), "--threads", "1", "--media-workers", "1"]
    command += ["--cache-dir", str(tmp_path / "cache")]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        finally:
            server.terminate()
            server.wait(30)
    text = log_path.read_text()
    assert "engine: 3-step 3-pass CFG sampler (EulerAncestralDiscreteScheduler), 9 UNet rows per frame" in text, text
    assert "engine failed to load" not in text


def test_serve_refuses_steps_a_model_cannot_take() -> None:
    for args, message in (
        (["--steps", "0"], "greater than or equal to 1"),
        (["--steps", "101"], "less than or equal to 100"),
        (["--steps", "4"], "one-step distilled student"),  # the shipped default
    ):
        result = subprocess.run(
            [sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=120, cwd=REPO
        )
        assert result.returncode == 2, (args, result.stderr)
        assert "invalid settings" in result.stderr and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
