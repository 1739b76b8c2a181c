"""Rules on how an engine may be run, checked both by EngineSpec and by the service's settings (no torch import)."""

from __future__ import annotations


def require_cuda_graph_on_torch_cuda(backend: str, device: str, cuda_graph: bool) -> None:
    """CUDA-graph replay is the torch backend's, on a CUDA device: asking for it elsewhere is an error."""
    if cuda_graph and (backend != "torch" or not device.startswith("cuda")):
        raise ValueError(
            f"cuda_graph needs the torch backend on a CUDA device (got backend {backend}, device {device})"
        )


def require_precision_on_backend(backend: str, precision: str) -> None:
    """int8 graphs are ONNX (QDQ) graphs that ONNX Runtime and OpenVINO run; bf16 is OpenVINO's inference hint."""
    if precision == "int8" and backend not in ("onnxruntime", "openvino"):
        raise ValueError(f"precision int8 needs the onnxruntime or openvino backend (got backend {backend})")
    if precision == "bf16" and backend != "openvino":
        raise ValueError(f"precision bf16 needs the openvino backend (got backend {backend})")
