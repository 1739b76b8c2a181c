"""Prometheus metrics of the service, in a registry of its own (one per app, no globals).

With several media workers the supervisor sets PROMETHEUS_MULTIPROC_DIR: every worker's values go to files
there (prometheus_client's multiprocess mode), and a scrape of any worker adds up all of them. Per-session
series exist only with one media worker, since a series cannot be removed from those files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from engines.client import BatchReport, EngineHealth

LATENCY_BUCKETS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
STAGE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
ENGINE_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def shared_across_processes() -> bool:
    """True when this process's metrics are one media worker's share (multiprocess mode)."""
    return bool(os.environ.get(MULTIPROCESS_ENV))


class _FrameCounter:
    """A frame counter kept twice: streamedit_<name>_total and, with one media worker,
    streamedit_session_<name>_total{session}."""

    def __init__(self, name: str, doc: str, registry: CollectorRegistry, per_session: bool) -> None:
        self.total = Counter(f"streamedit_{name}", doc, registry=registry)
        self.per_session = Counter(f"streamedit_session_{name}", doc, ["session"], registry=registry)
        self.labelled = per_session

    def inc(self, session_id: str) -> None:
        self.total.inc()
        if self.labelled:
            self.per_session.labels(session_id).inc()


class ServiceMetrics:
    """Counters, gauges and histograms; safe to update from the engine thread and the event loop."""

    def __init__(self, per_session: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = shared_across_processes()
        # Session ids in labels would let anyone who can scrape find every session: opt-in, one worker only.
        self.per_session = per_session and not self.multiprocess
        r, each = self.registry, self.per_session
        self.pending_sessions = Gauge(
            "streamedit_pending_sessions",
            "Answered offers whose peer has not connected yet (they hold no engine slot).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.active_sessions = Gauge(
            "streamedit_active_sessions", "Open sessions.", registry=r, multiprocess_mode="livesum"
        )
        self.rejected = Counter(
            "streamedit_sessions_rejected", "Sessions refused because the server was full.", registry=r
        )
        # Each frame counter exists as a total and per session: the per-session series go when the
        # session does, the totals keep counting (a scrape after a load test still sees every frame).
        self.frames_in = _FrameCounter("frames_in", "Camera frames received.", r, each)
        self.edited = _FrameCounter("frames_edited", "Frames edited and queued for sending.", r, each)
        self.dropped = _FrameCounter("frames_dropped", "Camera frames superseded before editing.", r, each)
        self.skipped = _FrameCounter("frames_skipped", "Frames answered by the similarity skip.", r, each)
        self.failed = _FrameCounter("frames_failed", "Frames the engine raised on (sent unedited).", r, each)
        self.unedited = _FrameCounter(
            "frames_unedited", "Camera frames sent back unedited while the engine was down.", r, each
        )
        self.engine_up = Gauge(
            "streamedit_engine_up",
            "1 while the engine is loaded, warm and connected (the lowest over media workers).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.engine_restarts = Gauge(
            "streamedit_engine_restarts",
            "Engine processes started after the first one the media workers saw.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.patches = Counter(
            "streamedit_patches",
            "PATCHes of a session answered 200, by outcome: applied, or superseded by a newer one (latest wins).",
            ["outcome"],
            registry=r,
        )
        self.patches_limited = Counter(
            "streamedit_patches_limited",
            "PATCHes turned away: over a session's or a client's rate (429), or the prompt encoder full (503).",
            ["limit"],
            registry=r,
        )
        self.cameras_over_budget = Counter(
            "streamedit_cameras_over_budget",
            "Times a session's camera sent more pixels a second than its hint allows, for seconds on end, and had "
            "its decoding lowered in priority (server/camera.py).",
            registry=r,
        )
        self.engine_losses = Counter(
            "streamedit_engine_losses", "Times this media worker lost its engine (process exit or silence).", registry=r
        )
        self.session_fps = Gauge("streamedit_session_edited_fps", "Edited frames per second.", ["session"], registry=r)
        self.total_fps = Gauge(
            "streamedit_edited_fps", "Edited frames per second, all sessions.", registry=r, multiprocess_mode="livesum"
        )
        self.latency = Histogram(
            "streamedit_capture_to_send_seconds",
            "Camera frame arrival to edited frame send.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "streamedit_frame_stage_seconds",
            "Each edited frame's time in a stage of the media worker: queue (decoded by aiortc to taken by the "
            "engine), engine (taken to edited frame back), pacing (back to taken by the sender), encode (taken by "
            "the sender to its next ask: VP8 encoding and sending).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "streamedit_batch_size", "Frames per engine call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.engine_seconds = Histogram(
            "streamedit_engine_batch_seconds",
            "Engine time per batched call, by the number of frames in it.",
            ["batch_size"],
            buckets=ENGINE_BUCKETS,
            registry=r,
        )
        self._labelled = (
            self.frames_in.per_session,
            self.edited.per_session,
            self.dropped.per_session,
            self.skipped.per_session,
            self.failed.per_session,
            self.unedited.per_session,
            self.session_fps,
        )

    def observe_batch(self, report: BatchReport) -> None:
        if report.size:
            self.batch_size.observe(report.size)
            self.engine_seconds.labels(str(report.size)).observe(report.seconds)

    def forget_session(self, session_id: str) -> None:
        for metric in self._labelled:
            try:
                metric.remove(session_id)
            except KeyError:
                pass

    def refresh(self, fps_by_session: Iterable[tuple[str, float]], health: EngineHealth) -> None:
        """Bring the gauges up to date (on every scrape, and each second: other workers' scrapes read them)."""
        total = 0.0
        for session_id, fps in fps_by_session:
            if self.per_session:
                self.session_fps.labels(session_id).set(fps)
            total += fps
        self.total_fps.set(total)
        self.engine_up.set(1 if health.ready else 0)
        self.engine_restarts.set(health.restarts)

    def render(self) -> bytes:
        """The exposition text: this worker's, or with several media workers all of theirs added up."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
