"""HTTP endpoints: each one validates, calls the session registry or the engine state, and returns JSON."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Body, Header, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from engines.params import EditParams, EditParamsPatch
from server.errors import Unavailable
from server.sessions import SessionRegistry

router = APIRouter()


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


class EditResponse(BaseModel):
    edit: EditParams


def registry_of(request: Request) -> SessionRegistry:
    state = request.app.state
    if state.registry is None:
        reason = state.engine_error or "the engine is still loading"
        raise Unavailable(reason, headers={"Retry-After": str(state.settings.retry_after_s)})
    return state.registry


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    """Alive (the process answers); says nothing about the engine."""
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"])
async def readyz(request: Request) -> JSONResponse:
    """200 when the engine is loaded and warmed and a session can be admitted, else 503."""
    state = request.app.state
    if state.registry is None:
        return JSONResponse({"ready": False, "reason": state.engine_error or "engine loading"}, status_code=503)
    registry: SessionRegistry = state.registry
    left = registry.capacity_left()
    body = {"ready": left > 0, "sessions": len(registry), "capacity_left": max(left, 0)}
    if left <= 0:
        body["reason"] = "session limit reached"
    return JSONResponse(body, status_code=200 if left > 0 else 503)


@router.get("/metrics", tags=["ops"])
async def metrics(request: Request) -> Response:
    registry = request.app.state.registry
    sessions = registry.sessions() if registry is not None else []
    body = request.app.state.metrics.render((s.id, s.stats.edited_fps()) for s in sessions)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/presets", tags=["sessions"])
async def presets(request: Request) -> dict[str, object]:
    """The loaded model's edits as one-click prompts, the params a session starts with, and the guidance ranges
    it was trained on (beyond them an edit extrapolates)."""
    state = request.app.state
    return {"presets": state.presets, "defaults": state.default_params.model_dump(), "ranges": state.guidance_ranges}


@router.post("/v1/sessions", status_code=201, response_model=AnswerResponse, tags=["sessions"])
async def create_session(request: Request, offer: OfferRequest) -> AnswerResponse:
    """Open a session from a complete SDP offer; the answer carries the edited video track."""
    registry = registry_of(request)
    params = request.app.state.default_params
    if offer.edit is not None:  # the fields the client gave, over the model's defaults
        params = EditParams.model_validate({**params.model_dump(), **offer.edit.model_dump(exclude_unset=True)})
    session, answer = await registry.create(offer.sdp, params)
    return AnswerResponse(session_id=session.id, token=session.token, sdp=answer.sdp, edit=session.params)


@router.get("/v1/sessions/{session_id}", tags=["sessions"])
async def get_session(request: Request, session_id: str) -> dict[str, object]:
    """Effective params and live stats of a session."""
    return registry_of(request).get(session_id).describe()


@router.patch("/v1/sessions/{session_id}", response_model=EditResponse, tags=["sessions"])
async def patch_session(
    request: Request,
    session_id: str,
    patch: EditParamsPatch = Body(...),  # noqa: B008 - FastAPI's way to declare a body
    authorization: str | None = Header(None),
) -> EditResponse:
    """Change some edit params; they take effect on the next edited frame."""
    registry = registry_of(request)
    session = registry.authorize(session_id, authorization)
    return EditResponse(edit=await session.update(patch, registry.worker))


@router.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"])
async def delete_session(request: Request, session_id: str, authorization: str | None = Header(None)) -> Response:
    """Close the peer connection and free everything the session held."""
    registry = registry_of(request)
    registry.authorize(session_id, authorization)
    await registry.close(session_id)
    return Response(status_code=204)
