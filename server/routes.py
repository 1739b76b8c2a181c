"""HTTP endpoints: each one validates, calls the session registry or the engine client, and returns JSON."""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, Header, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from engines.client import READING_FLOOR, EngineClient, RoutedCall, RoutedReply
from engines.params import EditParams, EditParamsPatch
from server.camera import camera_hint
from server.errors import ErrorBody, TooManyRequests
from server.metrics import ServiceMetrics
from server.rate import OfferRateLimit, TokenBuckets
from server.sessions import SessionRegistry

router = APIRouter()

_MEANINGS = {
    400: "Bad SDP offer (malformed, no video, more than one video track).",
    401: "No 'Authorization: Bearer <token>' header.",
    403: "The token belongs to another session.",
    404: "No such session.",
    413: "Request body over the limit (--max-body-bytes).",
    422: "Invalid parameters: one {loc, msg, type} per field; the input is never echoed.",
    429: "Too many new sessions from this client address (--offers-per-minute): retry after Retry-After seconds.",
    503: "Full, or the engine is loading or restarting: retry after Retry-After seconds.",
}
_PATCH_MEANINGS = {
    **_MEANINGS,
    429: "Too many PATCHes of this session (--patch-rate a second, --patch-burst at once), or from this client "
    "address (--client-patch-rate, --client-patch-burst): retry after Retry-After seconds. Nothing was applied.",
    503: "The engine is loading or restarting, or the server's prompt encoder has --max-prompt-encodings in flight: "
    "retry after Retry-After seconds. Nothing of the request was applied.",
}
#: the Retry-After header, as a 429 and a 503 carry it
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


def errors(*codes: int, meanings: dict[int, str] = _MEANINGS) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route answers, each with the one error body (and Retry-After where
    a client is told when to come back)."""
    entries: dict[int | str, dict[str, Any]] = {}
    for code in (*codes, 413, 422):
        entries[code] = {"model": ErrorBody, "description": meanings[code]}
        if code in (429, 503):
            entries[code]["headers"] = _RETRY_AFTER
    return entries


def session_links(session_id: str, authorization: str) -> dict[str, Any]:
    """OpenAPI links from a response to the GET, PATCH and DELETE of the same session, given the runtime
    expressions of its id and of its 'Authorization' header. They tell clients (and schemathesis' stateful
    run) where a session's id and token go; "Bearer {$response.body#/token}" is an OpenAPI embedded
    expression: the literal text with the expression's value in place of the braces."""
    links: dict[str, Any] = {}
    for name, method in (("ReadSession", "get"), ("EditSession", "patch"), ("CloseSession", "delete")):
        links[name] = {
            # operationRef (path and method), not operationId: FastAPI derives the ids from function names.
            "operationRef": f"#/paths/~1v1~1sessions~1{{session_id}}/{method}",
            "parameters": {"path.session_id": session_id, "header.authorization": authorization},
        }
    return links


class OfferRequest(BaseModel):
    sdp: str = Field(..., min_length=1, description="The client's complete SDP offer (ICE candidates gathered).")
    type: Literal["offer"] = "offer"
    edit: EditParams | None = Field(None, description="Initial edit parameters; defaults where omitted.")


class AnswerResponse(BaseModel):
    session_id: str
    token: str = Field(..., description="Bearer token for PATCH and DELETE of this session.")
    sdp: str
    type: Literal["answer"] = "answer"
    edit: EditParams


class EditShare(BaseModel):
    edit: str = Field(..., description="One of the edits the model was trained on (e.g. 'pencil_sketch').")
    share: float = Field(..., ge=0, le=1, description="How much of it the prompt is read as.")


class EditResponse(BaseModel):
    edit: EditParams = Field(
        ...,
        description="The session's params after this request: what it asked for, over "
        "the params the requests before it asked for.",
    )
    outcome: Literal["applied", "superseded"] = Field(
        "applied",
        description="'applied': the edited frames use these params from the next frame on. 'superseded': a newer "
        "PATCH of the session came while this one's new prompt was being encoded, and replaced it (latest wins): "
        "no frame used these params, and the newer PATCH, built on them, answers how it went. Frames keep the "
        "params before both until a new prompt is encoded.",
    )
    reading: list[EditShare] | None = Field(
        None,
        description=f"The trained edits the prompt is read as, heaviest first (shares under {READING_FLOOR} left "
        "out), so a client can say what the words became. null where the model reads prompts as they are, "
        "before the session's peer has connected, and for a prompt given while the engine restarts, until the new "
        "engine has read it.",
    )


def registry_of(request: Request) -> SessionRegistry:
    return request.app.state.registry


def engine_of(request: Request) -> EngineClient:
    return request.app.state.engine


def reply(answer: RoutedReply) -> Response:
    headers = {"Retry-After": str(answer.retry_after)} if answer.retry_after is not None else None
    if answer.body is None:
        return Response(status_code=answer.status, headers=headers)
    return JSONResponse(answer.body, status_code=answer.status, headers=headers)


