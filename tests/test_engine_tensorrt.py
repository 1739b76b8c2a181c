"""The TensorRT backend and the build-engine command: cache keys, clean failures and ONNX export run here;
building and running engines needs TensorRT and a CUDA GPU and is skipped, with the reason, elsewhere."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines.backends.base import BackendUnavailable
from engines.backends.tensorrt_backend import (
    TensorRTBackend,
    engine_cache_key,
    engine_folder,
    graph_max_batch,
)
from engines.backends.torch_backend import TorchBackend
from engines.build import main
from engines.export import GRAPH_NAMES, ONNX_OPSET
from engines.loader import EngineSpec, load_editor
from engines.model import EditorModel
from tests.test_engine_loading import TINY_IMAGE, make_tiny_pix2pix_folder, make_tiny_student_folder

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tensorrt_installed() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TRT_AND_CUDA = _tensorrt_installed() and torch.cuda.is_available()
needs_trt = pytest.mark.skipif(not HAS_TRT_AND_CUDA, reason="needs the tensorrt package and a CUDA GPU")
lacks_trt = pytest.mark.skipif(HAS_TRT_AND_CUDA, reason="TensorRT and CUDA are present: nothing is missing here")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_student_folder(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def model(folder: Path) -> EditorModel:
    return EditorModel.from_pretrained(folder)


# ---------------------------------------------------------------- the engine cache key

BASE = {
    "fingerprint": "0123456789abcdef",
    "resolution": 512,
    "min_batch": 1,
    "max_batch": 8,
    "trt_version": "11.3.0",
    "gpu_name": "NVIDIA H100 80GB HBM3",
}


def test_cache_key_names_every_component() -> None:
    key = engine_cache_key(**BASE)  # type: ignore[arg-type]
    assert key == "0123456789abcdef-512px-b1-8-trt11.3.0-nvidia-h100-80gb-hbm3"
    assert engine_cache_key(**BASE) == key  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fingerprint", "fedcba9876543210"),
        ("resolution", 256),
        ("min_batch", 2),
        ("max_batch", 16),
        ("trt_version", "11.4.0"),
        ("gpu_name", "NVIDIA GeForce RTX 4090"),
    ],
)
def test_cache_key_changes_with_each_component(field: str, value: object) -> None:
    assert engine_cache_key(**{**BASE, field: value}) != engine_cache_key(**BASE)  # type: ignore[arg-type]


def test_cache_key_is_one_safe_folder_name() -> None:
    key = engine_cache_key(**{**BASE, "gpu_name": "Tesla T4 / PCIe (rev a1)", "trt_version": "11.0.1.post1"})  # type: ignore[arg-type]
    assert re.fullmatch(r"[a-z0-9.-]+", key), key
    assert key.endswith("-trt11.0.1.post1-tesla-t4-pcie-rev-a1")
    with pytest.raises(ValueError, match=r"1 <= min <= max, got 4\.\.2"):
        engine_cache_key(**{**BASE, "min_batch": 4, "max_batch": 2})  # type: ignore[arg-type]


def test_engine_folder_is_keyed_by_the_models_fingerprint_and_resolution(model: EditorModel, tmp_path: Path) -> None:
    path = engine_folder(model, TINY_IMAGE, 4, tmp_path, "11.3.0", "NVIDIA L4")
    assert path == tmp_path / "tensorrt" / f"{model.fingerprint}-{TINY_IMAGE}px-b1-4-trt11.3.0-nvidia-l4"
    assert engine_folder(model, 2 * TINY_IMAGE, 4, tmp_path, "11.3.0", "NVIDIA L4") != path


def test_a_cfg_teacher_unet_engine_takes_three_rows_per_frame(model: EditorModel) -> None:
    assert graph_max_batch(model, 4) == {"encoder": 4, "unet": 4, "decoder": 4}
    teacher = model.config.model_copy(update={"guidance_embedding_dim": None})
    assert graph_max_batch(EditorModel(**{**model.__dict__, "config": teacher}), 4)["unet"] == 12


# ---------------------------------------------------------------- where TensorRT or CUDA is missing


@lacks_trt
def test_backend_says_what_is_missing(model: EditorModel, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="tensorrt|CUDA") as caught:
        TensorRTBackend(model, TINY_IMAGE, max_batch=2, cache_dir=tmp_path)
    missing = "the 'tensorrt' package is not installed" if not _tensorrt_installed() else "needs a CUDA GPU"
    assert missing in str(caught.value)
    assert not (tmp_path / "tensorrt").exists(), "nothing is built or cached when the backend cannot run"


@lacks_trt
def test_loader_falls_back_to_torch_with_a_logged_reason(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="engines.loader"):
        editor = load_editor(EngineSpec(weights=folder, backend="tensorrt", cache_dir=tmp_path))
    assert isinstance(editor.backend, TorchBackend)
    assert "TensorRT backend unavailable" in caplog.text and "falling back to torch" in caplog.text


# ---------------------------------------------------------------- the build-engine command


def test_build_command_exports_onnx_and_reports_where(
    folder: Path, model: EditorModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(folder), "--cache-dir", str(tmp_path), "--max-batch", "2"]) == 0
    out = capsys.readouterr().out
    slot = tmp_path / "onnx" / f"{model.fingerprint}-{TINY_IMAGE}px-opset{ONNX_OPSET}"
    assert f"ONNX graphs: {slot}\n" in out
    for name in GRAPH_NAMES:
        assert (slot / f"{name}.onnx").stat().st_size > 1000
        assert f"{name}.onnx" in out
    if HAS_TRT_AND_CUDA:
        assert "TensorRT engines: " + str(tmp_path / "tensorrt") in out
    else:
        assert "TensorRT engines: not built (the tensorrt backend needs" in out

    stamp = (slot / "unet.onnx").stat().st_mtime_ns
    assert main([str(folder), "--cache-dir", str(tmp_path), "--tensorrt", "skip"]) == 0
    out = capsys.readouterr().out
    assert f"ONNX graphs: {slot} (cached)" in out and "TensorRT engines: skipped" in out
    assert (slot / "unet.onnx").stat().st_mtime_ns == stamp


def test_build_command_resolution_flag_gets_its_own_cache_slot(
    folder: Path, model: EditorModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(folder), "--cache-dir", str(tmp_path), "--resolution", "128", "--tensorrt", "skip"]) == 0
    assert (tmp_path / "onnx" / f"{model.fingerprint}-128px-opset{ONNX_OPSET}" / "unet.onnx").is_file()
    assert "128px" in capsys.readouterr().out


def test_build_command_bad_folder_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: cannot load a model from ") and "is not a model folder" in captured.err
    assert "Traceback" not in captured.err + captured.out

    broken = make_tiny_pix2pix_folder(tmp_path / "no_autoencoder", autoencoder="none")
    assert main([str(broken), "--cache-dir", str(tmp_path)]) == 2
    assert "no autoencoder found" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()


def test_build_command_as_a_process_exits_non_zero_without_a_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engines.build", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2
    assert "error: cannot load a model from" in done.stderr and "Traceback" not in done.stderr


def test_build_command_rejects_bad_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--resolution", "100"], ["--max-batch", "0"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
    assert "--resolution must be a multiple of 8" in capsys.readouterr().err


@lacks_trt
def test_build_command_require_tensorrt_fails_cleanly(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(folder), "--cache-dir", str(tmp_path), "--tensorrt", "require"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: TensorRT engines cannot be built here: the tensorrt backend needs")
    assert "Traceback" not in err
    assert not (tmp_path / "onnx").exists(), "it fails before exporting anything"


# ---------------------------------------------------------------- with TensorRT and a GPU

FP16_ATOL, FP16_RTOL = 2e-2, 2e-2  # fp16 engines against the fp32 torch reference


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt
def test_engines_match_torch_and_are_cached(model: EditorModel, tmp_path: Path) -> None:
    backend = TensorRTBackend(model, TINY_IMAGE, max_batch=4, cache_dir=tmp_path)
    reference = TorchBackend(model, device="cpu", dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3, 4):
        images = torch.rand(batch, 3, TINY_IMAGE, TINY_IMAGE, generator=generator) * 2 - 1
        latents = torch.randn(batch, 4, TINY_IMAGE // 8, TINY_IMAGE // 8, generator=generator)
        sample = torch.randn(batch, 8, TINY_IMAGE // 8, TINY_IMAGE // 8, generator=generator)
        context = torch.randn(batch, model.config.max_prompt_tokens, model.prompt_encoder.dim, generator=generator)
        timestep = torch.full((batch,), 999)
        guidance = torch.tensor([[7.5, 1.5], [2.0, 1.0], [12.0, 2.5], [0.0, 0.0]][:batch])
        pairs = [
            (backend.encode(images.cuda()), reference.encode(images)),
            (
                backend.denoise(sample.cuda(), timestep.cuda(), context.cuda(), guidance.cuda()),
                reference.denoise(sample, timestep, context, guidance),
            ),
            (backend.decode(latents.cuda()), reference.decode(latents)),
        ]
        for got, expected in pairs:
            assert got.is_cuda and got.shape == expected.shape
            torch.testing.assert_close(got.float().cpu(), expected, atol=FP16_ATOL, rtol=FP16_RTOL)
    with pytest.raises(ValueError, match="batch 1..4, got 5"):
        backend.decode(torch.zeros(5, 4, TINY_IMAGE // 8, TINY_IMAGE // 8, device="cuda"))

    plans = sorted(backend.folder.glob("*.plan"))
    assert [p.stem for p in plans] == sorted(GRAPH_NAMES)
    stamps = [p.stat().st_mtime_ns for p in plans]
    again = TensorRTBackend(model, TINY_IMAGE, max_batch=4, cache_dir=tmp_path)
    assert again.folder == backend.folder
    assert [p.stat().st_mtime_ns for p in plans] == stamps, "cached engines were rebuilt"
