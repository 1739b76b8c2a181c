"""The engine's step inside the running service against the engine alone, same batch sizes, side by side in one run.

For each backend and stream count, three runs back to back on this machine:
- standalone: bench_worker's EngineWorker + Editor fed by synthetic 30 FPS streams (no media, no network);
- thread: the whole service (real uvicorn, real aiortc peers streaming a real clip on 127.0.0.1) with the
  engine on a thread of the media process, the shape the service had until the engine process;
- process: the same with the engine core in its own process (the default).
The service's step times come from its own metric, streamedit_engine_batch_seconds{batch_size}, taken over
the measured window; standalone's from the worker's batch reports. The ratio is service / standalone at the
same batch size. The load-testing peers run in this process, beside the media worker, as loadtest/ does.

Run from the repository root:
    .venv/bin/python bench/bench_service.py --backends torch onnxruntime --sessions 1 2
Writes bench/results/service_cpu_<date>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from bench_worker import run_step, warm_every_batch_size
from benchlib import (
    command_line,
    free_port,
    machine_info,
    machine_markdown,
    publish,
    table,
    wait_ready,
    window_figures,
)

from engines.loader import EngineSpec, load_editor, load_presets
from engines.spec import DEFAULT_MAX_BATCH
from engines.worker import EngineWorker
from loadtest.client import ClipTrack, EditSession, load_clip, pin_loopback_candidates
from server.app import create_app
from server.settings import Settings

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
STEP_METRIC = re.compile(r'^streamedit_engine_batch_seconds_(sum|count)\{batch_size="(\d+)"\} (\S+)$', re.M)


def step_totals(metrics_text: str) -> dict[int, dict[str, float]]:
    """{batch size: {"sum": seconds, "count": batches}} from the service's exposition text."""
    totals: dict[int, dict[str, float]] = {}
    for kind, size, value in STEP_METRIC.findall(metrics_text):
        totals.setdefault(int(size), {})[kind] = float(value)
    return totals


def standalone(backend: str, sessions: int, args: argparse.Namespace) -> dict[str, Any]:
    spec = EngineSpec(backend=backend, threads=args.threads, max_batch=args.max_batch, resolution=args.resolution)
    editor = load_editor(spec)
    prompts = [p["prompt"] for p in load_presets(None)] or ["make it a pencil sketch"]
    warm_every_batch_size(editor, args.max_batch, editor.encode_prompt(prompts[0]))
    worker = EngineWorker(editor, max_batch=args.max_batch)
    worker.start()
    try:
        step_args = argparse.Namespace(
            warmup=args.warmup, duration=args.duration, fps=args.fps, target_fps=12.0, max_p95_ms=200.0
        )
        step = run_step(worker, editor, sessions, prompts, step_args)
    finally:
        worker.stop()
    return {
        "ms_by_batch": {int(k): v for k, v in step["ms_by_batch"].items()},
        "batches_by_size": {int(k): v for k, v in step["batches_by_size"].items()},
        "fps_min": step["fps_min"],
        "latency_ms_p50": step["latency_ms_p50"],
        "latency_ms_p95": step["latency_ms_p95"],
    }


