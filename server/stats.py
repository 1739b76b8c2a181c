"""SessionStats: one session's frame counters, edited-FPS window and capture-to-send latency percentiles."""

from __future__ import annotations

import time
from collections import deque

import numpy as np

FPS_WINDOW_S = 2.0
LATENCY_SAMPLES = 300
#: an edited frame's stages in the media worker, in order (see server/media.py's FrameClock)
STAGES = ("queue", "engine", "pacing", "encode")


class SessionStats:
    """Counters updated on the event loop as frames arrive, are edited and are sent."""

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_edited = 0
        self.dropped = 0  # camera frames replaced by a newer one before the engine took them
        self.skipped = 0  # frames the similarity filter answered with the previous output
        self.errors = 0  # frames the engine raised on (sent unedited)
        self.unedited = 0  # frames sent back unedited because the engine was down (restarting)
        self.refused = 0  # camera frames of an absurd size or shape, never converted
        self.last_batch_size = 0
        self.camera_over_budget = False  # sending more pixels a second than asked: decoded at low priority
        # pts of the first frame sent back, in the receiver's timeline (pts counted from the first camera
        # frame received): with it a client can tell which of its frames each edited frame came from,
        # since aiortc re-bases RTP timestamps at every hop.
        self.first_sent_pts: int | None = None
        self._edited_at: deque[float] = deque()
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._stages: dict[str, deque[float]] = {s: deque(maxlen=LATENCY_SAMPLES) for s in STAGES}

    def frame_received(self, replaced_pending: bool) -> None:
        self.frames_in += 1
        if replaced_pending:
            self.dropped += 1

    def frame_done(self, batch_size: int, skipped: bool, failed: bool, unedited: bool = False) -> None:
        if unedited:
            self.unedited += 1
            return
        self.last_batch_size = batch_size
        if failed:
            self.errors += 1
            return
        self.frames_edited += 1
        self.skipped += int(skipped)
        now = time.monotonic()
        self._edited_at.append(now)
        self._trim(now)

    def frame_sent(self, latency_s: float, pts: int) -> None:
        self._latencies.append(latency_s)
        if self.first_sent_pts is None:
            self.first_sent_pts = pts

    def stage_done(self, stage: str, seconds: float) -> None:
        self._stages[stage].append(seconds)

    def stages_ms(self) -> dict[str, dict[str, float | None]]:
        """p50 and p95 (ms) of each stage over the recent frames."""
        out: dict[str, dict[str, float | None]] = {}
        for stage, samples in self._stages.items():
            values = np.fromiter(samples, float) * 1000.0 if samples else None
            out[stage] = {
                f"p{q}": None if values is None else round(float(np.percentile(values, q)), 2) for q in (50, 95)
            }
        return out

    def _trim(self, now: float) -> None:
        while self._edited_at and self._edited_at[0] < now - FPS_WINDOW_S:
            self._edited_at.popleft()

    def edited_fps(self) -> float:
        """Edited frames per second over the last FPS_WINDOW_S seconds."""
        self._trim(time.monotonic())
        return len(self._edited_at) / FPS_WINDOW_S

    def latency_ms(self, q: float) -> float | None:
        """A percentile (0–100) of the recent capture-to-send latencies, in milliseconds."""
        if not self._latencies:
            return None
        return float(np.percentile(np.fromiter(self._latencies, float), q) * 1000.0)

    def snapshot(self) -> dict[str, object]:
        return {
            "frames_in": self.frames_in,
            "frames_edited": self.frames_edited,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "errors": self.errors,
            "unedited": self.unedited,
            "refused": self.refused,
            "camera_over_budget": self.camera_over_budget,
            "edited_fps": round(self.edited_fps(), 2),
            "latency_ms_p50": self.latency_ms(50),
            "latency_ms_p95": self.latency_ms(95),
            "last_batch_size": self.last_batch_size,
            "first_sent_pts": self.first_sent_pts,
            "stages_ms": self.stages_ms(),
        }
