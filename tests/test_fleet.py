"""The local fleet: real replicas (`streamedit serve --replica`), Debian's nginx routing by replica name and
coturn relaying media, all on 127.0.0.1, driven by real aiortc clients through the proxy's one URL."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from fleet.local import FleetConfig, LocalFleet, ensure_proxy_tools
from fleet.routing import Replica, local_nginx_config, replica_of
from loadtest.client import ClipTrack, EditSession, pin_loopback_candidates
from loadtest.report import render_summary
from loadtest.run import LoadConfig, run_step
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    try:
        ensure_proxy_tools()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    workdir = tmp_path_factory.mktemp("fleet")
    config = FleetConfig(
        replicas=2,
        port=free_port(),
        first_replica_port=two_free_ports(),
        first_udp_port=45000,
        udp_ports_per_replica=50,
        turn_port=free_port(),
        replica_args=["--resolution", "64", "--backend", "torch", "--threads", "1", "--media-workers", "1"]
        + ["--max-sessions", "1", "--connect-timeout-s", "10"],
    )
    with LocalFleet(config, workdir=workdir) as running:
        yield running


def two_free_ports() -> int:
    """A port p such that p and p + 1 are both free (the replicas' HTTP ports)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


def rejected(fleet: LocalFleet, name: str) -> float:
    text = httpx.get(f"{fleet.replica_url(name)}/metrics", timeout=5).text
    return float(re.search(r"^streamedit_sessions_rejected_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def wait_until_every_replica_has_room(fleet: LocalFleet) -> None:
    """A closed session's slot frees once its replica has closed the peer and the engine's heartbeat says so."""
    deadline = time.monotonic() + 20
    for name in fleet.replicas:
        while httpx.get(f"{fleet.replica_url(name)}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, f"{name} still full 20 s after its sessions closed"
            time.sleep(0.1)


@pytest.fixture(autouse=True)
def _room_on_every_replica(request: pytest.FixtureRequest) -> None:
    if "fleet" in request.fixturenames:
        wait_until_every_replica_has_room(request.getfixturevalue("fleet"))


async def connected(session: EditSession) -> None:
    await wait_for(lambda: len(session.received) >= 2, 30, f"frames of {session.session_id}")


async def one_on_each_replica(fleet: LocalFleet, clip_frames, http: httpx.AsyncClient) -> list[EditSession]:
    """Two streaming sessions; with --max-sessions 1 they sit on different replicas."""
    sessions = []
    for _ in range(2):
        session = EditSession(fleet.url, ClipTrack(clip_frames), http)
        assert (await session.open()).status_code == 201
        await connected(session)
        sessions.append(session)
    return sessions


def test_the_fleet_command_starts_from_one_line_and_stops_everything_on_sigterm(tmp_path) -> None:
    try:
        ensure_proxy_tools()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    port, replica_port, turn_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "streamedit.cli", "fleet", "--replicas", "1", "--port", str(port)]
    argv += ["--first-replica-port", str(replica_port), "--first-udp-port", "45500", "--turn-port", str(turn_port)]
    argv += ["--log-dir", str(tmp_path), "--", "--resolution", "64", "--backend", "torch", "--threads", "1"]
    argv += ["--media-workers", "1"]
    fleet_process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = fleet_process.stdout.readline()  # type: ignore[union-attr]
        assert f"fleet on http://127.0.0.1:{port}" in banner, banner + (tmp_path / "streamedit-0.log").read_text()
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status_code == 200 and health.headers["X-StreamEdit-Replica"] == "streamedit-0"
    finally:
        fleet_process.send_signal(signal.SIGTERM)
        assert fleet_process.wait(60) == 0
    for url in (f"http://127.0.0.1:{port}/healthz", f"http://127.0.0.1:{replica_port}/healthz"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
    # The replica stopped in order (media worker, then engine): its log names no error and holds no traceback.
    replica_log = (tmp_path / "streamedit-0.log").read_text()
    assert "supervisor exited" in replica_log, replica_log[-3000:]
    assert " ERROR " not in replica_log and "Traceback" not in replica_log, replica_log[-3000:]


def test_the_fleet_command_refuses_bad_arguments_with_a_message() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streamedit.cli", "fleet", "--replicas", "0"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "--replicas must be at least 1" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_routing_rule_and_its_nginx_config() -> None:
    assert replica_of("/v1/sessions/streamedit-1.0a1b2c") == "streamedit-1"
    assert replica_of("/v1/sessions") is None and replica_of("/v1/sessions/0a1b2c") is None
    with pytest.raises(ValueError, match="DNS label"):
        Replica("Bad_Name", "127.0.0.1:1")
    with pytest.raises(ValueError, match="repeat"):
        local_nginx_config([Replica("a", "127.0.0.1:1"), Replica("a", "127.0.0.1:2")], "127.0.0.1:3", "/p", "/t")


async def test_sessions_spread_and_a_full_replicas_503_passes_to_the_other(fleet: LocalFleet, clip_frames) -> None:
    pin_loopback_candidates()
    async with httpx.AsyncClient(timeout=20) as http:
        first = EditSession(fleet.url, ClipTrack(clip_frames), http)
        response = await first.open()
        assert response.status_code == 201, response.text
        owner = response.headers["X-StreamEdit-Replica"]
        assert first.session_id.startswith(f"{owner}.")
        await connected(first)
        other = next(n for n in fleet.replicas if n != owner)
        full_before = rejected(fleet, owner)
        try:
            # Round robin sends about every other new session to the full replica first; nginx passes its
            # 503 on, and the client sees only the 201 of the other.
            for _ in range(4):
                session = EditSession(fleet.url, ClipTrack(clip_frames), http)
                response = await session.open()
                assert response.status_code == 201, response.text
                assert replica_of(f"/v1/sessions/{session.session_id}") == other
                await connected(session)
                await session.close()
                await asyncio.sleep(0.5)  # the slot frees when the replica has closed the peer
            assert rejected(fleet, owner) > full_before, "no new session ever met the full replica's 503"
            # Both full: nginx has tried each, and the client gets a 503 with Retry-After.
            blocker = EditSession(fleet.url, ClipTrack(clip_frames), http)
            assert (await blocker.open()).status_code == 201
            await connected(blocker)
            extra = EditSession(fleet.url, ClipTrack(clip_frames), http)
            refused = await extra.open()
            assert refused.status_code == 503 and "Retry-After" in refused.headers
            await blocker.close()
        finally:
            await first.close()


async def test_a_sessions_calls_reach_its_replica_and_its_token_is_checked_there(
    fleet: LocalFleet, clip_frames
) -> None:
    pin_loopback_candidates()
    async with httpx.AsyncClient(timeout=20) as http:
        a, b = await one_on_each_replica(fleet, clip_frames, http)
        try:
            owner_a = replica_of(f"/v1/sessions/{a.session_id}")
            assert owner_a != replica_of(f"/v1/sessions/{b.session_id}"), "max-sessions 1: one on each"
            url_a = f"{fleet.url}/v1/sessions/{a.session_id}"
            for _ in range(3):  # round robin would land half of these elsewhere if the rule were not applied
                got = await http.get(url_a, headers=a.auth)
                assert got.status_code == 200 and got.headers["X-StreamEdit-Replica"] == owner_a
            patched = await http.patch(url_a, json={"prompt": "make it a pencil sketch"}, headers=a.auth)
            assert patched.status_code == 200, patched.text
            assert (await http.patch(url_a, json={"prompt": "x"}, headers=b.auth)).status_code == 403
            assert (await http.get(url_a)).status_code == 401
            unknown = await http.get(f"{fleet.url}/v1/sessions/nosuch-replica.0a1b")
            assert unknown.status_code == 502 and "nosuch-replica" in unknown.text
            missing = await http.get(f"{fleet.url}/v1/sessions/{owner_a}.0a1b", headers=a.auth)
            assert missing.status_code == 404 and missing.headers["X-StreamEdit-Replica"] == owner_a
            deleted = await http.delete(url_a, headers=a.auth)
            assert deleted.status_code == 204
            assert (await http.get(url_a, headers=a.auth)).status_code == 404
        finally:
            await a.close(delete=False)
            await b.close()


def test_the_load_tester_drives_the_fleet_through_the_proxy_and_reports_each_replica(fleet: LocalFleet) -> None:
    pin_loopback_candidates()
    config = LoadConfig(url=fleet.url, sessions=2, duration_s=8, warmup_s=3, ramp_per_s=1, fps=15, width=64, height=64)
    step = run_step(config)
    assert step["connected"] == 2, step["per_session"]
    assert sorted(step["per_replica"]) == sorted(fleet.replicas), "max-sessions 1: one session on each replica"
    assert all(r["sessions"] == 1 and r["distinct_fps_mean"] > 0 for r in step["per_replica"].values())
    # Media bandwidth is measured from the peer connection's RTP stats, both ways.
    assert all(s["kbps_received"] > 0 and s["kbps_sent"] > 0 for s in step["per_session"])
    assert "kbps/session" in render_summary(step)
    summary = render_summary(step)
    assert all(f"replica {name}: 1 sessions" in summary for name in fleet.replicas)


async def test_a_relay_only_client_gets_its_frames_through_coturn(fleet: LocalFleet, clip_frames) -> None:
    turn = fleet.config.turn_server()
    relay_only = RTCConfiguration(
        iceServers=[RTCIceServer(urls=turn["urls"], username=turn["username"], credential=turn["credential"])],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    )
    async with httpx.AsyncClient(timeout=20) as http:
        session = EditSession(fleet.url, ClipTrack(clip_frames), http, rtc_configuration=relay_only)
        response = await session.open()
        assert response.status_code == 201, response.text
        try:
            await connected(session)
            pair = session.pc.getTransceivers()[0].receiver.transport.transport.iceGatherer  # type: ignore[union-attr]
            local = [c for c in pair.getLocalCandidates()]
            assert local and all(c.type == "relay" for c in local), [c.type for c in local]
        finally:
            await session.close()


async def test_killing_a_replica_leaves_the_others_sessions_streaming(fleet: LocalFleet, clip_frames) -> None:
    pin_loopback_candidates()
    async with httpx.AsyncClient(timeout=20) as http:
        a, b = await one_on_each_replica(fleet, clip_frames, http)
        victim = replica_of(f"/v1/sessions/{a.session_id}")
        survivor = replica_of(f"/v1/sessions/{b.session_id}")
        assert victim and survivor and victim != survivor
        fleet.kill(victim)
        before = len(b.received)
        await wait_for(lambda: len(b.received) >= before + 10, 20, "the survivor's session to keep streaming")
        gone = await http.get(f"{fleet.url}/v1/sessions/{a.session_id}", headers=a.auth)
        assert gone.status_code == 502
        await b.close()
        await a.close(delete=False)
        await asyncio.sleep(0.5)
        for _ in range(3):
            fresh = EditSession(fleet.url, ClipTrack(clip_frames), http)
            response = await fresh.open()
            assert response.status_code == 201, response.text
            assert response.headers["X-StreamEdit-Replica"] == survivor
            await connected(fresh)
            await fresh.close()
            await asyncio.sleep(0.5)
