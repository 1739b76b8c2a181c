"""aiortc media: fit camera frames to the editor, read only the newest, and send edited frames back."""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av.video.reformatter import VideoReformatter

from engines.client import EngineOutcome

log = logging.getLogger(__name__)


#: camera frames beyond these are refused before any scaling: a 16000×16 frame scaled to the editor's square
#: would cost a large fraction of a second and hundreds of megabytes
MAX_CAMERA_SIDE = 4096
MAX_CAMERA_ASPECT = 4.0


def refusal(frame: av.VideoFrame) -> str | None:
    """Why a camera frame is not worth converting, or None when it is fine."""
    w, h = frame.width, frame.height
    if min(w, h) < 2 or max(w, h) > MAX_CAMERA_SIDE:
        return f"{w}x{h} is outside 2..{MAX_CAMERA_SIDE} pixels a side"
    if max(w, h) / min(w, h) > MAX_CAMERA_ASPECT:
        return f"{w}x{h} is wider than {MAX_CAMERA_ASPECT:g}:1"
    return None


def fit_frame(frame: av.VideoFrame, size: int, scaler: VideoReformatter | None = None) -> np.ndarray:
    """Scale a camera frame so its shorter side is `size` (keeping its aspect), then centre-crop a square.

    Cameras change their send resolution under load; this keeps what the editor sees the same shape. One
    scaler per session (`scaler`) keeps one swscale context for all its frames.
    """
    w, h = frame.width, frame.height
    scale = size / min(w, h)
    sw, sh = max(size, round(w * scale)), max(size, round(h * scale))
    scaled = (scaler or VideoReformatter()).reformat(frame, format="rgb24", width=sw, height=sh, threads=1)
    rgb = scaled.to_ndarray()
    top, left = (sh - size) // 2, (sw - size) // 2
    return np.ascontiguousarray(rgb[top : top + size, left : left + size])


@dataclass
class FrameClock:
    """A camera frame's pts and when (time.monotonic()) it ended each stage in this media worker."""

    pts: int | None
    time_base: fractions.Fraction | None
    decoded_at: float  # aiortc handed it over, decoded
    taken_at: float | None = None  # the engine took it: converted for the editor when the engine asked
    edited_at: float | None = None  # the engine's outcome came back
    sent_at: float | None = None  # the sender took the edited frame to encode it


FrameSink = Callable[[Callable[[], np.ndarray], float, FrameClock], None]


async def read_newest(
    track: MediaStreamTrack,
    offer: FrameSink,
    size: int,
    refuse: Callable[[str], None] = lambda why: None,
    decoded: Callable[[float, int, int], None] = lambda at, width, height: None,
) -> None:
    """Drain `track` as fast as it delivers, handing each frame on (with a converter that runs only if the
    engine takes it); the engine stream keeps only the newest. `decoded` hears of every frame the camera's
    decoder produced (time, width, height), refused ones too: each cost its decoding.

    aiortc's receive queue is unbounded: a consumer slower than the camera would otherwise build
    seconds of latency. Returns when the track ends.
    """
    # Single-threaded and reused: PyAV's default gives each frame its own scaler with a pool of one thread
    # per core, spawned per frame and kept alive for as long as the frame object is.
    scaler = VideoReformatter()
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if not isinstance(frame, av.VideoFrame):
            continue
        decoded(time.monotonic(), frame.width, frame.height)
        why = refusal(frame)
        if why is not None:
            refuse(why)
            continue
        clock = FrameClock(frame.pts, frame.time_base, time.monotonic())

        def pixels(frame: av.VideoFrame = frame, clock: FrameClock = clock) -> np.ndarray:
            clock.taken_at = time.monotonic()
            return fit_frame(frame, size, scaler)

        offer(pixels, clock.decoded_at, clock)


class EditedVideoTrack(MediaStreamTrack):
    """The outgoing track: each recv() waits for the next edited frame and stamps it with its camera pts."""

    kind = "video"

    def __init__(
        self,
        on_sent: Callable[[float, int, FrameClock | None], None],
        on_encoded: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        super().__init__()
        self._latest: EngineOutcome | None = None
        self._new = asyncio.Event()
        self._last_pts: int | None = None
        self._on_sent = on_sent
        self._on_encoded = on_encoded
        self._handed: FrameClock | None = None  # the frame the sender is encoding and sending
        # Frames go out in the encoder's own yuv420p, converted by one single-threaded scaler: left in rgb24,
        # aiortc's encoder would convert each through a new scaler with a thread per core.
        self._to_yuv = VideoReformatter()

    def deliver(self, outcome: EngineOutcome) -> None:
        """Make `outcome` the next frame to send (an unsent older one is superseded). Event-loop only."""
        self._latest = outcome
        self._new.set()

    async def recv(self) -> av.VideoFrame:
        if self._handed is not None:  # the sender asks again once it has encoded and sent the previous frame
            assert self._handed.sent_at is not None
            self._on_encoded(time.monotonic() - self._handed.sent_at)
            self._handed = None
        if self.readyState != "live":
            raise MediaStreamError
        await self._new.wait()
        self._new.clear()
        outcome = self._latest
        if outcome is None or self.readyState != "live":
            raise MediaStreamError
        rgb = av.VideoFrame.from_ndarray(outcome.frame, format="rgb24")
        frame = self._to_yuv.reformat(rgb, format="yuv420p", threads=1)
        clock = outcome.meta if isinstance(outcome.meta, FrameClock) else None
        pts, time_base = (clock.pts, clock.time_base) if clock is not None else (None, None)
        if pts is None:
            pts, time_base = int(time.monotonic() * 90000), fractions.Fraction(1, 90000)
        # The encoder needs increasing timestamps; a reordered or repeated camera pts is nudged forward.
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1
        self._last_pts = pts
        frame.pts, frame.time_base = pts, time_base
        now = time.monotonic()
        if clock is not None:
            clock.sent_at = now
            self._handed = clock
        self._on_sent(now - outcome.received_at, pts, clock)
        return frame

    def stop(self) -> None:
        super().stop()
        self._new.set()  # wake a pending recv() so the sender sees the end
