"""Loading, converting and conditioning the editor's model: parity with diffusers' own outputs on tiny checkpoints.

The tiny diffusers-format InstructPix2Pix folders built here (random weights, saved with diffusers' and
transformers' own `save_pretrained`) are also used by test_engine_onnx.py and test_engine_tensorrt.py.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DDPMScheduler,
    LatentConsistencyModelPipeline,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from engines.autoencoder import KLCodec, TinyCodec
from engines.config import SD_LATENT_SCALING, EditorConfig
from engines.editor import frames_to_tensor
from engines.guidance import combine_cfg, guidance_embedding, sinusoidal_embedding
from engines.model import EditorModel, ModelFolderError
from engines.sampling import NoiseSchedule, cfg_prediction, teacher_sample
from engines.unet import (
    GuidedUNet,
    add_guidance_embedding,
    convert_to_mobile_pix2pix,
    mobile_pix2pix_config,
    mobile_pix2pix_state_dict,
    sd15_pix2pix_config,
)

# ---------------------------------------------------------------- tiny diffusers-format checkpoints

SD15_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
TINY_TEXT_DIM = 32
TINY_IMAGE = 64  # pixels; latents are 8x8, the smallest a 4-level UNet divides evenly


def tiny_sd15_unet_config(**overrides: Any) -> dict[str, Any]:
    """InstructPix2Pix's UNet layout (SD1.5 block types, 8 input channels) at toy width."""
    config: dict[str, Any] = {
        "sample_size": 8,
        "in_channels": 8,
        "out_channels": 4,
        "block_out_channels": (16, 16, 32, 32),
        "down_block_types": SD15_DOWN,
        "up_block_types": SD15_UP,
        "layers_per_block": 1,
        "cross_attention_dim": TINY_TEXT_DIM,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    }
    config.update(overrides)
    return config


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-level BPE alphabet: one printable character per byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


# A handful of merges so common prompt words become single tokens, as in the real CLIP vocabulary.
TINY_MERGES = ["m a", "ma k", "mak e</w>", "i t</w>", "s k", "sk e", "ske t", "sket c", "sketc h</w>"]


