"""The torch backend's CUDA options (fp16, channels_last, CUDA graphs, torch.compile) against its fp32 CPU path;
GPU tests are marked `gpu` and skip without CUDA, the option checks run everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from engines.backends.torch_backend import CudaGraphRunner, TorchBackend
from engines.editor import Editor, EditRequest
from engines.loader import EngineSpec, load_editor
from engines.model import EditorModel
from engines.params import EditParams
from engines.temporal import StreamState
from tests.test_engine_loading import TINY_IMAGE, make_tiny_student_folder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP16_ATOL, FP16_RTOL = 2e-2, 2e-2  # fp16 on the GPU against the fp32 CPU reference


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_student_folder(tmp_path_factory.mktemp("student"))


def _unet_inputs(model: EditorModel, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    latent = TINY_IMAGE // 8
    return (
        torch.randn(batch, 8, latent, latent, generator=generator),
        torch.full((batch,), 999),
        torch.randn(batch, model.config.max_prompt_tokens, model.prompt_encoder.dim, generator=generator),
        torch.rand(batch, 2, generator=generator) * torch.tensor([14.0, 3.0]),
    )


def test_cuda_options_are_refused_on_the_cpu(folder: Path) -> None:
    model = EditorModel.from_pretrained(folder)
    for options in ({"cuda_graph": True}, {"compile": True}):
        with pytest.raises(ValueError, match="CUDA options; the torch backend runs on cpu"):
            TorchBackend(model, "cpu", **options)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        CudaGraphRunner(model.unet, torch.device("cpu"))
    for backend, device in (("torch", "cpu"), ("onnxruntime", "cuda"), ("tensorrt", "cuda")):
        with pytest.raises(ValidationError, match="cuda_graph needs the torch backend on a CUDA device"):
            EngineSpec(backend=backend, device=device, cuda_graph=True)


def test_cpu_backend_runs_fp32_and_equals_the_modules(folder: Path) -> None:
    model = EditorModel.from_pretrained(folder)
    backend = TorchBackend(model)
    assert backend.device == torch.device("cpu") and backend.dtype == torch.float32
    args = _unet_inputs(model, 2, seed=0)
    with torch.inference_mode():
        assert torch.equal(backend.denoise(*args), model.unet(*args))


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp16_channels_last_matches_cpu_fp32(folder: Path) -> None:
    reference = TorchBackend(EditorModel.from_pretrained(folder))
    backend = TorchBackend(EditorModel.from_pretrained(folder), "cuda")
    assert backend.dtype == torch.float16
    conv = backend.model.unet.unet.conv_in.weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    args = _unet_inputs(reference.model, 3, seed=1)
    got = backend.denoise(*(a.cuda() for a in args))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float().cpu(), reference.denoise(*args), atol=FP16_ATOL, rtol=FP16_RTOL)
    images = torch.rand(2, 3, TINY_IMAGE, TINY_IMAGE) * 2 - 1
    latents = backend.encode(images.cuda())
    torch.testing.assert_close(latents.float().cpu(), reference.encode(images), atol=FP16_ATOL, rtol=FP16_RTOL)
    torch.testing.assert_close(
        backend.decode(latents).float().cpu(), reference.decode(latents.float().cpu()), atol=FP16_ATOL, rtol=FP16_RTOL
    )


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_equals_eager_per_batch_shape(folder: Path) -> None:
    eager = TorchBackend(EditorModel.from_pretrained(folder), "cuda")
    graphed = TorchBackend(EditorModel.from_pretrained(folder), "cuda", cuda_graph=True, max_graphs=2)
    unet_runner = graphed.graph_runners[0]
    # A repeated shape replays its graph with the new inputs; with room for 2 graphs, batch 3 evicts batch 1
    # (least recently used), so the final batch 1 is captured again: captures for 2, 1, 3, 1.
    for seed, batch in enumerate((2, 2, 1, 2, 3, 1)):
        args = [a.cuda() for a in _unet_inputs(eager.model, batch, seed)]
        torch.testing.assert_close(graphed.denoise(*args), eager.denoise(*args), atol=1e-3, rtol=1e-3)
    assert unet_runner.captures == 4
    images = torch.rand(2, 3, TINY_IMAGE, TINY_IMAGE, device="cuda") * 2 - 1
    torch.testing.assert_close(graphed.encode(images), eager.encode(images), atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_torch_compile_matches_eager(folder: Path) -> None:
    eager = TorchBackend(EditorModel.from_pretrained(folder), "cuda")
    compiled = TorchBackend(EditorModel.from_pretrained(folder), "cuda", compile=True)
    args = [a.cuda() for a in _unet_inputs(eager.model, 2, seed=3)]
    torch.testing.assert_close(compiled.denoise(*args), eager.denoise(*args), atol=1e-2, rtol=1e-2)


def _edit_frames(editor: Editor, frames: list[np.ndarray]) -> list[np.ndarray]:
    prompt = "make it blue"
    requests = [
        EditRequest(frame, editor.encode_prompt(prompt), EditParams(prompt=prompt, seed=i), StreamState(i))
        for i, frame in enumerate(frames)
    ]
    return [result.frame for result in editor.edit(requests)]


@pytest.mark.gpu
@needs_cuda
def test_the_service_engine_keeps_one_cuda_graph_per_batch_size(folder: Path) -> None:
    spec = {"weights": folder, "backend": "torch", "device": "cuda", "max_batch": 3}
    eager = load_editor(EngineSpec(**spec))
    graphed = load_editor(EngineSpec(**spec, cuda_graph=True))
    unet_runner = graphed.backend.graph_runners[0]  # type: ignore[attr-defined]
    assert unet_runner.max_graphs == 3
    rng = np.random.default_rng(0)
    size = graphed.resolution
    for batch in (1, 2, 3, 1, 3, 2):
        frames = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
        for got, want in zip(_edit_frames(graphed, frames), _edit_frames(eager, frames), strict=True):
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    assert unet_runner.captures == 3, "every batch size the worker forms keeps its graph"
