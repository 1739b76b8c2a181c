"""Sessions (a peer connection, token, edit params and stats each) and the registry that admits and reaps them."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
import uuid
from collections.abc import Callable

import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from pydantic import ValidationError

from engines.client import (
    EngineBusy,
    EngineClient,
    EngineError,
    EngineFull,
    EngineOutcome,
    EngineStream,
    RoutedCall,
    RoutedReply,
    StreamNotFound,
)
from engines.params import EditParams, EditParamsPatch
from server.camera import CameraBudget, CameraHint, DecodePriority, camera_hint, cap_video_bitrate
from server.errors import (
    BadOffer,
    Forbidden,
    ServiceError,
    SessionNotFound,
    Unauthorized,
    Unavailable,
    describe_invalid,
    safe_text,
)
from server.ice import keep_reachable_candidates, rtc_configuration
from server.jitter import apply_receive_rule
from server.media import EditedVideoTrack, FrameClock, read_newest
from server.metrics import ServiceMetrics
from server.rate import TokenBuckets
from server.settings import Settings
from server.stats import SessionStats

log = logging.getLogger(__name__)


class Session:
    """One viewer: a peer connection, its camera reader, its edited output track and its parameters."""

    def __init__(self, registry: SessionRegistry, pc: RTCPeerConnection, session_id: str, params: EditParams) -> None:
        self.id = session_id
        self.token = secrets.token_urlsafe(24)
        self.pc = pc
        self.params = params
        self.created_at = time.monotonic()
        self.last_camera_at = self.created_at  # the last camera frame (refused ones too)
        self.stats = SessionStats()
        self.closed = False
        self.stream: EngineStream | None = None
        self._registry = registry
        self._update_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self.output = EditedVideoTrack(on_sent=self._sent, on_encoded=self._encoded)

    @property
    def state(self) -> str:
        return "closed" if self.closed else self.pc.connectionState

    async def activate(self, engine: EngineClient) -> None:
        """The peer connected: take an engine slot (EngineFull, EngineUnavailable) with the params as they are."""
        async with self._update_lock:
            if self.stream is not None or self.closed:
                return
            self.last_camera_at = time.monotonic()  # camera silence counts from the connection
            stream = await engine.open_stream(self.id, self.params, self.deliver)
            if self.closed:  # closed while the engine opened it
                await engine.close_stream(self.id)
                return
            self.stream = stream

    def start_reading(self, track: MediaStreamTrack, hint: CameraHint, receiver: object | None) -> None:
        """Read the camera `track`, held to `hint`'s budget through `receiver`'s decoder thread."""
        self._camera_budget = CameraBudget(hint)
        self._decode_priority = DecodePriority(receiver)
        reader = read_newest(track, self._offer, hint.height, self._refused, self._decoded)
        self._reader = asyncio.ensure_future(reader)

    def _decoded(self, at: float, width: int, height: int) -> None:
        over = self._camera_budget.add(at, width, height)
        if over is None:
            return
        lowered = self._decode_priority.lower(over)
        self.stats.camera_over_budget = over
        if over:
            self._registry.metrics.cameras_over_budget.inc()
        log.warning(
            "session %s: camera %s its budget of %.1f Mpx/s (%dx%d now)%s",
            self.id,
            "over" if over else "back within",
            self._camera_budget.pixels_per_s / 1e6,
            width,
            height,
            (": its decoding runs at low priority" if over else ": its decoding back at normal priority")
            if lowered
            else "",
        )

    def _refused(self, why: str) -> None:
        self.last_camera_at = time.monotonic()
        if self.stats.refused == 0:
            log.warning("session %s: camera frame refused: %s", self.id, why)
        self.stats.refused += 1

    def _offer(self, pixels: Callable[[], np.ndarray], received_at: float, meta: object) -> None:
        self.last_camera_at = received_at
        if self.stream is None:
            return
        replaced = self.stream.submit(pixels, received_at, meta)
        self.stats.frame_received(replaced)
        metrics = self._registry.metrics
        metrics.frames_in.inc(self.id)
        if replaced:
            metrics.dropped.inc(self.id)

    def deliver(self, outcome: EngineOutcome) -> None:
        """An engine outcome, on the event loop: count it and make it the next frame to send."""
        if self.closed:
            return
        failed = outcome.error is not None
        self.stats.frame_done(outcome.batch_size, outcome.skipped, failed, outcome.unedited)
        metrics = self._registry.metrics
        if failed:
            metrics.failed.inc(self.id)
        elif outcome.unedited:
            metrics.unedited.inc(self.id)
        else:
            metrics.edited.inc(self.id)
            if outcome.skipped:
                metrics.skipped.inc(self.id)
            if isinstance(outcome.meta, FrameClock):
                outcome.meta.edited_at = time.monotonic()
        self.output.deliver(outcome)

    def _sent(self, latency_s: float, pts: int, clock: FrameClock | None) -> None:
        self.stats.frame_sent(latency_s, pts)
        self._registry.metrics.latency.observe(latency_s)
        if clock is not None and clock.taken_at is not None and clock.edited_at is not None:
            assert clock.sent_at is not None
            for stage, seconds in (
                ("queue", clock.taken_at - clock.decoded_at),
                ("engine", clock.edited_at - clock.taken_at),
                ("pacing", clock.sent_at - clock.edited_at),
            ):
                self.stats.stage_done(stage, seconds)
                self._registry.metrics.stage.labels(stage).observe(seconds)

    def _encoded(self, seconds: float) -> None:
        self.stats.stage_done("encode", seconds)
        self._registry.metrics.stage.labels("encode").observe(seconds)

    async def update(self, patch: EditParamsPatch, engine: EngineClient) -> tuple[EditParams, bool]:
        """Apply a partial update over the newest params asked for; the engine encodes a new prompt (frames go on
        with the old one meanwhile) before both take effect together. Returns the params and whether they
        applied: False when a newer update came while this one's prompt was encoded (latest wins; the newer one
        was built on these params, so no field of them is lost)."""
        params = patch.apply(self.params)
        previous, self.params = self.params, params  # the next PATCH builds on these, applied or not yet
        if self.stream is None:
            async with self._update_lock:  # activate() may be opening the stream with the params before these
                pass
            if self.stream is None:
                return params, True  # the stream opens with them when the peer connects
        try:
            outcome = await engine.update_stream(self.id, params)
        except EngineError:
            if self.params is params:  # refused, and nothing newer builds on it
                self.params = previous
            raise
        return params, outcome.applied

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
        return {"session_id": self.id, "edit": self.params.model_dump(), "reading": self.read_as(), "stats": stats}

    def read_as(self) -> list[dict[str, object]] | None:
        """How the engine read the prompt, as the API gives it: the edits it became, heaviest first, with their
        shares (None until the stream is open)."""
        reading = None if self.stream is None else self.stream.reading
        return None if reading is None else [{"edit": edit, "share": round(share, 3)} for edit, share in reading]


class SessionRegistry:
    """Creates sessions within the engine's admission, answers calls on them (here or where they live), reaps."""

    def __init__(self, settings: Settings, engine: EngineClient, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self._sessions: dict[str, Session] = {}
        self._negotiating = 0
        # PATCHes per session, counted where the session lives (a call routed from another worker counts too)
        self.patch_limit = TokenBuckets(settings.patch_rate, settings.patch_burst) if settings.patch_rate else None

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def fps_by_session(self) -> list[tuple[str, float]]:
        return [(s.id, s.stats.edited_fps()) for s in self._sessions.values()]

    def pending(self) -> int:
        """Sessions answered whose peer has not connected yet (no engine slot)."""
        return sum(s.stream is None for s in self._sessions.values())

    def _count(self) -> None:
        pending = self.pending()
        self.metrics.pending_sessions.set(pending)
        self.metrics.active_sessions.set(len(self._sessions) - pending)

    async def create(self, sdp: str, params: EditParams) -> tuple[Session, RTCSessionDescription]:
        """Negotiate a new session from a complete (non-trickle) offer; returns it with its answer.

        Admission: the engine must have a free slot now, but a slot is taken only when the peer connects
        (activate), so answered offers whose peer never connects can't lock anyone out; they are capped
        apart (--max-pending) and reaped after --connect-timeout-s.
        """
        health = self.engine.health()
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if not health.ready:
            raise Unavailable(health.reason or "the engine is not ready", headers=retry)
        if health.capacity_left <= 0:
            self.metrics.rejected.inc()
            raise Unavailable(f"server full: {self.settings.max_sessions} sessions are open", headers=retry)
        pending = self.pending()
        if pending >= self.settings.max_pending:
            self.metrics.rejected.inc()
            raise Unavailable(
                f"{pending} answered offers are waiting for their peers to connect: retry shortly",
                headers={"Retry-After": "1"},
            )
        if self._negotiating >= self.settings.max_negotiations:
            raise Unavailable(
                f"{self._negotiating} offers are being negotiated already: retry shortly",
                headers={"Retry-After": "1"},
            )
        self._negotiating += 1
        try:
            return await self._create(sdp, params)
        finally:
            self._negotiating -= 1

    async def _create(self, sdp: str, params: EditParams) -> tuple[Session, RTCSessionDescription]:
        # In a fleet the id names the replica first: the proxy routes the session's later calls by it.
        replica = self.settings.replica
        session_id = f"{replica}.{uuid.uuid4().hex}" if replica else uuid.uuid4().hex
        pc = RTCPeerConnection(rtc_configuration(self.settings.ice_servers))
        session = Session(self, pc, session_id, params)
        try:
            answer = await self._negotiate(session, sdp)
        except BaseException:
            await session.close()
            raise
        self._sessions[session.id] = session
        await self.engine.claim(session.id)  # calls for it that reach another media worker are routed here
        self._count()
        log.info("session %s answered (%d here)", session.id, len(self._sessions))
        return session, answer

    async def activate(self, session: Session) -> None:
        """Its peer connected: give it an engine slot, or close it if the engine has none left after all."""
        try:
            await session.activate(self.engine)
        except EngineError as exc:
            if isinstance(exc, EngineFull):
                self.metrics.rejected.inc()
            log.warning("session %s connected but gets no engine stream (%s): closing it", session.id, exc)
            await self.close(session.id)
            return
        self._count()
        log.info("session %s connected (%d open here)", session.id, len(self._sessions))

    async def _negotiate(self, session: Session, sdp: str) -> RTCSessionDescription:
        pc = session.pc
        hint = camera_hint(self.settings, self.engine.info.resolution)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                receiver = next((r for r in pc.getReceivers() if r.track is track), None)
                session.start_reading(track, hint, receiver)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected":
                await self.activate(session)
            elif pc.connectionState in ("failed", "closed"):
                await self.close(session.id)

        try:
            sdp = keep_reachable_candidates(sdp, self.settings.host_addresses())
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:
            raise BadOffer(f"malformed SDP offer: {exc or type(exc).__name__}") from exc
        apply_receive_rule(pc, self.settings.receive_rule)
        videos = sum(t.kind == "video" for t in pc.getTransceivers())
        if videos == 0:
            raise BadOffer("the offer has no video section: send the camera as a video track")
        if videos > 1:  # each would be decoded; one session edits one camera
            raise BadOffer(f"the offer has {videos} video sections: send exactly one camera track")
        pc.addTrack(session.output)
        await pc.setLocalDescription(await pc.createAnswer())
        answer = pc.localDescription
        return RTCSessionDescription(cap_video_bitrate(answer.sdp, self.settings.camera_max_kbps), answer.type)

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
        # Bytes, so any header text compares in constant time (str needs ASCII).
        if not secrets.compare_digest(token.strip().encode(), session.token.encode()):
            raise Forbidden("this token does not belong to this session")
        return session

    async def call(self, call: RoutedCall) -> RoutedReply:
        """A GET, PATCH or DELETE of a session: answered here if it lives here, else where it lives."""
        if call.session_id in self._sessions:
            return await self.answer(call)
        try:
            return await self.engine.route(call)
        except StreamNotFound:
            raise SessionNotFound(f"no session {call.session_id!r}") from None
        except EngineError as exc:
            # Another media worker may hold it, but only the engine knows which: say so, and when to retry.
            raise Unavailable(
                f"session {call.session_id!r} is not held by this worker and the engine cannot route: {exc}",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from exc

    async def answer(self, call: RoutedCall) -> RoutedReply:
        """Carry out a call on a session this worker holds; errors become their status and message."""
        try:
            session = self.authorize(call.session_id, call.authorization)  # even to read: params are private
            if call.op == "get":
                return RoutedReply(200, session.describe())
            if call.op == "patch":
                wait = self.patch_limit.take(session.id) if self.patch_limit is not None else 0.0
                if wait > 0:
                    self.metrics.patches_limited.labels("session").inc()
                    return RoutedReply(
                        429,
                        {"detail": f"too many changes to this session: at most {self.settings.patch_rate:g} a second"},
                        retry_after=max(1, math.ceil(wait)),
                    )
                params, applied = await session.update(EditParamsPatch.model_validate(call.body), self.engine)
                outcome = "applied" if applied else "superseded"
                self.metrics.patches.labels(outcome).inc()
                return RoutedReply(200, {"edit": params.model_dump(), "reading": session.read_as(), "outcome": outcome})
            await self.close(call.session_id)
            return RoutedReply(204, None)
        except ServiceError as exc:
            return RoutedReply(exc.status, {"detail": safe_text(exc.message, 500)})
        except ValidationError as exc:  # a routed body is validated again where the session lives
            return RoutedReply(422, {"detail": describe_invalid(exc.errors())})
        except EngineBusy as exc:
            self.metrics.patches_limited.labels("server").inc()
            return RoutedReply(exc.status, {"detail": str(exc)}, retry_after=exc.retry_after)
        except EngineError as exc:
            retry = self.settings.retry_after_s if exc.status == 503 else None
            return RoutedReply(exc.status, {"detail": str(exc)}, retry_after=retry)

    async def close(self, session_id: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        await self.engine.close_stream(session_id)  # its stream, or its claim
        if self.patch_limit is not None:
            self.patch_limit.forget(session_id)
        await session.close()
        self.metrics.forget_session(session_id)
        self._count()
        log.info("session %s closed (%d open here)", session_id, len(self._sessions))
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
                # A peer killed outright leaves ICE "connected" for half a minute; its camera stops at once.
                silent = state == "connected" and now - session.last_camera_at > self.settings.camera_timeout_s
                gone = gone or silent
                if never_connected or gone:
                    log.info("reaping session %s (state %s)", session.id, state)
                    disconnected_since.pop(session.id, None)
                    try:
                        await self.close(session.id)
                    except Exception:
                        log.exception("reaping session %s failed", session.id)
