"""The ONNX Runtime backend against the torch backend on a tiny distilled editor, and the ONNX export cache.

Stated tolerance: ORT's CPU kernels (fused convolutions, other summation orders) may differ from eager
PyTorch fp32 by float rounding only, so every tensor must agree within atol 1e-5 + rtol 1e-4 (measured:
under 1e-6), and edited uint8 frames within 1 level.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.backends.onnxruntime_backend import OnnxRuntimeBackend
from engines.backends.torch_backend import TorchBackend
from engines.editor import Editor, EditRequest, frames_to_tensor
from engines.export import GRAPH_NAMES, ONNX_OPSET, export_onnx, onnx_folder
from engines.loader import EngineSpec, load_editor
from engines.model import EditorModel
from engines.params import EditParams
from engines.temporal import StreamState
from engines.text import CachedPromptEncoder
from tests.test_engine_loading import TINY_IMAGE, make_tiny_student_folder, random_frames

ATOL, RTOL = 1e-5, 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_student_folder(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def model(folder: Path) -> EditorModel:
    return EditorModel.from_pretrained(folder)


@pytest.fixture(scope="module")
def backends(model: EditorModel, cache_dir: Path) -> tuple[TorchBackend, OnnxRuntimeBackend]:
    return TorchBackend(model), OnnxRuntimeBackend(model, TINY_IMAGE, cache_dir, threads=1)


def _inputs(model: EditorModel, batch: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    latent = TINY_IMAGE // 8
    tokens, dim = model.config.max_prompt_tokens, model.prompt_encoder.dim
    return {
        "encoder": (frames_to_tensor(random_frames(batch, seed=seed)),),
        "unet": (
            torch.randn(batch, 8, latent, latent, generator=generator),
            torch.tensor([999, 500, 20, 999, 1][:batch]),
            torch.randn(batch, tokens, dim, generator=generator),
            torch.tensor([[7.5, 1.5], [2.0, 1.0], [12.0, 2.5], [0.0, 0.0], [5.0, 3.0]][:batch]),
        ),
        "decoder": (torch.randn(batch, 4, latent, latent, generator=generator),),
    }


def _run(backend: TorchBackend | OnnxRuntimeBackend, name: str, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    method = {"encoder": backend.encode, "unet": backend.denoise, "decoder": backend.decode}[name]
    return method(*args)


@pytest.mark.parametrize("name", GRAPH_NAMES)
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_each_graph_matches_torch_at_any_batch(
    backends: tuple[TorchBackend, OnnxRuntimeBackend], model: EditorModel, name: str, batch: int
) -> None:
    """Exported at batch 1 with a dynamic batch axis: other batch sizes run and agree with eager PyTorch."""
    torch_backend, ort_backend = backends
    args = _inputs(model, batch)[name]
    expected = _run(torch_backend, name, args)
    got = _run(ort_backend, name, args)
    assert got.shape == expected.shape and got.shape[0] == batch
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_batched_rows_equal_single_rows(backends: tuple[TorchBackend, OnnxRuntimeBackend], model: EditorModel) -> None:
    """Each row of a batch is computed as if alone: sessions do not leak into each other."""
    _, ort_backend = backends
    sample, timestep, context, guidance = _inputs(model, 3, seed=4)["unet"]
    batched = ort_backend.denoise(sample, timestep, context, guidance)
    for i in range(3):
        alone = ort_backend.denoise(sample[i : i + 1], timestep[i : i + 1], context[i : i + 1], guidance[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, atol=ATOL, rtol=RTOL)


def _edit(editor: Editor, params: list[EditParams]) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    frames = random_frames(len(params), seed=7)
    states = [StreamState(p.seed) for p in params]
    requests = [
        EditRequest(f, editor.encode_prompt(p.prompt), p, s) for f, p, s in zip(frames, params, states, strict=True)
    ]
    results = editor.edit(requests)
    latents = [s.last_output_latent for s in states]
    assert all(latent is not None for latent in latents)
    return [r.frame for r in results], latents  # type: ignore[misc]


def test_editor_batch_of_two_matches_torch(
    backends: tuple[TorchBackend, OnnxRuntimeBackend], model: EditorModel
) -> None:
    """A whole Editor.edit call, two streams with different prompts, guidance and seeds, through each backend."""
    prompts = CachedPromptEncoder(model.prompt_encoder)
    params = [
        EditParams(prompt="make it a sketch", text_guidance=7.5, image_guidance=1.5, seed=1),
        EditParams(prompt="make it red", text_guidance=2.0, image_guidance=1.0, seed=2),
    ]
    results = {}
    for backend in backends:
        results[backend.name] = _edit(Editor(backend, model.config, model.schedule, prompts), params)
    (torch_frames, torch_latents), (ort_frames, ort_latents) = results["torch"], results["onnxruntime"]
    for expected, got in zip(torch_latents, ort_latents, strict=True):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    for expected, got in zip(torch_frames, ort_frames, strict=True):
        assert got.shape == (TINY_IMAGE, TINY_IMAGE, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    # the two streams really were conditioned differently
    assert not torch.allclose(torch_latents[0], torch_latents[1], atol=1e-3)


def test_load_editor_builds_the_onnxruntime_backend(folder: Path, tmp_path: Path) -> None:
    editor = load_editor(EngineSpec(weights=folder, backend="onnxruntime", cache_dir=tmp_path, threads=1))
    assert editor.backend.name == "onnxruntime"
    frames, _ = _edit(editor, [EditParams(seed=3)])
    assert frames[0].shape == (TINY_IMAGE, TINY_IMAGE, 3)
    assert any(tmp_path.glob(f"onnx/*-{TINY_IMAGE}px-opset{ONNX_OPSET}/unet.onnx"))


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_export_cache_is_reused_and_keyed_by_fingerprint_and_resolution(
    model: EditorModel, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    graphs = export_onnx(model, TINY_IMAGE, tmp_path)
    assert graphs.complete()
    assert graphs.folder.name == f"{model.fingerprint}-{TINY_IMAGE}px-opset{ONNX_OPSET}"
    assert sorted(p.name for p in graphs.folder.iterdir()) == sorted(f"{n}.onnx" for n in GRAPH_NAMES)
    before = _stamps(graphs.folder)

    again = export_onnx(model, TINY_IMAGE, tmp_path)
    assert again == graphs and _stamps(again.folder) == before, "the second export rewrote cached graphs"

    # a removed graph is exported again, the others are kept
    graphs.path("decoder").unlink()
    export_onnx(model, TINY_IMAGE, tmp_path)
    after = _stamps(graphs.folder)
    assert after["unet.onnx"] == before["unet.onnx"] and after["encoder.onnx"] == before["encoder.onnx"]
    assert graphs.path("decoder").is_file()

    # another resolution and other weights get their own slots
    assert onnx_folder(model, 2 * TINY_IMAGE, tmp_path).folder != graphs.folder
    other = EditorModel.from_pretrained(make_tiny_student_folder(tmp_path_factory.mktemp("other"), seed=1))
    assert other.fingerprint != model.fingerprint
    assert onnx_folder(other, TINY_IMAGE, tmp_path).folder != graphs.folder
    assert not any(p.name.endswith(".partial.onnx") for p in graphs.folder.iterdir())
    assert os.listdir(tmp_path / "onnx") == [graphs.folder.name]


def test_export_puts_the_model_back_on_its_dtype(folder: Path, tmp_path: Path) -> None:
    model = EditorModel.from_pretrained(folder, torch_dtype=torch.float16)
    export_onnx(model, TINY_IMAGE, tmp_path)
    assert next(model.unet.parameters()).dtype == torch.float16
    assert next(model.codec.parameters()).dtype == torch.float16
