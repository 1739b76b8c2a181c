"""No session can slow another: prompt work off the frame path, latest wins, PATCH rate limits (issue 34).

The prompt worker and the cache on their own; then a real uvicorn server with real aiortc peers streaming a real
clip, the engine in its own process (and in-thread where the rules are the same).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from engines.prompts import SUPERSEDED, PreparedPrompt, PromptCache, PromptResult, PromptWorker
from server.camera import CameraBudget, CameraHint, DecodePriority
from server.cli import drop_rate_limited
from tests.conftest import running_server, wait_for
from tests.engine_doubles import SlowPrompts

THERMAL = "make it look like a thermal camera image"
CARTOON = "turn it into a cartoon"
SKETCH = "make it a pencil sketch"


def prepared(tag: float) -> PreparedPrompt:
    return PreparedPrompt(torch.full((1, 2), tag), None)


def test_the_prompt_cache_forgets_the_least_recently_used() -> None:
    cache = PromptCache(capacity=2)
    cache.put("a", prepared(1))
    cache.put("b", prepared(2))
    assert cache.get("a") is not None  # a is now the more recent
    cache.put("c", prepared(3))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.hits == 3 and cache.misses == 1


def test_a_newer_job_of_a_lane_supersedes_one_not_started_and_the_bound_counts_every_lane() -> None:
    release = threading.Event()
    started: list[list[str]] = []

    def prepare(prompts: list[str]) -> list[PreparedPrompt]:
        started.append(prompts)
        release.wait(5)
        return [prepared(len(p)) for p in prompts]

    results: dict[str, PromptResult] = {}
    done = threading.Event()

    def answer(name: str):
        def record(result: PromptResult) -> None:
            results[name] = result
            if len(results) == 4:
                done.set()

        return record

    worker = PromptWorker(prepare, max_jobs=3, cpu_share=1.0)
    try:
        assert worker.submit("a", ["first"], answer("first"))
        deadline = time.monotonic() + 5
        while not started and time.monotonic() < deadline:  # "first" is running, blocked in prepare
            time.sleep(0.005)
        assert worker.submit("a", ["second"], answer("second"))
        assert worker.submit("a", ["third"], answer("third"))  # replaces "second", which never starts
        assert results == {"second": SUPERSEDED}
        assert worker.submit("b", ["other"], answer("other"))
        assert worker.in_flight() == 3
        assert not worker.submit("c", ["too many"], answer("refused")), "past max_jobs a bounded job is refused"
        assert worker.submit("c", ["a stream's first"], answer("unbounded"), bounded=False)
        release.set()
        assert done.wait(5)
        assert started[0] == ["first"] and ["second"] not in started
        assert isinstance(results["first"], list) and isinstance(results["third"], list)
        assert "refused" not in results
    finally:
        release.set()
        worker.stop()


def test_one_encoder_pass_gives_context_and_reading_and_equal_texts_share_it(editor) -> None:
    base = editor.prompts.encoder.base
    calls: list[list[str]] = []
    original = base.encode

    def counted(prompts: list[str]) -> torch.Tensor:
        calls.append(list(prompts))
        return original(prompts)

    base.encode = counted
    try:
        prompt = "Make it look like  a THERMAL camera image, take 7"  # not seen by any other test
        first = editor.prepare_prompts([prompt])[0]
        assert len(calls) == 1, "the reading must come from the context's own pass"
        assert first.reading and first.reading[0][0] == "thermal"
        again = editor.cached_prompt("make it look like a thermal camera image, take 7")
        assert again is first, "case and spacing do not change what MiniLM (uncased) encodes"
        assert editor.read_prompt(prompt) == first.reading and len(calls) == 1
        assert torch.equal(editor.encode_prompt(prompt), first.context) and len(calls) == 1
    finally:
        base.encode = original


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["process", "thread"])
async def test_the_newest_prompt_wins_and_frames_flow_while_it_is_encoded(clip_frames, engine: str) -> None:
    async with running_server(SlowPrompts(0.6), engine=engine, prompt_cpu_share=1.0) as srv:
        session = await srv.open_session(clip_frames, edit={"prompt": SKETCH})
        await wait_for(lambda: len(session.received) >= 5, 30, "edited frames")
        before = len(session.received)
        started = time.monotonic()
        first = asyncio.create_task(session.patch(prompt=THERMAL + " at noon"))
        await asyncio.sleep(0.15)  # the first is being encoded now
        second = asyncio.create_task(session.patch(prompt="make it look like an old photograph, please"))
        await asyncio.sleep(0.15)
        third = asyncio.create_task(session.patch(prompt=CARTOON + " for kids", text_guidance=9.0))
        answers = [await t for t in (first, second, third)]
        took = time.monotonic() - started
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        outcomes = [a.json()["outcome"] for a in answers]
        assert outcomes == ["superseded", "superseded", "applied"], outcomes
        assert answers[2].json()["reading"][0]["edit"] == "cartoon"
        # Frames kept coming with the old prompt while two encodings ran (1.2 s at least).
        assert took >= 1.2 and len(session.received) - before >= 5, (took, len(session.received) - before)
        info = await session.info()
        assert info["edit"]["prompt"] == CARTOON + " for kids" and info["edit"]["text_guidance"] == 9.0
        assert info["reading"][0]["edit"] == "cartoon"
        if engine == "thread":  # the superseded prompt that had not started was never encoded
            encoded = srv.app.state.engine.worker.editor.encoded
            assert "make it look like an old photograph, please" not in encoded
            assert encoded.count(CARTOON + " for kids") == 1


@pytest.mark.slow
async def test_a_prompt_any_session_used_applies_without_an_encoding(clip_frames) -> None:
    async with running_server(SlowPrompts(0.3), engine="thread") as srv:
        one = await srv.open_session(clip_frames, edit={"prompt": THERMAL})
        two = await srv.open_session(clip_frames, edit={"prompt": SKETCH})
        await wait_for(lambda: len(one.received) >= 3 and len(two.received) >= 3, 30, "both sessions' frames")
        encoded = srv.app.state.engine.worker.editor.encoded
        count = len(encoded)
        response = await two.patch(prompt="  Make it look like a THERMAL camera image ")
        assert response.status_code == 200 and response.json()["outcome"] == "applied", response.text
        assert response.json()["reading"][0]["edit"] == "thermal"
        assert len(encoded) == count, f"encoded again: {encoded[count:]}"


@pytest.mark.slow
async def test_a_storming_session_gets_429_while_another_keeps_streaming(clip_frames) -> None:
    async with running_server(patch_rate=5, patch_burst=10) as srv:
        storming = await srv.open_session(clip_frames, edit={"prompt": SKETCH})
        victim = await srv.open_session(clip_frames, edit={"prompt": CARTOON})
        await wait_for(lambda: len(victim.received) >= 5 and len(storming.received) >= 5, 30, "frames")
        # Guidance only: the 200s cost no encoding, so what is measured is the limit, not the encoder.
        storm = [storming.patch(text_guidance=5.0 + k / 100) for k in range(40)]
        answers = await asyncio.gather(*storm)
        codes = [a.status_code for a in answers]
        assert set(codes) == {200, 429}, codes
        assert 10 <= codes.count(200) <= 13, codes  # the burst, and what refilled while the storm was sent
        for refused in (a for a in answers if a.status_code == 429):
            assert int(refused.headers["Retry-After"]) >= 1
            assert "too many changes" in refused.json()["detail"]
        # The victim's own bucket is untouched, and its frames kept coming.
        frames = len(victim.received)
        response = await victim.patch(text_guidance=8.0)
        assert response.status_code == 200 and response.json()["outcome"] == "applied", response.text
        await wait_for(lambda: len(victim.received) >= frames + 10, 20, "the victim's frames after the storm")
        metrics = (await srv.http.get(f"{srv.url}/metrics")).text
        assert 'streamedit_patches_limited_total{limit="session"}' in metrics
        # No bucket outlives its session.
        await storming.close()
        await victim.close()
        srv.sessions.clear()
        await wait_for(lambda: len(srv.registry) == 0, 10, "both sessions closed")
        assert len(srv.registry.patch_limit) == 0


@pytest.mark.slow
async def test_a_client_address_over_its_rate_gets_429_before_its_body_is_validated(clip_frames) -> None:
    async with running_server(client_patch_rate=0.5, client_patch_burst=2) as srv:
        session = await srv.open_session(clip_frames)
        assert "b=AS:1000" in session.answer_sdp and "b=TIAS:1000000" in session.answer_sdp
        url = f"{srv.url}/v1/sessions/{session.session_id}"
        codes = [(await srv.http.patch(url, json={"seed": k}, headers=session.auth)).status_code for k in range(2)]
        assert codes == [200, 200]
        refused = await srv.http.patch(url, json={"seed": "not a number"}, headers=session.auth)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) >= 1 and "from this address" in refused.json()["detail"]
        schema = (await srv.http.get(f"{srv.url}/openapi.json")).json()
        patch = schema["paths"]["/v1/sessions/{session_id}"]["patch"]["responses"]
        assert "Retry-After" in patch["429"]["headers"] and "Retry-After" in patch["503"]["headers"]
        presets = (await srv.http.get(f"{srv.url}/v1/presets")).json()
        assert presets["camera"] == {"height": 256, "frame_rate": 30, "max_kbps": 1000}


def test_a_camera_goes_over_its_budget_only_after_seconds_over_it_and_back_only_after_seconds_within() -> None:
    hint = CameraHint(height=240, frame_rate=30, max_kbps=1000)
    budget = CameraBudget(hint, tolerance=1.5, window_s=1.0, over_s=2.0, under_s=5.0)
    assert budget.pixels_per_s == pytest.approx(1.5 * 240 * (240 * 16 / 9) * 30)
    changes = []
    t = 0.0
    for _ in range(10 * 30):  # 10 s of 426x240 at 30 FPS: within
        changes.append(budget.add(t, 426, 240))
        t += 1 / 30
    assert not any(c is not None for c in changes) and not budget.over
    went_over = None
    for k in range(5 * 60):  # 1280x720 at 60 FPS
        if budget.add(t, 1280, 720) is True:
            went_over = k / 60
        t += 1 / 60
    assert budget.over and went_over is not None and 2.0 <= went_over <= 3.2, went_over
    came_back = None
    for k in range(10 * 30):
        if budget.add(t, 426, 240) is False:
            came_back = k / 30
        t += 1 / 30
    assert not budget.over and came_back is not None and 5.0 <= came_back <= 6.2, came_back


def test_the_decode_priority_lever_lowers_and_restores_the_decoder_thread_and_is_harmless_without_one() -> None:
    class Receiver:  # stands for aiortc's RTCRtpReceiver: only where its private thread is kept matters
        pass

    stop = threading.Event()
    receiver = Receiver()
    thread = threading.Thread(target=stop.wait, name="video-decoder")
    thread.start()
    receiver._RTCRtpReceiver__decoder_thread = thread  # type: ignore[attr-defined]
    try:
        lever = DecodePriority(receiver)
        assert lever.lower(True) and os.getpriority(os.PRIO_PROCESS, thread.native_id) == DecodePriority.LOW
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0, "only that thread is lowered"
        if lever.lower(False):  # needs CAP_SYS_NICE or RLIMIT_NICE: a server without stays low (said so)
            assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == 0
    finally:
        stop.set()
        thread.join()
    assert not DecodePriority(Receiver()).lower(True)


@pytest.mark.slow
async def test_a_camera_over_its_budget_is_decoded_at_low_priority_and_keeps_streaming(clip_frames) -> None:
    # camera_max_fps 10 makes the budget 1.5 x 256 x 455 x 10 = 1.75 Mpx/s: 160x120 at 30 FPS (0.58) is
    # within it, 320x240 at 30 FPS (2.3) over it, so both cameras stay cheap for the test machine.
    small = [np.ascontiguousarray(f[::2, ::2]) for f in clip_frames]
    async with running_server(camera_max_fps=10) as srv:
        within = await srv.open_session(small)
        over = await srv.open_session(clip_frames)
        sessions = {s.session_id: srv.registry.get(s.session_id) for s in (within, over)}

        def over_budget(client: Any) -> bool:
            return sessions[client.session_id].stats.camera_over_budget

        await wait_for(lambda: over_budget(over), 20, "the 320x240 camera over its budget")
        await asyncio.sleep(1.0)
        assert not over_budget(within)
        info = await over.info()
        assert info["stats"]["camera_over_budget"] is True and info["stats"]["state"] == "connected", info

        def decoder_nice(client: Any) -> int:
            receiver = sessions[client.session_id].pc.getReceivers()[0]
            return os.getpriority(os.PRIO_PROCESS, receiver._RTCRtpReceiver__decoder_thread.native_id)

        assert decoder_nice(over) == DecodePriority.LOW and decoder_nice(within) == 0
        frames = len(over.received)
        await wait_for(lambda: len(over.received) >= frames + 10, 20, "frames after it went over")
        metrics = (await srv.http.get(f"{srv.url}/metrics")).text
        assert "streamedit_cameras_over_budget_total 1.0" in metrics


def test_a_storm_of_429s_does_not_flood_the_access_log() -> None:
    def access(status: int) -> logging.LogRecord:  # as uvicorn.access logs a request
        args = ("127.0.0.1:5000", "PATCH", "/v1/sessions/x", "1.1", status)
        return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)

    assert not drop_rate_limited(access(429))
    assert drop_rate_limited(access(200)) and drop_rate_limited(access(503))
