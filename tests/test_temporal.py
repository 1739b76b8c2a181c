"""Temporal latent reuse: fixed noise, the similarity skip (with its cap), latent feedback, and the flicker measure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.editor import EditRequest
from engines.params import EditParams
from engines.temporal import StreamState, flicker


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
