"""The TensorRT backend: fp16 engines built from the exported ONNX graphs, cached on disk, run on torch CUDA tensors."""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tqdm.auto import tqdm

from engines.backends.base import Backend, BackendUnavailable
from engines.export import FRAMES_INPUT, GRAPH_NAMES, default_cache_dir, export_onnx
from engines.model import EditorModel
from engines.spec import DEFAULT_MAX_BATCH

log = logging.getLogger(__name__)

ENGINE_SUFFIX = ".plan"


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or BackendUnavailable saying how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(
            "the tensorrt backend needs NVIDIA TensorRT, and the 'tensorrt' package is not installed "
            "(pip install 'streamedit[tensorrt]' on a machine with a CUDA GPU)"
        ) from exc
    return tensorrt


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "the tensorrt backend needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)"
        )


def engine_cache_key(
    fingerprint: str, resolution: int, min_batch: int, max_batch: int, trt_version: str, gpu_name: str
) -> str:
    """The engine cache's folder name: an engine fits only the weights, frame size, batch range, TensorRT and GPU
    it was built for, so every one of them is in the key (StreamDiffusion's lacked the resolution)."""
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"batch range must satisfy 1 <= min <= max, got {min_batch}..{max_batch}")

    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"

    return f"{slug(fingerprint)}-{resolution}px-b{min_batch}-{max_batch}-trt{slug(trt_version)}-{slug(gpu_name)}"


def engine_folder(
    model: EditorModel, resolution: int, max_batch: int, cache_dir: Path | None, trt_version: str, gpu_name: str
) -> Path:
    key = engine_cache_key(model.fingerprint, resolution, 1, max_batch, trt_version, gpu_name)
    return (cache_dir or default_cache_dir()) / "tensorrt" / key


def graph_max_batch(model: EditorModel, max_batch: int) -> dict[str, int]:
    """Rows each graph must take: a model without guidance embeddings runs its UNet on 3 rows per frame (CFG)."""
    return {"encoder": max_batch, "unet": max_batch * (1 if model.config.distilled else 3), "decoder": max_batch}


