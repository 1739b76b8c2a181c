"""Prometheus metrics of the service, in a registry of its own (one per app, no globals)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engines.client import BatchReport, EngineHealth

LATENCY_BUCKETS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
ENGINE_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


class _FrameCounter:
    """A frame counter kept twice: streamedit_<name>_total and streamedit_session_<name>_total{session}."""

    def __init__(self, name: str, doc: str, registry: CollectorRegistry) -> None:
        self.total = Counter(f"streamedit_{name}", doc, registry=registry)
        self.per_session = Counter(f"streamedit_session_{name}", doc, ["session"], registry=registry)

    def inc(self, session_id: str) -> None:
        self.total.inc()
        self.per_session.labels(session_id).inc()


class ServiceMetrics:
    """Counters, gauges and histograms; safe to update from the engine thread and the event loop."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_sessions = Gauge("streamedit_active_sessions", "Open sessions.", registry=r)
        self.rejected = Counter(
            "streamedit_sessions_rejected", "Sessions refused because the server was full.", registry=r
        )
        # Each frame counter exists as a total and per session: the per-session series go when the
        # session does, the totals keep counting (a scrape after a load test still sees every frame).
        self.frames_in = _FrameCounter("frames_in", "Camera frames received.", r)
        self.edited = _FrameCounter("frames_edited", "Frames edited and queued for sending.", r)
        self.dropped = _FrameCounter("frames_dropped", "Camera frames superseded before editing.", r)
        self.skipped = _FrameCounter("frames_skipped", "Frames answered by the similarity skip.", r)
        self.failed = _FrameCounter("frames_failed", "Frames the engine raised on (sent unedited).", r)
        self.unedited = _FrameCounter(
            "frames_unedited", "Camera frames sent back unedited while the engine was down.", r
        )
        self.engine_up = Gauge("streamedit_engine_up", "1 while the engine is loaded, warm and connected.", registry=r)
        self.engine_restarts = Gauge(
            "streamedit_engine_restarts", "Engine processes started after the first one this worker saw.", registry=r
        )
        self.engine_losses = Counter(
            "streamedit_engine_losses", "Times this media worker lost its engine (process exit or silence).", registry=r
        )
        self.session_fps = Gauge("streamedit_session_edited_fps", "Edited frames per second.", ["session"], registry=r)
        self.total_fps = Gauge("streamedit_edited_fps", "Edited frames per second, all sessions.", registry=r)
        self.latency = Histogram(
            "streamedit_capture_to_send_seconds",
            "Camera frame arrival to edited frame send.",
            buckets=LATENCY_BUCKETS,
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

    def observe_engine(self, health: EngineHealth) -> None:
        self.engine_up.set(1 if health.ready else 0)
        self.engine_restarts.set(health.restarts)

    def forget_session(self, session_id: str) -> None:
        for metric in self._labelled:
            try:
                metric.remove(session_id)
            except KeyError:
                pass

    def render(self, fps_by_session: Iterable[tuple[str, float]]) -> bytes:
        """The exposition text, with the FPS gauges brought up to date first."""
        total = 0.0
        for session_id, fps in fps_by_session:
            self.session_fps.labels(session_id).set(fps)
            total += fps
        self.total_fps.set(total)
        return generate_latest(self.registry)
