"""Builds the FastAPI app: its lifespan starts the engine client, the session registry and the reaper."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, Route

from engines.client import EditorFactory, EngineClient, open_engine_client
from server.errors import ServiceError, describe_invalid, safe_text
from server.ice import parse_port_range, pin_host_addresses, restrict_udp_ports
from server.limits import BodyLimit
from server.metrics import ServiceMetrics
from server.rate import OfferRateLimit, TokenBuckets
from server.routes import router
from server.sessions import SessionRegistry
from server.settings import Settings
from server.worker_headers import WorkerHeaders

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


def methods_at(routes: Iterable[BaseRoute], request: Request) -> set[str]:
    """Every method the API serves at the request's path, whichever of its routes serves it."""
    return {
        method
        for route in routes
        if isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE
        for method in route.methods or ()
    }


def create_app(
    settings: Settings | None = None,
    editor_factory: EditorFactory | None = None,
    engine: EngineClient | None = None,
    worker_name: str = "0",
) -> FastAPI:
    """The service (one media worker). `engine` connects to an engine started elsewhere (the supervisor's);
    without it the app starts its own, as settings.engine says, built by `editor_factory` (tests swap it).
    Every response names the media worker that answered (X-StreamEdit-Worker) and, in a fleet, the replica
    (X-StreamEdit-Replica)."""
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
        state.offer_limit = (
            OfferRateLimit(settings.offers_per_minute, settings.offer_burst) if settings.offers_per_minute else None
        )
        client_rate, client_burst = settings.client_patch_rate, settings.client_patch_burst
        state.patch_limit = TokenBuckets(client_rate, client_burst) if client_rate else None
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

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI answers a JSON body that is not UTF-8 with a bare 400 ("error parsing the body"), though it
            # answers malformed JSON with 422 json_invalid. JSON text is UTF-8 (RFC 8259): answer both alike,
            # with the 422 every body route documents.
            invalid = [{"loc": ["body"], "msg": "JSON decode error: the body is not UTF-8", "type": "json_invalid"}]
            return JSONResponse({"detail": invalid}, status_code=422)
        if exc.status_code == 405:
            # RFC 9110: a 405 lists every method of the resource. Starlette's names only the first route's on the
            # path ("Allow: GET" for /v1/sessions/{id}, which has PATCH and DELETE too); the page's files, none.
            # No API route at the path: one of the page's files, or /docs or /openapi.json; all GET and HEAD.
            allowed = methods_at(router.routes, request) or {"GET", "HEAD"}
            exc = HTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": ", ".join(sorted(allowed))})
        return await http_exception_handler(request, exc)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    # Outermost (added last), so even BodyLimit's 413 says which worker answered.
    app.add_middleware(WorkerHeaders, worker=worker_name, replica=settings.replica or "")
    app.include_router(router)
    if settings.static_dir.is_dir():
        # The page's files, tried only for requests no API route matches, not even by path alone (a mount at "/"
        # took those too: OPTIONS /v1/sessions got StaticFiles' 405 "Allow: GET, HEAD", GET /v1/sessions a 404).
        app.frontend("/", directory=settings.static_dir, fallback=None)
    return app
