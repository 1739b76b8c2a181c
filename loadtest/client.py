"""A StreamEdit WebRTC client over the public API: streams a clip, receives the edited track, times every frame.

Frame identity across the round trip: aiortc re-bases RTP timestamps at every hop (each receiver counts
pts from the first frame it got), so the pts a client receives is `P_k − P_j`, where P_k is the pts it
sent for the source frame and P_j the pts of the first source frame the server sent back. The server
reports `first_sent_pts` = P_j − P_0 (in its own timeline, P_0 = the first frame it received) and this
client knows P_0 (the first frame its sender pulled), so P_k = received + first_sent_pts + P_0 (to within a few
90 kHz ticks of rounding, matched to the nearest sent pts), unless the very first frame was lost on the way
in (then every latency is off by whole frame intervals; on loopback we have not seen it happen).
"""

from __future__ import annotations

import asyncio
import bisect
import fractions
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aioice.ice
import av
import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av.video.reformatter import VideoReformatter

from server.jitter import apply_receive_rule

VIDEO_CLOCK = 90000


def pin_loopback_candidates() -> None:
    """Offer only 127.0.0.1 as ICE host candidate (aioice leaves loopback out by default)."""

    def loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    aioice.ice.get_host_addresses = loopback


def load_clip(path: str | Path, width: int, height: int, max_frames: int = 300) -> list[np.ndarray]:
    """Decode up to max_frames of a video file as RGB frames of the given size."""
    frames: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
            if len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return frames


