"""Temporal reuse: fixed noise, the similarity skip (with its cap), latent feedback, the still hold, and the flicker
measures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engines.editor import EditRequest, frames_to_tensor, tensor_to_frames
from engines.params import EditParams
from engines.temporal import StreamState, box_mean, flicker, hold_still, moving_pixels, region_flicker


def test_fixed_noise_is_drawn_once_per_seed_and_fresh_noise_is_not() -> None:
    state = StreamState(seed=0)
    fixed = EditParams(seed=5, fixed_noise=True)
    a, b = state.noise(fixed, (4, 8, 8), torch.device("cpu")), state.noise(fixed, (4, 8, 8), torch.device("cpu"))
    assert torch.equal(a, b)
    assert torch.equal(a, StreamState(seed=99).noise(fixed, (4, 8, 8), torch.device("cpu")))  # the seed decides
    c = state.noise(EditParams(seed=6), (4, 8, 8), torch.device("cpu"))
    assert not torch.equal(a, c)
    fresh = EditParams(fixed_noise=False)
    assert not torch.equal(state.noise(fresh, (4, 8, 8), torch.device("cpu")), state.noise(fresh, (4, 8, 8), "cpu"))


def test_similarity_skip_follows_threshold_cap_and_param_changes() -> None:
    state = StreamState(seed=0)
    params = EditParams(similarity_skip=True, skip_threshold=0.9, max_skipped_frames=3)
    latent = torch.randn(4, 8, 8)
    assert not state.should_skip(latent, params)  # nothing edited yet
    state.record_edit(latent, latent, np.zeros((8, 8, 3), np.uint8), params)
    skips = []
    for _ in range(8):
        skip = state.should_skip(latent, params)  # identical latent: probability 1, until the cap
        skips.append(skip)
        if skip:
            state.record_skip()
        else:
            state.record_edit(latent, latent, np.zeros((8, 8, 3), np.uint8), params)
    assert skips == [True, True, True, False, True, True, True, False]
    assert not state.should_skip(-latent, params)  # a different scene is always edited
    assert not state.should_skip(latent, params.model_copy(update={"prompt": "make it sepia"}))
    assert not state.should_skip(latent, params.model_copy(update={"similarity_skip": False}))


def test_latent_feedback_is_off_at_zero_and_scales_the_last_output() -> None:
    state = StreamState()
    assert state.feedback_latent(EditParams(latent_feedback=0.5)) is None  # no output yet
    out = torch.ones(4, 8, 8)
    state.record_edit(out, out, np.zeros((8, 8, 3), np.uint8), EditParams())
    assert state.feedback_latent(EditParams(latent_feedback=0.0)) is None
    assert torch.allclose(state.feedback_latent(EditParams(latent_feedback=0.5)), 0.5 * out)


def test_flicker_is_output_change_over_input_change() -> None:
    inputs = [np.full((4, 4, 3), v, np.uint8) for v in (0, 10, 20)]
    assert flicker(inputs, inputs) == pytest.approx(1.0)
    steady = [np.full((4, 4, 3), 50, np.uint8)] * 3
    assert flicker(inputs, steady) == 0.0
    doubled = [np.full((4, 4, 3), v, np.uint8) for v in (0, 20, 40)]
    assert flicker(inputs, doubled) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        flicker(inputs[:1], inputs[:1])


def test_box_mean_is_the_windowed_average_cut_at_the_borders() -> None:
    """The still hold's and region flicker's 9×9 average equals avg_pool2d's (without padded counts) on frames of
    any shape, large values included (its running sums are float64)."""
    values = torch.rand(2, 37, 50) * 255
    for window in (1, 3, 9):
        pooled = F.avg_pool2d(values[:, None], window, 1, window // 2, count_include_pad=False)[:, 0]
        torch.testing.assert_close(box_mean(values, window), pooled, atol=1e-4, rtol=1e-5)
    big = torch.full((512, 512), 255.0)
    assert float((box_mean(big, 9) - 255.0).abs().max()) < 1e-4


def test_region_flicker_splits_a_still_scenes_shimmer_from_following_its_motion() -> None:
    """A camera with ±1-level noise everywhere and a bright square moving 4 pixels a frame: an output that copies
    the camera scores 1 in both regions; one that draws the square but not the noise scores 0 where the camera is
    still and 1 where it moves; a frozen output scores 0 in both."""
    rng = np.random.default_rng(0)
    camera, clean = [], []
    for t in range(4):
        frame = np.full((48, 48, 3), 100.0)
        frame[10:22, 4 + 4 * t : 16 + 4 * t] = 200.0
        clean.append(frame.astype(np.uint8))
        camera.append((frame + rng.integers(-1, 2, frame.shape)).astype(np.uint8))
    moving = moving_pixels(camera)
    assert moving.shape == (3, 48, 48)
    assert moving[:, 16, 8:20].all() and not moving[:, 40, :].any()  # the square's edges move; the floor does not
    assert region_flicker(camera, camera, moving) == pytest.approx((1.0, 1.0))
    still, motion = region_flicker(camera, clean, moving)
    assert still == 0.0 and motion == pytest.approx(1.0, abs=0.05)
    assert region_flicker(camera, [clean[0]] * 4, moving) == (0.0, 0.0)


def test_editor_skips_unet_on_a_still_scene_and_costs_no_rows(editor) -> None:
    frame = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    params = EditParams(similarity_skip=True, skip_threshold=0.5, max_skipped_frames=4)
    state = StreamState()
    context = editor.encode_prompt(params.prompt)
    rows = editor.unet_rows
    results = [editor.edit([EditRequest(frame, context, params, state)])[0] for _ in range(10)]
    assert [r.skipped for r in results] == [False, True, True, True, True, False, True, True, True, True]
    assert editor.unet_rows - rows == 2
    assert all(np.array_equal(r.frame, results[0].frame) for r in results[:5])


def _scene(t: int, drift: float = 0.0) -> np.ndarray:
    """A 48² camera frame: a grey floor with ±1-level noise (brightened by `drift` levels a frame) and a bright
    square moving 4 pixels a frame along the top."""
    frame = np.full((48, 48, 3), 100.0 + drift * t) + np.random.default_rng(t).integers(-1, 2, (48, 48, 3))
    frame[4:16, 4 + 4 * t : 16 + 4 * t] = 200.0
    return frame.clip(0, 255).astype(np.uint8)


def _send(state: StreamState, camera: np.ndarray, output: np.ndarray, params: EditParams) -> np.ndarray:
    """One stream's frame through hold_still and record_edit, as the editor sends it."""
    sent = tensor_to_frames(hold_still([state], frames_to_tensor([camera]), frames_to_tensor([output]), [params]))[0]
    state.record_edit(torch.zeros(1), torch.zeros(1), sent, params)
    return sent


