"""The ONNX Runtime backend: the exported graphs on ORT's CPU (or CUDA) execution provider."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from engines.backends.base import BackendUnavailable, ExportedGraphBackend, float_feed
from engines.export import export_onnx
from engines.model import EditorModel


class OnnxRuntimeBackend(ExportedGraphBackend):
    """Runs encoder.onnx, unet.onnx and decoder.onnx (fp32, or int8 from the model's ranges); builds them if needed."""

    name = "onnxruntime"

    def __init__(
        self,
        model: EditorModel,
        resolution: int,
        cache_dir: Path | None = None,
        threads: int | None = None,
        providers: list[str] | None = None,
        precision: Literal["fp32", "int8"] = "fp32",
        int8_ranges: Path | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("the onnxruntime backend needs the 'onnxruntime' package") from exc
        if precision == "int8":
            from engines.quantize import int8_graphs

            graphs = int8_graphs(model, resolution, cache_dir, int8_ranges)  # default: the model's own int8/
        else:
            graphs = export_onnx(model, resolution, cache_dir)
        self.precision = precision
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # ORT's pool threads spin after each run by default; between our three graphs torch does small
        # tensor work on the same cores, and the spinning threads starved it (2.5x slower edits, measured).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Several threads call run() on different sessions; ORT sessions are safe for that.
        providers = providers or ["CPUExecutionProvider"]
        self._sessions = {
            name: ort.InferenceSession(str(graphs.path(name)), options, providers=providers)
            for name in ("encoder", "unet", "decoder")
        }
        # What each graph takes: a UNet without guidance embeddings has no `guidance` input (export.input_names).
        self._inputs = {name: {i.name for i in session.get_inputs()} for name, session in self._sessions.items()}
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.graphs = graphs

    def _run(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._sessions[name].run(None, float_feed(inputs, self._inputs[name]))[0])