def synthetic_clip(width: int, height: int, frames: int = 60) -> list[np.ndarray]:
    """A moving gradient with a bouncing square: camera-like motion without a file."""
    yy, xx = np.mgrid[0:height, 0:width]
    out = []
    for i in range(frames):
        img = np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, np.full_like(xx, (3 * i) % 256)], -1)
        x = int((width - width // 4) * (0.5 + 0.5 * np.sin(i / 10)))
        img[height // 3 : height // 3 + height // 4, x : x + width // 4] = 255
        out.append(img.astype(np.uint8))
    return out


#: How the load tester's camera stand-in produces VP8; every report names the one that ran.
SOURCE_ENCODINGS: dict[str, str] = {
    "pre-encoded": "the clip encoded to VP8 once and its packets replayed, as LiveKit's load tester publishes "
    "pre-encoded samples: the client spends next to no CPU",
    "live": "aiortc encodes every frame as it is sent, as a browser encodes its camera",
}
PRE_ENCODED_BITRATE = 500_000  # aiortc's own starting VP8 bitrate, so both sources send alike
PRE_ENCODED_KEYFRAME_EVERY = 30  # frames: a replayed stream can't answer a keyframe request, so it has one a second


class PacedClip(MediaStreamTrack):
    """A camera stand-in: plays a clip in a loop at `fps`, remembering when each pts was captured and sent."""

    kind = "video"

    def __init__(self, length: int, fps: float) -> None:
        super().__init__()
        self.length = length
        self.fps = fps
        self.captured_at: dict[int, float] = {}  # pts → time.monotonic() when the frame was produced
        self.sent_pts: list[int] = []  # in increasing order
        # pts → time.monotonic() when the sender came back for the next frame: this one was encoded and sent
        self.encoded_at: dict[int, float] = {}
        self._handed: int | None = None
        self.first_pts: int | None = None
        self._index = 0
        self._start: float | None = None

    def media(self, index: int, pts: int) -> av.VideoFrame | av.Packet:
        """Frame `index` of the clip, stamped with `pts` (1/90000 s)."""
        raise NotImplementedError

    async def recv(self) -> av.VideoFrame | av.Packet:  # type: ignore[override]  # aiortc sends packets as they are
        if self._handed is not None:
            self.encoded_at[self._handed] = time.monotonic()
            self._handed = None
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._index / self.fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        pts = round(self._index * VIDEO_CLOCK / self.fps)
        item = self.media(self._index % self.length, pts)
        self.captured_at[pts] = time.monotonic()
        self.sent_pts.append(pts)
        if self.first_pts is None:
            self.first_pts = pts
        self._index += 1
        self._handed = pts
        return item


def to_yuv420p(frames: list[np.ndarray]) -> list[np.ndarray]:
    """RGB frames in the VP8 encoder's yuv420p, converted once with one single-threaded scaler."""
    # An rgb24 frame would be converted on every send, each time through a new scaler with a thread per
    # core: CPU that this machine's server needs.
    to_yuv = VideoReformatter()
    return [
        to_yuv.reformat(av.VideoFrame.from_ndarray(f, format="rgb24"), format="yuv420p", threads=1).to_ndarray()
        for f in frames
    ]


class ClipTrack(PacedClip):
    """Raw frames, which aiortc's sender encodes live, one by one, as a browser encodes its camera."""

    def __init__(self, frames: list[np.ndarray], fps: float = 30.0) -> None:
        super().__init__(len(frames), fps)
        self.frames = frames
        self._yuv = to_yuv420p(frames)

    def media(self, index: int, pts: int) -> av.VideoFrame:
        frame = av.VideoFrame.from_ndarray(self._yuv[index], format="yuv420p")
        frame.pts, frame.time_base = pts, fractions.Fraction(1, VIDEO_CLOCK)
        return frame


def encode_vp8(frames: list[np.ndarray], fps: float, keyframe_every: int = PRE_ENCODED_KEYFRAME_EVERY) -> list[bytes]:
    """One VP8 frame per RGB frame, real-time CBR at aiortc's bitrate, a keyframe first and every `keyframe_every`."""
    height, width = frames[0].shape[:2]
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.bit_rate = PRE_ENCODED_BITRATE
    codec.time_base = fractions.Fraction(1, round(fps))
    codec.gop_size = keyframe_every
    rate = str(PRE_ENCODED_BITRATE)
    codec.options = {"deadline": "realtime", "cpu-used": "-6", "lag-in-frames": "0", "minrate": rate, "maxrate": rate}
    codec.thread_count = 1
    encoded: list[bytes] = []
    for i, yuv in enumerate(to_yuv420p(frames)):
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = i
        if i % keyframe_every == 0:  # the loop restarts on a keyframe, so a replay decodes seamlessly
            frame.pict_type = av.video.frame.PictureType.I
        encoded += [bytes(p) for p in codec.encode(frame)]
    encoded += [bytes(p) for p in codec.encode(None)]
    if len(encoded) != len(frames):
        raise RuntimeError(f"libvpx gave {len(encoded)} packets for {len(frames)} frames")
    return encoded


class EncodedClipTrack(PacedClip):
    """The clip's VP8 frames, encoded once up front and replayed: the sender only packetizes them."""

    def __init__(self, encoded: list[bytes], fps: float = 30.0) -> None:
        super().__init__(len(encoded), fps)
        self.encoded = encoded

    def media(self, index: int, pts: int) -> av.Packet:
        packet = av.Packet(self.encoded[index])
        packet.pts, packet.time_base = pts, fractions.Fraction(1, VIDEO_CLOCK)
        return packet


def clip_tracks(frames: list[np.ndarray], fps: float, encoding: str) -> Callable[[], PacedClip]:
    """A maker of camera stand-ins for a source encoding (a key of SOURCE_ENCODINGS); the clip is encoded once."""
    if encoding == "pre-encoded":
        encoded = encode_vp8(frames, fps)
        return lambda: EncodedClipTrack(encoded, fps)
    if encoding == "live":
        return lambda: ClipTrack(frames, fps)
    raise ValueError(f"the source encoding is one of {', '.join(SOURCE_ENCODINGS)}, not {encoding!r}")


@dataclass
class Received:
    at: float  # time.monotonic() on arrival
    pts: int  # as received (re-based by aiortc)


@dataclass
class EditSession:
    """One session: the peer connection, the REST handle, and every edited frame received."""

    base_url: str
    source: PacedClip
    http: httpx.AsyncClient
    keep_images: int = 1
    receive_rule: str = "marker"  # one of server.jitter.RECEIVE_RULES
    session_id: str = ""
    token: str = ""
    answer_sdp: str = ""  # the server's SDP answer, as it came
    edit: dict[str, Any] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    images: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (index in received, RGB)
    on_frame: Callable[[Received, av.VideoFrame], None] | None = None
    #: None: no STUN/TURN (loopback); a fleet's relay test passes its TURN server with a relay-only policy.
    rtc_configuration: RTCConfiguration | None = None
    pc: RTCPeerConnection | None = None
    _to_rgb: VideoReformatter = field(default_factory=VideoReformatter, repr=False)
    _reader: asyncio.Task[None] | None = None
    _first_sent_pts: int | None = None

    async def open(self, edit: dict[str, Any] | None = None) -> httpx.Response:
        """Offer (with every candidate gathered), POST it, apply the answer; the response is returned as is."""
        pc = RTCPeerConnection(self.rtc_configuration or RTCConfiguration(iceServers=[]))
        self.pc = pc
        pc.addTrack(self.source)
        apply_receive_rule(pc, self.receive_rule)
        got_track = asyncio.get_running_loop().create_future()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video" and not got_track.done():
                got_track.set_result(track)

        await pc.setLocalDescription(await pc.createOffer())
        body: dict[str, Any] = {"sdp": pc.localDescription.sdp, "type": "offer"}
        if edit is not None:
            body["edit"] = edit
        response = await self.http.post(f"{self.base_url}/v1/sessions", json=body)
        if response.status_code != 201:
            await pc.close()
            return response
        data = response.json()
        self.session_id, self.token, self.edit = data["session_id"], data["token"], data["edit"]
        self.answer_sdp = data["sdp"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=data["sdp"], type="answer"))
        track = await asyncio.wait_for(got_track, 10)
        self._reader = asyncio.create_task(self._read(track))
        return response

    async def _read(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            item = Received(time.monotonic(), int(frame.pts))
            self.received.append(item)
            if self.keep_images:
                rgb = self._to_rgb.reformat(frame, format="rgb24", threads=1).to_ndarray()
                self.images.append((len(self.received) - 1, rgb))
                del self.images[: -self.keep_images]
            if self.on_frame is not None:
                self.on_frame(item, frame)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def patch(self, **params: Any) -> httpx.Response:
        return await self.http.patch(f"{self.base_url}/v1/sessions/{self.session_id}", json=params, headers=self.auth)

    async def info(self) -> dict[str, Any]:
        response = await self.http.get(f"{self.base_url}/v1/sessions/{self.session_id}", headers=self.auth)
        response.raise_for_status()
        return response.json()

    async def calibrate(self) -> bool:
        """Fetch the server's first_sent_pts once frames flow; True when latencies can be computed."""
        if self._first_sent_pts is None and self.received:
            self._first_sent_pts = (await self.info())["stats"].get("first_sent_pts")
        return self._first_sent_pts is not None and self.source.first_pts is not None

    def source_pts(self, item: Received) -> int | None:
        """The pts this client sent for the camera frame that `item` was edited from.

        aiortc's timebase conversions on the way round can shift a pts by a few ticks of the 90 kHz clock,
        so the nearest sent pts within half a frame interval is taken.
        """
        if self._first_sent_pts is None or self.source.first_pts is None:
            return None
        estimate = item.pts + self._first_sent_pts + self.source.first_pts
        sent = self.source.sent_pts
        i = bisect.bisect_left(sent, estimate)
        nearest = min(sent[max(i - 1, 0) : i + 1], key=lambda p: abs(p - estimate), default=None)
        if nearest is None or abs(nearest - estimate) > VIDEO_CLOCK / self.source.fps / 2:
            return None
        return nearest

    def latencies(self, since: float = 0.0) -> list[float]:
        """Capture-to-receive seconds of the distinct frames received at or after `since`."""
        out, seen = [], set()
        for item in self.received:
            if item.at < since or item.pts in seen:
                continue
            seen.add(item.pts)
            pts = self.source_pts(item)
            captured = self.source.captured_at.get(pts) if pts is not None else None
            if captured is not None:
                out.append(item.at - captured)
        return out

    def distinct_frames(self, start: float, end: float) -> int:
        """Edited frames with a pts not seen before, received in [start, end)."""
        seen: set[int] = set()
        count = 0
        for item in self.received:
            if item.pts not in seen:
                seen.add(item.pts)
                count += start <= item.at < end
        return count

    async def close(self, delete: bool = True) -> httpx.Response | None:
        response = None
        if delete and self.session_id:
            response = await self.http.delete(f"{self.base_url}/v1/sessions/{self.session_id}", headers=self.auth)
        if self._reader is not None:
            self._reader.cancel()
        self.source.stop()
        if self.pc is not None:
            await self.pc.close()
        return response
