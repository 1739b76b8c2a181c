"""Static int8 quantization of the exported graphs (ONNX QDQ): calibrated once on real frames, rebuilt from its ranges.

Calibration runs the fp32 ONNX Runtime editor on real frames and edits, keeps every graph's inputs, and lets ONNX
Runtime's MinMax calibrator find each activation's range. The ranges (one JSON per graph), the recipe and the
weights' fingerprint go into the model folder's `int8/`; from them any machine rebuilds the same int8 graphs into
the engine cache without a single frame. Whether int8 is good enough is measured elsewhere (training/quantize.py,
against the evaluation's held-out frames); this module only makes and finds the graphs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from pydantic import BaseModel, ConfigDict, Field

from engines.autoencoder import TinyCodec, last_upsample_end
from engines.backends.base import Backend
from engines.export import FRAMES_INPUT, GRAPH_NAMES, INPUT_NAMES, ExportedGraphs, export_onnx, input_names, onnx_folder
from engines.model import INT8_FOLDER, EditorModel
from engines.params import EditParams

log = logging.getLogger(__name__)

RECORD_NAME = "quantization.json"


def ranges_name(graph: str) -> str:
    """The file of one graph's activation ranges (ONNX Runtime's calibration cache format)."""
    return f"{graph}.ranges.json"


class QuantizationUnavailable(RuntimeError):
    """No int8 ranges fit this model; the message says why and how to make them."""


class GraphRecipe(BaseModel):
    """Which nodes of one graph become int8."""

    model_config = ConfigDict(extra="forbid")

    op_types: list[str] | None = Field(None, description="Op types to quantize; None: every one ORT can.")
    exclude: list[str] = Field(default_factory=list, description="Regexes on node names that stay float.")
    float_after_frame_join: bool = Field(
        False,
        description="The decoder from where the input frame joins stays float: its frame skip, their Add and every "
        "layer after the last upsampling, found in the model at calibration and written into `exclude`.",
    )


class QuantizationRecipe(BaseModel):
    """How the three graphs are quantized: int8 weights (per channel) and uint8 activations, ORT's CPU choice."""

    model_config = ConfigDict(extra="forbid")

    graphs: dict[str, GraphRecipe]
    per_channel: bool = True
    reduce_range: bool = Field(
        False,
        description="Weights in 7 bits, so that a pair of uint8 × int8 products fits the 16-bit sums of x86 CPUs "
        "without VNNI: exact on every CPU, at some precision (ONNX Runtime's advice for such CPUs).",
    )


# x86 flags of an instruction that sums uint8 × int8 products straight into 32 bits (ONNX Runtime's int8 kernels
# use it where present). Without one, AVX2 and AVX-512 pair two products into a saturating 16-bit sum first, and
# full-range int8 weights overflow it: on an AMD EPYC (AVX2 only) the shipped v9 lost 2.33 dB mean on the
# held-out frames and painted 8×8 patches 81 levels off fp32 (a purple blot on an orange hoodie under "black and
# white"); the same ranges had cost 0.15 dB on the Intel machines that gated them (training/report/int8.md).
EXACT_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


def int8_saturation(machine: str, cpu_flags: frozenset[str] | None) -> str | None:
    """Why this CPU's int8 kernels would saturate full-range int8 weights (None where they sum exactly).

    `machine` is platform.machine(); `cpu_flags` the kernel's CPU flags, None where they cannot be read. Only x86
    pairs products into 16 bits; an x86 CPU whose flags are unknown is taken to saturate, so unmeasured int8 never
    runs by default.
    """
    if machine.lower() not in X86_MACHINES:
        return None
    if cpu_flags is None:
        return "this x86 CPU's flags could not be read, so whether its int8 sums saturate is unknown"
    if cpu_flags & EXACT_INT8_FLAGS:
        return None
    return "this x86 CPU has no VNNI, so its int8 kernels sum pairs of products in saturating 16 bits"


