"""`streamedit loadtest`: one step of N sessions, or a capacity search, against a server on loopback."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from loadtest.client import SOURCE_ENCODINGS
from loadtest.run import LoadConfig, run_step, write_report
from server.jitter import RECEIVE_RULE_MEANINGS, RECEIVE_RULES


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}"


def capacity(
    config: LoadConfig, target_fps: float, max_p95_ms: float, max_sessions: int, counts: list[int] | None = None
) -> dict[str, Any]:
    """Raise the session count (one at a time, or through `counts`) until a step misses the FPS target or the
    latency bound."""
    steps, held = [], 0
    for n in counts or range(1, max_sessions + 1):
        step = run_step(replace(config, sessions=n))
        steps.append(step)
        p95 = step["latency_ms_p95"]
        ok = step["failures"] == 0 and step["distinct_fps_min"] >= target_fps and p95 is not None and p95 <= max_p95_ms
        print(f"  {n} sessions: min fps {step['distinct_fps_min']}, p95 {p95} ms → {'held' if ok else 'missed'}")
        if not ok:
            break
        held = n
    return {"mode": "capacity", "capacity": held, "target_fps": target_fps, "max_p95_ms": max_p95_ms, "steps": steps}


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready after {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="streamedit loadtest", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--duration", type=float, default=30.0, help="seconds per step")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds at the start of a step not counted")
    p.add_argument("--ramp", type=float, default=2.0, help="sessions opened per second")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--resolution", default="256x256", help="WxH of the sent video")
    p.add_argument("--source", default="synthetic", help="a video file (looped) or 'synthetic'")
    p.add_argument("--prompt", action="append", help="edit prompt; repeat to cycle with --patch-every")
    p.add_argument("--guidance", action="append", help="S_T,S_I; repeat to cycle with --patch-every")
    p.add_argument("--patch-every", type=float, default=0.0, help="PATCH the next prompt (and guidance) every N s")
    p.add_argument("--processes", type=int, default=1, help="client processes (for many sessions)")
    p.add_argument("--capacity", action="store_true", help="raise sessions until a step misses the targets")
    p.add_argument("--target-fps", type=float, default=12.0)
    p.add_argument("--max-p95-ms", type=float, default=200.0)
    p.add_argument("--max-sessions", type=int, default=16, help="capacity mode: stop here")
    p.add_argument("--steps", type=int, nargs="+", help="capacity mode: these session counts, in order (e.g. 8 16 32)")
    p.add_argument("--spawn-server", action="store_true", help="start `streamedit serve` on --url's port first")
    p.add_argument("--server-args", default="", help="extra flags for the spawned server")
    p.add_argument(
        "--receive-rule",
        choices=RECEIVE_RULES,
        default="marker",
        help="when a received frame is complete: "
        + "; ".join(f"'{rule}', {meaning}" for rule, meaning in RECEIVE_RULE_MEANINGS.items()),
    )
    p.add_argument(
        "--source-encoding",
        choices=list(SOURCE_ENCODINGS),
        default="pre-encoded",
        help="how the clip becomes VP8: " + "; ".join(f"'{k}', {v}" for k, v in SOURCE_ENCODINGS.items()),
    )
    p.add_argument("--out", type=Path, default=Path("loadtest/results/latest"))
    args = p.parse_args(argv)
    try:
        size = args.resolution.lower().split("x")
        if len(size) != 2 or not all(x.isdigit() and int(x) >= 16 for x in size):
            raise ValueError(f"--resolution takes WxH, e.g. 256x256, not {args.resolution!r}")
        width, height = int(size[0]), int(size[1])
        guidance = []
        for pair in args.guidance or []:
            values = pair.split(",")
            if len(values) != 2:
                raise ValueError(f"--guidance takes S_T,S_I, e.g. 1.0,1.0, not {pair!r}")
            guidance.append((float(values[0]), float(values[1])))
        config = LoadConfig(
            url=args.url.rstrip("/"),
            sessions=args.sessions,
            duration_s=args.duration,
            warmup_s=args.warmup,
            ramp_per_s=args.ramp,
            fps=args.fps,
            width=width,
            height=height,
            source=args.source,
            prompts=args.prompt or ["make it a pencil sketch"],
            patch_every_s=args.patch_every,
            processes=args.processes,
            receive_rule=args.receive_rule,
            source_encoding=args.source_encoding,
        )
        config.check()
        if args.steps and (sorted(args.steps) != args.steps or args.steps[0] < 1):
            raise ValueError(f"--steps takes increasing session counts of at least 1, not {args.steps}")
        if args.source != "synthetic" and not Path(args.source).is_file():
            raise ValueError(f"no such video file: {args.source}")
    except ValueError as exc:
        print(f"streamedit loadtest: {exc}", file=sys.stderr)
        return 2
    server = None
    if args.spawn_server:
        port = config.url.rsplit(":", 1)[-1]
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", port, *args.server_args.split()]
        server = subprocess.Popen(cmd)
    try:
        wait_ready(config.url, 300 if server else 10)
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        if args.capacity:
            report = capacity(config, args.target_fps, args.max_p95_ms, args.max_sessions, args.steps)
        else:
            report = run_step(config)
            report["target_fps"] = args.target_fps
        report.update(
            started=started, machine=machine(), command="streamedit loadtest " + " ".join(argv or sys.argv[1:])
        )
        paths = write_report(report, args.out)
        print(paths["summary"].read_text(), end="")
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0
    except RuntimeError as exc:
        print(f"streamedit loadtest: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)
