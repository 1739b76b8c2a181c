"""Scrape the server's Prometheus /metrics and summarise what changed during a load step."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.stats import STAGES as SERVER_STAGES  # the media worker's stages of an edited frame, in order

Samples = dict[str, float]


def scrape_metrics(url: str) -> Samples:
    """Totals of every counter/histogram sample at /metrics, summed over labels but `le` and `stage` ({} if
    unreachable, or if a fleet's proxy answered: its /metrics is whichever replica it picked, and a difference
    of two such scrapes would mix replicas)."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    if "X-StreamEdit-Replica" in response.headers:
        return {}
    text = response.text
    totals: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            for label in ("stage", "le"):
                if label in sample.labels:
                    key += f"{{{label}={sample.labels[label]}}}"
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def server_delta(before: Samples, after: Samples) -> dict[str, Any]:
    """Engine time per batch, mean batch size, edited/dropped/skipped/failed frames during the step."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    if not after:
        return {"available": False}
    stage_means = {}
    for stage in SERVER_STAGES:
        count = delta(f"streamedit_frame_stage_seconds_count{{stage={stage}}}")
        if count:
            stage_means[stage] = round(1000 * delta(f"streamedit_frame_stage_seconds_sum{{stage={stage}}}") / count, 2)
    batches = delta("streamedit_engine_batch_seconds_count")
    rows = delta("streamedit_batch_size_sum")
    return {
        "available": True,
        "batches": int(batches),
        "engine_ms_per_batch": round(1000 * delta("streamedit_engine_batch_seconds_sum") / batches, 2)
        if batches
        else None,
        "mean_batch_size": round(rows / batches, 2) if batches else None,
        "frames_in": int(delta("streamedit_frames_in_total")),
        "frames_edited": int(delta("streamedit_frames_edited_total")),
        "frames_dropped": int(delta("streamedit_frames_dropped_total")),
        "frames_skipped": int(delta("streamedit_frames_skipped_total")),
        "frames_failed": int(delta("streamedit_frames_failed_total")),
        "sessions_rejected": int(delta("streamedit_sessions_rejected_total")),
        "stage_ms_mean": stage_means,
    }
