"""The marker-bit jitter buffer: frames complete at their last packet, in order, through loss and reordering."""

from __future__ import annotations

import asyncio

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtp import RtpPacket

from loadtest.client import ClipTrack, pin_loopback_candidates, synthetic_clip
from server.jitter import RECEIVER_BUFFER, MarkerJitterBuffer, complete_frames_at_marker


def packet(seq: int, timestamp: int, data: bytes, marker: bool) -> RtpPacket:
    p = RtpPacket(payload_type=96, marker=int(marker), sequence_number=seq, timestamp=timestamp)
    p._data = data  # type: ignore[attr-defined] - what aiortc's depayloader leaves for the buffer
    return p


def frames_of(n: int, per_frame: int, first_seq: int = 1000) -> list[RtpPacket]:
    """n frames of `per_frame` packets each; frame k's packets hold bytes b'k.i'."""
    out = []
    for k in range(n):
        for i in range(per_frame):
            seq = (first_seq + k * per_frame + i) % 65536
            out.append(packet(seq, 3000 * k, f"{k}.{i};".encode(), marker=i == per_frame - 1))
    return out


def feed(buffer: JitterBuffer, packets: list[RtpPacket]) -> list[tuple[int, bytes]]:
    """(index of the packet whose arrival completed a frame, the frame's data) for each frame returned."""
    done = []
    for index, p in enumerate(packets):
        _, frame = buffer.add(p)
        if frame is not None:
            done.append((index, frame.data))
    return done


def test_a_frame_completes_at_its_marker_not_at_the_next_frame() -> None:
    packets = frames_of(3, per_frame=2)
    ours = feed(MarkerJitterBuffer(), packets)
    assert ours == [(1, b"0.0;0.1;"), (3, b"1.0;1.1;"), (5, b"2.0;2.1;")]
    stock = feed(JitterBuffer(capacity=512, is_video=True), packets)
    assert stock == [(2, b"0.0;0.1;"), (4, b"1.0;1.1;")], "aiortc's own rule waits for the next frame's first packet"


def test_packets_swapped_within_and_across_frames_still_give_whole_frames_in_order() -> None:
    p = frames_of(3, per_frame=3)
    order = [p[0], p[2], p[1], p[4], p[3], p[6], p[5], p[8], p[7]]  # every frame's packets swapped
    assert feed(MarkerJitterBuffer(), order) == [(2, b"0.0;0.1;0.2;"), (6, b"1.0;1.1;1.2;"), (8, b"2.0;2.1;2.2;")]


def test_a_lost_packet_holds_later_frames_until_its_retransmission() -> None:
    p = frames_of(3, per_frame=2)
    lost, rest = p[2], p[:2] + p[3:]  # frame 1 loses its first packet
    buffer = MarkerJitterBuffer()
    assert feed(buffer, rest) == [(1, b"0.0;0.1;")], "nothing behind the gap is handed on, no broken frame either"
    _, frame = buffer.add(lost)  # the NACKed packet arrives
    assert frame is not None and frame.data == b"1.0;1.1;"
    _, frame = buffer.add(packet(p[-1].sequence_number + 1, 9000, b"3.0;", marker=False))
    assert frame is not None and frame.data == b"2.0;2.1;", "the frame completed meanwhile follows"


def test_a_sender_that_sets_no_marker_gets_the_old_rule() -> None:
    packets = frames_of(3, per_frame=2)
    for p in packets:
        p.marker = 0
    assert feed(MarkerJitterBuffer(), packets) == [(2, b"0.0;0.1;"), (4, b"1.0;1.1;")]


def test_sequence_numbers_that_wrap_around() -> None:
    packets = frames_of(3, per_frame=2, first_seq=65533)
    assert [data for _, data in feed(MarkerJitterBuffer(), packets)] == [b"0.0;0.1;", b"1.0;1.1;", b"2.0;2.1;"]


async def test_installed_on_real_peers_frames_decode_and_arrive() -> None:
    pin_loopback_candidates()
    sender = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    receiver = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    sender.addTrack(ClipTrack(synthetic_clip(128, 96, 30)))
    got: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    receiver.on("track", lambda track: got.set_result(track))
    try:
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        assert complete_frames_at_marker(receiver) == 1
        assert isinstance(getattr(receiver.getTransceivers()[0].receiver, RECEIVER_BUFFER), MarkerJitterBuffer)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(RTCSessionDescription(receiver.localDescription.sdp, "answer"))
        track = await asyncio.wait_for(got, 10)
        frames = [await asyncio.wait_for(track.recv(), 10) for _ in range(10)]
        image = frames[-1].to_ndarray(format="rgb24")
        assert image.shape == (96, 128, 3) and float(np.std(image)) > 10, "decoded pictures, not blank frames"
    finally:
        await sender.close()
        await receiver.close()
