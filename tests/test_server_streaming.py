"""The frame path end to end: a real uvicorn server and real aiortc peers streaming real clips on 127.0.0.1."""

from __future__ import annotations

import asyncio

import numpy as np

from engines.editor import EditRequest
from engines.params import EditParams
from engines.temporal import StreamState
from server.media import fit_frame
from tests.conftest import running_server, wait_for
from tests.engine_doubles import Slowed, poisoned


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-9))


async def test_edited_frames_come_back_with_increasing_pts(clip_frames) -> None:
    async with running_server() as srv:
        session = await srv.open_session(clip_frames)
        await wait_for(lambda: len(session.received) >= 30, 30, "30 edited frames")
        pts = [r.pts for r in session.received]
        assert all(b > a for a, b in zip(pts, pts[1:], strict=False)), "pts went backwards"
        _, image = session.images[-1]
        assert image.shape == (256, 256, 3)
        info = await session.info()
        assert info["stats"]["state"] == "connected"
        assert info["stats"]["frames_edited"] >= 30
        assert info["stats"]["errors"] == 0
        assert info["stats"]["latency_ms_p95"] is not None


async def test_patch_prompt_changes_output_within_a_few_frames(clip_frames) -> None:
    still = [clip_frames[0]] * 4  # a static scene: output changes only when the edit does
    async with running_server() as srv:
        session = await srv.open_session(still, keep_images=200, edit={"prompt": "make it a pencil sketch"})
        await wait_for(lambda: len(session.received) >= 15, 30, "frames before the patch")
        reading = (await session.info())["reading"]
        assert reading[0]["edit"] == "pencil_sketch" and reading[0]["share"] > 0.9, reading
        before = [img for _, img in session.images[-5:]]
        jitter = max(float(np.abs(a.astype(float) - before[-1]).mean()) for a in before)
        n_before = len(session.received)
        response = await session.patch(prompt="turn it into a thermal camera image", text_guidance=12.0)
        assert response.status_code == 200, response.text
        assert response.json()["edit"]["prompt"] == "turn it into a thermal camera image"
        assert response.json()["reading"][0]["edit"] == "thermal"
        await wait_for(lambda: len(session.received) >= n_before + 10, 30, "frames after the patch")
        after = [img for i, img in session.images if n_before <= i < n_before + 10]
        change = max(float(np.abs(a.astype(float) - before[-1]).mean()) for a in after)
        assert change > 3 * jitter + 1.0, f"output did not change: {change:.2f} vs jitter {jitter:.2f}"
        info = await session.info()
        assert info["edit"]["text_guidance"] == 12.0


async def test_two_sessions_in_one_batch_each_get_their_own_edit(editor, clip_frames) -> None:
    frame = clip_frames[10]
    prompts = ["make it a pencil sketch", "make it look like night vision"]
    expected = []
    for prompt in prompts:
        params = EditParams(prompt=prompt, seed=3)
        fitted = np.ascontiguousarray(
            np.asarray(fit_frame(__import__("av").VideoFrame.from_ndarray(frame, format="rgb24"), 256))
        )
        request = EditRequest(fitted, editor.encode_prompt(prompt), params, StreamState(3))
        expected.append(editor.edit([request])[0].frame)
    assert psnr(expected[0], expected[1]) < 30, "the two prompts should give different edits"
    async with running_server(max_batch=4) as srv:
        a = await srv.open_session([frame] * 2, edit={"prompt": prompts[0], "seed": 3})
        b = await srv.open_session([frame] * 2, edit={"prompt": prompts[1], "seed": 3})
        await wait_for(lambda: len(a.received) >= 20 and len(b.received) >= 20, 40, "frames on both sessions")
        batch_sizes = srv.app.state.metrics.batch_size.collect()[0].samples
        two_or_more = sum(s.value for s in batch_sizes if s.name.endswith("_bucket") and s.labels["le"] == "1.0")
        total = next(s.value for s in batch_sizes if s.name.endswith("_count"))
        assert total > two_or_more, "no call ever batched both sessions"
        got_a, got_b = a.images[-1][1], b.images[-1][1]
        assert psnr(got_a, expected[0]) > psnr(got_a, expected[1]) + 3
        assert psnr(got_b, expected[1]) > psnr(got_b, expected[0]) + 3