async def service(engine: str, backend: str, sessions: int, frames: list[np.ndarray], args: argparse.Namespace) -> dict:
    port = free_port()
    settings = Settings(
        host="127.0.0.1",
        port=port,
        backend=backend,
        threads=args.threads,
        engine=engine,
        max_batch=args.max_batch,
        resolution=args.resolution,
        max_sessions=max(4, sessions),
        log_level="warning",
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="asyncio", log_level="warning"))
    task = asyncio.create_task(server.serve())
    pin_loopback_candidates()
    url = f"http://127.0.0.1:{port}"
    clients: list[EditSession] = []
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            await wait_ready(http, url, 180, f"the {engine} engine")
            prompts = [p["prompt"] for p in load_presets(None)] or ["make it a pencil sketch"]
            for i in range(sessions):
                client = EditSession(url, ClipTrack(frames, args.fps), http)
                response = await client.open({"prompt": prompts[i % len(prompts)], "seed": i})
                if response.status_code != 201:
                    raise RuntimeError(f"session {i}: {response.status_code} {response.text}")
                clients.append(client)
            await asyncio.sleep(args.warmup)
            before = step_totals((await http.get(f"{url}/metrics")).text)
            start = time.monotonic()
            await asyncio.sleep(args.duration)
            end = time.monotonic()
            after = step_totals((await http.get(f"{url}/metrics")).text)
            fps, latencies = await window_figures(clients, start, end)
            for client in clients:
                await client.close()
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)
    ms_by_batch, batches_by_size = {}, {}
    for size, totals in after.items():
        count = totals.get("count", 0.0) - before.get(size, {}).get("count", 0.0)
        seconds = totals.get("sum", 0.0) - before.get(size, {}).get("sum", 0.0)
        if count > 0:
            ms_by_batch[size] = 1000 * seconds / count
            batches_by_size[size] = int(count)
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "ms_by_batch": ms_by_batch,
        "batches_by_size": batches_by_size,
        "fps_min": min(fps),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p95": float(np.percentile(lat, 95)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=("torch", "onnxruntime"), default=["torch", "onnxruntime"])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the engine in every run")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the window opens")
    parser.add_argument("--clip", type=Path, default=MEDIA / "asl_book.mkv")
    parser.add_argument(
        "--resolution",
        type=int,
        help="editor frame size (default: the model's 256); at 64 the torch backend's step is many short calls, "
        "the regime in which an engine thread starves for the GIL",
    )
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if not args.clip.is_file():
        parser.error(f"no clip at {args.clip} (shared/media beside the checkout)")
    if any(n < 1 for n in args.sessions):
        parser.error("--sessions takes counts of at least 1")
    machine, command = machine_info(), command_line()
    frames = load_clip(args.clip, 320, 240, max_frames=150)
    runs: list[dict[str, Any]] = []
    for backend in args.backends:
        for sessions in args.sessions:
            for engine in ("standalone", "thread", "process"):
                if engine == "standalone":
                    result = standalone(backend, sessions, args)
                else:
                    result = asyncio.run(service(engine, backend, sessions, frames, args))
                result.update(backend=backend, sessions=sessions, engine=engine)
                runs.append(result)
                steps = ", ".join(f"b{k}: {v:.1f} ms" for k, v in sorted(result["ms_by_batch"].items()))
                print(f"{backend} {sessions} streams {engine}: {steps}; min {result['fps_min']:.1f} FPS", flush=True)
    rows, ratios = [], []
    for run in runs:
        alone = next(
            r
            for r in runs
            if r["engine"] == "standalone" and (r["backend"], r["sessions"]) == (run["backend"], run["sessions"])
        )
        for size, ms in sorted(run["ms_by_batch"].items()):
            base = alone["ms_by_batch"].get(size)
            ratio = ms / base if base else None
            if run["engine"] == "process" and ratio is not None and run["batches_by_size"][size] >= 10:
                ratios.append(ratio)
            rows.append(
                [
                    run["backend"],
                    str(run["sessions"]),
                    run["engine"],
                    str(size),
                    f"{ms:.1f}",
                    str(run["batches_by_size"][size]),
                    "" if ratio is None else f"{ratio:.2f}×",
                    f"{run['fps_min']:.1f}",
                    f"{run['latency_ms_p50']:.0f} / {run['latency_ms_p95']:.0f}",
                ]
            )
    worst = max(ratios, default=float("nan"))
    parts = [
        machine_markdown(machine, command),
        f"The shipped default editor at {args.resolution or 256}², engine threads {args.threads}, "
        f"max batch {args.max_batch}; "
        f"{args.duration:.0f} s measured after {args.warmup:.0f} s per run; service sessions stream "
        f"{args.clip.name} at {args.fps:g} FPS from aiortc peers in the benchmark's process. Latency: standalone "
        "from offer to outcome; service from capture to receipt at the client (VP8 both ways).\n",
        f"**Process engine, worst step ratio to standalone at a batch size seen ≥ 10 times: {worst:.2f}×** "
        f"(target ≤ 1.3×)\n",
        table(
            [
                "backend",
                "streams",
                "engine",
                "batch",
                "ms per step",
                "steps",
                "vs standalone",
                "FPS min",
                "latency p50 / p95 ms",
            ],
            rows,
        )
        + "\n",
    ]
    return publish(
        "service_cpu",
        args.tag,
        "Engine step inside the service vs the engine alone",
        parts,
        {"machine": machine, "command": command, "runs": runs, "worst_process_ratio": worst},
    )


if __name__ == "__main__":
    raise SystemExit(main())
