"""int8 graphs: calibrated on a tiny editor the test makes, rebuilt from the ranges alone, refused when stale.

Stated tolerance: int8 activations and weights round every layer, so edited frames of the tiny editor differ
from fp32's by more than float rounding; they must stay above 40 dB PSNR against the fp32 frames (measured here:
about 56 dB). The shipped default's own gate, on real held-out frames, is training/report/int8.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from engines.backends.onnxruntime_backend import OnnxRuntimeBackend
from engines.config import DEFAULT_MODEL_DIR
from engines.editor import Editor, EditRequest
from engines.export import GRAPH_NAMES
from engines.loader import EngineSpec, resolve_precision
from engines.model import INT8_FOLDER, EditorModel, folder_fingerprint
from engines.params import EditParams
from engines.quantize import (
    DEFAULT_RECIPE,
    RECORD_NAME,
    QuantizationUnavailable,
    calibrate,
    cpuinfo_field,
    int8_graphs,
    int8_saturation,
    ranges_name,
    read_cpu_flags,
    read_record,
    this_cpu_saturates_int8,
    usable_record,
)
from engines.temporal import StreamState
from engines.text import CachedPromptEncoder
from tests.test_engine_loading import TINY_IMAGE, make_tiny_student_folder, random_frames
from training.evaluate import psnr

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EDITS = [
    EditParams(prompt="make it a pencil sketch", text_guidance=1.0, image_guidance=1.0, seed=0),
    EditParams(prompt="make it sepia", text_guidance=1.8, image_guidance=0.8, seed=1),
]


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


def edit_frames(backend: OnnxRuntimeBackend, model: EditorModel, frames: list[np.ndarray]) -> list[np.ndarray]:
    editor = Editor(backend, model.config, model.schedule, CachedPromptEncoder(model.prompt_encoder))
    params = EDITS[0]
    context = editor.encode_prompt(params.prompt)
    return [r.frame for r in editor.edit([EditRequest(f, context, params, StreamState(0)) for f in frames])]


def producers(graph: onnx.GraphProto) -> dict[str, str]:
    return {out: node.op_type for node in graph.node for out in node.output}


def test_calibration_writes_ranges_for_these_weights_without_changing_their_fingerprint(
    folder: Path, model: EditorModel
) -> None:
    record = read_record(folder / INT8_FOLDER)
    assert record is not None
    assert record.fingerprint == model.fingerprint == folder_fingerprint(folder)
    assert record.resolution == TINY_IMAGE
    assert record.recipe == DEFAULT_RECIPE
    assert record.calibration["frames"] == 6
    for graph in GRAPH_NAMES:
        ranges = json.loads((folder / INT8_FOLDER / ranges_name(graph)).read_text())["data"]
        assert ranges, graph
        for value in ranges.values():
            assert value["lowest"]["data"][0] <= value["highest"]["data"][0]


def test_int8_graphs_quantize_what_the_recipe_says(model: EditorModel, cache_dir: Path) -> None:
    graphs = int8_graphs(model, TINY_IMAGE, cache_dir)
    for name in GRAPH_NAMES:
        graph = onnx.load(str(graphs.path(name))).graph
        made_by = producers(graph)
        convs = [n for n in graph.node if n.op_type == "Conv"]
        assert convs, name
        for conv in convs:  # QDQ form: a quantized conv reads dequantized activations and weights
            assert made_by.get(conv.input[0]) == "DequantizeLinear", (name, conv.name)
            assert made_by.get(conv.input[1]) == "DequantizeLinear", (name, conv.name)
    unet = onnx.load(str(graphs.path("unet"))).graph
    made_by = producers(unet)
    scores = [n for n in unet.node if n.op_type == "MatMul" and n.name.endswith(("attn1/MatMul", "attn1/MatMul_1"))]
    timestep = [n for n in unet.node if "time_embedding/" in n.name and n.op_type in ("MatMul", "Gemm")]
    assert scores and timestep
    for node in scores + timestep:  # the recipe keeps attention scores and the embeddings in float
        assert all(made_by.get(i) != "DequantizeLinear" for i in node.input), node.name


def test_int8_edits_stay_close_to_fp32(model: EditorModel, cache_dir: Path) -> None:
    frames = random_frames(3, seed=7)  # not the calibration frames
    fp32 = edit_frames(OnnxRuntimeBackend(model, TINY_IMAGE, cache_dir, threads=1), model, frames)
    backend = OnnxRuntimeBackend(model, TINY_IMAGE, cache_dir, threads=1, precision="int8")
    assert backend.precision == "int8"
    int8 = edit_frames(backend, model, frames)
    scores = [psnr(a, b) for a, b in zip(fp32, int8, strict=True)]
    assert min(scores) > 40, scores
    assert any(not np.array_equal(a, b) for a, b in zip(fp32, int8, strict=True))  # int8 did run


def test_the_ranges_alone_rebuild_the_same_graphs(model: EditorModel, cache_dir: Path, tmp_path: Path) -> None:
    here = int8_graphs(model, TINY_IMAGE, cache_dir)
    elsewhere = int8_graphs(model, TINY_IMAGE, tmp_path / "fresh-cache")
    for name in GRAPH_NAMES:
        assert here.path(name).read_bytes() == elsewhere.path(name).read_bytes(), name


def test_ranges_of_other_weights_are_refused(folder: Path, model: EditorModel, tmp_path: Path) -> None:
    other_folder = make_tiny_student_folder(tmp_path / "other", seed=1)
    shutil.copytree(folder / INT8_FOLDER, other_folder / INT8_FOLDER)
    other = EditorModel.from_pretrained(other_folder)
    with pytest.raises(QuantizationUnavailable, match="calibrated for weights .*training.quantize"):
        usable_record(other)
    assert resolve_precision(other, EngineSpec(weights=other_folder), TINY_IMAGE) == "fp32"
    with pytest.raises(QuantizationUnavailable):
        resolve_precision(other, EngineSpec(weights=other_folder, precision="int8"), TINY_IMAGE)


def test_ranges_that_name_other_tensors_are_refused(folder: Path, model: EditorModel, tmp_path: Path) -> None:
    ranges = tmp_path / "ranges"
    shutil.copytree(folder / INT8_FOLDER, ranges)
    path = ranges / ranges_name("decoder")
    data = json.loads(path.read_text())
    data["data"]["/renamed/by/another/exporter"] = next(iter(data["data"].values()))
    path.write_text(json.dumps(data))
    with pytest.raises(QuantizationUnavailable, match="another export"):
        int8_graphs(model, TINY_IMAGE, tmp_path / "cache", ranges)


def test_auto_precision_takes_int8_only_where_it_was_measured(model: EditorModel, folder: Path) -> None:
    # Full-range int8 weights only where this CPU sums them exactly (the next tests cover the other CPUs).
    exact = this_cpu_saturates_int8() is None
    assert resolve_precision(model, EngineSpec(weights=folder), TINY_IMAGE) == ("int8" if exact else "fp32")
    assert resolve_precision(model, EngineSpec(weights=folder, precision="fp32"), TINY_IMAGE) == "fp32"
    assert resolve_precision(model, EngineSpec(weights=folder, backend="torch"), TINY_IMAGE) == "fp32"
    assert resolve_precision(model, EngineSpec(weights=folder), 2 * TINY_IMAGE) == "fp32"  # not its size
    with pytest.raises(ValueError, match="int8 needs the onnxruntime or openvino backend"):
        EngineSpec(backend="torch", precision="int8")


def test_seven_bit_weights_run_int8_on_every_cpu_and_full_range_ones_are_refused_where_they_saturate(
    tmp_path: Path, cache_dir: Path
) -> None:
    folder = make_tiny_student_folder(tmp_path / "student")
    model = EditorModel.from_pretrained(folder)
    seven_bit = DEFAULT_RECIPE.model_copy(update={"reduce_range": True})
    calibrate(model, random_frames(4, seed=2), EDITS, folder / INT8_FOLDER, recipe=seven_bit, cache_dir=cache_dir)
    assert resolve_precision(model, EngineSpec(weights=folder), TINY_IMAGE) == "int8"
    assert resolve_precision(model, EngineSpec(weights=folder, precision="int8"), TINY_IMAGE) == "int8"
    assert resolve_precision(model, EngineSpec(weights=folder), 2 * TINY_IMAGE) == "fp32"  # not its size
    graph = onnx.load(str(int8_graphs(model, TINY_IMAGE, cache_dir).path("unet"))).graph
    weights = [onnx.numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64  # 7 bits, not 127

    calibrate(model, random_frames(4, seed=2), EDITS, folder / INT8_FOLDER, cache_dir=cache_dir)  # 8-bit weights
    reason = this_cpu_saturates_int8()
    if reason is None:
        assert resolve_precision(model, EngineSpec(weights=folder, precision="int8"), TINY_IMAGE) == "int8"
    else:
        assert resolve_precision(model, EngineSpec(weights=folder), TINY_IMAGE) == "fp32"
        with pytest.raises(QuantizationUnavailable, match="VNNI.*--reduce-range"):
            resolve_precision(model, EngineSpec(weights=folder, precision="int8"), TINY_IMAGE)


def test_int8_saturation_is_read_off_the_cpu_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\n")
    flags = read_cpu_flags(cpuinfo)
    assert cpuinfo_field("model name", cpuinfo) == "AMD EPYC"
    assert flags == frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
    assert "no VNNI" in (int8_saturation("x86_64", flags) or "")
    assert int8_saturation("x86_64", flags | {"avx512_vnni"}) is None
    assert int8_saturation("x86_64", flags | {"avx_vnni"}) is None
    assert "unknown" in (int8_saturation("AMD64", None) or "")
    assert int8_saturation("aarch64", None) is None  # ONNX Runtime's 16-bit pairing is x86's alone
    assert read_cpu_flags(tmp_path / "absent") is None


def test_a_folder_without_ranges_runs_fp32_or_says_how_to_make_them(tmp_path: Path) -> None:
    bare = EditorModel.from_pretrained(make_tiny_student_folder(tmp_path / "bare"))
    assert resolve_precision(bare, EngineSpec(weights=tmp_path / "bare"), TINY_IMAGE) == "fp32"
    with pytest.raises(QuantizationUnavailable, match="holds no int8 ranges .* training.quantize"):
        OnnxRuntimeBackend(bare, TINY_IMAGE, tmp_path / "cache", precision="int8")


def test_the_shipped_default_ships_ranges_for_its_own_weights_and_passed_the_gate() -> None:
    record = read_record(DEFAULT_MODEL_DIR / INT8_FOLDER)
    assert record is not None, "engines/default_model/int8/ is missing: run python -m training.quantize"
    assert record.fingerprint == folder_fingerprint(DEFAULT_MODEL_DIR), "stale int8 ranges: rerun training.quantize"
    assert all((DEFAULT_MODEL_DIR / INT8_FOLDER / ranges_name(g)).is_file() for g in GRAPH_NAMES)
    assert (DEFAULT_MODEL_DIR / INT8_FOLDER / RECORD_NAME).is_file()
    assert float(record.evaluation["drop_db"]) <= 0.3  # type: ignore[arg-type]
