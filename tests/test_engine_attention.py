"""One-token cross-attention: the same UNet output without the attention, in PyTorch and in the ONNX graph."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from engines.attention import OneTokenCrossAttnProcessor, use_one_token_cross_attention
from engines.backends.onnxruntime_backend import OnnxRuntimeBackend
from engines.backends.torch_backend import TorchBackend
from engines.config import EditorConfig
from engines.export import export_onnx
from engines.model import EditorModel
from tests.test_engine_loading import (
    TINY_IMAGE,
    TINY_TEXT_DIM,
    make_tiny_pix2pix_folder,
    mobile_pix2pix_config,
    tiny_sd15_unet_config,
)
from training.prompts import HashPromptEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unet_inputs(batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 8, 8, 8, generator=generator)
    context = torch.randn(batch, tokens, TINY_TEXT_DIM, generator=generator)
    return sample, torch.tensor([999, 500, 20][:batch]), context


def _cross_attentions(unet: UNet2DConditionModel) -> list[Attention]:
    return [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]


def test_one_token_processor_gives_the_attention_output() -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**mobile_pix2pix_config(tiny_sd15_unet_config())).eval()
    sample, t, context = _unet_inputs(3, 1)
    with torch.inference_mode():
        expected = unet(sample, t, encoder_hidden_states=context).sample
        changed = use_one_token_cross_attention(unet)
        got = unet(sample, t, encoder_hidden_states=context).sample
        other_prompts = unet(sample, t, encoder_hidden_states=context.roll(1, 0)).sample
    assert changed == len(_cross_attentions(unet)) > 0
    assert all(isinstance(m.processor, OneTokenCrossAttnProcessor) for m in _cross_attentions(unet))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (other_prompts - got).abs().amax() > 1e-3, "the prompt no longer reaches the output"


def test_one_token_processor_refuses_a_longer_context() -> None:
    unet = UNet2DConditionModel(**mobile_pix2pix_config(tiny_sd15_unet_config())).eval()
    use_one_token_cross_attention(unet)
    sample, t, context = _unet_inputs(1, 2)
    with pytest.raises(ValueError, match=r"needs an unmasked \(batch, 1, dim\) context, got \(1, 2, 32\)"):
        unet(sample, t, encoder_hidden_states=context)


def _softmax_count(path: Path) -> int:
    return sum(node.op_type == "Softmax" for node in onnx.load(str(path)).graph.node)


def test_a_one_token_editor_exports_without_cross_attention_and_matches_torch(tmp_path: Path) -> None:
    """Loading a one-token editor installs the processor; its ONNX graph keeps only self-attention softmaxes."""
    unet_config = mobile_pix2pix_config(tiny_sd15_unet_config(time_cond_proj_dim=16))
    editor = EditorConfig(
        resolution=TINY_IMAGE, prompt_encoder="minilm-pooled", max_prompt_tokens=1, guidance_embedding_dim=8
    )
    folder = make_tiny_pix2pix_folder(tmp_path / "pooled", unet_config=unet_config, editor_config=editor)
    model = EditorModel.from_pretrained(folder, prompt_encoder=HashPromptEncoder(TINY_TEXT_DIM, tokens=1))
    cross = _cross_attentions(model.unet.unet)
    assert cross and all(isinstance(m.processor, OneTokenCrossAttnProcessor) for m in cross)

    ort = OnnxRuntimeBackend(model, TINY_IMAGE, tmp_path / "cache", threads=1)
    sample, t, context = _unet_inputs(3, 1)
    guidance = torch.tensor([[1.0, 1.0], [2.0, 0.75], [0.0, 1.5]])
    expected = TorchBackend(model).denoise(sample, t, context, guidance)
    torch.testing.assert_close(ort.denoise(sample, t, context, guidance), expected, atol=1e-5, rtol=1e-4)

    self_attentions = sum(isinstance(m, Attention) and not m.is_cross_attention for m in model.unet.unet.modules())
    unet_graph = export_onnx(model, TINY_IMAGE, tmp_path / "cache").path("unet")
    assert _softmax_count(unet_graph) == self_attentions > 0


def test_the_one_token_encoder_and_config_go_together() -> None:
    with pytest.raises(ValueError, match="max_prompt_tokens must be 1 exactly when prompt_encoder is 'minilm-pooled'"):
        EditorConfig(prompt_encoder="minilm-pooled", max_prompt_tokens=16)
    with pytest.raises(ValueError, match="max_prompt_tokens must be 1 exactly"):
        EditorConfig(prompt_encoder="minilm", max_prompt_tokens=1)
