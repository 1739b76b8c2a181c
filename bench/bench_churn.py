"""Session churn: does a media worker give back what each session took? RSS, threads and descriptors over cycles.

Starts `streamedit serve` (engine process + one media worker) on 127.0.0.1, then runs --cycles cycles of open a
session / stream for --stream-s / DELETE, and then --abandoned peers that open a session and vanish without a
word (their peer connection closed, no DELETE), which the server must reap. Every --every cycles it reads the
media worker's RSS, thread count and open descriptors from /proc (its pid from /healthz). Targets (issue 14):
threads back to the idle count after each close; RSS growth ≤ 30 MB per 100 cycles after warm-up.

Run from the repository root:
    .venv/bin/python bench/bench_churn.py --cycles 200 --abandoned 50
Writes bench/results/churn_cpu_<date>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
from benchlib import command_line, free_port, machine_info, machine_markdown, publish, served, table, wait_ready

from loadtest.client import ClipTrack, EditSession, load_clip, pin_loopback_candidates

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"


def process_figures(pid: int) -> dict[str, float]:
    """RSS (MB), threads and open descriptors of one process, from /proc."""
    rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return {
        "rss_mb": rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20,
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


async def churn(url: str, args: argparse.Namespace) -> dict[str, Any]:
    frames = load_clip(args.clip, 320, 240, max_frames=60)
    pin_loopback_candidates()
    async with httpx.AsyncClient(timeout=30) as http:
        await wait_ready(http, url, 300)
        pid = int((await http.get(f"{url}/healthz")).json()["pid"])
        cold = process_figures(pid)
        samples = [{"cycle": 0, **cold}]
        print(f"idle before any session: {cold}", flush=True)
        idle: dict[str, float] = {}
        most_threads = 0.0  # after any close but the first, 0.5 s on
        for cycle in range(1, args.cycles + 1):
            session = EditSession(url, ClipTrack(frames), http)
            response = await session.open()
            if response.status_code != 201:
                raise RuntimeError(f"cycle {cycle}: {response.status_code} {response.text}")
            await asyncio.sleep(args.stream_s)
            await session.close()
            await asyncio.sleep(0.5)  # the close's last tasks finish
            figures = process_figures(pid)
            if cycle == 1:
                # The first session starts what stays for all: asyncio's default executor threads (aiortc encodes
                # on them; the pool is bounded), pooled HTTP connections.
                idle = figures
                print(f"idle after the first session: {idle}", flush=True)
            else:
                most_threads = max(most_threads, figures["threads"])
            if cycle % args.every == 0:
                samples.append({"cycle": cycle, **figures})
                print(samples[-1], flush=True)
        for _ in range(args.abandoned):  # a peer that vanishes: no DELETE
            session = EditSession(url, ClipTrack(frames), http)
            await session.open()
            await asyncio.sleep(0.3)
            await session.close(delete=False)
        reap_deadline = time.monotonic() + 60
        while (await http.get(f"{url}/metrics")).text.find("streamedit_active_sessions 0.0") < 0:
            if time.monotonic() > reap_deadline:
                raise RuntimeError("abandoned sessions were not reaped within 60 s")
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        after_abandoned = {"cycle": args.cycles, "abandoned": args.abandoned, **process_figures(pid)}
        print(f"after {args.abandoned} abandoned peers: {after_abandoned}", flush=True)
    return {
        "cold": cold,
        "idle": idle,
        "most_threads_after_a_close": most_threads,
        "samples": samples,
        "after_abandoned": after_abandoned,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--abandoned", type=int, default=50)
    parser.add_argument("--stream-s", type=float, default=1.0, help="seconds each session streams")
    parser.add_argument("--every", type=int, default=20, help="cycles between samples")
    parser.add_argument("--warmup-cycles", type=int, default=20, help="cycles before growth is counted")
    parser.add_argument("--clip", type=Path, default=MEDIA / "asl_book.mkv")
    parser.add_argument("--server-args", default="", help="extra flags for `streamedit serve`")
    args = parser.parse_args(argv)
    if not args.clip.is_file():
        parser.error(f"no clip at {args.clip}")
    if args.cycles < args.warmup_cycles + args.every or args.every < 1:
        parser.error("need --cycles ≥ --warmup-cycles + --every, and --every ≥ 1")
    machine, command = machine_info(), command_line()
    port = free_port()
    with served(port, args.server_args.split()):
        result = asyncio.run(churn(f"http://127.0.0.1:{port}", args))
    samples, idle = result["samples"], result["idle"]
    warm = next(s for s in samples if s["cycle"] >= args.warmup_cycles)
    last = samples[-1]
    growth_per_100 = (last["rss_mb"] - warm["rss_mb"]) * 100 / max(last["cycle"] - warm["cycle"], 1)
    most = result["most_threads_after_a_close"]
    threads_back = most <= idle["threads"] and result["after_abandoned"]["threads"] <= idle["threads"]
    parts = [
        machine_markdown(machine, command),
        f"`streamedit serve` (engine process + 1 media worker, {args.server_args or 'defaults'}); {args.cycles} "
        f"cycles of open / stream {args.stream_s:g} s / DELETE, then {args.abandoned} peers that vanish without "
        "DELETE (reaped by the server). Figures are the media worker's, from /proc, 0.5 s after a close; threads are "
        "read after every close.\n",
        f"**RSS growth after cycle {warm['cycle']}: {growth_per_100:.1f} MB per 100 cycles** (target ≤ 30); "
        f"**threads back to the idle {idle['threads']} after every close: {'yes' if threads_back else 'no'}** "
        f"(most after a close: {most:g}; idle is read after the first session, which starts asyncio's default "
        f"executor threads that aiortc encodes on; before any session: {result['cold']['threads']:g})\n",
        table(
            ["cycle", "RSS MB", "threads", "descriptors"],
            [[str(s["cycle"]), f"{s['rss_mb']:.1f}", str(s["threads"]), str(s["fds"])] for s in samples]
            + [
                [
                    f"+{args.abandoned} abandoned",
                    f"{result['after_abandoned']['rss_mb']:.1f}",
                    str(result["after_abandoned"]["threads"]),
                    str(result["after_abandoned"]["fds"]),
                ]
            ],
        )
        + "\n",
    ]
    return publish(
        "churn_cpu",
        "",
        "Session churn: what a media worker gives back",
        parts,
        {
            "machine": machine,
            "command": command,
            **result,
            "rss_growth_mb_per_100_cycles": growth_per_100,
            "threads_back_to_idle": threads_back,
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
