"""A decoder that reads the input frame (engines.autoencoder.FrameSkip) on a tiny editor the test makes: loaded from
frame_skip/, exact when zero, run alike by the torch and ONNX Runtime backends and by int8 calibration (which keeps
the decoder float from where the frame joins, wherever that is), refused with a message where a frame is missing or
the skip does not fit.

Stated tolerance: as tests/test_engine_onnx.py, ONNX Runtime and eager PyTorch agree within float rounding
(atol 1e-5 + rtol 1e-4 on tensors, 1 level on uint8 frames).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from diffusers import AutoencoderTiny

from engines.autoencoder import FrameSkip, TinyCodec
from engines.backends.onnxruntime_backend import OnnxRuntimeBackend
from engines.backends.torch_backend import TorchBackend
from engines.editor import Editor, EditRequest, frames_to_tensor
from engines.export import export_onnx
from engines.model import FRAME_SKIP_FOLDER, EditorModel, ModelFolderError, folder_fingerprint, load_frame_skip
from engines.params import EditParams
from engines.quantize import DEFAULT_RECIPE, calibrate, recipe_for
from engines.temporal import StreamState
from engines.text import CachedPromptEncoder
from tests.test_engine_loading import TINY_IMAGE, make_tiny_student_folder, random_frames
from training.decoder_blocks import without_decoder_blocks

ATOL, RTOL = 1e-5, 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def add_frame_skip(folder: Path, seed: int = 0) -> FrameSkip:
    """Give a tiny student folder a frame skip with random (non-zero) weights, as training leaves one."""
    width = EditorModel.from_pretrained(folder).codec.taesd.config.decoder_block_out_channels[-1]
    skip = FrameSkip(feature_channels=width, kernel_size=3)
    with torch.no_grad():
        skip.proj.weight.copy_(torch.randn(skip.proj.weight.shape, generator=torch.Generator().manual_seed(seed)))
    skip.save_pretrained(str(folder / FRAME_SKIP_FOLDER))
    return skip


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_student_folder(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_student_folder(tmp_path_factory.mktemp("skip"))
    add_frame_skip(folder)
    return folder


@pytest.fixture(scope="module")
def model(folder: Path) -> EditorModel:
    return EditorModel.from_pretrained(folder)


def edit(backend: TorchBackend | OnnxRuntimeBackend, model: EditorModel, frames: list[np.ndarray]) -> list[np.ndarray]:
    editor = Editor(backend, model.config, model.schedule, CachedPromptEncoder(model.prompt_encoder))
    params = EditParams(prompt="make it a pencil sketch", seed=3)
    context = editor.encode_prompt(params.prompt)
    return [r.frame for r in editor.edit([EditRequest(f, context, params, StreamState(3)) for f in frames])]


def test_a_zero_frame_skip_leaves_the_decoder_exactly_as_it_was(plain_folder: Path) -> None:
    """The split forward is DecoderTiny's own: a fresh (zero) skip gives the same bits, whatever the frames."""
    codec = EditorModel.from_pretrained(plain_folder).codec
    assert isinstance(codec, TinyCodec) and not codec.reads_frames
    width = codec.taesd.config.decoder_block_out_channels[-1]
    skipped = TinyCodec(codec.taesd, FrameSkip(feature_channels=width))
    latents = torch.randn(2, 4, TINY_IMAGE // 8, TINY_IMAGE // 8, generator=torch.Generator().manual_seed(0))
    frames = frames_to_tensor(random_frames(2))
    with torch.no_grad():
        assert torch.equal(skipped.decode(latents, frames), codec.decode(latents))
        assert torch.equal(skipped.decode(latents, frames), codec.decode(latents, frames))  # a plain one ignores them


def test_a_folder_with_frame_skip_loads_it_and_its_decoder_reads_the_frame(
    folder: Path, plain_folder: Path, model: EditorModel
) -> None:
    assert isinstance(model.codec, TinyCodec) and model.codec.reads_frames
    assert model.fingerprint != folder_fingerprint(plain_folder)  # the engine cache keys on the skip's weights too
    latents = torch.randn(1, 4, TINY_IMAGE // 8, TINY_IMAGE // 8, generator=torch.Generator().manual_seed(1))
    one, other = (frames_to_tensor(random_frames(1, seed=s)) for s in (0, 1))
    with torch.no_grad():
        assert not torch.allclose(model.codec.decode(latents, one), model.codec.decode(latents, other))
        with pytest.raises(ValueError, match="reads the input frame"):
            model.codec.decode(latents)
    # A frame skip belongs to the folder's own decoder: a TAESD named apart runs without it.
    assert not EditorModel.from_pretrained(folder, taesd=folder / "taesd").codec.reads_frames
    # save_pretrained writes it back as it was.
    copy = folder.parent / "saved"
    model.save_pretrained(copy)
    saved = load_frame_skip(copy, torch.float32)
    assert saved is not None and model.codec.frame_skip is not None
    assert torch.equal(saved.proj.weight, model.codec.frame_skip.proj.weight)


def test_a_frame_skip_that_does_not_fit_the_decoder_is_refused(tmp_path: Path) -> None:
    folder = make_tiny_student_folder(tmp_path / "wrong")
    FrameSkip(feature_channels=5).save_pretrained(str(folder / FRAME_SKIP_FOLDER))
    with pytest.raises(ModelFolderError, match="feeds 5 channels, the decoder's last stage is 8 wide"):
        EditorModel.from_pretrained(folder)
    (folder / FRAME_SKIP_FOLDER / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="frame skip: no weights"):
        EditorModel.from_pretrained(folder)


def test_onnx_runtime_runs_the_frame_reading_decoder_as_torch_does(model: EditorModel, tmp_path: Path) -> None:
    """The exported decoder takes (latents, frames) with a dynamic batch; edits agree with the torch backend."""
    graphs = export_onnx(model, TINY_IMAGE, tmp_path)
    import onnx

    inputs = [i.name for i in onnx.load(str(graphs.path("decoder")), load_external_data=False).graph.input]
    assert inputs == ["latents", "frames"]
    torch_backend, ort = TorchBackend(model), OnnxRuntimeBackend(model, TINY_IMAGE, tmp_path, threads=1)
    for batch in (1, 3):
        latents = torch.randn(batch, 4, TINY_IMAGE // 8, TINY_IMAGE // 8, generator=torch.Generator().manual_seed(2))
        frames = frames_to_tensor(random_frames(batch, seed=batch))
        torch.testing.assert_close(
            ort.decode(latents, frames), torch_backend.decode(latents, frames), atol=ATOL, rtol=RTOL
        )
    with pytest.raises(ValueError, match="reads the input frame"):
        ort.decode(latents)
    frames_in = random_frames(3, seed=4)
    for a, b in zip(edit(ort, model, frames_in), edit(torch_backend, model, frames_in), strict=True):
        assert int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def test_int8_calibration_records_the_frames_the_decoder_reads(model: EditorModel, tmp_path: Path) -> None:
    """The decoder's int8 ranges cover its frame input; the int8 editor runs and stays near fp32."""
    ranges = tmp_path / "int8"
    params = [EditParams(prompt="make it a pencil sketch", seed=5)]
    calibrate(model, random_frames(4, seed=6), params, ranges, cache_dir=tmp_path)
    assert "frames" in (ranges / "decoder.ranges.json").read_text()
    int8 = OnnxRuntimeBackend(model, TINY_IMAGE, tmp_path, threads=1, precision="int8", int8_ranges=ranges)
    fp32 = OnnxRuntimeBackend(model, TINY_IMAGE, tmp_path, threads=1)
    frames = random_frames(2, seed=7)
    for a, b in zip(edit(int8, model, frames), edit(fp32, model, frames), strict=True):
        assert float(np.abs(a.astype(float) - b.astype(float)).mean()) < 8.0  # int8 rounding, not another image


def test_int8_keeps_the_decoder_float_from_where_the_frame_joins_in_a_pruned_decoder_too(
    plain_folder: Path, tmp_path: Path
) -> None:
    """The recipe names no layer: for a decoder with a block removed (so its layers are renumbered) the float part is
    still the frame skip, its Add and every convolution after the last upsampling, and nothing before it."""
    folder = tmp_path / "pruned"
    shutil.copytree(plain_folder, folder)
    pruned = without_decoder_blocks(AutoencoderTiny.from_pretrained(str(folder / "taesd")), [8])
    shutil.rmtree(folder / "taesd")
    pruned.save_pretrained(str(folder / "taesd"))
    add_frame_skip(folder)
    model = EditorModel.from_pretrained(folder)
    exclude = recipe_for(model, DEFAULT_RECIPE).graphs["decoder"].exclude
    nodes = list(onnx.load(str(export_onnx(model, TINY_IMAGE, tmp_path).path("decoder"))).graph.node)
    kept_float = {n.name for n in nodes if any(re.search(pattern, n.name) for pattern in exclude)}
    last_upsample = max(i for i, n in enumerate(nodes) if n.op_type == "Resize")
    convs = {i: n.name for i, n in enumerate(nodes) if n.op_type == "Conv"}
    skip = {name for name in convs.values() if name.startswith("/frame_skip/")}
    assert len(skip) == 1 and skip <= kept_float
    assert {name for i, name in convs.items() if i > last_upsample} <= kept_float
    assert not {name for i, name in convs.items() if i < last_upsample} - skip & kept_float
    skip_output = next(n.output[0] for n in nodes if n.name in skip)
    assert all(n.name in kept_float for n in nodes if skip_output in n.input)  # the Add where the frame joins
    # A decoder that does not read the frame has nothing to keep float.
    assert recipe_for(EditorModel.from_pretrained(plain_folder), DEFAULT_RECIPE) == DEFAULT_RECIPE
