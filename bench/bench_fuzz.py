"""API fuzz at depth: schemathesis' command line, every phase, against `streamedit serve` on 127.0.0.1.

The CI run (tests/test_api_fuzz.py) is bounded to seconds; this one runs schemathesis' examples, coverage,
fuzzing and stateful phases with --max-examples cases per operation, real SDP offers mixed into valid POSTs
(bench/fuzz_hooks.py) so that the stateful links reach GET, PATCH and DELETE with real tokens. Checks: all but
positive_data_acceptance (the schema cannot say which text is an SDP offer, or that a prompt holds no control
characters: such valid-by-schema requests get their documented 400 or 422). The server runs with limits no fuzz
reaches (offers never connect, so they are pending sessions, reaped after 2 s): a 503 for "full" would count as
a server error. Target (issue 14): zero 5xx, zero undocumented statuses.

Run from the repository root:
    .venv/bin/python bench/bench_fuzz.py --max-examples 200
Writes bench/results/fuzz_api_<date>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from aiortc import RTCConfiguration, RTCPeerConnection, VideoStreamTrack
from benchlib import command_line, free_port, machine_info, machine_markdown, publish, served, wait_ready

from loadtest.client import pin_loopback_candidates

REPO = Path(__file__).resolve().parents[1]
SERVER_FLAGS = ["--max-sessions", "16", "--max-pending", "4096", "--connect-timeout-s", "2", "--max-negotiations", "64"]


async def real_offers(count: int) -> list[str]:
    """Complete SDP offers with one video track; their peers close at once, so no session ever connects."""
    pin_loopback_candidates()
    offers = []
    for _ in range(count):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(VideoStreamTrack())
        await pc.setLocalDescription(await pc.createOffer())
        offers.append(pc.localDescription.sdp)
        await pc.close()
    return offers


async def ready(url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        await wait_ready(http, url, 300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=200, help="cases per operation and phase")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    machine, command = machine_info(), command_line()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with served(port, SERVER_FLAGS):
        asyncio.run(ready(url))
        with tempfile.TemporaryDirectory() as tmp:
            offers = Path(tmp) / "offers.json"
            offers.write_text(json.dumps(asyncio.run(real_offers(3))))
            env = {
                **os.environ,
                "STREAMEDIT_FUZZ_OFFERS": str(offers),
                "PYTHONPATH": str(REPO / "bench"),
                "SCHEMATHESIS_HOOKS": "fuzz_hooks",
            }
            fuzz = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json"]
            fuzz += ["--checks", "all", "--exclude-checks", "positive_data_acceptance", "--workers", "1"]
            fuzz += ["--max-examples", str(args.max_examples), "--no-color"]
            fuzz += ["--seed", str(args.seed)] if args.seed is not None else []
            started = time.monotonic()
            run = subprocess.run(fuzz, env=env, cwd=tmp, capture_output=True, text=True)
            seconds = time.monotonic() - started
    output = run.stdout + run.stderr
    summary = output[output.rfind("SUMMARY") :] if "SUMMARY" in output else output[-4000:]
    cases = re.search(r"(\d+) generated", output)
    server_errors = re.search(r"Server error: (\d+)", output)
    undocumented = re.search(r"Undocumented HTTP status code: (\d+)", output)
    figures = {
        "cases": int(cases.group(1)) if cases else None,
        "server_errors": int(server_errors.group(1)) if server_errors else 0,
        "undocumented_statuses": int(undocumented.group(1)) if undocumented else 0,
        "exit_status": run.returncode,
        "seconds": seconds,
    }
    parts = [
        machine_markdown(machine, command),
        f"`streamedit serve {' '.join(SERVER_FLAGS)}` (engine process + 1 media worker); schemathesis "
        f"`{' '.join(fuzz[1:2] + ['<url>'] + fuzz[3:])}` with bench/fuzz_hooks.py, {seconds:.0f} s.\n",
        f"**{figures['cases']} cases: {figures['server_errors']} 5xx, {figures['undocumented_statuses']} "
        f"undocumented statuses; schemathesis exit status {run.returncode}** (target: zero and zero)\n",
        "schemathesis' summary:\n\n```\n" + summary.strip() + "\n```\n",
    ]
    return publish("fuzz_api", "", "API fuzz: schemathesis, every phase", parts, {**figures, "summary": summary})


if __name__ == "__main__":
    raise SystemExit(main())
