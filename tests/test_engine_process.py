"""The engine in its own process: death and restart mid-stream, several media workers, nothing leaking.

Real uvicorn servers, real aiortc peers, a real engine process; loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
import zmq
import zmq.asyncio

from engines import messages as m
from engines.client import EngineAddress, EngineSpec, connect_engine, launch_engine
from engines.client_process import BEAT_TIMEOUT_S, ProcessEngineClient
from engines.frame_table import FrameTable
from engines.params import EditParams
from engines.spec import ModelInfo
from loadtest.client import ClipTrack, EditSession, pin_loopback_candidates
from server.app import create_app
from server.settings import Settings
from tests.conftest import free_port, running_server, unanswered_offer, wait_for

REPO = Path(__file__).resolve().parents[1]


async def get_json(http: httpx.AsyncClient, url: str) -> tuple[int, dict]:
    response = await http.get(url)
    return response.status_code, response.json()


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def test_output_frames_are_read_only_while_still_the_newest() -> None:
    table = FrameTable.create(slots=2, resolution=64)
    try:
        first = np.full((64, 64, 3), 7, np.uint8)
        table.write_output(1, 5, first)
        assert np.array_equal(table.read_output(1, 5), first)
        table.write_output(1, 6, first + 1)
        assert table.read_output(1, 5) is None, "a superseded frame must not be read as if it were current"
        assert table.read_output(0, 5) is None, "slots are separate"
    finally:
        table.close()


@contextlib.asynccontextmanager
async def worker_beside_a_bare_engine(endpoint: str) -> AsyncIterator[tuple[ProcessEngineClient, zmq.asyncio.Socket]]:
    """A media worker's real engine client, started against a bare ROUTER socket standing in for the engine."""
    table = FrameTable.create(slots=1, resolution=64)
    info = ModelInfo(resolution=64, default_params=EditParams(), guidance_ranges={}, presets=[])
    context = zmq.asyncio.Context()
    engine = context.socket(zmq.ROUTER)
    engine.bind(endpoint)
    client = ProcessEngineClient(info, EngineAddress(endpoint, table.layout))
    try:
        await client.start()
        yield client, engine
    finally:
        await client.shutdown()
        engine.close(0)
        context.term()
        table.close()


async def test_a_workers_hello_reaches_an_engine_that_has_not_beaten_yet(tmp_path) -> None:
    """A worker says Hello once its connection can carry it, so an engine that sends no Beat (one still loading, or
    one that just took another worker) hears it at once. Said on the bare connect, the Hello was dropped about half
    of the time and waited for a Beat to be said again. Five workers in turn."""
    for attempt in range(5):
        async with worker_beside_a_bare_engine(f"ipc://{tmp_path}/engine-{attempt}.sock") as (_, engine):
            deadline = time.monotonic() + 0.9  # under HELLO_REPEAT_S, and no Beat comes to prompt a repeat
            heard = []
            while not heard or not isinstance(heard[-1], m.Hello):
                left = deadline - time.monotonic()
                assert left > 0, f"worker {attempt}: no Hello within 0.9 s, only {heard}"
                with contextlib.suppress(TimeoutError):
                    heard.append(m.to_engine.decode((await asyncio.wait_for(engine.recv_multipart(), left))[1]))


async def test_a_worker_that_stops_says_goodbye(tmp_path) -> None:
    """A media worker's clean stop tells the engine, which then forgets it at INFO, not with the warning it gives a
    worker that vanished (every Ctrl-C of the service used to log one per worker)."""
    heard: list[object] = []
    async with worker_beside_a_bare_engine(f"ipc://{tmp_path}/engine.sock") as (client, engine):
        identity, data = await asyncio.wait_for(engine.recv_multipart(), 10)
        heard.append(m.to_engine.decode(data))
        await engine.send_multipart([identity, m.encoder.encode(m.Welcome(incarnation=1))])
        await wait_for(lambda: client.welcomed, 10, "the Welcome")
        stopping = asyncio.ensure_future(client.shutdown())  # the context's own shutdown then does nothing
        deadline = time.monotonic() + 5
        while not any(isinstance(msg, m.Goodbye) for msg in heard):
            assert time.monotonic() < deadline, f"no Goodbye, only {heard}"
            with contextlib.suppress(TimeoutError):
                heard.append(m.to_engine.decode((await asyncio.wait_for(engine.recv_multipart(), 1))[1]))
        await stopping


