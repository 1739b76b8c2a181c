"""Shared benchmark plumbing: machine description, interleaved timing, FLOP counting, a server to wait for, results."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
from torch.utils.flop_counter import FlopCounterMode

from engines.text import PromptEncoder

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(port: int, flags: Sequence[str] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """`streamedit serve` (engine process + one media worker, plus `flags`) on 127.0.0.1:`port` until the block
    ends, then stopped as an orchestrator stops it (SIGTERM)."""
    command = [sys.executable, "-m", "server", "--port", str(port), "--media-workers", "1", *flags]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield server
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def process_tree_cpu(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by `root_pid` and every process below it, by comm ("se-engine",
    "se-media-0", ...; the root as "server"), read from /proc: which of the server's processes pays for a load."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:  # a process that ended while we looked
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        stats[int(entry.name)] = (int(fields[1]), comm, (int(fields[11]) + int(fields[12])) / tick)
    below = {root_pid}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in stats.items():
            if ppid in below and pid not in below:
                below.add(pid)
                grew = True
    out: dict[str, float] = {}
    for pid in below:
        if pid in stats:
            name = "server" if pid == root_pid else stats[pid][1]
            out[name] = out.get(name, 0.0) + stats[pid][2]
    return out


async def window_figures(clients: Sequence[Any], start: float, end: float) -> tuple[list[float], list[float]]:
    """Distinct FPS of each load-test client (loadtest.client.EditSession) in [start, end), and the
    capture-to-receive milliseconds of all their distinct frames received since `start`."""
    for client in clients:
        await client.calibrate()
    fps = [c.distinct_frames(start, end) / (end - start) for c in clients]
    latencies = [x * 1000 for c in clients for x in c.latencies(since=start)]
    return fps, latencies


async def wait_ready(http: httpx.AsyncClient, url: str, timeout_s: float, what: str = "the server") -> None:
    """Poll `url`/readyz until it answers 200; RuntimeError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get(f"{url}/readyz")).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} never became ready")
        await asyncio.sleep(0.2)


class RandomPromptEncoder(PromptEncoder):
    """Contexts of a model's shape from a seeded generator: speed does not depend on what the prompt says."""

    def __init__(self, dim: int, tokens: int) -> None:
        self.dim, self.tokens = dim, tokens

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack(
            [torch.randn(self.tokens, self.dim, generator=torch.Generator().manual_seed(len(p))) for p in prompts]
        )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: the instruction sets that decide which CPU path is fast (this workplace's machines differ in exactly these)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_isa() -> list[str]:
    """Which of ISA_FLAGS this CPU has, from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in ISA_FLAGS if f in flags]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was (it may be shared)."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def command_line() -> str:
    """The command as typed from the repository root (the interpreter relative to it where it lives inside)."""
    python = Path(sys.executable)
    try:
        shown = str(python.relative_to(Path.cwd()))
    except ValueError:
        shown = python.name
    return shlex.join([shown, *sys.argv])


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (torch's FlopCounterMode: 2 per multiply-add, convolutions, matmuls and attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin so that load from other processes hits all alike.

    Each round runs them in a fresh order (seeded): a call is slower after some calls than after others (a torch
    edit before an ONNX Runtime one leaves the caches and threads another way), and in a fixed order that
    difference went to one of them every round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffler = random.Random(0)
    for _ in range(reps):
        shuffler.shuffle(order)
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def mark_end(machine: dict[str, Any], started: float) -> None:
    """Record the load at the end of a run and its wall time (perf_counter seconds since `started`)."""
    machine["loadavg_at_end"] = list(os.getloadavg())
    machine["wall_s"] = time.perf_counter() - started


def write_results(stem: str, title: str, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """Write bench/results/<stem>_<date>.md and .json; returns their paths."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    date = dt.date.today().isoformat()
    md_path = RESULTS_DIR / f"{stem}_{date}.md"
    json_path = RESULTS_DIR / f"{stem}_{date}.json"
    md_path.write_text(f"# {title}\n\n{markdown.strip()}\n")
    json_path.write_text(json.dumps({"date": date, **data}, indent=2, default=str) + "\n")
    return md_path, json_path


def publish(stem: str, tag: str, title: str, parts: list[str], data: dict[str, Any]) -> int:
    """Write `parts` (the machine header first) and `data` as bench/results/<stem>[_<tag>]_<date>.{md,json},
    print the parts after the header, and return the exit status 0."""
    md, js = write_results(f"{stem}_{tag}" if tag else stem, title, "\n".join(parts), data)
    print("\n".join(parts[1:]))
    print(f"wrote {md} and {js}")
    return 0


def machine_markdown(machine: dict[str, Any], command: str) -> str:
    load = ", ".join(f"{x:.2f}" for x in machine["loadavg_at_start"])
    end = machine.get("loadavg_at_end")
    load_end = f"; at the end {', '.join(f'{x:.2f}' for x in end)}" if end else ""
    return (
        f"- date: {dt.date.today().isoformat()}\n"
        f"- machine: {machine['nproc']} CPUs ({machine['cpu_model']}; "
        f"{', '.join(machine.get('cpu_isa') or ['ISA unknown'])}), torch {machine['torch']} with "
        f"{machine['torch_threads']} threads, Python {machine['python']}\n"
        f"- load average at the start: {load}{load_end} (a shared machine: absolute times are noisy, "
        "ratios were measured round-robin in one run)\n"
        f"- command: `{command}`\n"
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def thread_sweep_main(
    argv: list[str] | None,
    doc: str,
    result: tuple[str, str],
    measure: Callable[[int, int], dict[str, Any]],
    report: Callable[[dict[str, Any], str, dict[int, dict[str, Any]]], str],
    reps: int,
    extra: dict[str, Any] | None = None,
) -> int:
    """A benchmark's command line: `measure(reps, threads)` at each --threads, then `report` into result files.

    `result` is the (file stem, title) of bench/results/<stem>_<date>.{md,json}; `extra` goes into the JSON too.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=reps, help="timed calls per variant and thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    machine = {**machine_info(), "torch_threads": " and ".join(map(str, args.threads))}
    command = command_line()
    started = time.perf_counter()
    runs: dict[int, dict[str, Any]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs[threads] = measure(args.reps, threads)
    mark_end(machine, started)
    md, js = write_results(
        result[0],
        result[1],
        report(machine, command, runs),
        {"machine": machine, "command": command, **(extra or {}), "runs": runs},
    )
    print(f"wrote {md} and {js}")
    return 0
