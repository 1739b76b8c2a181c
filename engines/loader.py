"""Build a ready Editor from an EngineSpec: load the weights, pick the backend, fall back where one is missing."""

from __future__ import annotations

import logging
from typing import Literal

import torch

from engines.backends.base import Backend, BackendUnavailable
from engines.editor import Editor
from engines.model import EditorModel
from engines.spec import PRESETS_NAME, EngineSpec, default_params, load_presets
from engines.text import CachedPromptEncoder, PromptEncoder

log = logging.getLogger(__name__)


def make_backend(model: EditorModel, spec: EngineSpec, resolution: int) -> Backend:
    """The backend the spec names; TensorRT falls back to torch, with a logged reason, where it cannot run."""
    if spec.threads and spec.device == "cpu":
        torch.set_num_threads(spec.threads)
    if spec.backend == "tensorrt":
        try:
            from engines.backends.tensorrt_backend import TensorRTBackend

            return TensorRTBackend(model, resolution, max_batch=spec.max_batch, cache_dir=spec.cache_dir)
        except (BackendUnavailable, ImportError) as exc:
            log.warning("TensorRT backend unavailable (%s); falling back to torch", exc)
            from engines.backends.torch_backend import TorchBackend

            return TorchBackend(model, device=spec.device)
    if spec.backend == "onnxruntime":
        from engines.backends.onnxruntime_backend import OnnxRuntimeBackend

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if spec.device.startswith("cuda") else None
        precision = resolve_precision(model, spec, resolution)
        log.info("engine: ONNX Runtime, %s graphs, %dpx", precision, resolution)
        return OnnxRuntimeBackend(
            model, resolution, spec.cache_dir, threads=spec.threads, providers=providers, precision=precision
        )
    if spec.backend == "openvino":
        from engines.backends.openvino_backend import OpenVinoBackend

        precision = resolve_precision(model, spec, resolution)
        log.info("engine: OpenVINO, %s, %dpx", precision, resolution)
        return OpenVinoBackend(model, resolution, spec.cache_dir, threads=spec.threads, precision=precision)
    from engines.backends.torch_backend import TorchBackend

    # One graph per batch size the worker can form, so none is evicted and captured again mid-stream.
    return TorchBackend(model, device=spec.device, cuda_graph=spec.cuda_graph, max_graphs=spec.max_batch)


def resolve_precision(model: EditorModel, spec: EngineSpec, resolution: int) -> Literal["fp32", "bf16", "int8"]:
    """What `spec.precision` means for this model: 'auto' is int8 on ONNX Runtime's CPU provider with ranges made
    for these weights at this size, on a CPU that computes them exactly (where int8 was measured), else fp32;
    'int8' without usable ranges, or on a CPU that would saturate them, is an error."""
    if spec.precision in ("fp32", "bf16") or spec.backend not in ("onnxruntime", "openvino"):
        return spec.precision if spec.precision == "bf16" else "fp32"
    if spec.backend == "openvino" and spec.precision == "auto":
        log.info("precision auto: fp32 on OpenVINO (its bf16 and int8 quality are not yet gated)")
        return "fp32"
    from engines.quantize import QuantizationUnavailable, require_exact_int8, usable_record

    try:
        record = usable_record(model)
        require_exact_int8(record)
    except QuantizationUnavailable as exc:
        if spec.precision == "int8":
            raise
        log.info("precision auto: fp32, as %s", exc)
        return "fp32"
    if spec.precision == "int8":
        return "int8"
    # int8's speed was measured on ONNX Runtime's CPU provider, its quality at the size it was calibrated at.
    if spec.device != "cpu" or resolution != record.resolution:
        log.info("precision auto: fp32 (int8 is measured on the CPU at %dpx only)", record.resolution)
        return "fp32"
    return "int8"


def check_int8(spec: EngineSpec) -> None:
    """Before an engine loads: QuantizationUnavailable where `precision="int8"` would be refused (no ranges for
    these weights, or a CPU that would saturate them), so a command line fails at once instead of an engine later
    (engines.client.check_engine_spec, the server's door to it, asks only when the spec says int8)."""
    from engines.model import INT8_FOLDER, folder_fingerprint
    from engines.quantize import record_for, require_exact_int8

    folder = spec.model_folder()
    require_exact_int8(record_for(folder / INT8_FOLDER, folder_fingerprint(folder, spec.taesd)))


def load_editor(spec: EngineSpec, prompt_encoder: PromptEncoder | None = None) -> Editor:
    """Load the model the spec names and wrap it, with its backend and prompt cache, as an Editor.

    `prompt_encoder` replaces the model's own (a benchmark's stand-in where MiniLM is not installed).
    """
    model = EditorModel.from_pretrained(spec.model_folder(), taesd=spec.taesd, prompt_encoder=prompt_encoder)
    model.config = spec.configure(model.config)
    backend = make_backend(model, spec, model.config.resolution)
    editor = Editor(
        backend, model.config, model.schedule, CachedPromptEncoder(model.prompt_encoder), spec.prompt_cache_size
    )
    log.info("engine: %s", editor.describe())
    return editor


__all__ = ["PRESETS_NAME", "EngineSpec", "default_params", "load_editor", "load_presets", "make_backend"]
