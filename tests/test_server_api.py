"""The control plane over a real server: validation, tokens, admission, reaping, health and metrics."""

from __future__ import annotations

import asyncio
import gc
import logging

import httpx
from aiortc import RTCConfiguration, RTCPeerConnection

from loadtest.client import ClipTrack, EditSession
from server.app import _supervised, create_app
from server.settings import Settings
from tests.conftest import running_server, unanswered_offer, wait_for
from tests.engine_doubles import GatedUntilFile


def open_peer_connections() -> list[RTCPeerConnection]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, RTCPeerConnection) and o.connectionState != "closed"]


async def test_malformed_sdp_gets_400_and_leaks_no_peer_connection() -> None:
    async with running_server() as srv:
        before = len(open_peer_connections())
        for sdp in ["this is not sdp", "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video"]:
            response = await srv.http.post(f"{srv.url}/v1/sessions", json={"sdp": sdp, "type": "offer"})
            assert response.status_code == 400, response.text
            assert "SDP" in response.json()["detail"] or "offer" in response.json()["detail"]
        assert len(srv.registry) == 0
        assert len(open_peer_connections()) == before


async def test_offer_without_video_gets_400_and_leaks_no_peer_connection() -> None:
    async with running_server() as srv:
        before = len(open_peer_connections())
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.createDataChannel("x")
        await pc.setLocalDescription(await pc.createOffer())
        response = await srv.http.post(f"{srv.url}/v1/sessions", json={"sdp": pc.localDescription.sdp})
        await pc.close()
        assert response.status_code == 400
        assert "video" in response.json()["detail"]
        assert len(srv.registry) == 0
        assert len(open_peer_connections()) == before