def cpuinfo_field(name: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """One field of the first processor Linux describes ('flags', 'model name'), or None where there is none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU flags Linux reports, or None where it reports none."""
    flags = cpuinfo_field("flags", cpuinfo)
    return None if flags is None else frozenset(flags.split())


def this_cpu_saturates_int8() -> str | None:
    """int8_saturation() of the machine this runs on."""
    import platform

    return int8_saturation(platform.machine(), read_cpu_flags())


# Measured on the shipped default (training/report/int8.md): quantizing every op of the UNet lost the edit
# altogether (held-out PSNR fell to the unedited input's); its timestep and guidance embeddings and attention
# scores need float. Its convolutions and projections in int8, and the whole 16-wide autoencoder, cost < 0.1 dB.
# Once the decoder read the input frame (v7), its full-resolution part in int8 (from where the frame joins: the
# frame skip, its Add and the layers after the last upsampling) cost 0.27 dB and more flicker; kept float,
# 0.13 dB and fixed-noise flicker 1.03 / 1.29 / 5.48 instead of 1.15 / 1.37 / 6.10, at the same frame time.
DEFAULT_RECIPE = QuantizationRecipe(
    graphs={
        "encoder": GraphRecipe(),
        "unet": GraphRecipe(op_types=["Conv", "MatMul"], exclude=[r"attn\d/MatMul(_1)?$", r"time_embedding/"]),
        "decoder": GraphRecipe(float_after_frame_join=True),
    }
)


def recipe_for(model: EditorModel, recipe: QuantizationRecipe) -> QuantizationRecipe:
    """`recipe` with what depends on this model's layout written out as node names (the record keeps this form)."""
    codec = model.codec
    if not isinstance(codec, TinyCodec) or not codec.reads_frames:
        return recipe
    layers = len(codec.taesd.decoder.layers)
    after_join = "|".join(str(i) for i in range(last_upsample_end(codec.taesd), layers))
    # Node names of the exported decoder (CodecDecoder): the skip's own, the Add that joins it, the layers after.
    joined = [r"^/frame_skip/", r"^/Add$", rf"^/layers\.({after_join})/"]
    graphs = {
        name: part.model_copy(update={"exclude": [*part.exclude, *joined]}) if part.float_after_frame_join else part
        for name, part in recipe.graphs.items()
    }
    return recipe.model_copy(update={"graphs": graphs})


class QuantizationRecord(BaseModel):
    """int8/quantization.json: which weights, size and recipe the ranges belong to, and how they were made."""

    model_config = ConfigDict(extra="forbid")

    fingerprint: str = Field(description="The weights' fingerprint the ranges were calibrated on.")
    resolution: int
    recipe: QuantizationRecipe
    onnxruntime: str = Field(description="ONNX Runtime version that calibrated.")
    calibration: dict[str, object] = Field(default_factory=dict, description="Frames and edits used (for readers).")
    evaluation: dict[str, object] = Field(default_factory=dict, description="The quality gate's result, if run.")


def default_ranges_folder(model: EditorModel) -> Path | None:
    return None if model.folder is None else model.folder / INT8_FOLDER


def read_record(folder: Path) -> QuantizationRecord | None:
    path = folder / RECORD_NAME
    if not path.is_file():
        return None
    return QuantizationRecord.model_validate_json(path.read_text())


def usable_record(model: EditorModel, ranges: Path | None = None) -> QuantizationRecord:
    """The record of ranges made for exactly these weights, or QuantizationUnavailable saying why not."""
    return record_for(ranges or default_ranges_folder(model), model.fingerprint)


def record_for(folder: Path | None, fingerprint: str) -> QuantizationRecord:
    """The record of the ranges in `folder` if they were made for the weights of `fingerprint` (no model loaded)."""
    fix = "calibrate them with `python -m training.quantize --weights <model folder>`"
    if folder is None:
        raise QuantizationUnavailable(f"the model was not loaded from a folder, so it has no int8 ranges; {fix}")
    try:
        record = read_record(folder)
    except ValueError as exc:
        raise QuantizationUnavailable(f"{folder / RECORD_NAME} is not a valid record ({exc}); {fix}") from exc
    if record is None:
        raise QuantizationUnavailable(f"{folder} holds no int8 ranges ({RECORD_NAME}); {fix}")
    if record.fingerprint != fingerprint:
        raise QuantizationUnavailable(
            f"the int8 ranges in {folder} were calibrated for weights {record.fingerprint}, these are "
            f"{fingerprint}; {fix}"
        )
    missing = [ranges_name(g) for g in GRAPH_NAMES if not (folder / ranges_name(g)).is_file()]
    if missing:
        raise QuantizationUnavailable(f"{folder} lacks {', '.join(missing)}; {fix}")
    return record


def require_exact_int8(record: QuantizationRecord) -> None:
    """QuantizationUnavailable where this CPU would saturate the record's full-range int8 weights."""
    if record.recipe.reduce_range:
        return
    reason = this_cpu_saturates_int8()
    if reason is not None:
        raise QuantizationUnavailable(
            f"{reason}: full-range int8 weights lose the edit there (training/report/int8_avx2/); "
            "calibrate 7-bit weights with `python -m training.quantize --reduce-range`"
        )


def int8_graphs(
    model: EditorModel, resolution: int, cache_dir: Path | None = None, ranges: Path | None = None
) -> ExportedGraphs:
    """The int8 graphs of this model and size, built from its ranges into the engine cache unless already there."""
    folder = ranges or default_ranges_folder(model)
    record = usable_record(model, folder)
    assert folder is not None
    if resolution != record.resolution:
        log.warning(
            "int8 ranges were calibrated at %dpx; using them at %dpx (quality not measured)",
            record.resolution,
            resolution,
        )
    digest = hashlib.sha256((folder / RECORD_NAME).read_bytes())
    for graph in GRAPH_NAMES:
        digest.update((folder / ranges_name(graph)).read_bytes())
    base = onnx_folder(model, resolution, cache_dir).folder
    graphs = ExportedGraphs(base.with_name(f"{base.name}-int8-{digest.hexdigest()[:12]}"))
    if graphs.complete():
        return graphs
    fp32 = export_onnx(model, resolution, cache_dir)
    graphs.folder.mkdir(parents=True, exist_ok=True)
    for graph in GRAPH_NAMES:
        if not graphs.path(graph).is_file():
            log.info("building the int8 %s graph from %s", graph, folder / ranges_name(graph))
            _quantize_graph(fp32.path(graph), graphs.path(graph), folder / ranges_name(graph), record.recipe, graph)
    return graphs


class RecordingBackend(Backend):
    """Runs another backend and keeps a float32 copy of every graph's inputs, named as the ONNX graphs name them."""

    name = "recording"

    def __init__(self, inner: Backend, names: dict[str, list[str]] = INPUT_NAMES) -> None:
        self.inner = inner
        self.device = inner.device
        self.dtype = inner.dtype
        self.names = names  # the inputs the graphs take (export.input_names): no guidance without embeddings
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {graph: [] for graph in GRAPH_NAMES}

    def _keep(self, graph: str, *inputs: torch.Tensor) -> None:
        every = [*INPUT_NAMES[graph], *([FRAMES_INPUT] if graph == "decoder" else [])]
        arrays = dict(zip(every[: len(inputs)], inputs, strict=True))
        kept = {k: arrays[k].detach().to("cpu", torch.float32).numpy().copy() for k in self.names[graph]}
        self.feeds[graph].append(kept)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._keep("encoder", images)
        return self.inner.encode(images)

    def denoise(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor
    ) -> torch.Tensor:
        self._keep("unet", sample, timestep, context, guidance)
        return self.inner.denoise(sample, timestep, context, guidance)

    def decode(self, latents: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        result = self.inner.decode(latents, frames)  # first: it refuses a missing frame where one is read
        self._keep("decoder", latents, *(() if frames is None else (frames,)))
        return result


def calibrate(
    model: EditorModel,
    frames: Sequence[np.ndarray],
    edits: Sequence[EditParams],
    out: Path,
    *,
    resolution: int | None = None,
    recipe: QuantizationRecipe = DEFAULT_RECIPE,
    cache_dir: Path | None = None,
    description: dict[str, object] | None = None,
) -> QuantizationRecord:
    """Edit every frame on the fp32 ONNX Runtime editor (frame i with edit i mod len), write the ranges to `out`."""
    from engines.backends.onnxruntime_backend import OnnxRuntimeBackend
    from engines.editor import Editor, EditRequest
    from engines.temporal import StreamState
    from engines.text import CachedPromptEncoder

    if not frames or not edits:
        raise ValueError("calibration needs at least one frame and one edit")
    resolution = resolution or model.config.resolution
    recipe = recipe_for(model, recipe)
    recorder = RecordingBackend(OnnxRuntimeBackend(model, resolution, cache_dir), input_names(model))
    editor = Editor(recorder, model.config, model.schedule, CachedPromptEncoder(model.prompt_encoder))
    for i, frame in enumerate(frames):
        params = edits[i % len(edits)]
        editor.edit([EditRequest(frame, editor.encode_prompt(params.prompt), params, StreamState(params.seed))])
    out.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, resolution, cache_dir)
    with tempfile.TemporaryDirectory() as scratch:
        for graph in GRAPH_NAMES:
            target = out / ranges_name(graph)
            target.unlink(missing_ok=True)  # a stale file would be read as a cache hit
            _quantize_graph(
                fp32.path(graph), Path(scratch) / f"{graph}.onnx", target, recipe, graph, recorder.feeds[graph]
            )
    record = QuantizationRecord(
        fingerprint=model.fingerprint,
        resolution=resolution,
        recipe=recipe,
        onnxruntime=onnxruntime.__version__,
        calibration={"frames": len(frames), "edits": [e.model_dump() for e in edits], **(description or {})},
    )
    (out / RECORD_NAME).write_text(record.model_dump_json(indent=2) + "\n")
    return record


class _FeedReader(CalibrationDataReader):
    """Recorded feeds, one at a time, as ONNX Runtime's calibrator reads them."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _check_ranges(ranges: Path, prepared: Path) -> None:
    """Every tensor the ranges name must be in the graph: another exporter renames them, and ORT would not say."""
    graph = onnx.load(str(prepared), load_external_data=False).graph
    names = {t for node in graph.node for t in (*node.input, *node.output)} | {i.name for i in graph.input}
    ranged = set(json.loads(ranges.read_text()).get("data", {}))
    missing = sorted(ranged - names)
    if missing:
        raise QuantizationUnavailable(
            f"{ranges} names {len(missing)} tensors this exported graph lacks (e.g. {missing[0]}): it was "
            "calibrated on another export; recalibrate with `python -m training.quantize`"
        )


def _quantize_graph(
    source: Path,
    target: Path,
    ranges: Path,
    recipe: QuantizationRecipe,
    graph: str,
    feeds: Sequence[dict[str, np.ndarray]] | None = None,
) -> None:
    """Quantize one fp32 graph into `target`: calibrating on `feeds` into `ranges`, or reading `ranges` as they are."""
    part = recipe.graphs[graph]
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # ORT's advised preparation (shape inference, basic fusions); its symbolic shape inference cannot
        # follow the UNet's reshapes, ONNX's own inference can.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        if feeds is None:
            _check_ranges(ranges, prepared)
        nodes = [n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node]
        exclude = [n for n in nodes if any(re.search(p, n) for p in part.exclude)]
        partial = Path(scratch) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(partial),
            None if feeds is None else _FeedReader(feeds),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=part.op_types,
            nodes_to_exclude=exclude,
            calibration_cache_path=ranges,
        )
        # Renamed last, so an interrupted build never leaves a graph that looks complete.
        partial.replace(target)