async def test_a_welcome_before_the_first_beat_is_word_from_the_engine(tmp_path) -> None:
    """A worker restarted next to a running engine can be welcomed before the engine's next Beat; it must not take
    that engine for silent (it once did: 'engine lost' a moment after every such restart)."""
    async with worker_beside_a_bare_engine(f"ipc://{tmp_path}/engine.sock") as (client, engine):
        # Its first message (a Hello, or a Ping: a Hello sent before the connection's handshake is dropped, and said
        # again when a Beat shows it unanswered) names the worker; the Welcome goes back before any Beat.
        identity, data = await asyncio.wait_for(engine.recv_multipart(), 10)
        assert isinstance(m.to_engine.decode(data), m.Hello | m.Ping)
        await engine.send_multipart([identity, m.encoder.encode(m.Welcome(incarnation=1))])
        await wait_for(lambda: client.welcomed, 10, "the Welcome")
        now = time.monotonic()
        assert not client.engine_silent(now), "a Welcome is word from the engine"
        assert client.engine_silent(now + BEAT_TIMEOUT_S + 1), "silence after it still counts"


async def test_a_killed_engine_is_noticed_at_once_and_replaced_while_sessions_keep_streaming(clip_frames) -> None:
    async with running_server(max_batch=4) as srv:
        a = await srv.open_session(clip_frames)
        b = await srv.open_session(clip_frames, edit={"prompt": "make it sepia"})
        await wait_for(lambda: len(a.received) >= 10 and len(b.received) >= 10, 40, "edited frames on both")
        launcher = srv.app.state.engine.launcher
        old_pid = launcher.pid
        os.kill(old_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while (await srv.http.get(f"{srv.url}/readyz")).status_code != 503:
            assert time.monotonic() - killed_at < 1.0, "the engine's death went unnoticed for a second"
            await asyncio.sleep(0.02)
        noticed_s = time.monotonic() - killed_at
        metrics = (await srv.http.get(f"{srv.url}/metrics")).text
        assert metric(metrics, "streamedit_engine_up") == 0.0
        assert metric(metrics, "streamedit_engine_losses_total") == 1.0
        # Both sessions keep their connection and get their camera back unedited meanwhile.
        counts = len(a.received), len(b.received)
        await wait_for(
            lambda: len(a.received) >= counts[0] + 10 and len(b.received) >= counts[1] + 10, 20, "frames meanwhile"
        )
        for session in (a, b):
            stats = (await session.info())["stats"]
            assert stats["state"] == "connected" and stats["unedited"] >= 10, stats
        # A new prompt while no engine is there: taken, and not read yet.
        patched = await b.patch(prompt="make it a pencil sketch")
        assert patched.status_code == 200 and patched.json()["reading"] is None, patched.text
        # A new engine process comes up, takes both streams back, and edits resume untouched by the clients.
        deadline = time.monotonic() + 90
        while (await srv.http.get(f"{srv.url}/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "no new engine within 90 s"
            await asyncio.sleep(0.1)
        assert launcher.pid != old_pid
        edited = [(await s.info())["stats"]["frames_edited"] for s in (a, b)]

        async def edited_again() -> bool:
            now = [(await s.info())["stats"]["frames_edited"] for s in (a, b)]
            return all(n >= e + 10 for n, e in zip(now, edited, strict=True))

        deadline = time.monotonic() + 30
        while not await edited_again():
            assert time.monotonic() < deadline, "edits did not resume on both sessions"
            await asyncio.sleep(0.2)
        info = await b.info()
        assert info["edit"]["prompt"] == "make it a pencil sketch", "the new engine must take the session's own params"
        assert info["reading"][0]["edit"] == "pencil_sketch", "the new engine must say how it read that prompt"
        metrics = (await srv.http.get(f"{srv.url}/metrics")).text
        assert metric(metrics, "streamedit_engine_up") == 1.0
        assert metric(metrics, "streamedit_engine_restarts") == 1.0
        print(f"engine death noticed after {noticed_s * 1000:.0f} ms")


@contextlib.asynccontextmanager
async def two_media_workers(max_sessions: int) -> AsyncIterator[tuple[str, str, httpx.AsyncClient]]:
    """One engine process and two media workers (two uvicorn servers on their own ports) connected to it."""
    spec = EngineSpec(backend="torch", threads=2)
    launcher = launch_engine(spec, slots=max_sessions)
    servers, tasks, urls = [], [], []
    try:
        for index in range(2):
            port = free_port()
            settings = Settings(host="127.0.0.1", port=port, backend="torch", threads=2, max_sessions=max_sessions)
            app = create_app(settings, engine=connect_engine(spec, launcher.address), worker_name=str(index))
            server = uvicorn.Server(
                uvicorn.Config(app, host="127.0.0.1", port=port, loop="asyncio", log_level="warning")
            )
            servers.append(server)
            tasks.append(asyncio.create_task(server.serve()))
            urls.append(f"http://127.0.0.1:{port}")
        pin_loopback_candidates()
        async with httpx.AsyncClient(timeout=20) as http:
            deadline = time.monotonic() + 90
            for url in urls:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(f"{url}/readyz")).status_code == 200:
                            break
                    assert time.monotonic() < deadline, "the media workers never became ready"
                    await asyncio.sleep(0.1)
            yield urls[0], urls[1], http
    finally:
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(launcher.stop)


async def test_a_session_opened_through_one_media_worker_is_patched_and_deleted_through_another(clip_frames) -> None:
    async with two_media_workers(max_sessions=3) as (url_a, url_b, http):
        session = EditSession(url_a, ClipTrack(clip_frames), http)
        assert (await session.open({"prompt": "make it sepia"})).status_code == 201
        try:
            await wait_for(lambda: len(session.received) >= 5, 30, "frames through worker A")
            via_b = f"{url_b}/v1/sessions/{session.session_id}"
            response = await http.get(via_b, headers=session.auth)
            assert response.status_code == 200 and response.headers["X-StreamEdit-Worker"] == "1"
            assert response.json()["stats"]["frames_edited"] >= 5, "worker B answers with worker A's live stats"
            assert (
                await http.patch(via_b, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
            ).status_code == 403
            assert (await http.patch(via_b, json={"prompt": "x"})).status_code == 401
            patched = await http.patch(via_b, json={"prompt": "make it a pencil sketch"}, headers=session.auth)
            assert patched.status_code == 200, patched.text
            assert (await session.info())["edit"]["prompt"] == "make it a pencil sketch"
            # The engine's reading of the new prompt comes back through the worker that routed the call.
            assert patched.json()["reading"][0]["edit"] == "pencil_sketch"
            # A session whose peer is still connecting holds no slot, yet calls for it are routed too.
            ghost, sdp = await unanswered_offer(clip_frames)
            pending = await http.post(f"{url_a}/v1/sessions", json={"sdp": sdp})
            await ghost.close()
            assert pending.status_code == 201, pending.text
            token = {"Authorization": f"Bearer {pending.json()['token']}"}
            routed = await http.get(f"{url_b}/v1/sessions/{pending.json()['session_id']}", headers=token)
            assert routed.status_code == 200 and routed.json()["stats"]["state"] in ("new", "connecting")
            assert routed.json()["reading"] is None  # no stream yet: the engine has not read its prompt
            # Admission counts both workers' connected sessions: 1 on A + 2 on B fill 3 slots.
            others = [EditSession(url_b, ClipTrack(clip_frames), http) for _ in range(3)]
            statuses = []
            for other in others:
                statuses.append((await other.open()).status_code)
                if statuses[-1] == 201:
                    await wait_for(lambda o=other: len(o.received) >= 1, 30, "the session to connect")
            assert statuses == [201, 201, 503], statuses
            # Worker A learns the engine's free slots from its heartbeat (every 0.25 s), so its probe may
            # lag B's admission by a beat or two on a busy machine; it must turn within a few.
            deadline = time.monotonic() + 3.0
            while (await http.get(f"{url_a}/readyz")).status_code != 503:
                assert time.monotonic() < deadline, "worker A's /readyz still says ready 3 s after the engine filled"
                await asyncio.sleep(0.05)
            for other in others[:2]:
                await other.close()
            assert (await http.delete(via_b, headers=session.auth)).status_code == 204
            assert (await http.get(f"{url_a}/v1/sessions/{session.session_id}")).status_code == 404
            assert (await http.get(via_b, headers=session.auth)).status_code == 404
            assert (await http.get(f"{url_b}/v1/sessions/no-such-session")).status_code == 404
        finally:
            await session.close(delete=False)


def shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}


def child_processes() -> set[int]:
    """This process's children, less multiprocessing's resource tracker (one per process tree, by design)."""
    children: set[int] = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            children.update(int(pid) for pid in f.read().split())
    return {pid for pid in children if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()}


def native_threads() -> int:
    """Threads Python's threading module does not own: codec and scaler pools (asyncio's executor, which aiortc
    encodes on, is a bounded pool of Python threads that may grow when two encodes overlap)."""
    return len(os.listdir(f"/proc/{os.getpid()}/task")) - threading.active_count()


def open_fds() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


@pytest.mark.slow
async def test_fifty_sessions_opened_and_closed_leak_no_segment_process_or_descriptor(clip_frames) -> None:
    before_shm = shm_segments()
    async with running_server() as srv:
        engine_children = child_processes()
        for cycle in range(50):
            session = await srv.open_session(clip_frames[:10])
            await wait_for(lambda s=session: len(s.received) >= 1, 20, f"a frame in cycle {cycle}")
            assert (await session.close()).status_code == 204
            srv.sessions.remove(session)
            if cycle == 4:  # after a warm-up: sockets and pools the first sessions create stay for reuse
                await asyncio.sleep(0.5)
                gc.collect()
                fds_after_warmup, threads_after_warmup = open_fds(), native_threads()
            elif cycle > 4:  # freed at close, not by the garbage collector (codec and scaler threads were not)
                await asyncio.sleep(0.2)
                assert native_threads() <= threads_after_warmup, f"cycle {cycle}: {native_threads()} threads"
        await asyncio.sleep(1.0)
        gc.collect()
        assert len(srv.registry) == 0
        assert child_processes() == engine_children, "a session left a process behind"
        assert open_fds() <= fds_after_warmup + 2, f"descriptors grew: {fds_after_warmup} → {open_fds()}"
        assert shm_segments() - before_shm == {srv.app.state.engine.table.layout.name}
    assert shm_segments() == before_shm, "the frame table outlived the server"
    assert child_processes() == set(), "the engine process outlived the server"


async def test_serve_runs_the_engine_and_two_media_workers_on_one_port_and_ctrl_c_stops_them_cleanly(
    clip_frames, tmp_path
) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    command = [sys.executable, "-m", "streamedit.cli", "serve", "--port", str(port), "--media-workers", "2"]
    command += ["--backend", "torch", "--threads", "1", "--max-sessions", "4"]
    # Its own process group, as a terminal gives it: Ctrl-C sends SIGINT to the whole group.
    server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    pin_loopback_candidates()
    try:
        # Fresh connections spread over both workers (SO_REUSEPORT): see both answer.
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_keepalive_connections=0)) as fresh:
            deadline = time.monotonic() + 120
            workers: dict[str, int] = {}
            ready: set[str] = set()
            while len(workers) < 2 or len(ready) < 2:
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                with contextlib.suppress(httpx.HTTPError):
                    response = await fresh.get(f"{url}/healthz")
                    workers[response.headers["X-StreamEdit-Worker"]] = response.json()["pid"]
                    response = await fresh.get(f"{url}/readyz")
                    if response.status_code == 200:
                        ready.add(response.headers["X-StreamEdit-Worker"])
                await asyncio.sleep(0.1)
            sessions: dict[str, EditSession] = {}
            for _ in range(12):  # open until each worker holds one
                if len(sessions) == 2:
                    break
                session = EditSession(url, ClipTrack(clip_frames), fresh)
                response = await session.open()
                assert response.status_code == 201, response.text
                holder = response.headers["X-StreamEdit-Worker"]
                if holder in sessions:
                    await session.close()
                else:
                    sessions[holder] = session
            assert set(sessions) == {"0", "1"}
            await wait_for(lambda: all(len(s.received) >= 5 for s in sessions.values()), 60, "frames on both")
            # Any worker's /metrics adds up both workers' (prometheus_client's multiprocess mode).
            for _ in range(4):
                text = (await fresh.get(f"{url}/metrics")).text
                assert metric(text, "streamedit_active_sessions") == 2.0, text
                assert "streamedit_session_frames_in_total" not in text, "per-session series need one worker"
            for session in sessions.values():  # every call works whichever worker the connection reaches
                for _ in range(6):
                    assert (await session.info())["stats"]["frames_edited"] >= 1
                    assert (await session.patch(text_guidance=2.0)).status_code == 200
            # A media worker that dies takes only its own session with it.
            os.kill(workers["0"], signal.SIGKILL)
            survivor, lost = sessions["1"], sessions["0"]
            count = len(survivor.received)
            await wait_for(lambda: len(survivor.received) >= count + 20, 30, "the other worker's session to go on")
            deadline = time.monotonic() + 30
            while (await fresh.get(f"{url}/v1/sessions/{lost.session_id}")).status_code != 404:
                assert time.monotonic() < deadline, "the dead worker's session is still listed"
                await asyncio.sleep(0.2)
            assert (await survivor.info())["stats"]["state"] == "connected"
            for session in sessions.values():
                await session.close(delete=False)
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C
        try:
            code = server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "media worker 0" in text and "exited with code -9" in text, text[-3000:]
    # The workers close their sessions, then the engine stops: no traceback, no engine taken for lost.
    assert code == 0 and "supervisor exited" in text, text[-3000:]
    assert "Traceback" not in text and "engine lost" not in text, text[-3000:]
    assert not re.search(r"engine process \d+ \(pid \d+\) exited", text), "the engine died before it was stopped"
    # The two workers alive at Ctrl-C said goodbye; only the killed one was taken for gone.
    assert text.count("stopped: closing its") == 2 and text.count("is gone: closing its") <= 1, text[-3000:]