async def test_invalid_params_get_422_with_a_message(clip_frames) -> None:
    async with running_server() as srv:
        bad_posts = [
            {"sdp": "x", "type": "offer", "edit": {"text_guidance": 99}},
            {"sdp": "x", "type": "offer", "edit": {"prompt": ""}},
            {"sdp": "x", "type": "offer", "edit": {"prompt": "x" * 301}},
            {"sdp": "x", "type": "offer", "edit": {"seed": "not a number"}},
            {"sdp": "x", "type": "offer", "edit": {"no_such_knob": 1}},
            {"sdp": "x", "type": "answer"},
            {"type": "offer"},
        ]
        for body in bad_posts:
            response = await srv.http.post(f"{srv.url}/v1/sessions", json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["detail"], body
        session = await srv.open_session(clip_frames)
        for patch in [{"image_guidance": -1}, {"latent_feedback": 2}, {"max_skipped_frames": 0}, {"prompt": 5}]:
            response = await session.patch(**patch)
            assert response.status_code == 422, (patch, response.text)
        assert (await session.info())["edit"] == session.edit  # nothing changed


async def test_tokens_protect_each_session(clip_frames) -> None:
    async with running_server() as srv:
        a = await srv.open_session(clip_frames, edit={"prompt": "make it sepia"})
        b = await srv.open_session(clip_frames, edit={"prompt": "make it a pencil sketch"})
        url = f"{srv.url}/v1/sessions/{a.session_id}"
        foreign = {"Authorization": f"Bearer {b.token}"}
        assert (await srv.http.patch(url, json={"prompt": "hacked"}, headers=foreign)).status_code == 403
        assert (await srv.http.patch(url, json={"prompt": "hacked"})).status_code == 401
        basic = {"Authorization": "Basic x"}
        assert (await srv.http.patch(url, json={"prompt": "hacked"}, headers=basic)).status_code == 401
        assert (await srv.http.delete(url, headers=foreign)).status_code == 403
        assert (await a.info())["edit"]["prompt"] == "make it sepia"
        assert (await b.info())["edit"]["prompt"] == "make it a pencil sketch"
        response = await a.patch(prompt="make it look like an old photograph", seed=7)
        assert response.status_code == 200
        assert response.json()["edit"]["seed"] == 7
        assert (await b.info())["edit"]["seed"] == 0
        assert (await srv.http.get(f"{srv.url}/v1/sessions/nope")).status_code == 404
        assert (await a.close()).status_code == 204
        assert (await srv.http.get(url)).status_code == 404
        assert len(srv.registry) == 1


async def test_session_limit_answers_503_with_retry_after(clip_frames) -> None:
    async with running_server(max_sessions=1, retry_after_s=3) as srv:
        first = await srv.open_session(clip_frames)
        await wait_for(lambda: len(first.received) >= 1, 20, "the first session to connect and stream")
        assert (await srv.http.get(f"{srv.url}/readyz")).status_code == 503
        extra = EditSession(srv.url, ClipTrack(clip_frames), srv.http)
        response = await extra.open()
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "3"
        assert "full" in response.json()["detail"]
        metrics = (await srv.http.get(f"{srv.url}/metrics")).text
        assert "streamedit_sessions_rejected_total 1.0" in metrics


async def test_offers_that_never_connect_cannot_lock_out_a_real_session(clip_frames) -> None:
    # Before: 4 unanswered offers held all 4 slots of a default server for 15 s.
    async with running_server(max_sessions=1, max_pending=3, connect_timeout_s=3.0) as srv:
        ghosts = [await unanswered_offer(clip_frames) for _ in range(4)]
        statuses = []
        for _, sdp in ghosts:
            statuses.append(await srv.http.post(f"{srv.url}/v1/sessions", json={"sdp": sdp}))
        assert [r.status_code for r in statuses] == [201, 201, 201, 503]
        assert "waiting for their peers" in statuses[3].json()["detail"]
        assert statuses[3].headers["Retry-After"] == "1"
        assert (await srv.http.get(f"{srv.url}/readyz")).json()["capacity_left"] == 1, "pending offers hold no slot"
        assert "streamedit_pending_sessions 3.0" in (await srv.http.get(f"{srv.url}/metrics")).text
        await wait_for(lambda: srv.registry.pending() == 0, 8, "the unanswered offers to be reaped")
        real = await srv.open_session(clip_frames)
        await wait_for(lambda: len(real.received) >= 3, 20, "the real session to stream")
        for pc, _ in ghosts:
            await pc.close()


async def test_a_burst_of_garbage_offers_is_refused_as_bad_not_as_full(clip_frames) -> None:
    # Before: 196 of 200 garbage offers were told "server full" while no session was open.
    async with running_server(max_sessions=1) as srv:
        replies = await asyncio.gather(
            *(srv.http.post(f"{srv.url}/v1/sessions", json={"sdp": f"v=0 garbage {i}"}) for i in range(60))
        )
        assert all(r.status_code in (400, 503) for r in replies), {r.status_code for r in replies}
        assert not any("full" in r.json()["detail"] for r in replies)
        assert sum(r.status_code == 400 for r in replies) >= 8
        session = await srv.open_session(clip_frames)
        await wait_for(lambda: len(session.received) >= 1, 20, "a session right after the burst")


async def test_sessions_that_never_connect_or_whose_peer_leaves_are_reaped(clip_frames) -> None:
    async with running_server(connect_timeout_s=2.0) as srv:
        pc, sdp = await unanswered_offer(clip_frames)
        response = await srv.http.post(f"{srv.url}/v1/sessions", json={"sdp": sdp})
        assert response.status_code == 201
        ghost = response.json()["session_id"]
        # A session whose client closes its peer connection without DELETE.
        leaver = await srv.open_session(clip_frames)
        await wait_for(lambda: len(leaver.received) > 3, 20, "frames on the leaving session")
        await leaver.pc.close()
        await wait_for(lambda: len(srv.registry) == 0, 8, "both sessions to be reaped")
        assert (await srv.http.get(f"{srv.url}/v1/sessions/{ghost}")).status_code == 404
        await pc.close()


async def test_a_peer_whose_camera_goes_silent_is_reaped_fast(clip_frames) -> None:
    async with running_server(camera_timeout_s=2.0) as srv:
        frozen = await srv.open_session(clip_frames)  # as a client killed outright: no BYE, no ICE failure yet
        await wait_for(lambda: len(frozen.received) > 3, 20, "frames before the camera stops")
        frozen.source.stop()
        stopped = asyncio.get_running_loop().time()
        await wait_for(lambda: len(srv.registry) == 0, 8, "the silent session to be reaped")
        assert asyncio.get_running_loop().time() - stopped < 5.0


async def test_health_readiness_and_metrics(clip_frames, tmp_path) -> None:
    gate = tmp_path / "loaded"  # the engine process finishes loading only when the test creates this file
    app = create_app(Settings(backend="torch", threads=2), editor_factory=GatedUntilFile(gate))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            assert (await http.get("/healthz")).json()["status"] == "ok"
            loading = await http.get("/readyz")
            assert loading.status_code == 503 and loading.json()["ready"] is False
            offer = await http.post("/v1/sessions", json={"sdp": "x"})
            assert offer.status_code == 503 and "Retry-After" in offer.headers
            gate.touch()
            for _ in range(1200):
                if (await http.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            ready = (await http.get("/readyz")).json()
            assert ready["ready"] is True and ready["capacity_left"] == 4

    async with running_server(metrics_per_session=True) as srv:
        session = await srv.open_session(clip_frames)
        await wait_for(lambda: len(session.received) >= 10, 20, "frames")
        text = (await srv.http.get(f"{srv.url}/metrics")).text
        for name in [
            "streamedit_active_sessions 1.0",
            f'streamedit_session_frames_edited_total{{session="{session.session_id}"}}',
            "streamedit_frames_edited_total",
            f'streamedit_session_edited_fps{{session="{session.session_id}"}}',
            "streamedit_edited_fps",
            "streamedit_capture_to_send_seconds_bucket",
            "streamedit_batch_size_bucket",
            "streamedit_engine_batch_seconds_bucket",
            "streamedit_frames_dropped_total",
        ]:
            assert name in text, name
        await session.close()
        text = (await srv.http.get(f"{srv.url}/metrics")).text
        assert "streamedit_active_sessions 0.0" in text
        assert session.session_id not in text


async def test_page_and_openapi_are_served() -> None:
    async with running_server() as srv:
        page = await srv.http.get(f"{srv.url}/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        schema = (await srv.http.get(f"{srv.url}/openapi.json")).json()
        edit = schema["components"]["schemas"]["EditParams"]["properties"]
        assert edit["text_guidance"]["maximum"] == 20.0 and "description" in edit["image_guidance"]


async def test_ice_binds_inside_the_configured_udp_port_range(clip_frames) -> None:
    async with running_server(udp_ports="41000-41031") as srv:
        session = await srv.open_session(clip_frames)
        await wait_for(lambda: len(session.received) >= 3, 20, "frames over the restricted ports")
        answer = session.pc.remoteDescription.sdp
        ports = [int(line.split()[5]) for line in answer.splitlines() if line.startswith("a=candidate:")]
        assert ports and all(41000 <= p <= 41031 for p in ports), ports
        assert all(" 127.0.0.1 " in line for line in answer.splitlines() if line.startswith("a=candidate:"))


async def test_sessions_start_from_the_models_defaults_and_presets_say_them(clip_frames) -> None:
    async with running_server() as srv:
        info = (await srv.http.get(f"{srv.url}/v1/presets")).json()
        defaults, ranges = info["defaults"], info["ranges"]
        assert set(ranges) == {"text_guidance", "image_guidance"}
        assert ranges["text_guidance"][0] <= defaults["text_guidance"] <= ranges["text_guidance"][1]
        assert isinstance(info["presets"], list)
        session = await srv.open_session(clip_frames, edit={"prompt": "make it sepia", "seed": 4})
        assert session.edit["prompt"] == "make it sepia" and session.edit["seed"] == 4
        assert session.edit["text_guidance"] == defaults["text_guidance"]
        assert session.edit["image_guidance"] == defaults["image_guidance"]


async def test_readyz_reports_a_dead_engine_thread_and_an_ended_background_task() -> None:
    # Before: EngineWorker.exited was never read, and a reaper that ended left /readyz saying ready.
    async with running_server(engine="thread") as srv:
        assert (await srv.http.get(f"{srv.url}/readyz")).status_code == 200
        srv.app.state.engine.worker.stop()
        dead = await srv.http.get(f"{srv.url}/readyz")
        assert dead.status_code == 503 and "engine thread exited" in dead.json()["reason"]
    async with running_server() as srv:
        reaper = srv.app.state.tasks["reaper"]
        reaper.cancel()
        await asyncio.gather(reaper, return_exceptions=True)
        ended = await srv.http.get(f"{srv.url}/readyz")
        assert ended.status_code == 503 and "reaper" in ended.json()["reason"]


async def test_a_background_task_that_crashes_is_restarted_and_logged(caplog) -> None:
    caplog.set_level(logging.INFO, logger="server.app")
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("boom")

    await asyncio.wait_for(_supervised("flaky", flaky), 5)
    assert len(runs) == 2, "restarted once after the crash, then ended normally"
    assert "task flaky crashed: restarting it" in caplog.text and "task flaky exited" in caplog.text