def _progress_monitor(trt: ModuleType, graph: str) -> Any:
    """A tqdm bar per TensorRT build phase, through IProgressMonitor (TensorRT 10+); None where it is missing."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class TqdmProgressMonitor(base):  # type: ignore[misc,valid-type]
        """TensorRT calls this from its own threads: the bars are guarded by a lock."""

        def __init__(self) -> None:
            base.__init__(self)
            self._bars: dict[str, tqdm] = {}
            self._lock = threading.Lock()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = 1 + (parent_phase is not None)
                self._bars[phase_name] = tqdm(
                    total=num_steps, desc=f"{graph}: {phase_name}", position=depth, leave=False, unit="step"
                )

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return TqdmProgressMonitor()


def _keep_embeddings_in_fp32(trt: ModuleType, network: Any) -> None:
    """Sinusoids of timesteps (up to 999) and of 1000·s (up to 20 000) lose their phase in fp16: pin them to fp32.

    They are GuidedUNet's own layers (outside /unet/) and the UNet's time_proj.
    """
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.name.startswith("/unet/") and not layer.name.startswith("/unet/time_proj/"):
            continue
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE):  # data, not arithmetic
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outputs or any(out.dtype not in (trt.float32, trt.float16) for out in outputs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)


def build_engine(trt: ModuleType, onnx_path: Path, target: Path, graph: str, max_batch: int) -> None:
    """Build one fp16 engine with an optimization profile for batch 1..max_batch and write it to `target`."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # required before TensorRT 10, implied after
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    if graph == "unet":
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        _keep_embeddings_in_fp32(trt, network)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise RuntimeError(f"{onnx_path}: only the batch axis may be dynamic, {tensor.name} is {tensor.shape}")
        profile.set_shape(tensor.name, (1, *rest), (max_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    monitor = _progress_monitor(trt, graph)
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    partial = target.with_name(f"{target.stem}.{os.getpid()}.partial")
    partial.write_bytes(bytes(serialized))
    partial.replace(target)  # never a half-written engine under the final name


def build_engines(
    model: EditorModel,
    resolution: int,
    max_batch: int = DEFAULT_MAX_BATCH,
    cache_dir: Path | None = None,
    device: str | torch.device = "cuda",
) -> Path:
    """Export the ONNX graphs and build any engine missing from the cache; returns the engines' folder."""
    trt = import_tensorrt()
    require_cuda()
    device = torch.device(device)
    folder = engine_folder(model, resolution, max_batch, cache_dir, trt.__version__, torch.cuda.get_device_name(device))
    missing = [g for g in GRAPH_NAMES if not (folder / f"{g}{ENGINE_SUFFIX}").is_file()]
    if not missing:
        return folder
    graphs = export_onnx(model, resolution, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    limits = graph_max_batch(model, max_batch)
    with torch.cuda.device(device):
        for graph in tqdm(missing, desc="building TensorRT engines", unit="engine", position=0):
            log.info("building the %s engine (batch 1..%d) in %s", graph, limits[graph], folder)
            build_engine(trt, graphs.path(graph), folder / f"{graph}{ENGINE_SUFFIX}", graph, limits[graph])
    return folder


def _torch_dtype(trt: ModuleType, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.bool: torch.bool}
    for name, torch_dtype in (("int64", torch.int64), ("bfloat16", torch.bfloat16), ("int8", torch.int8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = torch_dtype
    return table[dtype]


class _Engine:
    """One deserialized engine and its execution context; tensors are bound by their CUDA pointers."""

    def __init__(self, trt: ModuleType, runtime: Any, plan: Path, device: torch.device, max_batch: int) -> None:
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {plan}; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        self.device = device
        self.max_batch = max_batch
        self.plan = plan
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        batch = next(iter(inputs.values())).shape[0]
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"{self.plan.name} was built for batch 1..{self.max_batch}, got {batch} rows")
        bound: list[torch.Tensor] = []  # alive until the engine has run
        for name in self.inputs:
            tensor = inputs[name].to(self.device, self.dtypes[name]).contiguous()
            bound.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            results.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.plan.name}")
        return results[0]


class TensorRTBackend(Backend):
    """Runs encoder.plan, unet.plan and decoder.plan (fp16 inside, fp32 at the edges) on one CUDA device.

    Engines are built on first use for this model, resolution, batch range, TensorRT version and GPU, then
    loaded from the cache (see engine_cache_key); building a full-size UNet takes minutes.
    """

    name = "tensorrt"

    def __init__(
        self,
        model: EditorModel,
        resolution: int,
        max_batch: int = DEFAULT_MAX_BATCH,
        cache_dir: Path | None = None,
        device: str | torch.device = "cuda",
    ) -> None:
        trt = import_tensorrt()
        require_cuda()
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = torch.float32  # the graphs' inputs and outputs; the engines compute in fp16
        self.folder = build_engines(model, resolution, max_batch, cache_dir, self.device)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        limits = graph_max_batch(model, max_batch)
        with torch.cuda.device(self.device):
            self._engines = {
                g: _Engine(trt, self._runtime, self.folder / f"{g}{ENGINE_SUFFIX}", self.device, limits[g])
                for g in GRAPH_NAMES
            }

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._engines["encoder"](images=images)

    def denoise(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor
    ) -> torch.Tensor:
        return self._engines["unet"](
            sample=sample, timestep=timestep.float(), encoder_hidden_states=context, guidance=guidance.float()
        )

    def decode(self, latents: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        engine = self._engines["decoder"]
        if FRAMES_INPUT not in engine.inputs:
            return engine(latents=latents)
        if frames is None:
            raise ValueError("this model's decoder reads the input frame (it has a frame skip): pass the frames")
        return engine(latents=latents, **{FRAMES_INPUT: frames})
