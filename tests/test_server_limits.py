"""Hostile and odd input over a real server: always a 4xx with a message, never a 5xx; privacy by default."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from loadtest.client import ClipTrack
from server.rate import OfferRateLimit
from tests.conftest import running_server


async def raw(http: httpx.AsyncClient, method: str, url: str, body: str, **headers: str) -> httpx.Response:
    """Send `body` as it is (json.dumps would refuse a lone surrogate or escape NaN away)."""
    return await http.request(method, url, content=body.encode("utf-8", "surrogatepass"), headers=headers)


async def test_unencodable_and_non_finite_input_gets_422_without_echo(clip_frames) -> None:
    async with running_server() as srv:
        session = await srv.open_session(clip_frames)
        url = f"{srv.url}/v1/sessions/{session.session_id}"
        auth = session.auth["Authorization"]
        cases = [
            ("PATCH", url, '{"prompt": "\\ud800 sketch"}'),  # a lone surrogate, escaped in JSON
            ("PATCH", url, '{"text_guidance": NaN}'),
            ("PATCH", url, '{"image_guidance": Infinity}'),
            ("PATCH", url, '{"\\udfff": 1}'),  # an unknown field whose name cannot be encoded
            ("POST", f"{srv.url}/v1/sessions", '{"sdp": 5, "edit": {"seed": -Infinity}}'),
        ]
        for method, target, body in cases:
            response = await raw(
                srv.http, method, target, body, **{"Content-Type": "application/json", "Authorization": auth}
            )
            assert response.status_code == 422, (body, response.status_code, response.text)
            detail = response.json()["detail"]
            assert detail and all({"loc", "msg", "type"} == set(d) for d in detail), detail
            assert "input" not in response.text
        assert (await session.info())["edit"] == session.edit, "nothing changed"


async def test_a_non_ascii_bearer_token_is_refused_not_crashed(clip_frames) -> None:
    async with running_server() as srv:
        session = await srv.open_session(clip_frames)
        url = f"{srv.url}/v1/sessions/{session.session_id}"
        for token in ["tökén", "\u2603" * 40]:
            headers = [(b"authorization", f"Bearer {token}".encode()), (b"content-type", b"application/json")]
            response = await srv.http.patch(url, content=b'{"seed": 1}', headers=headers)
            assert response.status_code == 403, response.text


async def test_bodies_over_the_limit_get_413_before_any_parsing(clip_frames) -> None:
    async with running_server(max_body_bytes=4096) as srv:
        session = await srv.open_session(clip_frames)
        url = f"{srv.url}/v1/sessions/{session.session_id}"
        big = json.dumps({"prompt": "x" * 10_000})
        for target in (url, f"{srv.url}/v1/sessions/not-a-session"):
            response = await srv.http.patch(target, content=big, headers=session.auth)
            assert response.status_code == 413 and "larger than 4096" in response.json()["detail"]
            assert len(response.content) < 200, "the body is never echoed"

        async def chunks():  # no Content-Length: the limit holds on the stream too
            for _ in range(10):
                yield b"x" * 1000

        response = await srv.http.patch(url, content=chunks(), headers=session.auth)
        assert response.status_code == 413


async def test_a_sessions_details_need_its_token_and_metrics_name_no_session(clip_frames) -> None:
    async with running_server() as srv:
        a = await srv.open_session(clip_frames, edit={"prompt": "make it sepia"})
        b = await srv.open_session(clip_frames)
        url = f"{srv.url}/v1/sessions/{a.session_id}"
        assert (await srv.http.get(url)).status_code == 401
        assert (await srv.http.get(url, headers=b.auth)).status_code == 403
        assert (await srv.http.get(url, headers=a.auth)).json()["edit"]["prompt"] == "make it sepia"
        metrics = (await srv.http.get(f"{srv.url}/metrics")).text
        assert a.session_id not in metrics and b.session_id not in metrics
        assert "streamedit_frames_in_total" in metrics


async def test_an_offer_with_two_video_tracks_gets_400(clip_frames) -> None:
    async with running_server() as srv:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(ClipTrack(clip_frames))
        pc.addTrack(ClipTrack(clip_frames))
        await pc.setLocalDescription(await pc.createOffer())
        response = await srv.http.post(f"{srv.url}/v1/sessions", json={"sdp": pc.localDescription.sdp})
        await pc.close()
        assert response.status_code == 400 and "exactly one camera track" in response.json()["detail"]
        assert len(srv.registry) == 0


async def test_the_schema_documents_every_status_and_metrics_as_text() -> None:
    async with running_server() as srv:
        schema = (await srv.http.get(f"{srv.url}/openapi.json")).json()
        paths = schema["paths"]
        assert set(paths["/v1/sessions"]["post"]["responses"]) >= {"201", "400", "413", "422", "503"}
        for method in ("get", "patch", "delete"):
            documented = set(paths["/v1/sessions/{session_id}"][method]["responses"])
            assert documented >= {"401", "403", "404", "413", "422", "503"}, (method, documented)
        assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
        assert "application/json" not in paths["/metrics"]["get"]["responses"]["200"]["content"]


async def test_camera_frames_of_absurd_shape_are_refused_before_scaling(clip_frames) -> None:
    sliver = [np.ascontiguousarray(np.resize(f, (16, 960, 3))) for f in clip_frames[:10]]  # 60:1
    async with running_server() as srv:
        session = await srv.open_session(sliver)
        deadline = asyncio.get_running_loop().time() + 20
        while (stats := (await session.info())["stats"])["refused"] < 10:
            assert asyncio.get_running_loop().time() < deadline, stats
            await asyncio.sleep(0.2)
        assert stats["frames_edited"] == 0 and stats["errors"] == 0
        assert (await srv.http.get(f"{srv.url}/readyz")).status_code == 200


async def test_blank_and_control_character_prompts_get_422(clip_frames) -> None:
    async with running_server() as srv:
        for prompt in ["   ", "\t\n", "make it\x00 sepia", "beep\x07"]:
            body = {"sdp": "x", "edit": {"prompt": prompt}}
            response = await srv.http.post(f"{srv.url}/v1/sessions", json=body)
            assert response.status_code == 422 and "prompt" in response.text, (prompt, response.text)
        session = await srv.open_session(clip_frames)
        for prompt in ["   ", "line\nbreak"]:
            response = await session.patch(prompt=prompt)
            assert response.status_code == 422, (prompt, response.text)
        assert (await session.info())["edit"]["prompt"] == session.edit["prompt"]


def test_the_offer_rate_limit_refills_per_client() -> None:
    limit = OfferRateLimit(per_minute=60, burst=2)  # a token a second
    assert [limit.take("a", now=100.0) for _ in range(2)] == [0.0, 0.0]
    assert limit.take("a", now=100.0) == pytest.approx(1.0)  # empty: one second to the next token
    assert limit.take("b", now=100.0) == 0.0, "another client has its own bucket"
    assert limit.take("a", now=100.5) == pytest.approx(0.5)
    assert limit.take("a", now=101.0) == 0.0
    assert limit.take("a", now=1000.0) == 0.0 and limit.take("a", now=1000.0) == 0.0, "refilled only to the burst"
    assert limit.take("a", now=1000.0) > 0


async def test_a_client_over_its_offer_rate_gets_429_with_retry_after() -> None:
    async with running_server(offers_per_minute=6, offer_burst=2) as srv:
        replies = [await srv.http.post(f"{srv.url}/v1/sessions", json={"sdp": "v=0 nonsense"}) for _ in range(3)]
        assert [r.status_code for r in replies] == [400, 400, 429]
        assert replies[2].headers["Retry-After"] == "10"
        assert "too many new sessions" in replies[2].json()["detail"]
