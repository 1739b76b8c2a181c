"""What the server asks of a camera: no more bitrate than it uses (a cap in the SDP answer), and no larger or
faster capture than the editor takes (a hint the page applies to its camera and sender).

A session's engine share is one frame a batch whatever it sends (engines.worker.OldestFirst over one-frame
slots), and frames the engine does not take are never converted; what a larger or faster camera still costs is
its decoding in the media worker. Asking the sender for less cuts that at the source: `b=AS`/`b=TIAS` in the
answer's video section is the most a WebRTC sender may send us (RFC 3556, RFC 3890; browsers honour it, and at a
low bitrate their encoders lower resolution and frame rate on their own), and the page opens its camera at the
editor's size and caps its sender's frame rate (RTCRtpSender.setParameters maxFramerate).

A sender may ignore all that (a replayed file, a hostile client). Its frames must still be decoded (each refers to
the one before), so what the server can cut is whose CPU pays: a camera that sends more pixels a second than its
hint allows, for seconds on end, has its decoder thread lowered to nice +10 until it comes back within budget.
Its decoding then runs on what the engine and the other sessions leave over: its excess costs its own frames.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CameraHint:
    """The capture a session needs: frames whose shorter side is `height`, at most `frame_rate` a second, and
    at most `max_kbps` of video."""

    height: int
    frame_rate: int
    max_kbps: int

    def as_json(self) -> dict[str, int]:
        return asdict(self)


def camera_hint(settings: Settings, resolution: int) -> CameraHint:
    """The one hint a server gives every camera: the editor's `resolution`, the settings' frame rate and bitrate."""
    return CameraHint(resolution, settings.camera_max_fps, settings.camera_max_kbps)


def cap_video_bitrate(sdp: str, kbps: int) -> str:
    """`sdp` with `b=AS` (kbps) and `b=TIAS` (bps) in every video section, after its connection line (where RFC
    4566 orders them), replacing any bandwidth lines it had."""
    lines = sdp.split("\r\n") if "\r\n" in sdp else sdp.split("\n")
    sep = "\r\n" if "\r\n" in sdp else "\n"
    out: list[str] = []
    in_video = False
    for line in lines:
        if line.startswith("m="):
            in_video = line.startswith("m=video")
        elif in_video and line.startswith("b="):
            continue  # ours replace it
        out.append(line)
        if in_video and line.startswith("c="):
            out += [f"b=AS:{kbps}", f"b=TIAS:{kbps * 1000}"]
    return sep.join(out)


class CameraBudget:
    """Whether a camera's decoded pixels a second stay within its hint, judged over a sliding window.

    The budget is `tolerance` x the hint's rate at its height in a 16:9 frame (the widest a camera is likely to
    be). Over it for `over_s` seconds on end makes the camera over budget; back within it for `under_s`, not."""

    def __init__(
        self, hint: CameraHint, tolerance: float = 1.5, window_s: float = 1.0, over_s: float = 2.0, under_s: float = 5.0
    ) -> None:
        self.pixels_per_s = tolerance * hint.height * (hint.height * 16 / 9) * hint.frame_rate
        self.window_s, self.over_s, self.under_s = window_s, over_s, under_s
        self.over = False
        self._frames: deque[tuple[float, int]] = deque()
        self._in_window = 0
        self._since: float | None = None  # when the rate last crossed to the other side of the budget

    def add(self, at: float, width: int, height: int) -> bool | None:
        """Count a decoded frame at `at`; True or False when the camera has just gone over or back within its
        budget, else None."""
        self._frames.append((at, width * height))
        self._in_window += width * height
        while self._frames and self._frames[0][0] <= at - self.window_s:
            self._in_window -= self._frames.popleft()[1]
        if at - self._frames[0][0] < self.window_s / 2:
            return None  # too few frames yet to call it a rate
        above = self._in_window / self.window_s > self.pixels_per_s
        if above == self.over:
            self._since = None
            return None
        if self._since is None:
            self._since = at
        if at - self._since >= (self.over_s if above else self.under_s):
            self.over, self._since = above, None
            return above
        return None


class DecodePriority:
    """Lowers or restores the priority of the thread that decodes one receiver's video (Linux: nice per thread).

    aiortc keeps that thread private (RTCRtpReceiver.__decoder_thread, aiortc 1.9 to 1.16): where it is not found
    the lever does nothing and says so once, and the session streams as before."""

    #: the nice value of an over-budget camera's decoder: what the frames of everyone else leave over
    LOW = 10

    def __init__(self, receiver: object) -> None:
        self._receiver = receiver

    def _thread_id(self) -> int | None:
        thread = getattr(self._receiver, "_RTCRtpReceiver__decoder_thread", None)
        return thread.native_id if isinstance(thread, threading.Thread) and thread.is_alive() else None

    def lower(self, low: bool) -> bool:
        """Set the decoder thread to nice LOW (`low`) or back to 0; False where there is no such thread here."""
        tid = self._thread_id()
        if tid is None:
            log.warning("no decoder thread found on this aiortc receiver: the camera budget cannot be enforced")
            return False
        try:
            # Raising a nice value needs no privilege; lowering it back to 0 needs CAP_SYS_NICE or RLIMIT_NICE, so
            # a server without them keeps the camera low until its session ends (the safe side).
            os.setpriority(os.PRIO_PROCESS, tid, self.LOW if low else 0)
        except (OSError, AttributeError) as exc:
            log.info("decoder thread %d: could not set its priority: %r", tid, exc)
            return False
        return True
