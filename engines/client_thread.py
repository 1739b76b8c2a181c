"""The engine on a thread of the server's own process, behind the EngineClient seam (tests and debugging)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from engines.client import (
    BatchReport,
    EditorFactory,
    EngineBusy,
    EngineClient,
    EngineFull,
    EngineHealth,
    EngineOutcome,
    EngineStream,
    EngineUnavailable,
    OutcomeHandler,
    PromptReading,
    RoutedCall,
    RoutedReply,
    RouteHandler,
    StreamNotFound,
    StreamUpdate,
)
from engines.params import EditParams
from engines.prompts import SUPERSEDED, PreparedPrompt, PromptResult
from engines.spec import EngineSpec, ModelInfo
from engines.worker import BatchStats, Conditions, EngineWorker, FrameOutcome, FrameSlot, PendingFrame

log = logging.getLogger(__name__)


def load_and_warm(spec: EngineSpec, editor_factory: EditorFactory | None) -> Any:
    """The editor the spec names (or the factory's), after one edit of a grey frame, so no viewer waits on
    first-call allocations and graph optimisation."""
    from engines.editor import EditRequest
    from engines.loader import load_editor
    from engines.temporal import StreamState

    editor = (editor_factory or load_editor)(spec)
    params = EditParams()
    size = editor.resolution
    frame = np.full((size, size, 3), 128, np.uint8)
    context = editor.prepare_prompts([params.prompt])[0].context
    editor.edit([EditRequest(frame, context, params, StreamState())])
    return editor


def to_engine_outcome(outcome: FrameOutcome) -> EngineOutcome:
    return EngineOutcome(
        frame=outcome.frame,
        received_at=outcome.pending.received_at,
        meta=outcome.pending.meta,
        skipped=outcome.skipped,
        error=None if outcome.error is None else repr(outcome.error),
        batch_size=outcome.batch_size,
    )


class _SlotStream(EngineStream):
    def __init__(self, slot: FrameSlot, reading: PromptReading | None) -> None:
        self.session_id = slot.stream_id
        self.slot = slot
        self.reading = reading

    def submit(self, pixels: Callable[[], np.ndarray], received_at: float, meta: Any) -> bool:
        return self.slot.offer(PendingFrame(pixels=pixels, received_at=received_at, meta=meta))


class InThreadEngineClient(EngineClient):
    """Loads the editor on a thread of its own, then runs an EngineWorker thread; one media worker only."""

    def __init__(
        self, info: ModelInfo, spec: EngineSpec, slots: int, editor_factory: EditorFactory | None = None
    ) -> None:
        super().__init__(info)
        self.spec = spec
        self.slots = slots
        self.editor_factory = editor_factory
        self.worker: EngineWorker | None = None
        self.error: str | None = None
        self._streams: dict[str, _SlotStream] = {}
        self._updates: dict[str, int] = {}  # a stream's newest update, counted: an older one finishing is superseded
        self._reserved = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._route_handler: RouteHandler | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._load, name="engine-loader", daemon=True).start()

    def _load(self) -> None:
        # Model loading gets a thread of its own: not the loop, and not the default executor aiortc encodes on.
        try:
            editor = load_and_warm(self.spec, self.editor_factory)
        except Exception as exc:
            log.exception("engine failed to load")
            self.error = f"engine failed to load: {exc}"
            return
        finally:
            log.info("engine loader thread exited")
        worker = EngineWorker(
            editor,
            max_batch=self.spec.max_batch,
            on_batch=self._batch_done,
            prompt_jobs=self.spec.max_prompt_encodings,
            prompt_cpu_share=self.spec.prompt_cpu_share,
        )
        worker.start()
        self.worker = worker
        log.info("engine ready at %dpx (in-thread)", editor.resolution)

    def _batch_done(self, stats: BatchStats) -> None:
        if stats.size and self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_batch, BatchReport(stats.size, stats.seconds))

    def _ready_worker(self) -> EngineWorker:
        if self.worker is None or self.worker.exited.is_set():
            raise EngineUnavailable(self.health().reason or "the engine is not running")
        return self.worker

    async def claim(self, session_id: str) -> None:
        pass  # one media worker: nothing is routed

    async def _prepare(self, worker: EngineWorker, lane: str, prompt: str, bounded: bool) -> PreparedPrompt | None:
        """The prompt prepared on the worker's prompt thread (at once if cached); None when a newer job of the
        lane replaced it. EngineBusy when the prompt thread is full, EngineUnavailable when encoding failed."""
        cached = worker.editor.cached_prompt(prompt)
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PromptResult] = loop.create_future()

        def done(result: PromptResult) -> None:  # on the prompt thread
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(result))

        if not worker.prompts.submit(lane, [prompt], done, bounded):
            raise EngineBusy(f"{worker.prompts.max_jobs} prompt encodings are in flight already: retry shortly")
        result = await future
        if result is SUPERSEDED:
            return None
        if isinstance(result, BaseException):
            raise EngineUnavailable(f"could not encode the prompt: {result!r}")
        return result[0]

    async def open_stream(self, session_id: str, params: EditParams, on_outcome: OutcomeHandler) -> EngineStream:
        worker = self._ready_worker()
        if len(self._streams) + self._reserved >= self.slots:
            raise EngineFull(f"server full: {self.slots} sessions are open")
        self._reserved += 1
        try:
            prepared = await self._prepare(worker, f"open:{session_id}", params.prompt, bounded=False)
        finally:
            self._reserved -= 1
        if prepared is None:  # only stop() supersedes an open
            raise EngineUnavailable("the engine stopped")
        loop = asyncio.get_running_loop()

        def deliver(outcome: FrameOutcome) -> None:  # on the engine thread: hand over to the loop
            loop.call_soon_threadsafe(on_outcome, to_engine_outcome(outcome))

        conditions = Conditions(params, prepared.context)
        stream = _SlotStream(FrameSlot(session_id, conditions, on_outcome=deliver), prepared.reading)
        self._streams[session_id] = stream
        worker.add(stream.slot)
        return stream

    async def update_stream(self, session_id: str, params: EditParams) -> StreamUpdate:
        worker = self._ready_worker()
        stream = self._streams.get(session_id)
        if stream is None:
            raise StreamNotFound(f"no session {session_id!r}")
        ticket = self._updates[session_id] = self._updates.get(session_id, 0) + 1
        current = stream.slot.conditions
        if worker.editor.prompt_key(params.prompt) == worker.editor.prompt_key(current.params.prompt):
            prepared: PreparedPrompt | None = PreparedPrompt(current.context, stream.reading)
        else:
            prepared = await self._prepare(worker, session_id, params.prompt, bounded=True)
        if prepared is None or self._updates.get(session_id) != ticket or session_id not in self._streams:
            return StreamUpdate(False, stream.reading)  # a newer update came first: latest wins
        stream.slot.set_conditions(params, prepared.context)
        stream.reading = prepared.reading
        return StreamUpdate(True, prepared.reading)

    async def close_stream(self, session_id: str) -> None:
        self._updates.pop(session_id, None)
        if self._streams.pop(session_id, None) is not None and self.worker is not None:
            self.worker.remove(session_id)

    def health(self) -> EngineHealth:
        left = self.slots - len(self._streams) - self._reserved
        if self.error is not None:
            return EngineHealth(False, self.error, left)
        if self.worker is None:
            return EngineHealth(False, "engine loading", left)
        if self.worker.exited.is_set():
            return EngineHealth(False, "the engine thread exited", left)
        return EngineHealth(True, None, left)

    def serve_routed(self, handler: RouteHandler) -> None:
        self._route_handler = handler

    async def route(self, call: RoutedCall) -> RoutedReply:
        raise StreamNotFound(f"no session {call.session_id!r}")  # one media worker: there is nowhere else

    async def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.stop()
