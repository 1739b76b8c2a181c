"""A video jitter buffer that completes each frame at its RTP marker bit, as browsers do, for aiortc's receivers.

aiortc 1.16's JitterBuffer hands a frame to the decoder only when the first packet of the *next* frame arrives
(`_remove_frame` looks for a change of timestamp and ignores the marker bit), so every aiortc receive hop waits
one frame interval: 33 ms at 30 FPS on the camera's way in. RFC 7741 (VP8) and RFC 3550 set the marker bit on
a frame's last packet; this buffer returns a frame as soon as every packet from its first to its marked last
one is in. A sender that sets no marker still gets the old rule (the next frame's first packet ends a frame).
Loss and reordering behave as in aiortc: a gap holds the frames behind it until the missing packet arrives
(NACK retransmission) or aiortc's own capacity and misorder rules drop it and ask for a keyframe.

One difference remains: add() returns one frame per packet, so when a retransmission completes several frames
at once, the later ones follow with the next packets (each frame of more than one packet drains one). Upstream,
add() would return every complete frame; until then this is a subclass installed per receiver.
"""

from __future__ import annotations

from typing import Literal, get_args

from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket

#: aiortc's private name of a receiver's jitter buffer (RTCRtpReceiver.__jitter_buffer, name-mangled)
RECEIVER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
#: as aiortc sizes a video receiver's buffer
VIDEO_CAPACITY = 512

#: when a received video frame is complete, as the server's and the load tester's --receive-rule name it
ReceiveRule = Literal["marker", "aiortc"]
RECEIVE_RULES: tuple[str, ...] = get_args(ReceiveRule)
RECEIVE_RULE_MEANINGS = {
    "marker": "each frame completes at its RTP marker bit, as a browser receives",
    "aiortc": "aiortc's own rule: a frame completes at the next frame's first packet, one frame interval late",
}


class MarkerJitterBuffer(JitterBuffer):
    """aiortc's video JitterBuffer, but a frame is complete at its marker bit, not at the next frame's start."""

    def __init__(self, capacity: int = VIDEO_CAPACITY) -> None:
        super().__init__(capacity=capacity, is_video=True)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        assert self._origin is not None  # add() sets it before it calls this
        packets: list[RtpPacket] = []
        timestamp: int | None = None
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None:
                return None  # a gap before the frame's end: wait for the missing packet
            if timestamp is None:
                timestamp = packet.timestamp
            elif packet.timestamp != timestamp:
                return self._take(packets, timestamp, count)  # no marker was set: the next frame ends this one
            packets.append(packet)
            if packet.marker:
                return self._take(packets, timestamp, count + 1)
        return None

    def _take(self, packets: list[RtpPacket], timestamp: int, count: int) -> JitterFrame:
        frame = JitterFrame(data=b"".join(p._data for p in packets), timestamp=timestamp)  # type: ignore[attr-defined]
        self.remove(count)
        return frame


def complete_frames_at_marker(pc: RTCPeerConnection) -> int:
    """Give each video receiver of `pc` a MarkerJitterBuffer; call it before media flows (after the offer or
    answer that made the transceivers). Returns how many it replaced."""
    replaced = 0
    for transceiver in pc.getTransceivers():
        if transceiver.kind != "video":
            continue
        receiver = transceiver.receiver
        if not isinstance(getattr(receiver, RECEIVER_BUFFER, None), JitterBuffer):
            raise RuntimeError(f"this aiortc's RTCRtpReceiver has no {RECEIVER_BUFFER}: update server/jitter.py")
        setattr(receiver, RECEIVER_BUFFER, MarkerJitterBuffer())
        replaced += 1
    return replaced


def apply_receive_rule(pc: RTCPeerConnection, rule: str) -> None:
    """Make `pc`'s video receivers complete frames by `rule` (one of RECEIVE_RULES; ValueError otherwise)."""
    if rule not in RECEIVE_RULES:
        raise ValueError(f"the receive rule is one of {', '.join(RECEIVE_RULES)}, not {rule!r}")
    if rule == "marker":
        complete_frames_at_marker(pc)
