"""Sessions (a peer connection, token, edit params and stats each) and the registry that admits and reaps them."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from engines.params import EditParams, EditParamsPatch
from engines.worker import Conditions, EngineWorker, FrameOutcome, FrameSlot, PendingFrame
from server.errors import BadOffer, Forbidden, SessionNotFound, Unauthorized, Unavailable
from server.ice import keep_reachable_candidates, rtc_configuration
from server.media import EditedVideoTrack, read_newest
from server.metrics import ServiceMetrics
from server.settings import Settings
from server.stats import SessionStats

log = logging.getLogger(__name__)


class Session:
    """One viewer: a peer connection, its camera reader, its edited output track and its parameters."""

    def __init__(
        self,
        registry: SessionRegistry,
        pc: RTCPeerConnection,
        params: EditParams,
        conditions: Conditions,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.token = secrets.token_urlsafe(24)
        self.pc = pc
        self.params = params
        self.created_at = time.monotonic()
        self.stats = SessionStats()
        self.closed = False
        self._registry = registry
        self._loop = asyncio.get_running_loop()
        self._update_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self.output = EditedVideoTrack(on_sent=self._sent)
        self.slot = FrameSlot(self.id, conditions, on_outcome=self._outcome_from_worker)

    @property
    def state(self) -> str:
        return "closed" if self.closed else self.pc.connectionState

    def start_reading(self, track: MediaStreamTrack, size: int) -> None:
        self._reader = asyncio.ensure_future(read_newest(track, self._offer, size))

    def _offer(self, frame: PendingFrame) -> None:
        replaced = self.slot.offer(frame)
        self.stats.frame_received(replaced)
        metrics = self._registry.metrics
        metrics.frames_in.inc(self.id)
        if replaced:
            metrics.dropped.inc(self.id)

    def _outcome_from_worker(self, outcome: FrameOutcome) -> None:
        # Called on the engine thread: hand over to the event loop, which owns the track and the stats.
        self._loop.call_soon_threadsafe(self._deliver, outcome)

    def _deliver(self, outcome: FrameOutcome) -> None:
        if self.closed:
            return
        failed = outcome.error is not None
        self.stats.frame_done(outcome.batch_size, outcome.skipped, failed)
        metrics = self._registry.metrics
        if failed:
            metrics.failed.inc(self.id)
        else:
            metrics.edited.inc(self.id)
            if outcome.skipped:
                metrics.skipped.inc(self.id)
        self.output.deliver(outcome)

    def _sent(self, latency_s: float, pts: int) -> None:
        self.stats.frame_sent(latency_s, pts)
        self._registry.metrics.latency.observe(latency_s)

    async def update(self, patch: EditParamsPatch, worker: EngineWorker) -> EditParams:
        """Apply a partial update; a new prompt is encoded (off the loop) before the swap."""
        async with self._update_lock:
            params = patch.apply(self.params)
            context = self.slot.conditions.context
            if params.prompt != self.params.prompt:
                context = await asyncio.wrap_future(worker.encode_prompt(params.prompt))
            self.slot.set_conditions(params, context)
            self.params = params
            return params

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.output.stop()
        if self._reader is not None:
            self._reader.cancel()
        await self.pc.close()

    def describe(self) -> dict[str, object]:
        stats: dict[str, object] = dict(self.stats.snapshot())
        stats["state"] = self.state
        return {"session_id": self.id, "edit": self.params.model_dump(), "stats": stats}


class SessionRegistry:
    """Creates sessions within the admission limit, finds and authorizes them, and reaps dead ones."""

    def __init__(self, settings: Settings, worker: EngineWorker, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.worker = worker
        self.metrics = metrics
        self._sessions: dict[str, Session] = {}
        self._admitting = 0  # sessions being negotiated: they count against the limit too

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def capacity_left(self) -> int:
        return self.settings.max_sessions - len(self._sessions) - self._admitting

    async def create(self, sdp: str, params: EditParams) -> tuple[Session, RTCSessionDescription]:
        """Negotiate a new session from a complete (non-trickle) offer; returns it with its answer."""
        if self.capacity_left() <= 0:
            self.metrics.rejected.inc()
            raise Unavailable(
                f"server full: {self.settings.max_sessions} sessions are open",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        self._admitting += 1
        try:
            return await self._negotiate(sdp, params)
        finally:
            self._admitting -= 1

    async def _negotiate(self, sdp: str, params: EditParams) -> tuple[Session, RTCSessionDescription]:
        context = await asyncio.wrap_future(self.worker.encode_prompt(params.prompt))
        pc = RTCPeerConnection(rtc_configuration(self.settings.ice_servers))
        session = Session(self, pc, params, Conditions(params, context))
        size = self.worker.resolution

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                session.start_reading(track, size)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.close(session.id)

        try:
            try:
                sdp = keep_reachable_candidates(sdp, self.settings.host_addresses())
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            except Exception as exc:
                raise BadOffer(f"malformed SDP offer: {exc or type(exc).__name__}") from exc
            if not any(t.kind == "video" for t in pc.getTransceivers()):
                raise BadOffer("the offer has no video section: send the camera as a video track")
            pc.addTrack(session.output)
            await pc.setLocalDescription(await pc.createAnswer())
        except BaseException:
            await session.close()
            raise
        self._sessions[session.id] = session
        self.worker.add(session.slot)
        self.metrics.active_sessions.set(len(self._sessions))
        log.info("session %s opened (%d open)", session.id, len(self._sessions))
        return session, pc.localDescription

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        return session

    def authorize(self, session_id: str, authorization: str | None) -> Session:
        """The session, if `authorization` is 'Bearer <its token>'; 401 without a token, 403 with another."""
        session = self.get(session_id)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing 'Authorization: Bearer <token>' header", headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(token.strip(), session.token):
            raise Forbidden("this token does not belong to this session")
        return session

    async def close(self, session_id: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        self.worker.remove(session_id)
        await session.close()
        self.metrics.forget_session(session_id)
        self.metrics.active_sessions.set(len(self._sessions))
        log.info("session %s closed (%d open)", session_id, len(self._sessions))
        return True

    async def close_all(self) -> None:
        for session_id in list(self._sessions):
            await self.close(session_id)

    async def reap_forever(self, interval_s: float = 1.0) -> None:
        """Close sessions whose peer never connected in time, or is gone (failed, closed, long disconnected)."""
        disconnected_since: dict[str, float] = {}
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            for session in self.sessions():
                state = session.pc.connectionState
                if state == "disconnected":
                    disconnected_since.setdefault(session.id, now)
                else:
                    disconnected_since.pop(session.id, None)
                timeout = self.settings.connect_timeout_s
                never_connected = state in ("new", "connecting") and now - session.created_at > timeout
                gone = state in ("failed", "closed") or now - disconnected_since.get(session.id, now) > timeout
                if never_connected or gone:
                    log.info("reaping session %s (state %s)", session.id, state)
                    disconnected_since.pop(session.id, None)
                    await self.close(session.id)