async def test_latency_stays_bounded_when_the_engine_is_slower_than_the_camera(clip_frames) -> None:
    fps = 30.0
    async with running_server(Slowed(2.0 / fps)) as srv:
        session = await srv.open_session(clip_frames, fps=fps)
        await wait_for(lambda: len(session.received) >= 1, 20, "the first frame")
        start = session.received[0].at
        await asyncio.sleep(20.5)
        assert await session.calibrate()
        first = [x for x in session.latencies(since=start) if True]
        early = np.array([lat for lat, r in zip(first, session.received, strict=False) if r.at < start + 10])
        late_all = session.latencies(since=start + 10)
        assert len(early) > 20 and len(late_all) > 20
        p95_early, p95_late = np.percentile(early, 95), np.percentile(late_all, 95)
        # A queue behind an engine at half the camera's rate grows by half a second every second, so
        # ten seconds on it would stand seconds above the start; the slack only absorbs a busy CI
        # machine's scheduling noise (p95 200 → 245 ms was seen there with no queue at all).
        assert p95_late <= 1.5 * p95_early + 0.1, f"latency grew: p95 {p95_early * 1000:.0f} → {p95_late * 1000:.0f} ms"
        assert np.median(late_all) <= 1.3 * np.median(early) + 0.05, "the typical frame's latency grew"
        info = await session.info()
        assert info["stats"]["dropped"] > 0, "a slow engine must drop stale frames, not queue them"


async def test_camera_resolution_changes_keep_the_output_size(clip_frames) -> None:
    small = [np.ascontiguousarray(f[::2, ::2]) for f in clip_frames[:20]]  # 160x120
    wide = [np.ascontiguousarray(np.pad(f, ((0, 0), (80, 80), (0, 0)))) for f in clip_frames[:20]]  # 480x240
    async with running_server() as srv:
        session = await srv.open_session(clip_frames[:20] + small + wide, keep_images=100)
        await wait_for(lambda: len(session.received) >= 70, 40, "frames across three camera sizes")
        assert {img.shape for _, img in session.images} == {(256, 256, 3)}
        assert (await session.info())["stats"]["errors"] == 0


async def test_a_failing_frame_passes_through_and_other_sessions_never_notice(clip_frames) -> None:
    async with running_server(poisoned, max_batch=4) as srv:
        bad = await srv.open_session(clip_frames, edit={"prompt": "explode"})
        good = await srv.open_session(clip_frames, edit={"prompt": "make it sepia"})
        await wait_for(lambda: len(bad.received) >= 20 and len(good.received) >= 20, 40, "frames on both")
        bad_stats, good_stats = (await bad.info())["stats"], (await good.info())["stats"]
        assert bad_stats["errors"] >= 20 and bad_stats["frames_edited"] == 0
        assert good_stats["errors"] == 0 and good_stats["frames_edited"] >= 20
        # The failing session still gets its camera back (unedited) and carries on.
        _, passthrough = bad.images[-1]
        assert passthrough.shape == (256, 256, 3)


async def test_the_in_thread_engine_serves_the_same_api(clip_frames) -> None:
    async with running_server(engine="thread") as srv:
        session = await srv.open_session(clip_frames, edit={"prompt": "make it sepia"})
        await wait_for(lambda: len(session.received) >= 10, 30, "10 edited frames from the in-thread engine")
        assert (await session.info())["reading"][0]["edit"] == "sepia"
        # Words that name no trained edit are read as a blend, and the client is told so.
        vague = (await session.patch(prompt="hello world")).json()["reading"]
        assert len(vague) >= 2 and vague[0]["share"] < 0.9, vague
        assert sum(item["share"] for item in vague) <= 1.0
        assert (await session.patch(text_guidance=2.0)).json()["reading"] == vague  # same prompt, same reading
        info = await session.info()
        assert info["stats"]["frames_edited"] >= 10 and info["stats"]["errors"] == 0
        assert info["edit"]["text_guidance"] == 2.0
        assert (await session.close()).status_code == 204
        srv.sessions.remove(session)
