"""Soak: one session for --minutes; does its latency or the server's memory drift as time goes by?

Starts `streamedit serve` (engine process + one media worker) on 127.0.0.1, opens one session streaming a shared
clip at --fps, and keeps it open for --minutes. Each minute it reads the capture-to-receive latency of the
frames received in it (p50, p95), the distinct edited FPS, and the RSS of the media worker and of the engine
process from /proc. Targets (issue 14): the last minute's p95 ≤ 1.1× the first minute's; RSS growth ≤ 20 MB
after the first minute.

Run from the repository root:
    .venv/bin/python bench/bench_soak.py --minutes 10
Writes bench/results/soak_cpu_<date>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_churn import process_figures
from benchlib import command_line, free_port, machine_info, machine_markdown, publish, served, table, wait_ready

from loadtest.client import ClipTrack, EditSession, load_clip, pin_loopback_candidates

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"


def engine_pid(server_pid: int, media_pid: int) -> int | None:
    """The supervisor's child that is not the media worker: the engine process."""
    children: set[int] = set()
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        children.update(int(p) for p in (task / "children").read_text().split())
    others = [p for p in children - {media_pid} if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    return others[0] if len(others) == 1 else None


def minute_figures(session: EditSession, start: float, end: float) -> dict[str, float]:
    """Latency percentiles (ms) and distinct FPS of the frames received in [start, end)."""
    latencies, seen = [], set()
    for item in session.received:
        if not start <= item.at < end or item.pts in seen:
            continue
        seen.add(item.pts)
        pts = session.source_pts(item)
        captured = session.source.captured_at.get(pts) if pts is not None else None
        if captured is not None:
            latencies.append((item.at - captured) * 1000)
    p50, p95 = (float(np.percentile(latencies, q)) for q in (50, 95)) if latencies else (float("nan"),) * 2
    return {"frames": len(latencies), "fps": len(seen) / (end - start), "p50_ms": p50, "p95_ms": p95}


async def soak(url: str, server_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    frames = load_clip(args.clip, 320, 240, max_frames=150)
    pin_loopback_candidates()
    async with httpx.AsyncClient(timeout=30) as http:
        await wait_ready(http, url, 300)
        media = int((await http.get(f"{url}/healthz")).json()["pid"])
        engine = engine_pid(server_pid, media)
        session = EditSession(url, ClipTrack(frames, args.fps), http, keep_images=0)
        response = await session.open({"prompt": args.prompt})
        if response.status_code != 201:
            raise RuntimeError(f"{response.status_code} {response.text}")
        while not session.received:
            await asyncio.sleep(0.05)
        start = time.monotonic()
        await session.calibrate()
        minutes = []
        for minute in range(1, args.minutes + 1):
            await asyncio.sleep(start + minute * 60 - time.monotonic())
            row = {
                "minute": minute,
                **minute_figures(session, start + (minute - 1) * 60, start + minute * 60),
                "media_rss_mb": process_figures(media)["rss_mb"],
                "engine_rss_mb": process_figures(engine)["rss_mb"] if engine else float("nan"),
            }
            minutes.append(row)
            print(row, flush=True)
        await session.close()
    return {"minutes": minutes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--fps", type=float, default=30.0, help="camera frame rate of the session")
    parser.add_argument("--clip", type=Path, default=MEDIA / "asl_book.mkv")
    parser.add_argument("--prompt", default="make it a pencil sketch")
    parser.add_argument("--server-args", default="", help="extra flags for `streamedit serve`")
    args = parser.parse_args(argv)
    if not args.clip.is_file():
        parser.error(f"no clip at {args.clip}")
    if args.minutes < 2:
        parser.error("--minutes must be at least 2: the first minute is compared with the last")
    machine, command = machine_info(), command_line()
    port = free_port()
    with served(port, args.server_args.split()) as server:
        result = asyncio.run(soak(f"http://127.0.0.1:{port}", server.pid, args))
    rows = result["minutes"]
    first, last = rows[0], rows[-1]
    p95_ratio = last["p95_ms"] / first["p95_ms"]
    media_growth = last["media_rss_mb"] - first["media_rss_mb"]
    engine_growth = last["engine_rss_mb"] - first["engine_rss_mb"]
    parts = [
        machine_markdown(machine, command),
        f"`streamedit serve` (engine process + 1 media worker, {args.server_args or 'defaults'}); one session of "
        f"{args.clip.name} at {args.fps:g} FPS, prompt {args.prompt!r}, for {args.minutes} minutes, the load "
        "tester's client on the same cores. Latency is capture to receive, per distinct edited frame.\n",
        f"**Last minute's p95 / first minute's: {p95_ratio:.2f}** (target ≤ 1.1); **RSS growth after the first "
        f"minute: media worker {media_growth:+.1f} MB, engine {engine_growth:+.1f} MB** (target ≤ 20)\n",
        table(
            ["minute", "distinct FPS", "p50 ms", "p95 ms", "media worker RSS MB", "engine RSS MB"],
            [
                [
                    str(r["minute"]),
                    f"{r['fps']:.1f}",
                    f"{r['p50_ms']:.0f}",
                    f"{r['p95_ms']:.0f}",
                    f"{r['media_rss_mb']:.1f}",
                    f"{r['engine_rss_mb']:.1f}",
                ]
                for r in rows
            ],
        )
        + "\n",
    ]
    return publish(
        "soak_cpu",
        "",
        "Soak: one session for a long while",
        parts,
        {
            "machine": machine,
            "command": command,
            **result,
            "p95_last_over_first": p95_ratio,
            "media_rss_growth_mb": media_growth,
            "engine_rss_growth_mb": engine_growth,
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
