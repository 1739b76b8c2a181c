"""Builds the FastAPI app: its lifespan starts the engine client, the session registry and the reaper."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from engines.client import EditorFactory, EngineClient, open_engine_client
from server.errors import ServiceError, describe_invalid, safe_text
from server.ice import parse_port_range, pin_host_addresses, restrict_udp_ports
from server.limits import BodyLimit
from server.metrics import ServiceMetrics
from server.routes import router
from server.sessions import SessionRegistry
from server.settings import Settings

log = logging.getLogger(__name__)


async def _supervised(name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a background task for the app's lifetime: each end goes to the log, and a crash restarts it."""
    while True:
        try:
            await run()
        except asyncio.CancelledError:
            log.info("task %s stopped", name)
            raise
        except Exception:
            log.exception("task %s crashed: restarting it in 1 s", name)
            await asyncio.sleep(1.0)
        else:
            log.info("task %s exited", name)
            return


async def refresh_metrics_forever(
    metrics: ServiceMetrics, registry: SessionRegistry, engine: EngineClient, interval_s: float = 1.0
) -> None:
    """Keep the gauges current between scrapes: with several media workers, another worker's scrape reads them."""
    while True:
        metrics.refresh(registry.fps_by_session(), engine.health())
        await asyncio.sleep(interval_s)


def create_app(
    settings: Settings | None = None,
    editor_factory: EditorFactory | None = None,
    engine: EngineClient | None = None,
    worker_name: str = "0",
) -> FastAPI:
    """The service (one media worker). `engine` connects to an engine started elsewhere (the supervisor's);
    without it the app starts its own, as settings.engine says, built by `editor_factory` (tests swap it).
    Every response names the media worker that answered (X-StreamEdit-Worker)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pin_host_addresses(settings.host_addresses())
        if settings.udp_ports:
            restrict_udp_ports(asyncio.get_running_loop(), *parse_port_range(settings.udp_ports))
        client = engine or open_engine_client(
            settings.engine, settings.engine_spec(), settings.max_sessions, editor_factory
        )
        metrics = ServiceMetrics(per_session=settings.metrics_per_session)
        registry = SessionRegistry(settings, client, metrics)
        client.on_batch = metrics.observe_batch
        client.on_engine_lost = lambda why: metrics.engine_losses.inc()
        client.serve_routed(registry.answer)
        state = app.state
        state.settings, state.metrics, state.registry, state.engine = settings, metrics, registry, client
        await client.start()
        tasks = {
            "reaper": asyncio.create_task(_supervised("reaper", registry.reap_forever)),
            "metrics": asyncio.create_task(
                _supervised("metrics", lambda: refresh_metrics_forever(metrics, registry, client))
            ),
        }
        state.tasks = tasks
        try:
            yield
        finally:
            await registry.close_all()
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            await client.shutdown()
            pin_host_addresses(None)

    app = FastAPI(
        title="StreamEdit",
        version="0.1.0",
        description="Real-time video editing: WebRTC in, one-step diffusion edits out, live REST control.",
        lifespan=lifespan,
    )

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": safe_text(exc.message, 500)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_invalid(exc.errors())}, status_code=422)

    @app.middleware("http")
    async def name_the_worker(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["X-StreamEdit-Worker"] = worker_name
        return response

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.include_router(router)
    if settings.static_dir.is_dir():
        app.mount("/", StaticFiles(directory=settings.static_dir, html=True), name="client_web")
    return app
