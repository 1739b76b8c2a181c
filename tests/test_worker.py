"""The batching worker's policy with recorded frames (as vLLM tests its scheduler), and with the real editor."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from engines.editor import EditRequest, EditResult
from engines.params import EditParams
from engines.prompts import PreparedPrompt
from engines.worker import Conditions, EngineWorker, FrameOutcome, FrameSlot, OldestFirst, PendingFrame


class RecordingEditor:
    """Returns each frame inverted and records every batch it was given; blocks while `hold` is clear."""

    resolution = 8

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hold = threading.Event()
        self.hold.set()

    def prepare_prompts(self, prompts: list[str]) -> list[PreparedPrompt]:
        return [PreparedPrompt(torch.zeros(2, 4), None) for _ in prompts]

    def edit(self, requests: list[EditRequest]) -> list[EditResult]:
        self.hold.wait(5)
        self.batches.append([int(r.frame[0, 0, 0]) for r in requests])
        if any(r.params.prompt == "boom" for r in requests):
            raise RuntimeError("boom")
        return [EditResult(255 - r.frame, skipped=False) for r in requests]


def frame(value: int) -> PendingFrame:
    pixels = np.full((8, 8, 3), value, np.uint8)
    return PendingFrame(pixels=lambda: pixels, received_at=time.monotonic(), meta=value)


def slot(name: str, outcomes: list[FrameOutcome], prompt: str = "p") -> FrameSlot:
    params = EditParams(prompt=prompt)
    return FrameSlot(name, Conditions(params, torch.zeros(2, 4)), outcomes.append)


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_newest_frame_wins_and_superseded_frames_are_reported() -> None:
    outcomes: list[FrameOutcome] = []
    s = slot("a", outcomes)
    assert s.offer(frame(1)) is False
    assert s.offer(frame(2)) is True  # frame 1 never reached the engine
    taken = s.take()
    assert taken is not None and taken[0].meta == 2
    assert s.take() is None


def test_one_call_batches_every_ready_stream_up_to_max_batch_oldest_first() -> None:
    editor = RecordingEditor()
    outcomes: list[FrameOutcome] = []
    worker = EngineWorker(editor, max_batch=2)
    slots = [slot(n, outcomes) for n in "abc"]
    for s in slots:
        worker.add(s)
    editor.hold.clear()
    worker.start()
    try:
        slots[0].offer(frame(10))  # the worker takes this alone and blocks in edit()
        wait_until(lambda: not slots[0].has_pending())
        slots[2].offer(frame(30))
        time.sleep(0.01)
        slots[1].offer(frame(20))
        slots[0].offer(frame(11))
        editor.hold.set()
        wait_until(lambda: len(outcomes) == 4)
    finally:
        worker.stop()
    # After the first call: c waited longest, then b; a's newer frame goes in the next call.
    assert editor.batches == [[10], [30, 20], [11]]
    assert {o.pending.meta: int(o.frame[0, 0, 0]) for o in outcomes} == {10: 245, 30: 225, 20: 235, 11: 244}
    assert [o.batch_size for o in outcomes] == [1, 2, 2, 1]


def test_a_raising_frame_fails_alone_and_passes_through() -> None:
    editor = RecordingEditor()
    outcomes: list[FrameOutcome] = []
    worker = EngineWorker(editor, max_batch=4)
    good, bad = slot("good", outcomes), slot("bad", outcomes, prompt="boom")
    worker.add(good)
    worker.add(bad)
    editor.hold.clear()
    worker.start()
    try:
        good.offer(frame(1))
        wait_until(lambda: not good.has_pending())
        good.offer(frame(2))
        bad.offer(frame(3))
        editor.hold.set()
        wait_until(lambda: len(outcomes) == 3)
    finally:
        worker.stop()
    by_meta = {o.pending.meta: o for o in outcomes}
    assert by_meta[2].error is None and int(by_meta[2].frame[0, 0, 0]) == 253
    assert isinstance(by_meta[3].error, RuntimeError)
    assert int(by_meta[3].frame[0, 0, 0]) == 3  # unedited


def test_conditions_swap_together_and_version_counts() -> None:
    s = slot("a", [])
    first = s.conditions
    new = s.set_conditions(EditParams(prompt="q"), torch.ones(2, 4))
    assert new.version == first.version + 1 and new.params.prompt == "q"
    s.offer(frame(1))
    taken = s.take()
    assert taken is not None and taken[1].params.prompt == "q" and bool(taken[1].context.eq(1).all())


def test_policy_never_exceeds_max_batch() -> None:
    outcomes: list[FrameOutcome] = []
    slots = [slot(str(i), outcomes) for i in range(5)]
    for i, s in enumerate(slots):
        s.offer(frame(i))
    chosen = OldestFirst().select(slots, 3)
    assert [s.stream_id for s in chosen] == ["0", "1", "2"]


def test_real_editor_batch_matches_single_calls(editor) -> None:
    """Batching is invisible: each stream's output equals what it gets when edited alone."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) for _ in range(2)]
    params = [EditParams(prompt="make it sepia", seed=1), EditParams(prompt="make it a negative", seed=2)]
    from engines.temporal import StreamState

    def requests() -> list[EditRequest]:
        pairs = zip(frames, params, strict=True)
        return [EditRequest(f, editor.encode_prompt(p.prompt), p, StreamState(p.seed)) for f, p in pairs]

    batched = editor.edit(requests())
    alone = [editor.edit([r])[0] for r in requests()]
    for b, a in zip(batched, alone, strict=True):
        assert np.abs(b.frame.astype(int) - a.frame.astype(int)).max() <= 2