def write_tiny_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json) written by hand, offline."""
    alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + "</w>" for c in alphabet), *(m.replace(" ", "") for m in TINY_MERGES)]:
        vocab[token] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True})
    )


def make_tiny_pix2pix_folder(
    root: Path,
    *,
    autoencoder: str = "taesd",
    unet_config: dict[str, Any] | None = None,
    editor_config: EditorConfig | None = None,
    seed: int = 0,
) -> Path:
    """A diffusers-format InstructPix2Pix folder with random weights: unet/, taesd/ or vae/ ("both", or "none"),
    text_encoder/, tokenizer/, scheduler/, and editor.json only when `editor_config` is given."""
    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    UNet2DConditionModel(**(unet_config or tiny_sd15_unet_config())).save_pretrained(root / "unet")
    if autoencoder in ("taesd", "both"):
        AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
            latent_channels=4,
        ).save_pretrained(root / "taesd")
    if autoencoder in ("vae", "both"):
        AutoencoderKL(
            block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=TINY_IMAGE,
            scaling_factor=SD_LATENT_SCALING,
        ).save_pretrained(root / "vae")
    write_tiny_tokenizer(root / "tokenizer")
    vocab_size = len(json.loads((root / "tokenizer" / "vocab.json").read_text()))
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    CLIPTextModel(text_config).save_pretrained(root / "text_encoder")
    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    ).save_pretrained(root / "scheduler")
    if editor_config is not None:
        editor_config.save(root)
    return root


def tiny_distilled_config(resolution: int = TINY_IMAGE, guidance_dim: int = 8) -> EditorConfig:
    """editor.json of a tiny one-step student: CLIP prompts, (s_T, s_I) embeddings, TAESD-space image latents."""
    return EditorConfig(
        resolution=resolution,
        prompt_encoder="clip",
        max_prompt_tokens=8,
        guidance_embedding_dim=guidance_dim,
        image_latent_scale=1.0,
    )


def make_tiny_student_folder(root: Path, seed: int = 0, guidance_dim: int = 8) -> Path:
    """A tiny distilled Mobile-Pix2Pix editor folder (guidance embeddings, TAESD, CLIP), like the shipped layout."""
    unet = mobile_pix2pix_config(tiny_sd15_unet_config(time_cond_proj_dim=2 * guidance_dim))
    return make_tiny_pix2pix_folder(
        root, unet_config=unet, editor_config=tiny_distilled_config(guidance_dim=guidance_dim), seed=seed
    )


def random_frames(count: int, size: int = TINY_IMAGE, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


# ---------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """HF_HUB_OFFLINE=1, and any socket connection during a test is recorded, refused and fails the test."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError(f"test tried to reach the network: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert not attempts, f"loading tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def ip2p_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain diffusers InstructPix2Pix folder (no editor.json) with both a TAESD and an AutoencoderKL."""
    return make_tiny_pix2pix_folder(tmp_path_factory.mktemp("ip2p"), autoencoder="both")


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain diffusers InstructPix2Pix folder with only vae/ (AutoencoderKL), as the real checkpoint ships."""
    return make_tiny_pix2pix_folder(tmp_path_factory.mktemp("ip2p_vae"), autoencoder="vae", seed=1)


# ---------------------------------------------------------------- loader parity with diffusers


def test_plain_instructpix2pix_folder_gets_its_conventions(ip2p_folder: Path) -> None:
    model = EditorModel.from_pretrained(ip2p_folder)
    assert model.config.prompt_encoder == "clip"
    assert model.config.max_prompt_tokens == 77
    assert model.config.guidance_embedding_dim is None and not model.config.distilled
    assert model.config.steps == 20  # InstructPix2Pix's own sampler, not one step
    assert model.schedule.sampler_class == "DDIMScheduler"  # the folder's scheduler_config.json names it
    assert model.config.image_latent_scale == pytest.approx(1 / SD_LATENT_SCALING)
    assert isinstance(model.codec, TinyCodec)  # taesd/ wins over vae/
    assert model.schedule.prediction_type == "epsilon"
    assert len(model.fingerprint) == 16


def test_unet_output_matches_diffusers(ip2p_folder: Path) -> None:
    model = EditorModel.from_pretrained(ip2p_folder)
    reference = UNet2DConditionModel.from_pretrained(ip2p_folder / "unet").eval()
    torch.manual_seed(1)
    sample = torch.randn(2, 8, 8, 8)
    timesteps = torch.tensor([999, 10])
    context = torch.randn(2, 77, TINY_TEXT_DIM)
    unused_guidance = torch.tensor([[7.5, 1.5], [2.0, 1.0]])
    with torch.inference_mode():
        ours = model.unet(sample, timesteps, context, unused_guidance)
        theirs = reference(sample, timesteps, encoder_hidden_states=context).sample
    assert ours.shape == (2, 4, 8, 8)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_distilled_unet_matches_diffusers_fed_lcm_guidance_embeddings(tmp_path: Path) -> None:
    """A folder whose UNet has time_cond_proj_dim: (s_T, s_I) must reach it as LCM-style embeddings, concatenated."""
    dim = 8
    folder = make_tiny_pix2pix_folder(tmp_path / "m", unet_config=tiny_sd15_unet_config(time_cond_proj_dim=2 * dim))
    model = EditorModel.from_pretrained(folder)
    assert model.config.guidance_embedding_dim == dim and model.config.steps == 1
    reference = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    torch.manual_seed(2)
    sample, context = torch.randn(2, 8, 8, 8), torch.randn(2, 77, TINY_TEXT_DIM)
    timesteps = torch.tensor([999, 999])
    guidance = torch.tensor([[7.5, 1.5], [2.0, 3.0]])
    lcm = LatentConsistencyModelPipeline.get_guidance_scale_embedding
    cond = torch.cat([lcm(None, guidance[:, 0], dim), lcm(None, guidance[:, 1], dim)], dim=1)  # type: ignore[arg-type]
    with torch.inference_mode():
        ours = model.unet(sample, timesteps, context, guidance)
        theirs = reference(sample, timesteps, encoder_hidden_states=context, timestep_cond=cond).sample
        swapped = model.unet(sample, timesteps, context, guidance.flip(1))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.allclose(ours, swapped, atol=1e-4), "s_T and s_I must not be interchangeable"


def test_taesd_latents_and_images_match_diffusers(ip2p_folder: Path) -> None:
    model = EditorModel.from_pretrained(ip2p_folder)
    reference = AutoencoderTiny.from_pretrained(ip2p_folder / "taesd").eval()
    images = frames_to_tensor(random_frames(2))
    with torch.inference_mode():
        latents = model.codec.encode(images)
        expected_latents = reference.encode(images).latents
        decoded = model.codec.decode(latents)
        expected_images = reference.decode(expected_latents).sample
    assert latents.shape == (2, 4, 8, 8) and decoded.shape == (2, 3, TINY_IMAGE, TINY_IMAGE)
    torch.testing.assert_close(latents, expected_latents, rtol=0, atol=0)
    torch.testing.assert_close(decoded, expected_images, rtol=0, atol=0)


def test_autoencoder_kl_latents_are_scaled_like_taesd(vae_folder: Path) -> None:
    model = EditorModel.from_pretrained(vae_folder)
    assert isinstance(model.codec, KLCodec)
    reference = AutoencoderKL.from_pretrained(vae_folder / "vae").eval()
    images = frames_to_tensor(random_frames(2, seed=3))
    with torch.inference_mode():
        latents = model.codec.encode(images)
        expected = reference.encode(images).latent_dist.mode() * SD_LATENT_SCALING
        decoded = model.codec.decode(latents)
        expected_images = reference.decode(expected / SD_LATENT_SCALING).sample
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)
    torch.testing.assert_close(decoded, expected_images, rtol=1e-5, atol=1e-5)


def test_taesd_override_folder_replaces_the_models_vae(vae_folder: Path, ip2p_folder: Path) -> None:
    model = EditorModel.from_pretrained(vae_folder, taesd=ip2p_folder / "taesd")
    assert isinstance(model.codec, TinyCodec)
    assert model.fingerprint != EditorModel.from_pretrained(vae_folder).fingerprint


def test_clip_context_matches_transformers(ip2p_folder: Path) -> None:
    model = EditorModel.from_pretrained(ip2p_folder)
    tokenizer = CLIPTokenizer.from_pretrained(ip2p_folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(ip2p_folder / "text_encoder").eval()
    prompts = ["make it a sketch", ""]
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = text_encoder(ids)[0]
    context = model.prompt_encoder.encode(prompts)
    assert context.shape == (2, 77, TINY_TEXT_DIM) and context.dtype == torch.float32
    torch.testing.assert_close(context, expected, rtol=0, atol=0)
    # The hand-written merges are in use: "make", "it" and "sketch" are single tokens.
    assert tokenizer.convert_ids_to_tokens(ids[0, :5].tolist()) == [
        "<|startoftext|>",
        "make</w>",
        "it</w>",
        "a</w>",
        "sketch</w>",
    ]


def test_teacher_sampler_reproduces_the_instructpix2pix_pipeline(vae_folder: Path) -> None:
    """Our 3-pass CFG DDIM sampler on the loaded folder gives diffusers' StableDiffusionInstructPix2PixPipeline latents.

    This covers the image-latent scale too: the pipeline conditions on the unscaled VAE mode, we on the scaled
    latent times image_latent_scale (1/0.18215).
    """
    prompt, steps, s_t, s_i = "make it a sketch", 3, 7.5, 1.5
    frame = random_frames(1, seed=5)[0]
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=AutoencoderKL.from_pretrained(vae_folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(vae_folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(vae_folder / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(vae_folder / "unet"),
        scheduler=DDIMScheduler.from_pretrained(vae_folder / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt,
        image=Image.fromarray(frame),
        num_inference_steps=steps,
        guidance_scale=s_t,
        image_guidance_scale=s_i,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images

    model = EditorModel.from_pretrained(vae_folder)
    with torch.inference_mode():
        image_latent = model.codec.encode(frames_to_tensor([frame])) * model.config.image_latent_scale
        ours = teacher_sample(
            model.unet,
            model.schedule,
            image_latent,
            model.prompt_encoder.encode([prompt]),
            model.prompt_encoder.encode([""]),
            torch.tensor([s_t]),
            torch.tensor([s_i]),
            steps=steps,
            generator=torch.Generator().manual_seed(0),
        )
    assert ours.shape == expected.shape == (1, 4, 8, 8)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    model = EditorModel.from_pretrained(make_tiny_student_folder(tmp_path / "a"))
    model.save_pretrained(tmp_path / "b")
    for part in ("tokenizer", "text_encoder"):  # the prompt encoder is not the model's to save
        shutil.copytree(tmp_path / "a" / part, tmp_path / "b" / part)
    again = EditorModel.from_pretrained(tmp_path / "b")
    assert again.config == model.config
    torch.manual_seed(3)
    args = (torch.randn(1, 8, 8, 8), torch.tensor([999]), torch.randn(1, 8, TINY_TEXT_DIM), torch.tensor([[5.0, 2.0]]))
    with torch.inference_mode():
        torch.testing.assert_close(again.unet(*args), model.unet(*args), rtol=0, atol=0)


# ---------------------------------------------------------------- missing or mismatched parts


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("unet", "unet/config.json is missing"),
        ("unet/diffusion_pytorch_model.safetensors", "UNet: no weights"),
        ("taesd", "no autoencoder found"),
        ("taesd/diffusion_pytorch_model.safetensors", "autoencoder: no weights"),
        ("text_encoder", "needs text_encoder/ and tokenizer/"),
        ("text_encoder/model.safetensors", "CLIP text encoder: no weights"),
        ("tokenizer/merges.txt", "needs vocab.json + merges.txt"),
    ],
)
def test_missing_part_is_a_clear_model_folder_error(
    ip2p_folder: Path, tmp_path: Path, remove: str, message: str
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(ip2p_folder, folder)
    if remove == "taesd":
        _remove(folder / "vae")
    _remove(folder / remove)
    with pytest.raises(ModelFolderError, match=message.replace("+", r"\+")):
        EditorModel.from_pretrained(folder)


def test_a_hub_name_is_not_a_folder_and_is_never_fetched() -> None:
    with pytest.raises(ModelFolderError, match="is not a model folder"):
        EditorModel.from_pretrained("timbrooks/instruct-pix2pix")


def test_mismatched_parts_are_model_folder_errors(ip2p_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(ip2p_folder, folder)
    # editor.json promises guidance embeddings the UNet does not take
    tiny_distilled_config().model_copy(update={"image_latent_scale": 1.0}).save(folder)
    with pytest.raises(ModelFolderError, match="time_cond_proj_dim=None but editor.json implies 16"):
        EditorModel.from_pretrained(folder)
    # a text-to-image UNet (4 input channels) is not an InstructPix2Pix UNet
    _remove(folder / "editor.json")
    _remove(folder / "unet")
    UNet2DConditionModel(**tiny_sd15_unet_config(in_channels=4)).save_pretrained(folder / "unet")
    with pytest.raises(ModelFolderError, match="8 input channels, this one 4"):
        EditorModel.from_pretrained(folder)


def test_prompt_encoder_width_must_match_cross_attention(ip2p_folder: Path) -> None:
    class WideEncoder:
        dim, tokens = 64, 77

    with pytest.raises(ModelFolderError, match="64-d tokens, the UNet attends to 32-d"):
        EditorModel.from_pretrained(ip2p_folder, prompt_encoder=WideEncoder())  # type: ignore[arg-type]


# ---------------------------------------------------------------- SD1.5 → Mobile-Pix2Pix converter


def test_sd15_config_has_the_instructpix2pix_layout() -> None:
    config = sd15_pix2pix_config()
    assert tuple(config["down_block_types"]) == SD15_DOWN and tuple(config["up_block_types"]) == SD15_UP
    assert config["in_channels"] == 8 and config["block_out_channels"] == (320, 640, 1280, 1280)


def test_converter_drops_exactly_the_highest_resolution_attention() -> None:
    torch.manual_seed(0)
    sd15 = UNet2DConditionModel(**tiny_sd15_unet_config()).eval()
    state = sd15.state_dict()
    expected = sorted(k for k in state if k.startswith(("down_blocks.0.attentions.", "up_blocks.3.attentions.")))
    assert any(k.startswith("down_blocks.0.attentions.") for k in expected)
    assert any(k.startswith("up_blocks.3.attentions.") for k in expected)

    mobile, dropped = convert_to_mobile_pix2pix(sd15)
    assert dropped == expected
    assert mobile_pix2pix_state_dict(state)[1] == expected
    assert mobile.config.down_block_types == ("DownBlock2D", *SD15_DOWN[1:])
    assert mobile.config.up_block_types == (*SD15_UP[:3], "UpBlock2D")
    converted = mobile.state_dict()
    assert set(converted) == set(state) - set(expected)
    for key, value in converted.items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
        assert value.data_ptr() != state[key].data_ptr(), f"{key} is shared, not copied"

    torch.manual_seed(1)
    args = (torch.randn(1, 8, 8, 8), torch.tensor([500]))
    context = torch.randn(1, 6, TINY_TEXT_DIM)
    with torch.inference_mode():
        out = mobile(*args, encoder_hidden_states=context).sample
        teacher = sd15(*args, encoder_hidden_states=context).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out, teacher), "the dropped attention must have mattered"


def test_converter_finds_the_outermost_up_block_of_a_three_level_unet() -> None:
    config = tiny_sd15_unet_config(
        block_out_channels=(16, 16, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
    )
    unet = UNet2DConditionModel(**config)
    mobile, dropped = convert_to_mobile_pix2pix(unet)
    assert {k.split(".attentions.")[0] for k in dropped} == {"down_blocks.0", "up_blocks.2"}
    assert set(mobile.state_dict()) == set(unet.state_dict()) - set(dropped)
    with pytest.raises(ValueError, match="already Mobile-Pix2Pix"):
        convert_to_mobile_pix2pix(mobile)


def test_converter_and_guidance_embedding_override_arguments_left_at_their_defaults() -> None:
    """diffusers' default block types are SD1.5's; a UNet built with them still converts (and gains cond_proj)."""
    small = {k: v for k, v in tiny_sd15_unet_config().items() if k not in ("down_block_types", "up_block_types")}
    unet = UNet2DConditionModel(**small)
    assert "down_block_types" in unet.config["_use_default_values"]
    mobile, dropped = convert_to_mobile_pix2pix(unet)
    assert mobile.config.down_block_types[0] == "DownBlock2D" and dropped
    student = add_guidance_embedding(mobile, 4)
    assert student.time_embedding.cond_proj is not None
    assert student.time_embedding.cond_proj.weight.shape[1] == 8


def _unet_flops(config: dict[str, Any], resolution: int) -> int:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        latent = resolution // 8
        args = (torch.empty(1, 8, latent, latent), torch.tensor([999]))
        context = torch.empty(1, 77, config["cross_attention_dim"])
    with FlopCounterMode(display=False) as counter:
        unet(*args, encoder_hidden_states=context)
    return counter.get_total_flops()


def test_mobile_pix2pix_costs_at_most_088_of_sd15_flops_at_512() -> None:
    """The issue's bar, counted on the meta device (shapes only) for the full SD1.5-size UNet."""
    sd15 = _unet_flops(sd15_pix2pix_config(), 512)
    mobile = _unet_flops(mobile_pix2pix_config(sd15_pix2pix_config()), 512)
    assert 0.5 < mobile / sd15 <= 0.88


