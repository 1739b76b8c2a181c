"""The PyTorch backend: eager modules on CPU or CUDA (fp16, channels_last, optional torch.compile or CUDA graphs)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engines.backends.base import Backend
from engines.model import EditorModel

TensorFn = Callable[..., torch.Tensor]
Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


class CudaGraphRunner:
    """Runs `fn` by replaying a CUDA graph captured for each input signature (shapes and dtypes) it sees.

    The first call with a new signature warms up on a side stream and captures; later calls copy their
    inputs into the captured static buffers, replay, and return a copy of the static output. At most
    `max_graphs` signatures are kept (least recently used goes first), as each holds its own memory pool.
    """

    def __init__(self, fn: TensorFn, device: torch.device, max_graphs: int = 8, warmup: int = 2) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.fn = fn
        self.device = device
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.captures = 0
        self._graphs: OrderedDict[Signature, _Captured] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key: Signature = tuple((tuple(a.shape), a.dtype) for a in args)
        with self._lock:
            captured = self._graphs.get(key)
            if captured is None:
                captured = self._capture(args)
                self._graphs[key] = captured
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            for static, arg in zip(captured.inputs, args, strict=True):
                static.copy_(arg)
            captured.graph.replay()
            return captured.output.clone()

    def _capture(self, args: tuple[torch.Tensor, ...]) -> _Captured:
        inputs = [a.to(self.device).clone() for a in args]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # lazy initialisations (cuDNN plans, workspaces) happen outside the graph
            for _ in range(self.warmup):
                self.fn(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.fn(*inputs)
        self.captures += 1
        return _Captured(graph, inputs, output)


class TorchBackend(Backend):
    """Runs EditorModel's modules directly; the reference every other backend is checked against.

    On CUDA the modules run in fp16 (unless `dtype` says otherwise) with channels_last weights; `compile`
    wraps them in torch.compile (mode max-autotune, which captures CUDA graphs itself), `cuda_graph`
    captures plain CUDA graphs per batch shape instead (no compile time; fixed shapes only).
    """

    name = "torch"

    def __init__(
        self,
        model: EditorModel,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        compile: bool = False,
        cuda_graph: bool = False,
        max_graphs: int = 8,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("the torch backend was asked for CUDA, but torch sees no CUDA device")
        if self.device.type != "cuda" and (compile or cuda_graph):
            raise ValueError(f"compile and cuda_graph are CUDA options; the torch backend runs on {self.device}")
        if compile and cuda_graph:
            raise ValueError("compile (max-autotune) already captures CUDA graphs: pick compile or cuda_graph")
        # fp16 pays on a GPU; CPU kernels for it are slow, so CPU stays fp32 unless asked.
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device, self.dtype)
        self._unet: TensorFn = self.model.unet
        self._encode: TensorFn = self.model.codec.encode
        self._decode: TensorFn = self.model.codec.decode
        self.graph_runners: list[CudaGraphRunner] = []
        if self.device.type == "cuda":
            self.model.unet.to(memory_format=torch.channels_last)
            self.model.codec.to(memory_format=torch.channels_last)
            if compile:
                self._unet = torch.compile(self._unet, mode="max-autotune", fullgraph=False)
                self._encode = torch.compile(self._encode)
                self._decode = torch.compile(self._decode)
            if cuda_graph:
                self.graph_runners = [
                    CudaGraphRunner(fn, self.device, max_graphs) for fn in (self._unet, self._encode, self._decode)
                ]
                self._unet, self._encode, self._decode = self.graph_runners

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images.to(self.device, self.dtype))

    @torch.inference_mode()
    def denoise(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor
    ) -> torch.Tensor:
        return self._unet(
            sample.to(self.device, self.dtype),
            timestep.to(self.device),
            context.to(self.device, self.dtype),
            guidance.to(self.device, torch.float32),
        )

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        if frames is None or not self.model.codec.reads_frames:
            return self._decode(latents.to(self.device, self.dtype))
        return self._decode(latents.to(self.device, self.dtype), frames.to(self.device, self.dtype))
