"""What an engine runs and what its model offers a session, read without torch (media workers never load it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.config import DEFAULT_MODEL_DIR, MAX_SAMPLER_STEPS, EditorConfig
from engines.params import EditParams
from engines.run_options import require_cuda_graph_on_torch_cuda, require_precision_on_backend

#: the prompt encoder's share of one thread. A storm of new prompts keeps it busy back to back, so this is the
#: most a storm takes from the frames: 0.1 cost a victim session ~10 % of its frames on a 2-CPU AVX2 machine
#: (bench/bench_isolation.py), 0.05 about half that; a single prompt change still applies at once (one
#: encoding, ~30 ms there), only prompts queued behind others wait for the rest (up to 19x an encoding).
PROMPT_CPU_SHARE = 0.05

BackendName = Literal["torch", "onnxruntime", "openvino", "tensorrt"]
PrecisionName = Literal["auto", "fp32", "bf16", "int8"]
PRESETS_NAME = "presets.json"
#: prepared prompts an engine keeps (the LRU of engines.prompts, across every stream)
DEFAULT_PROMPT_CACHE_SIZE = 256


class EngineSpec(BaseModel):
    """Which editor to run and how; the one place every engine default lives (serve, build-engine, benchmarks)."""

    model_config = ConfigDict(extra="forbid")

    weights: Path | None = Field(None, description="Model folder; None = the shipped default.")
    taesd: Path | None = Field(None, description="A TAESD folder to use instead of the model's own autoencoder.")
    backend: BackendName = Field("onnxruntime", description="torch, onnxruntime, openvino or tensorrt.")
    device: str = Field("cpu", description="'cpu' or 'cuda[:N]'.")
    resolution: int | None = Field(None, ge=64, le=2048, description="Override the model's resolution.")
    steps: int | None = Field(
        None,
        ge=1,
        le=MAX_SAMPLER_STEPS,
        description="Sampler steps per frame, overriding the model's own (editor.json; a stock InstructPix2Pix "
        "folder runs 20 steps of 3-pass CFG, 3 UNet passes each). A one-step distilled student runs 1 only.",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for the backend (None = library default).")
    max_batch: int = Field(
        4,
        ge=1,
        le=64,
        description="Most frames (one per stream) in one engine call; TensorRT engines are built and cached for "
        "batches 1..max_batch, so `build-engine` and `serve` share this default.",
    )
    cache_dir: Path | None = Field(None, description="Exported graphs and engines (default ~/.cache/streamedit).")
    cuda_graph: bool = Field(False, description="Torch on CUDA: replay a captured CUDA graph per batch size.")
    precision: PrecisionName = Field(
        "auto",
        description="'int8': ONNX Runtime or OpenVINO runs int8 graphs built from the model's calibrated ranges "
        "(int8/); 'bf16': OpenVINO computes in bf16 (a CPU with AMX or AVX-512 bf16 only); 'fp32': float graphs; "
        "'auto': int8 where it was measured (ONNX Runtime on the CPU, ranges made for these weights at this "
        "size), else fp32.",
    )
    prompt_cache_size: int = Field(
        DEFAULT_PROMPT_CACHE_SIZE,
        ge=1,
        le=100_000,
        description="Prompts whose encoding the engine keeps (by their normalised text, across sessions): a "
        "prompt seen before costs no encoding.",
    )
    max_prompt_encodings: int = Field(
        8,
        ge=1,
        le=1024,
        description="Prompt encodings queued or running at once, server-wide (one a session at most, latest "
        "wins); a PATCH of a new prompt past it gets 503 with Retry-After.",
    )
    prompt_cpu_share: float = Field(
        PROMPT_CPU_SHARE,
        gt=0,
        le=1,
        description="Most of one thread's time the prompt encoder may take (it rests after each encoding, at a "
        "lower priority than the frames).",
    )

    @model_validator(mode="after")
    def _options_fit(self) -> EngineSpec:
        require_cuda_graph_on_torch_cuda(self.backend, self.device, self.cuda_graph)
        require_precision_on_backend(self.backend, self.precision)
        if self.steps is not None:  # reads editor.json, so a one-step student is refused before anything starts
            self.configure(EditorConfig.load(self.model_folder()))
        return self

    def model_folder(self) -> Path:
        return self.weights or DEFAULT_MODEL_DIR

    def configure(self, config: EditorConfig) -> EditorConfig:
        """The model's config with this spec's resolution and steps; ValueError if the model cannot take them."""
        updates: dict[str, int] = {}
        if self.resolution is not None:
            updates["resolution"] = self.resolution
        if self.steps is not None:
            require_steps_fit(config, self.steps)
            updates["steps"] = self.steps
        return config.model_copy(update=updates)


def require_steps_fit(config: EditorConfig, steps: int) -> None:
    """A one-step distilled student was trained to denoise at t = student_timestep only: it has no multi-step
    sampler to run, so more steps would be a sampler it never learned, not a better edit."""
    if config.distilled and config.steps == 1 and steps != 1:
        raise ValueError(
            f"steps={steps}, but this model is a one-step distilled student (guidance embeddings, editor.json steps "
            f"1): it runs in one step only. A guidance-distilled model trained for several steps says so in its "
            f"editor.json ('steps')."
        )


#: One truth for the batch limit: Settings, EngineWorker, build-engine and the TensorRT backend read it here.
DEFAULT_MAX_BATCH: int = EngineSpec.model_fields["max_batch"].default


def default_params(config: EditorConfig) -> EditParams:
    """The params a new session starts with: EditParams' defaults with the model's own guidance strengths."""
    return EditParams(text_guidance=config.default_text_guidance, image_guidance=config.default_image_guidance)


def load_presets(folder: Path | None) -> list[dict[str, str]]:
    """The model's one-click edits ([{"name", "prompt"}]) from presets.json beside its weights, if any."""
    path = (folder or DEFAULT_MODEL_DIR) / PRESETS_NAME
    if not path.is_file():
        return []
    return [{"name": str(p["name"]), "prompt": str(p["prompt"])} for p in json.loads(path.read_text())]


@dataclass(frozen=True)
class ModelInfo:
    """What the service tells clients about the loaded model: frame size, starting params, ranges, presets."""

    resolution: int
    default_params: EditParams
    guidance_ranges: dict[str, list[float]]
    presets: list[dict[str, str]]

    @classmethod
    def of(cls, spec: EngineSpec) -> ModelInfo:
        config = spec.configure(EditorConfig.load(spec.model_folder()))
        return cls(
            resolution=config.resolution,
            default_params=default_params(config),
            guidance_ranges={
                "text_guidance": list(config.trained_text_guidance),
                "image_guidance": list(config.trained_image_guidance),
            },
            presets=load_presets(spec.weights),
        )
