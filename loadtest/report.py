"""Render a load-test report as a PNG (edited FPS over time, latency CDF) and a one-screen text summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from loadtest.client import SOURCE_ENCODINGS
from server.jitter import RECEIVE_RULE_MEANINGS


def _steps(report: dict[str, Any]) -> list[dict[str, Any]]:
    return report["steps"] if report.get("mode") == "capacity" else [report]


def render_png(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = _steps(report)
    shown = steps[-1]
    fig, (ax_fps, ax_cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, timeline in enumerate(shown["fps_timelines"]):
        ax_fps.plot(np.arange(len(timeline)), timeline, lw=1, label=f"session {i}" if i < 8 else None)
    target = report.get("target_fps")
    if target:
        ax_fps.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g} FPS")
    ax_fps.set(
        xlabel="seconds since first edited frame",
        ylabel="distinct edited frames / s",
        title=f"Edited FPS per session ({shown['sessions']} sessions)",
    )
    ax_fps.legend(fontsize=7, loc="lower right")
    for step in steps:
        lat = np.sort([x for s in step["latencies_ms"] for x in s])
        if len(lat):
            ax_cdf.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"{step['sessions']} sessions")
    ax_cdf.set(xlabel="capture-to-receive latency (ms)", ylabel="fraction of frames", title="Latency CDF")
    ax_cdf.grid(alpha=0.3)
    ax_cdf.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _step_line(step: dict[str, Any]) -> str:
    server = step.get("server", {})
    return (
        f"{step['sessions']:>3} sessions  connected {step['connected']:>3}  "
        f"fps min/mean {step['distinct_fps_min']:5.1f}/{step['distinct_fps_mean']:5.1f}  "
        f"latency p50/p95 {step['latency_ms_p50']}/{step['latency_ms_p95']} ms  freezes {step['freezes']}  "
        f"engine {server.get('engine_ms_per_batch')} ms/batch × {server.get('mean_batch_size')}  "
        f"dropped {server.get('frames_dropped')}  video in {step.get('kbps_received_mean')} kbps/session"
    )


def _replica_lines(per_replica: dict[str, dict[str, float]]) -> list[str]:
    """A fleet step's spread: sessions and FPS per replica (none against a single server)."""
    return [
        f"      replica {name}: {r['sessions']:g} sessions, fps min/mean {r['distinct_fps_min']:.1f}/"
        f"{r['distinct_fps_mean']:.1f}"
        for name, r in per_replica.items()
    ]


def _stage_lines(stages: list[dict[str, Any]]) -> list[str]:
    """One step's stage table: where a frame's capture-to-receive time went (loadtest.run.stage_table)."""

    def ms(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    if not stages:
        return []
    width = max(len(r["stage"]) for r in stages)
    lines = [f"      {'stage':<{width}}  {'mean':>6}  {'p50':>6}  {'p95':>6}  (ms)"]
    for r in stages:
        lines.append(f"      {r['stage']:<{width}}  {ms(r['mean_ms']):>6}  {ms(r['p50_ms']):>6}  {ms(r['p95_ms']):>6}")
    return lines


def render_summary(report: dict[str, Any]) -> str:
    cfg = report["config"] if report.get("mode") != "capacity" else report["steps"][0]["config"]
    rule = cfg.get("receive_rule", "aiortc")  # reports from before the rule existed ran aiortc's
    encoding = cfg.get("source_encoding", "live")  # and those from before pre-encoding encoded live
    lines = [
        f"StreamEdit load test — {report.get('started', '')} — {report.get('machine', '')}",
        f"target {cfg['url']}  source {cfg['source']} {cfg['width']}x{cfg['height']} @ {cfg['fps']:g} FPS, "
        f"{cfg['duration_s']:g} s per step (first {cfg['warmup_s']:g} s not counted)",
        f"receive rule: {rule} ({RECEIVE_RULE_MEANINGS.get(rule, '?')})",
        f"source encoding: {encoding} ({SOURCE_ENCODINGS.get(encoding, '?')})",
    ]
    for step in _steps(report):
        lines.append(_step_line(step))
        lines += _replica_lines(step.get("per_replica", {}))
        lines += _stage_lines(step.get("stages", []))
    if report.get("mode") == "capacity":
        lines.append(
            f"CAPACITY: {report['capacity']} sessions held ≥ {report['target_fps']:g} FPS each "
            f"with p95 ≤ {report['max_p95_ms']:g} ms"
        )
    patches = [x for step in _steps(report) for s in step["per_session"] for x in s["patch_to_visible_s"]]
    if patches:
        lines.append(f"PATCH → first frame with the new edit: median {np.median(patches) * 1000:.0f} ms")
    return "\n".join(lines) + "\n"
