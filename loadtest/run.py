"""One load-test step: N sessions against a running server, measured per session, with a metrics scrape around it."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtest.client import (
    SOURCE_ENCODINGS,
    EditSession,
    PacedClip,
    clip_tracks,
    load_clip,
    pin_loopback_candidates,
    synthetic_clip,
)
from loadtest.scrape import SERVER_STAGES, scrape_metrics, server_delta
from server.jitter import RECEIVE_RULES

LOOPBACK_PREFIXES = ("http://127.", "http://localhost", "http://[::1]")


@dataclass
class LoadConfig:
    """What one step runs; every session is bounded by `duration_s` and stops by itself."""

    url: str = "http://127.0.0.1:8000"
    sessions: int = 1
    duration_s: float = 30.0
    warmup_s: float = 5.0  # excluded from the sustained figures (connection setup, first keyframes)
    ramp_per_s: float = 2.0  # sessions opened per second
    fps: float = 30.0
    width: int = 256
    height: int = 256
    source: str = "synthetic"  # a video file PyAV reads, or "synthetic"
    prompts: list[str] = field(default_factory=lambda: ["make it a pencil sketch"])
    guidance: list[tuple[float, float]] = field(default_factory=list)  # (s_T, s_I) pairs to cycle, if any
    patch_every_s: float = 0.0  # > 0: cycle through `prompts` (and `guidance`) by PATCH this often
    processes: int = 1
    connect_timeout_s: float = 20.0
    receive_rule: str = "marker"  # when a received frame is complete: one of server.jitter.RECEIVE_RULES
    source_encoding: str = "pre-encoded"  # how the clip becomes VP8: one of loadtest.client.SOURCE_ENCODINGS

    def check(self) -> None:
        if not self.url.startswith(LOOPBACK_PREFIXES):
            raise ValueError(f"load tests only target loopback addresses, not {self.url}")
        if self.receive_rule not in RECEIVE_RULES:
            raise ValueError(f"the receive rule is one of {', '.join(RECEIVE_RULES)}, not {self.receive_rule!r}")
        if self.source_encoding not in SOURCE_ENCODINGS:
            raise ValueError(
                f"the source encoding is one of {', '.join(SOURCE_ENCODINGS)}, not {self.source_encoding!r}"
            )
        if self.sessions < 1 or self.duration_s <= self.warmup_s:
            raise ValueError("need at least one session and a duration longer than the warm-up")


@dataclass
class SessionResult:
    index: int
    connected: bool
    error: str | None = None
    time_to_first_frame_s: float | None = None
    distinct_fps: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    freezes: int = 0
    fps_timeline: list[float] = field(default_factory=list)  # distinct frames in each 1 s after the start
    patch_to_visible_s: list[float] = field(default_factory=list)
    encode_ms: list[float] = field(default_factory=list)  # this client's capture to encoded and sent, per frame
    server_stages_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)  # the session's, at the end
    replica: str | None = None  # the fleet replica that answered the POST (X-StreamEdit-Replica), if any
    kbps_received: float | None = None  # edited video from the server (over the media transport), measured window
    kbps_sent: float | None = None  # camera video to the server, same window

    def summary(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ms) if self.latencies_ms else None
        return {
            "index": self.index,
            "connected": self.connected,
            "error": self.error,
            "time_to_first_frame_s": self.time_to_first_frame_s,
            "distinct_fps": round(self.distinct_fps, 2),
            "latency_ms_p50": None if lat is None else round(float(np.percentile(lat, 50)), 1),
            "latency_ms_p95": None if lat is None else round(float(np.percentile(lat, 95)), 1),
            "latency_ms_max": None if lat is None else round(float(lat.max()), 1),
            "freezes": self.freezes,
            "patch_to_visible_s": [round(x, 3) for x in self.patch_to_visible_s],
            "replica": self.replica,
            "kbps_received": None if self.kbps_received is None else round(self.kbps_received, 1),
            "kbps_sent": None if self.kbps_sent is None else round(self.kbps_sent, 1),
        }


def source_frames(config: LoadConfig) -> list[np.ndarray]:
    if config.source == "synthetic":
        return synthetic_clip(config.width, config.height)
    return load_clip(config.source, config.width, config.height)


async def run_session(
    index: int, config: LoadConfig, tracks: Callable[[], PacedClip], http: httpx.AsyncClient, start_at: float
) -> SessionResult:
    """Open one session at its ramp slot, stream until the step ends, then measure and DELETE it."""
    await asyncio.sleep(max(0.0, start_at + index / config.ramp_per_s - time.monotonic()))
    session = EditSession(config.url, tracks(), http, keep_images=0, receive_rule=config.receive_rule)
    opened = time.monotonic()
    end = start_at + config.duration_s
    result = SessionResult(index, connected=False)
    try:
        first: dict[str, Any] = {"prompt": config.prompts[0]}
        if config.guidance:
            first.update(text_guidance=config.guidance[0][0], image_guidance=config.guidance[0][1])
        response = await session.open(first)
        result.replica = response.headers.get("X-StreamEdit-Replica")
        if response.status_code != 201:
            result.error = f"HTTP {response.status_code}: {response.text[:200]}"
            return result
        while not session.received and time.monotonic() < opened + config.connect_timeout_s:
            await asyncio.sleep(0.02)
        if not session.received:
            result.error = "no edited frame within the connect timeout"
            return result
        result.connected = True
        result.time_to_first_frame_s = session.received[0].at - opened
        patches: list[float] = []
        next_patch = time.monotonic() + config.patch_every_s if config.patch_every_s > 0 else float("inf")
        k = 0
        counted_from: tuple[float, int, int] | None = None
        while (now := time.monotonic()) < end:
            if counted_from is None and now >= start_at + config.warmup_s:
                counted_from = (now, *await rtp_bytes(session))
            if now >= next_patch:
                k += 1
                change: dict[str, Any] = {"prompt": config.prompts[k % len(config.prompts)]}
                if config.guidance:
                    s_t, s_i = config.guidance[k % len(config.guidance)]
                    change.update(text_guidance=s_t, image_guidance=s_i)
                response = await session.patch(**change)
                if response.status_code != 200:
                    raise RuntimeError(f"PATCH {change} answered {response.status_code}: {response.text[:200]}")
                patches.append(time.monotonic())  # frames captured after this are edited with the new prompt
                next_patch += config.patch_every_s
            await asyncio.sleep(min(0.1, max(0.0, end - now)))
        if counted_from is not None:
            received, sent = await rtp_bytes(session)
            seconds = time.monotonic() - counted_from[0]
            result.kbps_received = (received - counted_from[1]) * 8 / 1000 / seconds
            result.kbps_sent = (sent - counted_from[2]) * 8 / 1000 / seconds
        await session.calibrate()
        measure_from = max(start_at + config.warmup_s, session.received[0].at)
        window = end - measure_from
        result.distinct_fps = session.distinct_frames(measure_from, end) / window if window > 0 else 0.0
        result.latencies_ms = [x * 1000 for x in session.latencies(since=measure_from)]
        source = session.source
        result.encode_ms = [
            (source.encoded_at[pts] - at) * 1000
            for pts, at in source.captured_at.items()
            if at >= measure_from and pts in source.encoded_at
        ]
        result.server_stages_ms = (await session.info())["stats"].get("stages_ms", {})
        arrivals = sorted({r.pts: r.at for r in session.received if r.at >= measure_from}.values())
        gaps = np.diff(arrivals) if len(arrivals) > 1 else np.array([])
        result.freezes = int(np.sum(gaps > 2.0 / config.fps))
        first = session.received[0].at
        seconds = int(end - first)  # whole seconds only: a partial last bin would read as a drop
        seen: set[int] = set()
        timeline = [0] * max(seconds, 0)
        for r in session.received:
            if r.pts not in seen and r.at < first + seconds:
                seen.add(r.pts)
                timeline[int(r.at - first)] += 1
        result.fps_timeline = [float(x) for x in timeline]
        result.patch_to_visible_s = patch_delays(session, patches)
    except Exception as exc:  # a failing session is a result, not a crash of the run
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            await session.close()
        except Exception:  # noqa: S110 - the server may already be gone
            pass
    return result


async def rtp_bytes(session: EditSession) -> tuple[int, int]:
    """Bytes received and sent so far over the session's media transport: its one video each way, with their
    SRTP and RTCP overhead (aiortc's inbound RTP stats carry no byte count; its transport stats do)."""
    assert session.pc is not None
    stats = [s for s in (await session.pc.getStats()).values() if s.type == "transport"]
    return sum(s.bytesReceived for s in stats), sum(s.bytesSent for s in stats)


def patch_delays(session: EditSession, patched_at: list[float]) -> list[float]:
    """For each PATCH: seconds until the first received frame captured after it was applied."""
    delays = []
    for t in patched_at:
        for item in session.received:
            pts = session.source_pts(item)
            captured = session.source.captured_at.get(pts) if pts is not None else None
            if captured is not None and captured >= t:
                delays.append(item.at - t)
                break
    return delays


async def run_sessions(config: LoadConfig, indices: list[int], start_at_wall: float) -> list[SessionResult]:
    pin_loopback_candidates()
    tracks = clip_tracks(source_frames(config), config.fps, config.source_encoding)
    start_at = time.monotonic() + (start_at_wall - time.time())
    limits = httpx.Limits(max_connections=max(10, 2 * len(indices)))
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        return list(await asyncio.gather(*(run_session(i, config, tracks, http, start_at) for i in indices)))


def _process_main(config: LoadConfig, indices: list[int], start_at_wall: float) -> list[dict[str, Any]]:
    return [asdict(r) for r in asyncio.run(run_sessions(config, indices, start_at_wall))]


def run_step(config: LoadConfig) -> dict[str, Any]:
    """Run N sessions (spread over `processes` processes), scrape /metrics around them, return the report."""
    config.check()
    before = scrape_metrics(config.url)
    start_at_wall = time.time() + 1.0
    indices = list(range(config.sessions))
    processes = max(1, min(config.processes, config.sessions))
    if processes == 1:
        results = [asdict(r) for r in asyncio.run(run_sessions(config, indices, start_at_wall))]
    else:
        shares = [indices[p::processes] for p in range(processes)]
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            parts = pool.starmap(_process_main, [(config, share, start_at_wall) for share in shares])
        results = sorted((r for part in parts for r in part), key=lambda r: r["index"])
    after = scrape_metrics(config.url)
    sessions = [SessionResult(**r) for r in results]
    return step_report(config, sessions, server_delta(before, after))


def step_report(config: LoadConfig, sessions: list[SessionResult], server: dict[str, Any]) -> dict[str, Any]:
    connected = [s for s in sessions if s.connected]
    all_lat = [x for s in connected for x in s.latencies_ms]
    fps = [s.distinct_fps for s in connected]
    kbps = [s.kbps_received for s in connected if s.kbps_received is not None]
    return {
        "config": asdict(config),
        "sessions": len(sessions),
        "connected": len(connected),
        "kbps_received_mean": round(float(np.mean(kbps)), 1) if kbps else None,
        "failures": len(sessions) - len(connected),
        "distinct_fps_min": round(min(fps), 2) if fps else 0.0,
        "distinct_fps_mean": round(float(np.mean(fps)), 2) if fps else 0.0,
        "latency_ms_p50": round(float(np.percentile(all_lat, 50)), 1) if all_lat else None,
        "latency_ms_p95": round(float(np.percentile(all_lat, 95)), 1) if all_lat else None,
        "freezes": sum(s.freezes for s in connected),
        "stages": stage_table(connected, server, all_lat),
        "per_session": [s.summary() for s in sessions],
        "per_replica": per_replica(connected),
        "fps_timelines": [s.fps_timeline for s in sessions],
        "latencies_ms": [s.latencies_ms for s in sessions],
        "server": server,
    }


def per_replica(connected: list[SessionResult]) -> dict[str, dict[str, float]]:
    """Sessions and edited FPS per fleet replica (empty against a single server, which names none)."""
    by_replica: dict[str, list[float]] = {}
    for s in connected:
        if s.replica:
            by_replica.setdefault(s.replica, []).append(s.distinct_fps)
    return {
        name: {
            "sessions": len(fps),
            "distinct_fps_min": round(min(fps), 2),
            "distinct_fps_mean": round(float(np.mean(fps)), 2),
        }
        for name, fps in sorted(by_replica.items())
    }


def stage_table(sessions: list[SessionResult], server: dict[str, Any], e2e_ms: list[float]) -> list[dict[str, Any]]:
    """Where an edited frame's capture-to-receive time went, stage by stage: this client's encode and send, the
    server's stages (means from its /metrics over the step; p50 and p95 over each session's recent frames,
    the median over sessions), and the rest: network, jitter buffers and decoding on both hops, which no clock
    here sees apart (the mean end to end less every mean above). Means add up; percentiles do not."""
    if not e2e_ms:
        return []

    def row(stage: str, mean: float | None, p50: float | None, p95: float | None) -> dict[str, Any]:
        return {"stage": stage, "mean_ms": mean, "p50_ms": p50, "p95_ms": p95}

    def pct(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)), 1) if values else None

    encode = [x for s in sessions for x in s.encode_ms]
    encode_mean = round(float(np.mean(encode)), 1) if encode else None
    rows = [row("client: encode and send", encode_mean, pct(encode, 50), pct(encode, 95))]
    means = server.get("stage_ms_mean", {})
    for stage in SERVER_STAGES:
        of_sessions = [s.server_stages_ms.get(stage, {}) for s in sessions]
        p50s = [x["p50"] for x in of_sessions if x.get("p50") is not None]
        p95s = [x["p95"] for x in of_sessions if x.get("p95") is not None]
        rows.append(
            row(
                f"server: {stage}",
                means.get(stage),
                round(float(np.median(p50s)), 1) if p50s else None,
                round(float(np.median(p95s)), 1) if p95s else None,
            )
        )
    known = [r["mean_ms"] for r in rows]
    total = float(np.mean(e2e_ms))
    rest = round(total - sum(known), 1) if all(m is not None for m in known) else None
    rows.append(row("network, jitter buffers, decoding (both hops)", rest, None, None))
    rows.append(row("end to end (capture to receive)", round(total, 1), pct(e2e_ms, 50), pct(e2e_ms, 95)))
    return rows


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write report.json, report.png and summary.txt into out_dir."""
    import json

    from loadtest.report import render_png, render_summary

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "png": out_dir / "report.png", "summary": out_dir / "summary.txt"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    render_png(report, paths["png"])
    paths["summary"].write_text(render_summary(report))
    return paths