# ---------------------------------------------------------------- guidance embedding and 3-pass CFG


def test_guidance_embedding_shapes_and_values() -> None:
    scales = torch.tensor([[7.5, 1.5], [0.0, 0.0], [14.0, 3.0]])
    emb = guidance_embedding(scales, 16, 1000.0)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    lcm = LatentConsistencyModelPipeline.get_guidance_scale_embedding
    assert torch.equal(emb[:, :16], lcm(None, scales[:, 0], 16))  # type: ignore[arg-type]
    assert torch.equal(emb[:, 16:], lcm(None, scales[:, 1], 16))  # type: ignore[arg-type]
    # s = 0: sin 0 = 0 in the first half of each block, cos 0 = 1 in the second
    assert torch.equal(emb[1], torch.tensor(([0.0] * 8 + [1.0] * 8) * 2))
    # the lowest frequency is 1: sin(1000 s)
    assert emb[0, 0].item() == pytest.approx(np.sin(7500.0), abs=1e-3)
    assert sinusoidal_embedding(torch.tensor([1.5]), 6, 1.0).shape == (1, 6)
    for bad in (torch.ones(3), torch.ones(3, 3)):
        with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
            guidance_embedding(bad, 16)


def test_add_guidance_embedding_student_equals_teacher_at_init() -> None:
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**mobile_pix2pix_config(tiny_sd15_unet_config())).eval()
    student = add_guidance_embedding(teacher, 8).eval()
    assert student.config.time_cond_proj_dim == 16
    guided = GuidedUNet(student, 8, 1000.0)
    torch.manual_seed(1)
    sample, context = torch.randn(3, 8, 8, 8), torch.randn(3, 6, TINY_TEXT_DIM)
    timesteps = torch.tensor([999, 500, 1])
    with torch.inference_mode():
        expected = teacher(sample, timesteps, encoder_hidden_states=context).sample
        for scales in ([[7.5, 1.5]] * 3, [[0.0, 0.0], [14.0, 3.0], [2.0, 1.0]]):
            torch.testing.assert_close(
                guided(sample, timesteps, context, torch.tensor(scales)), expected, rtol=0, atol=0
            )
        # once training moves the projection, the scales reach every block
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.1)
        low = guided(sample, timesteps, context, torch.tensor([[1.0, 1.0]] * 3))
        high = guided(sample, timesteps, context, torch.tensor([[12.0, 1.0]] * 3))
    assert not torch.allclose(low, high, atol=1e-4)
    assert teacher.time_embedding.cond_proj is None, "the teacher itself is untouched"


