"""What the server asks of a camera: no more bitrate than it uses (a cap in the SDP answer), and no larger or
faster capture than the editor takes (a hint the page applies to its camera and sender).

A session's engine share is one frame a batch whatever it sends (engines.worker.OldestFirst over one-frame
slots), and frames the engine does not take are never converted; what a larger or faster camera still costs is
its decoding in the media worker. Asking the sender for less cuts that at the source: `b=AS`/`b=TIAS` in the
answer's video section is the most a WebRTC sender may send us (RFC 3556, RFC 3890; browsers honour it, and at a
low bitrate their encoders lower resolution and frame rate on their own), and the page opens its camera at the
editor's size and caps its sender's frame rate (RTCRtpSender.setParameters maxFramerate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CameraHint:
    """The capture a session needs: frames whose shorter side is `height`, at most `frame_rate` a second, and
    at most `max_kbps` of video."""

    height: int
    frame_rate: int
    max_kbps: int

    def as_json(self) -> dict[str, int]:
        return asdict(self)


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
