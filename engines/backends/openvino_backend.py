"""The OpenVINO backend: the exported graphs compiled by OpenVINO's CPU plugin, in fp32, bf16 or int8."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from engines.backends.base import BackendUnavailable, ExportedGraphBackend, float_feed
from engines.export import export_onnx
from engines.model import EditorModel

log = logging.getLogger(__name__)

OpenVinoPrecision = Literal["fp32", "bf16", "int8"]


def cpu_capabilities(core: object) -> set[str]:
    """What OpenVINO's CPU plugin says this CPU computes natively (FP32, BF16, INT8, ...)."""
    return set(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))  # type: ignore[attr-defined]


def require_precision_here(precision: OpenVinoPrecision, capabilities: set[str]) -> None:
    """bf16 only where the CPU computes it (AMX or AVX-512 bf16): elsewhere OpenVINO would emulate it, slower than
    fp32; int8 only where the CPU has int8 dot products (VNNI or AMX)."""
    needed = {"bf16": "BF16", "int8": "INT8"}.get(precision)
    if needed is not None and needed not in capabilities:
        raise BackendUnavailable(
            f"OpenVINO {precision} needs a CPU that computes {needed} natively; this one offers "
            f"{', '.join(sorted(capabilities)) or 'nothing'}"
        )


class OpenVinoBackend(ExportedGraphBackend):
    """Compiles encoder.onnx, unet.onnx and decoder.onnx (the fp32 graphs, or the model's int8 QDQ graphs) for the
    CPU, once for each batch size it is given; compiled blobs are kept in the cache folder, keyed by the graphs,
    the precision, OpenVINO's version and the CPU's capabilities."""

    name = "openvino"

    def __init__(
        self,
        model: EditorModel,
        resolution: int,
        cache_dir: Path | None = None,
        threads: int | None = None,
        precision: OpenVinoPrecision = "fp32",
        int8_ranges: Path | None = None,
    ) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendUnavailable("the openvino backend needs the 'openvino' package") from exc
        core = ov.Core()
        capabilities = cpu_capabilities(core)
        require_precision_here(precision, capabilities)
        if precision == "int8":
            from engines.quantize import int8_graphs

            graphs = int8_graphs(model, resolution, cache_dir, int8_ranges)
        else:
            graphs = export_onnx(model, resolution, cache_dir)
        # A blob compiled by one OpenVINO for one CPU's instructions is no use to another: both are in the key
        # (OpenVINO also checks its own), and the graphs' folder name carries the weights' hash and the size.
        key = hashlib.sha256(
            f"{graphs.folder.name}|{precision}|{ov.get_version()}|{','.join(sorted(capabilities))}".encode()
        ).hexdigest()[:16]
        self.compiled_cache = graphs.folder.parent.parent / "openvino" / key
        self.compiled_cache.mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {
            "CACHE_DIR": str(self.compiled_cache),
            # bf16 as the inference precision where asked; fp32 pinned otherwise, since on a CPU with AMX
            # OpenVINO's default hint would already be bf16, untested for quality.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            # One request at a time per graph (the engine runs one batch at a time): latency, one stream.
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._core, self._config = core, config
        self._graphs_read = {name: core.read_model(str(graphs.path(name))) for name in ("encoder", "unet", "decoder")}
        self._inputs = {name: {p.get_any_name() for p in m.inputs} for name, m in self._graphs_read.items()}
        # One compiled model a graph and batch size, compiled on first use and kept: the CPU plugin refused the
        # default decoder's convolutions with a dynamic batch axis ("Cannot get dims for non static shape"), and
        # static shapes let it plan every layer's memory once. The cache folder keeps each one across restarts.
        self._requests: dict[tuple[str, int], Any] = {}
        self.precision = precision
        self.graphs = graphs
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def _request(self, name: str, batch: int) -> Any:
        request = self._requests.get((name, batch))
        if request is None:
            graph = self._graphs_read[name].clone()
            graph.reshape({port.get_any_name(): [batch, *list(port.get_partial_shape())[1:]] for port in graph.inputs})
            request = self._core.compile_model(graph, "CPU", self._config).create_infer_request()
            self._requests[(name, batch)] = request
        return request

    def _run(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        feed = float_feed(inputs, self._inputs[name])
        request = self._request(name, next(iter(feed.values())).shape[0])
        request.infer(feed)
        # The output tensor's memory belongs to the request and is overwritten by its next run: copy it out.
        return torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))