def test_combine_cfg_against_hand_computation() -> None:
    shape = (2, 4, 2, 2)
    uncond, image, full = torch.full(shape, 1.0), torch.full(shape, 3.0), torch.full(shape, 10.0)
    image[1] = -1.0
    out = combine_cfg(uncond, image, full, torch.tensor([7.5, 2.0]), torch.tensor([1.5, 1.0]))
    # row 0: 1 + 1.5·(3 − 1) + 7.5·(10 − 3) = 56.5;  row 1: 1 + 1·(−1 − 1) + 2·(10 − (−1)) = 21
    assert torch.equal(out[0], torch.full(shape[1:], 56.5))
    assert torch.equal(out[1], torch.full(shape[1:], 21.0))
    # s_T = s_I = 1 is the plain conditional prediction; s_T = s_I = 0 the unconditional one
    torch.testing.assert_close(combine_cfg(uncond, image, full, torch.ones(2), torch.ones(2)), full)
    torch.testing.assert_close(combine_cfg(uncond, image, full, torch.zeros(2), torch.zeros(2)), uncond)


def _schedule(prediction_type: str) -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(
        {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": prediction_type,
        }
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_cfg_prediction_equals_three_separate_passes(prediction_type: str) -> None:
    torch.manual_seed(0)
    unet = GuidedUNet(UNet2DConditionModel(**mobile_pix2pix_config(tiny_sd15_unet_config())).eval(), None, 1000.0)
    schedule = _schedule(prediction_type)
    x_t, image_latent = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    context, null = torch.randn(2, 6, TINY_TEXT_DIM), torch.randn(1, 6, TINY_TEXT_DIM)
    timesteps = torch.tensor([999, 400])
    s_t, s_i = torch.tensor([7.5, 3.0]), torch.tensor([1.5, 1.2])
    none = torch.zeros(2, 2)
    with torch.inference_mode():
        guided = cfg_prediction(unet, schedule, x_t, image_latent, timesteps, context, null, s_t, s_i)
        full = unet(torch.cat([x_t, image_latent], 1), timesteps, context, none)
        image_only = unet(torch.cat([x_t, image_latent], 1), timesteps, null.expand(2, -1, -1), none)
        uncond = unet(torch.cat([x_t, torch.zeros_like(image_latent)], 1), timesteps, null.expand(2, -1, -1), none)
    eps = [schedule.predict_eps(p, x_t, timesteps) for p in (full, image_only, uncond)]
    s_t4, s_i4 = s_t.view(2, 1, 1, 1), s_i.view(2, 1, 1, 1)
    expected_eps = eps[2] + s_i4 * (eps[1] - eps[2]) + s_t4 * (eps[0] - eps[1])
    assert guided.shape == (2, 4, 8, 8)
    torch.testing.assert_close(schedule.predict_eps(guided, x_t, timesteps), expected_eps, rtol=1e-4, atol=1e-4)
    if prediction_type == "epsilon":
        torch.testing.assert_close(guided, expected_eps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noise_schedule_conversions_round_trip(prediction_type: str) -> None:
    schedule = _schedule(prediction_type)
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([999, 500, 20])
    x_t = schedule.add_noise(x0, noise, timesteps)
    torch.testing.assert_close(x_t, reference.add_noise(x0, noise, timesteps), rtol=1e-5, atol=1e-5)
    target = {"epsilon": noise, "sample": x0, "v_prediction": reference.get_velocity(x0, noise, timesteps)}
    prediction = target[prediction_type]
    torch.testing.assert_close(schedule.predict_x0(prediction, x_t, timesteps), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(schedule.predict_eps(prediction, x_t, timesteps), noise, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(schedule.eps_to_prediction(noise, x_t, timesteps), prediction, rtol=1e-4, atol=1e-4)


def test_noise_schedule_rejects_unknown_prediction_type_and_keeps_ddim_keys() -> None:
    with pytest.raises(ValueError, match="unsupported prediction_type 'flow'"):
        _schedule("flow")
    schedule = NoiseSchedule.from_scheduler_config({"prediction_type": "epsilon", "set_alpha_to_one": False})
    assert DDIMScheduler.from_config(schedule.scheduler_config).config.set_alpha_to_one is False
