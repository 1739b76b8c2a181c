"""Builds the FastAPI app: its lifespan loads the engine off the loop and starts the worker, registry and reaper."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from engines.config import EditorConfig
from engines.editor import EditRequest
from engines.loader import EngineSpec, default_params, load_editor, load_presets
from engines.model import DEFAULT_MODEL_DIR
from engines.params import EditParams
from engines.temporal import StreamState
from engines.worker import BatchEditor, EngineWorker
from server.errors import ServiceError
from server.ice import parse_port_range, pin_host_addresses, restrict_udp_ports
from server.metrics import ServiceMetrics
from server.routes import router
from server.sessions import SessionRegistry
from server.settings import Settings

log = logging.getLogger(__name__)

EditorFactory = Callable[[Settings], BatchEditor]


def load_configured_editor(settings: Settings) -> BatchEditor:
    spec = EngineSpec(
        weights=settings.weights,
        taesd=settings.taesd,
        backend=settings.backend,
        device=settings.device,
        resolution=settings.resolution,
        threads=settings.threads,
        max_batch=settings.max_batch,
        cache_dir=settings.cache_dir,
        cuda_graph=settings.cuda_graph,
    )
    return load_editor(spec)


def warm_up(editor: BatchEditor) -> None:
    """One edit of a grey frame: first-call allocations and graph optimisation happen before any viewer waits."""
    params = EditParams()
    size = editor.resolution
    frame = np.full((size, size, 3), 128, np.uint8)
    editor.edit([EditRequest(frame, editor.encode_prompt(params.prompt), params, StreamState())])


def _in_thread(fn: Callable[[], BatchEditor]) -> asyncio.Future[BatchEditor]:
    """Run model loading on a thread of its own: not the loop, and not the default executor aiortc encodes on."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[BatchEditor] = loop.create_future()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the awaiting coroutine
            loop.call_soon_threadsafe(future.set_exception, exc)
        else:
            loop.call_soon_threadsafe(future.set_result, result)

    threading.Thread(target=run, name="engine-loader", daemon=True).start()
    return future


def create_app(settings: Settings | None = None, editor_factory: EditorFactory | None = None) -> FastAPI:
    """The service; `editor_factory` swaps the engine (tests slow it down or make it fail on purpose)."""
    settings = settings or Settings()
    factory = editor_factory or load_configured_editor

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pin_host_addresses(settings.host_addresses())
        if settings.udp_ports:
            restrict_udp_ports(asyncio.get_running_loop(), *parse_port_range(settings.udp_ports))
        state = app.state
        state.settings, state.metrics, state.registry, state.engine_error = settings, ServiceMetrics(), None, None
        state.presets = load_presets(settings.weights)
        model_config = EditorConfig.load(settings.weights or DEFAULT_MODEL_DIR)
        state.default_params = default_params(model_config)
        state.guidance_ranges = {
            "text_guidance": list(model_config.trained_text_guidance),
            "image_guidance": list(model_config.trained_image_guidance),
        }
        worker: EngineWorker | None = None
        tasks: list[asyncio.Task[None]] = []

        async def start_engine() -> None:
            nonlocal worker
            try:
                editor = await _in_thread(lambda: _loaded_and_warm(factory, settings))
            except Exception as exc:
                log.exception("engine failed to load")
                state.engine_error = f"engine failed to load: {exc}"
                return
            worker = EngineWorker(editor, max_batch=settings.max_batch, on_batch=state.metrics.observe_batch)
            worker.start()
            state.registry = SessionRegistry(settings, worker, state.metrics)
            tasks.append(asyncio.create_task(state.registry.reap_forever()))
            log.info("engine ready at %dpx, up to %d sessions", editor.resolution, settings.max_sessions)

        tasks.append(asyncio.create_task(start_engine()))
        try:
            yield
        finally:
            if state.registry is not None:
                await state.registry.close_all()
            for task in tasks:
                task.cancel()
            if worker is not None:
                worker.stop()
            pin_host_addresses(None)

    app = FastAPI(
        title="StreamEdit",
        version="0.1.0",
        description="Real-time video editing: WebRTC in, one-step diffusion edits out, live REST control.",
        lifespan=lifespan,
    )

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    app.include_router(router)
    if settings.static_dir.is_dir():
        app.mount("/", StaticFiles(directory=settings.static_dir, html=True), name="client_web")
    return app


def _loaded_and_warm(factory: EditorFactory, settings: Settings) -> BatchEditor:
    editor = factory(settings)
    warm_up(editor)
    return editor
