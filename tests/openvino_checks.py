"""The OpenVINO backend against the torch backend on a tiny distilled editor; its precisions and compiled cache.

Stated tolerances: OpenVINO's fp32 CPU kernels (fused convolutions, other summation orders) differ from eager
PyTorch by float rounding, so every tensor agrees within atol 1e-4 + rtol 1e-3 and edited uint8 frames within
1 level. int8 rounds every quantised layer: the tiny editor's int8 frames stay above 40 dB PSNR of fp32, as
ONNX Runtime's do (tests/test_engine_quantize.py). bf16 keeps 8 bits of mantissa: above 35 dB where the CPU
computes bf16 at all (elsewhere the backend refuses it).

Run by tests/test_engine_openvino.py in a pytest process of its own (why: there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines.backends.base import BackendUnavailable
from engines.backends.torch_backend import TorchBackend
from engines.editor import EditRequest
from engines.export import GRAPH_NAMES
from engines.loader import EngineSpec, load_editor
from engines.model import INT8_FOLDER, EditorModel
from engines.quantize import calibrate, this_cpu_saturates_int8
from engines.temporal import StreamState
from tests.test_engine_loading import TINY_IMAGE, make_tiny_student_folder, random_frames
from tests.test_engine_onnx import _inputs, _run
from tests.test_engine_quantize import EDITS, edit_frames, psnr

ov = pytest.importorskip("openvino")
from engines.backends.openvino_backend import (  # noqa: E402 - only where openvino is installed
    OpenVinoBackend,
    cpu_capabilities,
    require_precision_here,
)

ATOL, RTOL = 1e-4, 1e-3
CAPABILITIES = cpu_capabilities(ov.Core())

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_student_folder(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def model(folder: Path, cache_dir: Path) -> EditorModel:
    """The tiny editor with its own int8/ ranges, calibrated on random frames."""
    model = EditorModel.from_pretrained(folder)
    calibrate(model, random_frames(6, seed=1), EDITS, folder / INT8_FOLDER, cache_dir=cache_dir)
    return model


@pytest.fixture(scope="module")
def fp32(model: EditorModel, cache_dir: Path) -> OpenVinoBackend:
    return OpenVinoBackend(model, TINY_IMAGE, cache_dir, threads=1)


@pytest.mark.parametrize("name", GRAPH_NAMES)
@pytest.mark.parametrize("batch", [1, 3])
def test_each_graph_matches_torch_at_any_batch(
    fp32: OpenVinoBackend, model: EditorModel, name: str, batch: int
) -> None:
    """Each batch size gets its compiled model on first use; all of them agree with eager PyTorch."""
    args = _inputs(model, batch)[name]
    expected = _run(TorchBackend(model), name, args)
    got = _run(fp32, name, args)  # type: ignore[arg-type]
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_fp32_edits_match_torch_within_a_level(fp32: OpenVinoBackend, model: EditorModel) -> None:
    frames = random_frames(2, seed=7)
    expected = edit_frames(TorchBackend(model), model, frames)
    for want, got in zip(expected, edit_frames(fp32, model, frames), strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


@pytest.mark.skipif("INT8" not in CAPABILITIES, reason="this CPU has no native int8 in OpenVINO")
def test_int8_edits_stay_close_to_fp32(fp32: OpenVinoBackend, model: EditorModel, cache_dir: Path) -> None:
    if this_cpu_saturates_int8() is not None:
        pytest.skip("the tiny editor's full-range int8 weights saturate on this CPU (engines.quantize)")
    frames = random_frames(3, seed=7)
    int8 = OpenVinoBackend(model, TINY_IMAGE, cache_dir, threads=1, precision="int8")
    assert int8.precision == "int8" and "int8" in int8.graphs.folder.name
    want, got = edit_frames(fp32, model, frames), edit_frames(int8, model, frames)
    scores = [psnr(a, b) for a, b in zip(want, got, strict=True)]
    assert min(scores) > 40, scores
    assert any(not np.array_equal(a, b) for a, b in zip(want, got, strict=True))  # int8 did run


def test_bf16_runs_only_where_the_cpu_computes_it(fp32: OpenVinoBackend, model: EditorModel, cache_dir: Path) -> None:
    with pytest.raises(BackendUnavailable, match="needs a CPU that computes BF16"):
        require_precision_here("bf16", {"FP32", "INT8"})
    require_precision_here("bf16", {"FP32", "BF16"})
    with pytest.raises(BackendUnavailable, match="INT8"):
        require_precision_here("int8", {"FP32"})
    if "BF16" not in CAPABILITIES:
        with pytest.raises(BackendUnavailable, match="BF16"):
            OpenVinoBackend(model, TINY_IMAGE, cache_dir, threads=1, precision="bf16")
        return
    frames = random_frames(3, seed=7)
    bf16 = OpenVinoBackend(model, TINY_IMAGE, cache_dir, threads=1, precision="bf16")
    scores = [
        psnr(a, b) for a, b in zip(edit_frames(fp32, model, frames), edit_frames(bf16, model, frames), strict=True)
    ]
    assert min(scores) > 35, scores


def test_a_second_start_reuses_the_compiled_cache(model: EditorModel, tmp_path: Path) -> None:
    def run_all(backend: OpenVinoBackend) -> list[torch.Tensor]:
        return [_run(backend, name, args) for name, args in _inputs(model, 2).items()]  # type: ignore[arg-type]

    first = OpenVinoBackend(model, TINY_IMAGE, tmp_path, threads=1)
    expected = run_all(first)
    blobs = {p: p.stat().st_mtime_ns for p in first.compiled_cache.iterdir()}
    assert len(blobs) >= len(GRAPH_NAMES), "one compiled blob a graph"
    second = OpenVinoBackend(model, TINY_IMAGE, tmp_path, threads=1)
    assert second.compiled_cache == first.compiled_cache
    for want, got in zip(expected, run_all(second), strict=True):
        torch.testing.assert_close(got, want)
    assert {p: p.stat().st_mtime_ns for p in second.compiled_cache.iterdir()} == blobs, "compiled again"
    if "INT8" in CAPABILITIES:  # another precision never shares the slot
        int8 = OpenVinoBackend(model, TINY_IMAGE, tmp_path, threads=1, precision="int8")
        assert int8.compiled_cache != first.compiled_cache


def test_load_editor_builds_the_openvino_backend_and_the_spec_keeps_precisions_to_their_backends(
    folder: Path, tmp_path: Path
) -> None:
    editor = load_editor(EngineSpec(weights=folder, backend="openvino", cache_dir=tmp_path, threads=1))
    assert editor.backend.name == "openvino" and editor.backend.precision == "fp32"  # type: ignore[attr-defined]
    params = EDITS[1]
    result = editor.edit(
        [EditRequest(random_frames(1, seed=3)[0], editor.encode_prompt(params.prompt), params, StreamState(1))]
    )
    assert result[0].frame.shape == (TINY_IMAGE, TINY_IMAGE, 3)
    with pytest.raises(ValueError, match="bf16 needs the openvino backend"):
        EngineSpec(backend="onnxruntime", precision="bf16")
    EngineSpec(backend="openvino", precision="int8")