async def patch_rate_by_client(request: Request) -> None:
    """A PATCH takes a token of its client address's bucket before its body is validated (429 past it). Counted
    by the media worker it reaches; each session's own bucket is counted where the session lives."""
    limit: TokenBuckets | None = request.app.state.patch_limit
    if limit is None:
        return
    wait = limit.take(request.client.host if request.client else "unknown")
    if wait > 0:
        request.app.state.metrics.patches_limited.labels("client").inc()
        rate = request.app.state.settings.client_patch_rate
        raise TooManyRequests(
            f"too many PATCHes from this address: at most {rate:g} a second",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, object]:
    """Alive (this media worker's process answers, with its pid); says nothing about the engine."""
    return {"status": "ok", "pid": os.getpid()}


@router.get(
    "/readyz",
    tags=["ops"],
    responses={503: {"description": "Not ready: engine loading or restarting, or no capacity left (a reason says)."}},
)
async def readyz(request: Request) -> JSONResponse:
    """200 when the engine is loaded, warm and connected and a session can be admitted, else 503."""
    health = engine_of(request).health()
    registry = registry_of(request)
    stopped = [name for name, task in request.app.state.tasks.items() if task.done()]
    if stopped:
        return JSONResponse({"ready": False, "reason": f"background task {stopped[0]} ended"}, status_code=503)
    if not health.ready:
        return JSONResponse({"ready": False, "reason": health.reason or "engine not ready"}, status_code=503)
    left = health.capacity_left
    body: dict[str, object] = {"ready": left > 0, "sessions": len(registry), "capacity_left": max(left, 0)}
    if left <= 0:
        body["reason"] = "session limit reached"
    return JSONResponse(body, status_code=200 if left > 0 else 503)


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=Response,
    responses={200: {"description": "Prometheus text exposition format.", "content": {"text/plain": {}}}},
)
async def metrics(request: Request) -> Response:
    service_metrics: ServiceMetrics = request.app.state.metrics
    service_metrics.refresh(registry_of(request).fps_by_session(), engine_of(request).health())
    return Response(service_metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/presets", tags=["sessions"])
async def presets(request: Request) -> dict[str, object]:
    """The loaded model's edits as one-click prompts, the params a session starts with, the guidance ranges
    it was trained on (beyond them an edit extrapolates), and the camera a session needs (`camera`: the shorter
    side of the frames the editor takes, the most frames a second and kbit/s worth sending)."""
    info = engine_of(request).info
    camera = camera_hint(request.app.state.settings, info.resolution)
    return {
        "presets": info.presets,
        "defaults": info.default_params.model_dump(),
        "ranges": info.guidance_ranges,
        "camera": camera.as_json(),
    }


@router.post(
    "/v1/sessions",
    status_code=201,
    response_model=AnswerResponse,
    tags=["sessions"],
    responses={
        201: {
            "description": "The session is open: its id, its token, and the SDP answer.",
            "links": session_links("$response.body#/session_id", "Bearer {$response.body#/token}"),
        },
        **errors(400, 429, 503),
    },
)
async def create_session(request: Request, offer: OfferRequest) -> AnswerResponse:
    """Open a session from a complete SDP offer; the answer carries the edited video track."""
    limit: OfferRateLimit | None = request.app.state.offer_limit
    if limit is not None:
        wait = limit.take(request.client.host if request.client else "unknown")
        if wait > 0:
            raise TooManyRequests(
                "too many new sessions from this address: retry later", headers={"Retry-After": str(math.ceil(wait))}
            )
    params = engine_of(request).info.default_params
    if offer.edit is not None:  # the fields the client gave, over the model's defaults
        params = EditParams.model_validate({**params.model_dump(), **offer.edit.model_dump(exclude_unset=True)})
    session, answer = await registry_of(request).create(offer.sdp, params)
    return AnswerResponse(session_id=session.id, token=session.token, sdp=answer.sdp, edit=session.params)


@router.get("/v1/sessions/{session_id}", tags=["sessions"], responses=errors(401, 403, 404, 503))
async def get_session(request: Request, session_id: str, authorization: str | None = Header(None)) -> Response:
    """Effective params and live stats of a session (whichever media worker holds it); needs its token."""
    return reply(await registry_of(request).call(RoutedCall("get", session_id, authorization)))


@router.patch(
    "/v1/sessions/{session_id}",
    response_model=EditResponse,
    tags=["sessions"],
    responses=errors(401, 403, 404, 429, 503, meanings=_PATCH_MEANINGS),
    dependencies=[Depends(patch_rate_by_client)],
)
async def patch_session(
    request: Request,
    session_id: str,
    patch: EditParamsPatch = Body(...),  # noqa: B008 - FastAPI's way to declare a body
    authorization: str | None = Header(None),
) -> Response:
    """Change some edit params; they take effect on the next edited frame. A new prompt is encoded first, while
    frames keep the old one (a prompt any session used before applies at once); a PATCH that a newer one replaces
    meanwhile answers 200 with outcome 'superseded'. Rate-limited per session and per client address."""
    body = patch.model_dump(exclude_unset=True)
    return reply(await registry_of(request).call(RoutedCall("patch", session_id, authorization, body)))


@router.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"], responses=errors(401, 403, 404, 503))
async def delete_session(request: Request, session_id: str, authorization: str | None = Header(None)) -> Response:
    """Close the peer connection and free everything the session held."""
    return reply(await registry_of(request).call(RoutedCall("delete", session_id, authorization)))
