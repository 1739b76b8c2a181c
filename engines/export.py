"""ONNX export of the editor's three graphs (TAESD encoder, guided UNet, TAESD decoder), cached by model and shape."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.autoencoder import CodecDecoder, CodecEncoder
from engines.backends.base import FRAMES_INPUT  # noqa: F401 - also named here, beside the other input names
from engines.model import EditorModel

log = logging.getLogger(__name__)

ONNX_OPSET = 17
GRAPH_NAMES = ("encoder", "unet", "decoder")


def default_cache_dir() -> Path:
    """Where exported graphs and built engines live: $STREAMEDIT_CACHE_DIR or ~/.cache/streamedit."""
    return Path(os.environ.get("STREAMEDIT_CACHE_DIR", Path.home() / ".cache" / "streamedit"))


@dataclass(frozen=True)
class ExportedGraphs:
    """Paths of the three ONNX files of one model at one resolution."""

    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.onnx"

    def complete(self) -> bool:
        return all(self.path(n).is_file() for n in GRAPH_NAMES)


def onnx_folder(model: EditorModel, resolution: int, cache_dir: Path | None = None) -> ExportedGraphs:
    """The cache slot for this model's graphs: keyed by the weights' hash, the resolution and the opset."""
    root = cache_dir or default_cache_dir()
    return ExportedGraphs(root / "onnx" / f"{model.fingerprint}-{resolution}px-opset{ONNX_OPSET}")


def example_inputs(model: EditorModel, resolution: int, batch: int = 1) -> dict[str, tuple[torch.Tensor, ...]]:
    """Inputs of the right shapes and dtypes for each graph (float32, on the CPU)."""
    latent = resolution // 8
    tokens, dim = model.config.max_prompt_tokens, model.prompt_encoder.dim
    return {
        "encoder": (torch.rand(batch, 3, resolution, resolution) * 2 - 1,),
        "unet": (
            torch.randn(batch, 8, latent, latent),
            torch.full((batch,), float(model.config.student_timestep)),
            torch.randn(batch, tokens, dim),
            torch.tensor([[7.5, 1.5]] * batch),
        ),
        "decoder": (torch.randn(batch, 4, latent, latent),)
        + ((torch.rand(batch, 3, resolution, resolution) * 2 - 1,) if model.codec.reads_frames else ()),
    }


INPUT_NAMES = {
    "encoder": ["images"],
    "unet": ["sample", "timestep", "encoder_hidden_states", "guidance"],
    "decoder": ["latents"],
}
OUTPUT_NAMES = {"encoder": ["latents"], "unet": ["prediction"], "decoder": ["images"]}


def input_names(model: EditorModel) -> dict[str, list[str]]:
    """The inputs each of this model's graphs takes: a UNet without guidance embeddings never reads `guidance`,
    so its graph has no such input (the exporter drops an unused one), and nothing may feed it one. A decoder with
    a frame skip also takes the frames."""
    names = dict(INPUT_NAMES)
    if not model.config.distilled:
        names["unet"] = [n for n in INPUT_NAMES["unet"] if n != "guidance"]
    if model.codec.reads_frames:
        names["decoder"] = [*INPUT_NAMES["decoder"], FRAMES_INPUT]
    return names


def export_onnx(model: EditorModel, resolution: int, cache_dir: Path | None = None) -> ExportedGraphs:
    """Export the three graphs with a dynamic batch axis, unless this model and size are cached already."""
    graphs = onnx_folder(model, resolution, cache_dir)
    if graphs.complete():
        return graphs
    graphs.folder.mkdir(parents=True, exist_ok=True)
    # Export on the CPU in fp32, then put the model back where its backend keeps it.
    weight = next(model.unet.parameters())
    device, dtype = weight.device, weight.dtype
    model.to("cpu", torch.float32)
    modules = {
        "encoder": CodecEncoder(model.codec).eval(),
        "unet": model.unet.eval(),
        "decoder": CodecDecoder(model.codec).eval(),
    }
    inputs = example_inputs(model, resolution)
    names = input_names(model)  # without guidance embeddings, the UNet's example guidance goes unused (and dropped)
    try:
        for name in GRAPH_NAMES:
            target = graphs.path(name)
            if target.is_file():
                continue
            # A per-process name: two processes exporting the same slot never write one file.
            partial = target.with_name(f"{name}.{os.getpid()}.partial.onnx")
            log.info("exporting %s to %s", name, target)
            dynamic = {n: {0: "batch"} for n in names[name] + OUTPUT_NAMES[name]}
            with torch.inference_mode(), warnings.catch_warnings():
                # diffusers' shape asserts become constants in the trace; the batch axis stays dynamic.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                torch.onnx.export(
                    modules[name],
                    inputs[name],
                    str(partial),
                    input_names=names[name],
                    output_names=OUTPUT_NAMES[name],
                    dynamic_axes=dynamic,
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                )
            # Rename last, so an interrupted export never leaves a graph that looks complete.
            partial.replace(target)
    finally:
        model.to(device, dtype)
    return graphs
