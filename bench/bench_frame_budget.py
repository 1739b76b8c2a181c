"""Issue 4's budget: the shipped default editor's whole 256² frame (encode + one UNet pass + decode) ≤ 50 ms.

Runs the shipped weights through the torch and ONNX Runtime backends round-robin, at 1 and at 2 threads, and
writes bench/results/frame_budget_cpu_<date>.{md,json}. Run it on an otherwise idle machine (no training):

    .venv/bin/python bench/bench_frame_budget.py
"""

from __future__ import annotations

from typing import Any

from bench_engine import bench_backends
from benchlib import machine_markdown, table, thread_sweep_main

BUDGET_MS = 50.0


def report(machine: dict[str, Any], command: str, runs: dict[int, dict[str, Any]]) -> str:
    rows = []
    for threads, run in runs.items():
        ms = run["ms"]
        fastest = min(ms, key=ms.get)
        rows.append(
            [
                str(threads),
                f"{ms['torch']:.1f}",
                f"{ms['onnxruntime']:.1f}",
                f"{ms['onnxruntime'] / ms['torch']:.3f}",
                f"{fastest}: **{ms[fastest]:.1f}** ({'met' if ms[fastest] <= BUDGET_MS else 'missed'})",
            ]
        )
    first = next(iter(runs.values()))
    return (
        machine_markdown(machine, command)
        + f"\nThe shipped default (`{first['weights']}`, fingerprint {first['fingerprint']}) per "
        f"{first['resolution']}² frame, one stream, median of round-robin repetitions; "
        f"{first['flops_per_frame'] / 1e9:.2f} GFLOPs a frame.\n\n"
        + table(
            ["threads", "torch ms", "onnxruntime ms", "onnxruntime / torch", f"fastest vs the {BUDGET_MS:.0f} ms bar"],
            rows,
        )
        + "\n\nThe service runs the engine on its own thread with ONNX Runtime by default; with 2 cores the server's "
        "video coding shares them, which the load tests (loadtest/results/) measure end to end.\n"
    )


def main(argv: list[str] | None = None) -> int:
    title = "Frame budget of the shipped default (CPU)"
    result = ("frame_budget_cpu", title)
    return thread_sweep_main(argv, __doc__ or "", result, bench_backends, report, 40, {"budget_ms": BUDGET_MS})


if __name__ == "__main__":
    raise SystemExit(main())