def test_the_still_hold_keeps_still_pixels_and_redraws_moving_ones_and_every_pixel_on_a_new_edit() -> None:
    """Outputs that shimmer by ±3 levels everywhere: with the hold, the floor far from the square is sent as first
    drawn while the square's path is drawn fresh; a changed parameter redraws everything; off, nothing is held."""
    params = EditParams()
    assert params.hold_still  # the service's default
    state = StreamState()
    shimmer = np.random.default_rng(1)
    fresh, sent = [], []
    for t in range(5):
        fresh.append((_scene(t).astype(int) + shimmer.integers(-3, 4, (48, 48, 3))).clip(0, 255).astype(np.uint8))
        sent.append(_send(state, _scene(t), fresh[-1], params))
    floor = (slice(30, 48), slice(None))
    assert np.array_equal(sent[0], fresh[0])
    assert all(np.array_equal(s[floor], sent[0][floor]) for s in sent)  # the still floor no longer shimmers
    assert not np.array_equal(fresh[4][floor], fresh[0][floor])
    assert np.array_equal(sent[4][4:16, 16:24], fresh[4][4:16, 16:24])  # where the square moved, drawn fresh
    changed = params.model_copy(update={"text_guidance": 2.0})
    assert np.array_equal(_send(state, _scene(5), fresh[0], changed), fresh[0])  # a new edit shows at once
    off = params.model_copy(update={"hold_still": False})
    assert np.array_equal(_send(StreamState(), _scene(0), fresh[1], off), fresh[1])


def test_the_still_hold_redraws_a_slow_drift_once_it_adds_up() -> None:
    """A floor brightening by 0.5 levels a frame never changes 2 levels between two frames, but it is redrawn once
    it has changed that much since it was drawn, so the output does not stay behind the camera."""
    params = EditParams()
    state = StreamState()
    floor = (slice(30, 48), slice(None))
    sent = [_send(state, _scene(t, drift=0.5), _scene(t, drift=0.5), params) for t in range(10)]
    assert np.array_equal(sent[1][floor], sent[0][floor])  # half a level: held
    gap = np.abs(sent[9][floor].astype(float) - _scene(9, drift=0.5)[floor]).mean()
    assert gap < 2.0, f"the held floor lags the camera by {gap:.2f} levels"
    assert not np.array_equal(sent[9][floor], sent[0][floor])


def test_the_still_hold_batches_streams_each_with_its_own_memory_and_settings() -> None:
    """One call for three streams equals three calls for one: a stream whose hold is off, and one whose threshold
    is higher, come back as they would alone."""
    settings = [EditParams(), EditParams(hold_still=False), EditParams(hold_threshold=8.0)]
    together, alone = [StreamState() for _ in settings], [StreamState() for _ in settings]
    rng = np.random.default_rng(2)
    for t in range(4):
        cameras = [_scene(t + k) for k in range(3)]
        outputs = [(c.astype(int) + rng.integers(-3, 4, c.shape)).clip(0, 255).astype(np.uint8) for c in cameras]
        batch = tensor_to_frames(hold_still(together, frames_to_tensor(cameras), frames_to_tensor(outputs), settings))
        for k, state in enumerate(together):
            state.record_edit(torch.zeros(1), torch.zeros(1), batch[k], settings[k])
            assert np.array_equal(batch[k], _send(alone[k], cameras[k], outputs[k], settings[k])), (t, k)
    assert together[1].held_output is None and together[0].held_output is not None


def test_the_editor_sends_the_held_frame_and_remembers_it(editor) -> None:
    """Editor.edit returns what the still hold made of the fresh output: on a still, noisy scene the first frame's
    pixels come back, and with the hold off the fresh output does."""
    rng = np.random.default_rng(0)
    base = rng.integers(20, 235, (256, 256, 3))
    frames = [(base + rng.integers(0, 2, base.shape)).astype(np.uint8) for _ in range(3)]  # up to a level
    params = EditParams(fixed_noise=True)
    context = editor.encode_prompt(params.prompt)
    held_state, fresh_state = StreamState(), StreamState()
    off = params.model_copy(update={"hold_still": False})
    held = [editor.edit([EditRequest(f, context, params, held_state)])[0].frame for f in frames]
    fresh = [editor.edit([EditRequest(f, context, off, fresh_state)])[0].frame for f in frames]
    assert not np.array_equal(fresh[2], fresh[0]), "the camera's noise should move the fresh output"
    assert np.array_equal(held[0], fresh[0]) and all(np.array_equal(h, held[0]) for h in held)
    assert held_state.last_output_frame is not None and np.array_equal(held_state.last_output_frame, held[0])
