"""Where frames complete on receive: RTP marker bit (as browsers) vs aiortc's next-frame rule, side by side.

Each round starts `streamedit serve` (engine process + 1 media worker, the shipped default) with one
--receive-rule and streams --sessions sessions of a shared clip from this process, whose receivers use the
same rule; rounds alternate between the rules (A B A B ...) so that the machine's drift falls on both. Per
round: capture-to-receive latency of the distinct edited frames in the measured window (p50, p95) and the
distinct FPS per session. The ratio is marker / aiortc.

Run from the repository root:
    .venv/bin/python bench/bench_receive.py --rounds 3 --sessions 1
Writes bench/results/receive_cpu_<date>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from benchlib import (
    command_line,
    free_port,
    machine_info,
    machine_markdown,
    publish,
    served,
    table,
    wait_ready,
    window_figures,
)

from loadtest.client import ClipTrack, EditSession, load_clip, pin_loopback_candidates

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
RULES = ("aiortc", "marker")


async def one_round(rule: str, frames: list[np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    clients: list[EditSession] = []
    with served(port, ["--receive-rule", rule, *args.server_args.split()]):
        async with httpx.AsyncClient(timeout=30) as http:
            await wait_ready(http, url, 300)
            for _ in range(args.sessions):
                client = EditSession(url, ClipTrack(frames, args.fps), http, keep_images=0, receive_rule=rule)
                response = await client.open({"prompt": args.prompt})
                if response.status_code != 201:
                    raise RuntimeError(f"{response.status_code} {response.text}")
                clients.append(client)
            await asyncio.sleep(args.warmup)
            start = time.monotonic()
            await asyncio.sleep(args.duration)
            fps, latencies = await window_figures(clients, start, time.monotonic())
            for client in clients:
                await client.close()
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "rule": rule,
        "fps_min": min(fps),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p95": float(np.percentile(lat, 95)),
        "frames": len(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per rule, alternating")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--clip", type=Path, default=MEDIA / "asl_book.mkv")
    parser.add_argument("--prompt", default="make it a pencil sketch")
    parser.add_argument("--server-args", default="", help="extra flags for `streamedit serve`")
    args = parser.parse_args(argv)
    if not args.clip.is_file():
        parser.error(f"no clip at {args.clip}")
    machine, command = machine_info(), command_line()
    frames = load_clip(args.clip, 320, 240, max_frames=150)
    pin_loopback_candidates()
    rounds = [asyncio.run(one_round(rule, frames, args)) for _ in range(args.rounds) for rule in RULES]
    for r in rounds:
        print(r, flush=True)
    median = {
        rule: {k: float(np.median([r[k] for r in rounds if r["rule"] == rule])) for k in rounds[0] if k != "rule"}
        for rule in RULES
    }
    ratio = {k: median["marker"][k] / median["aiortc"][k] for k in ("latency_ms_p50", "latency_ms_p95")}
    parts = [
        machine_markdown(machine, command),
        f"`streamedit serve --receive-rule R` (engine process + 1 media worker, the shipped default"
        f"{', ' + args.server_args if args.server_args else ''}); {args.sessions} session(s) of {args.clip.name} at "
        f"{args.fps:g} FPS from this process, whose receivers use the same rule R; {args.rounds} rounds per rule, "
        f"alternating; {args.warmup:g} s warm-up, {args.duration:g} s measured. Capture to receive, per distinct "
        "edited frame; medians over rounds.\n",
        f"**marker / aiortc: p50 {ratio['latency_ms_p50']:.2f}, p95 {ratio['latency_ms_p95']:.2f}**\n",
        table(
            ["rule", "p50 ms", "p95 ms", "distinct FPS (slowest session)"],
            [
                [rule, f"{m['latency_ms_p50']:.0f}", f"{m['latency_ms_p95']:.0f}", f"{m['fps_min']:.1f}"]
                for rule, m in median.items()
            ],
        )
        + "\n",
        "Rounds in the order they ran:\n",
        table(
            ["rule", "p50 ms", "p95 ms", "distinct FPS"],
            [
                [r["rule"], f"{r['latency_ms_p50']:.0f}", f"{r['latency_ms_p95']:.0f}", f"{r['fps_min']:.1f}"]
                for r in rounds
            ],
        )
        + "\n",
    ]
    tag = f"{args.sessions}s" if args.sessions > 1 else ""
    return publish(
        "receive_cpu", tag, "Receive rule: marker bit vs aiortc's next frame", parts, {"rounds": rounds, **ratio}
    )


if __name__ == "__main__":
    raise SystemExit(main())
