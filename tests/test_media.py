"""Frame fitting and per-session stats: the small pieces of the frame path, checked on exact pixels."""

from __future__ import annotations

import av
import numpy as np

from server.media import fit_frame
from server.stats import SessionStats


def test_fit_frame_keeps_aspect_and_centre_crops() -> None:
    # A 400x200 frame: left quarter red, middle half green, right quarter blue.
    img = np.zeros((200, 400, 3), np.uint8)
    img[:, :100, 0] = 255
    img[:, 100:300, 1] = 255
    img[:, 300:, 2] = 255
    out = fit_frame(av.VideoFrame.from_ndarray(img, format="rgb24"), 100)
    assert out.shape == (100, 100, 3)
    # Scaled to 200x100, the centre 100 columns are exactly the green half: nothing squashed in.
    assert out[:, 5:95, 1].min() > 200 and out[:, 5:95, 0].max() < 40 and out[:, 5:95, 2].max() < 40


def test_fit_frame_accepts_any_camera_size() -> None:
    for w, h in [(640, 480), (480, 640), (161, 121), (256, 256), (1280, 720)]:
        frame = av.VideoFrame.from_ndarray(np.zeros((h, w, 3), np.uint8), format="rgb24").reformat(format="yuv420p")
        assert fit_frame(frame, 256).shape == (256, 256, 3)


def test_stats_count_drops_failures_and_percentiles() -> None:
    stats = SessionStats()
    stats.frame_received(replaced_pending=False)
    stats.frame_received(replaced_pending=True)
    stats.frame_done(batch_size=3, skipped=True, failed=False)
    stats.frame_done(batch_size=2, skipped=False, failed=True)
    for ms, pts in [(10, 100), (20, 200), (30, 300), (40, 400)]:
        stats.frame_sent(ms / 1000, pts)
    snap = stats.snapshot()
    counts = [snap[k] for k in ("frames_in", "dropped", "frames_edited", "skipped", "errors")]
    assert counts == [2, 1, 1, 1, 1]
    assert snap["last_batch_size"] == 2 and snap["first_sent_pts"] == 100
    assert snap["latency_ms_p50"] == 25.0 and 38 < snap["latency_ms_p95"] <= 40
    assert snap["edited_fps"] == 0.5  # one edited frame in the 2 s window
