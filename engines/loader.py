"""Build a ready Editor from an EngineSpec: load the weights, pick the backend, fall back where one is missing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.backends.base import Backend, BackendUnavailable
from engines.config import EditorConfig
from engines.editor import Editor
from engines.model import DEFAULT_MODEL_DIR, EditorModel
from engines.params import EditParams
from engines.run_options import require_cuda_graph_on_torch_cuda
from engines.text import CachedPromptEncoder, PromptEncoder

log = logging.getLogger(__name__)

BackendName = Literal["torch", "onnxruntime", "tensorrt"]


class EngineSpec(BaseModel):
    """Which editor to run and how."""

    model_config = ConfigDict(extra="forbid")

    weights: Path | None = Field(None, description="Model folder; None = the shipped default.")
    taesd: Path | None = Field(None, description="A TAESD folder to use instead of the model's own autoencoder.")
    backend: BackendName = Field("onnxruntime", description="torch, onnxruntime or tensorrt.")
    device: str = Field("cpu", description="'cpu' or 'cuda[:N]'.")
    resolution: int | None = Field(None, ge=64, le=2048, description="Override the model's resolution.")
    threads: int | None = Field(None, ge=1, description="CPU threads for the backend (None = library default).")
    max_batch: int = Field(8, ge=1, le=64, description="Most rows in one batched call (TensorRT profiles use it).")
    cache_dir: Path | None = Field(None, description="Exported graphs and engines (default ~/.cache/streamedit).")
    cuda_graph: bool = Field(False, description="Torch on CUDA: replay a captured CUDA graph per batch size.")

    @model_validator(mode="after")
    def _cuda_graph_fits(self) -> EngineSpec:
        require_cuda_graph_on_torch_cuda(self.backend, self.device, self.cuda_graph)
        return self


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
        return OnnxRuntimeBackend(model, resolution, spec.cache_dir, threads=spec.threads, providers=providers)
    from engines.backends.torch_backend import TorchBackend

    # One graph per batch size the worker can form, so none is evicted and captured again mid-stream.
    return TorchBackend(model, device=spec.device, cuda_graph=spec.cuda_graph, max_graphs=spec.max_batch)


def load_editor(spec: EngineSpec, prompt_encoder: PromptEncoder | None = None) -> Editor:
    """Load the model the spec names and wrap it, with its backend and prompt cache, as an Editor.

    `prompt_encoder` replaces the model's own (a benchmark's stand-in where MiniLM is not installed).
    """
    model = EditorModel.from_pretrained(
        spec.weights or DEFAULT_MODEL_DIR, taesd=spec.taesd, prompt_encoder=prompt_encoder
    )
    if spec.resolution is not None:
        model.config = model.config.model_copy(update={"resolution": spec.resolution})
    backend = make_backend(model, spec, model.config.resolution)
    return Editor(backend, model.config, model.schedule, CachedPromptEncoder(model.prompt_encoder))


PRESETS_NAME = "presets.json"


def default_params(config: EditorConfig) -> EditParams:
    """The params a new session starts with: EditParams' defaults with the model's own guidance strengths."""
    return EditParams(text_guidance=config.default_text_guidance, image_guidance=config.default_image_guidance)


def load_presets(folder: Path | None) -> list[dict[str, str]]:
    """The model's one-click edits ([{"name", "prompt"}]) from presets.json beside its weights, if any."""
    path = (folder or DEFAULT_MODEL_DIR) / PRESETS_NAME
    if not path.is_file():
        return []
    return [{"name": str(p["name"]), "prompt": str(p["prompt"])} for p in json.loads(path.read_text())]
