"""Issue 4's budget: the shipped default editor's whole 256² frame (encode + one UNet pass + decode) ≤ 50 ms.

Runs the shipped weights through the torch and ONNX Runtime backends round-robin, at 1 and at 2 threads, and
writes bench/results/frame_budget_cpu_<date>.{md,json}. With `--compare FOLDER` another model (e.g. the previous
default, from a `git worktree` of its commit) runs through ONNX Runtime in the same round-robin, and the report
gives the ratio. Run it on an otherwise idle machine (no training):

    .venv/bin/python bench/bench_frame_budget.py [--compare /tmp/v4/engines/default_model]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

from bench_engine import BASELINE, bench_backends
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
        "video coding shares them, which the load tests (loadtest/results/) measure end to end.\n" + comparison(runs)
    )


def comparison(runs: dict[int, dict[str, Any]]) -> str:
    """The section comparing the shipped default with --compare's model, measured in the same round-robin."""
    first = next(iter(runs.values()))
    if "baseline" not in first:
        return ""
    base = first["baseline"]
    rows = [
        [
            str(threads),
            f"{run['ms']['onnxruntime']:.1f}",
            f"{run['ms'][BASELINE]:.1f}",
            f"**{run['ort_over_baseline_ort']:.3f}**",
        ]
        for threads, run in runs.items()
    ]
    return (
        f"\n## Against `{base['weights']}` (fingerprint {base['fingerprint']})\n\nBoth through ONNX Runtime, "
        "interleaved call by call in the same run.\n\n"
        + table(["threads", "shipped ms", "compared ms", "shipped / compared"], rows)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    title = "Frame budget of the shipped default (CPU)"
    result = ("frame_budget_cpu", title)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--compare", type=Path, default=None)
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.compare is not None and not (known.compare / "unet" / "config.json").is_file():
        print(f"bench_frame_budget: {known.compare} is not a model folder (no unet/config.json)", file=sys.stderr)
        return 2
    measure = partial(bench_backends, baseline=known.compare)
    return thread_sweep_main(rest, __doc__ or "", result, measure, report, 40, {"budget_ms": BUDGET_MS})


if __name__ == "__main__":
    raise SystemExit(main())
