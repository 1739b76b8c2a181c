"""The engine client: the one door from the server into engines/ (streams, frames, conditions, health, routing).

Torch-free on purpose: media workers import this and never load a model. Two implementations sit behind
`EngineClient`: the engine core in its own process (`engines.client_process`, the default) and the engine on
a thread of this process (`engines.client_thread`, for tests and debugging).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engines.frame_table import FrameTableLayout
from engines.params import EditParams
from engines.spec import DEFAULT_MAX_BATCH, MAX_SAMPLER_STEPS, BackendName, EngineSpec, ModelInfo, PrecisionName

if TYPE_CHECKING:
    from engines.client_process import EngineLauncher

EngineMode = Literal["process", "thread"]
#: Builds the editor inside the engine (the process engine pickles it: a module-level callable).
EditorFactory = Callable[[EngineSpec], Any]


@dataclass(frozen=True)
class EngineAddress:
    """Where media workers find an engine process: its control socket and its frame table."""

    endpoint: str
    layout: FrameTableLayout


class EngineError(Exception):
    """An engine call that could not be carried out; `status` is the HTTP status the server answers with."""

    status = 500


class EngineUnavailable(EngineError):
    """The engine is loading, restarting or gone: retry later."""

    status = 503


class EngineBusy(EngineUnavailable):
    """Too many prompt encodings are in flight server-wide (EngineSpec.max_prompt_encodings): retry in
    `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineFull(EngineError):
    """Every stream slot is taken (across all media workers)."""

    status = 503


class StreamNotFound(EngineError):
    """No media worker holds this session."""

    status = 404


@dataclass
class EngineOutcome:
    """One frame back from the engine: edited, answered by the similarity skip, failed, or passed through."""

    frame: np.ndarray  # RGB uint8 (res, res, 3): the edit, or the unedited input when not `edited`
    received_at: float  # time.monotonic() when the camera frame arrived
    meta: Any  # what the media side attached to the frame (pts, time_base)
    skipped: bool = False
    error: str | None = None  # the engine raised on this frame
    unedited: bool = False  # the engine was down: the camera frame came straight back
    batch_size: int = 0

    @property
    def edited(self) -> bool:
        return self.error is None and not self.unedited


@dataclass(frozen=True)
class BatchReport:
    """One batched engine call, reported once (by the media worker of its first row)."""

    size: int
    seconds: float


@dataclass(frozen=True)
class EngineHealth:
    """What /readyz and /metrics say about the engine."""

    ready: bool
    reason: str | None = None  # why not ready
    capacity_left: int = 0  # stream slots free across all media workers
    restarts: int = 0  # engine processes started after the first


@dataclass(frozen=True)
class RoutedCall:
    """A REST call on a session that another media worker holds: carried there, answered here."""

    op: Literal["get", "patch", "delete"]
    session_id: str
    authorization: str | None = None
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoutedReply:
    status: int
    body: dict[str, Any] | None
    retry_after: int | None = None  # seconds, for a 429 or a 503 (the Retry-After header)


@dataclass(frozen=True)
class StreamUpdate:
    """What became of new params for a stream (EngineClient.update_stream)."""

    applied: bool  # False: a newer update of the stream came before their prompt was encoded, and replaced them
    reading: PromptReading | None  # how the engine reads the prompt the stream's frames are edited with now


#: The trained edits a prompt is read as, heaviest first, each with its share (engines.routing): what the UNet is
#: fed for it. None where the model feeds prompts as they are, or the engine has not read this one yet.
PromptReading = list[tuple[str, float]]
#: The smallest share of an edit a reading names (routing's softmax gives every edit some).
READING_FLOOR = 0.05


def to_reading(value: Any) -> PromptReading | None:
    """A reading as msgpack carries it ([edit, share] lists), or None."""
    return None if value is None else [(str(edit), float(share)) for edit, share in value]


OutcomeHandler = Callable[[EngineOutcome], None]
RouteHandler = Callable[[RoutedCall], Awaitable[RoutedReply]]


class EngineStream(abc.ABC):
    """One session's stream into the engine: hand it camera frames, newest wins."""

    session_id: str
    reading: PromptReading | None  # how the engine reads its prompt now (update_stream keeps it current)

    @abc.abstractmethod
    def submit(self, pixels: Callable[[], np.ndarray], received_at: float, meta: Any) -> bool:
        """Offer a camera frame; `pixels` converts it and runs only if the engine will edit it.

        Returns True when this replaced a frame the engine never took (a dropped frame).
        """


class EngineClient(abc.ABC):
    """What the server may ask of the engine. Every method is called on the event loop; every callback
    (outcomes, batch reports, routed calls) is made on it too."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.on_batch: Callable[[BatchReport], None] = lambda report: None
        self.on_engine_lost: Callable[[str], None] = lambda why: None

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin loading the engine; returns at once (health() says when it is ready)."""

    @abc.abstractmethod
    async def claim(self, session_id: str) -> None:
        """Hold a session that has no stream yet (its peer is connecting): calls routed for it come here, and
        it takes no slot. Returns once calls are routed so. close_stream() ends the claim."""

    @abc.abstractmethod
    async def open_stream(self, session_id: str, params: EditParams, on_outcome: OutcomeHandler) -> EngineStream:
        """Admit a stream (EngineFull, EngineUnavailable) and encode its prompt; outcomes go to `on_outcome`."""

    @abc.abstractmethod
    async def update_stream(self, session_id: str, params: EditParams) -> StreamUpdate:
        """New params for a stream; a new prompt is encoded first (off the frame path: frames go on with the old
        conditions meanwhile), then both apply to the next frame taken. An update whose prompt is still being
        encoded when a newer one comes is superseded: it never applies, and returns applied=False. A prompt
        seen before (by any stream) applies at once. EngineBusy when the server's prompt encoder is full."""

    @abc.abstractmethod
    async def close_stream(self, session_id: str) -> None:
        """Forget a stream and free its slot; no outcome arrives for it afterwards."""

    @abc.abstractmethod
    def health(self) -> EngineHealth: ...

    @abc.abstractmethod
    def serve_routed(self, handler: RouteHandler) -> None:
        """Answer calls that other media workers route here for the sessions this one holds."""

    @abc.abstractmethod
    async def route(self, call: RoutedCall) -> RoutedReply:
        """Carry a call on a session this media worker does not hold to the one that does (StreamNotFound)."""

    @abc.abstractmethod
    async def shutdown(self) -> None: ...


def open_engine_client(
    mode: EngineMode,
    spec: EngineSpec,
    slots: int,
    editor_factory: EditorFactory | None = None,
) -> EngineClient:
    """An engine client that owns its engine: a process of its own (restarted if it dies), or a thread."""
    info = ModelInfo.of(spec)
    if mode == "thread":
        from engines.client_thread import InThreadEngineClient

        return InThreadEngineClient(info, spec, slots, editor_factory)
    from engines.client_process import EngineLauncher, ProcessEngineClient

    launcher = EngineLauncher(spec, info.resolution, slots, editor_factory)
    return ProcessEngineClient(info, launcher.address, owned=launcher)


def check_engine_spec(spec: EngineSpec) -> None:
    """ValueError saying why, where the engine would refuse `spec` at load, found before any process starts: today
    precision int8 without ranges for these weights or on a CPU that would saturate them (only then is torch
    imported here)."""
    if spec.precision != "int8":
        return
    from engines.loader import check_int8
    from engines.quantize import QuantizationUnavailable

    try:
        check_int8(spec)
    except QuantizationUnavailable as exc:
        raise ValueError(f"precision int8: {exc}") from exc


def launch_engine(spec: EngineSpec, slots: int, editor_factory: EditorFactory | None = None) -> EngineLauncher:
    """Start the engine process for several media workers (and keep one running); they connect to .address."""
    from engines.client_process import EngineLauncher

    launcher = EngineLauncher(spec, ModelInfo.of(spec).resolution, slots, editor_factory)
    launcher.start()
    return launcher


def connect_engine(spec: EngineSpec, address: EngineAddress) -> EngineClient:
    """A media worker's client of an engine process that someone else launched."""
    from engines.client_process import ProcessEngineClient

    return ProcessEngineClient(ModelInfo.of(spec), address)


__all__ = [
    "DEFAULT_MAX_BATCH",
    "EngineAddress",
    "BatchReport",
    "EngineBusy",
    "EditorFactory",
    "EngineClient",
    "EngineError",
    "EngineFull",
    "EngineHealth",
    "EngineMode",
    "EngineOutcome",
    "EngineSpec",
    "EngineStream",
    "EngineUnavailable",
    "MAX_SAMPLER_STEPS",
    "ModelInfo",
    "BackendName",
    "PrecisionName",
    "RoutedCall",
    "RoutedReply",
    "StreamNotFound",
    "StreamUpdate",
    "check_engine_spec",
    "connect_engine",
    "launch_engine",
    "open_engine_client",
]
