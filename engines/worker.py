"""The batching engine: per-stream newest-frame slots, the batch policy, EngineCore (select, run), its thread.

The hot-path rule: only `EngineCore.run` loops over a batch; everything else handles one stream.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from engines.editor import EditRequest, EditResult
from engines.params import EditParams
from engines.prompts import PreparedPrompt, PromptWorker
from engines.spec import DEFAULT_MAX_BATCH, PROMPT_CPU_SHARE
from engines.temporal import StreamState

log = logging.getLogger(__name__)


class BatchEditor(Protocol):
    """What the worker needs of an editor (engines.editor.Editor, or a test double)."""

    @property
    def resolution(self) -> int: ...

    def edit(self, requests: list[EditRequest]) -> list[EditResult]: ...

    def prepare_prompts(self, prompts: list[str]) -> list[PreparedPrompt]: ...

    def cached_prompt(self, prompt: str) -> PreparedPrompt | None: ...

    def prompt_key(self, prompt: str) -> str: ...


@dataclass
class PendingFrame:
    """A camera frame waiting for the engine; `pixels` converts it (in the worker's thread) when taken."""

    pixels: Callable[[], np.ndarray]  # → RGB uint8 (res, res, 3)
    received_at: float  # time.monotonic() when the frame arrived
    meta: Any = None  # whatever the caller needs back with the result (pts, time_base)


@dataclass
class Conditions:
    """A stream's parameters and their encoded prompt, swapped in together; `version` counts the swaps."""

    params: EditParams
    context: torch.Tensor
    version: int = 0


@dataclass
class FrameOutcome:
    """What the worker hands back for one frame."""

    frame: np.ndarray  # edited pixels, or the unedited input when `error` is set
    pending: PendingFrame
    skipped: bool
    error: BaseException | None
    batch_size: int
    conditions_version: int


class FrameSlot:
    """One stream's mailbox to the worker: at most one pending frame (the newest), plus its conditions."""

    def __init__(
        self,
        stream_id: str,
        conditions: Conditions,
        on_outcome: Callable[[FrameOutcome], None],
        state: StreamState | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.state = state or StreamState(conditions.params.seed)
        self.on_outcome = on_outcome
        self._conditions = conditions
        self._pending: PendingFrame | None = None
        self._lock = threading.Lock()
        self._wake: Callable[[], None] = lambda: None

    def offer(self, frame: PendingFrame) -> bool:
        """Make `frame` the pending one; True when it replaced an older frame the engine never took."""
        with self._lock:
            replaced = self._pending is not None
            self._pending = frame
        self._wake()
        return replaced

    def set_conditions(self, params: EditParams, context: torch.Tensor) -> Conditions:
        """Swap in new params and their prompt context; the next frame taken uses them."""
        with self._lock:
            self._conditions = Conditions(params, context, self._conditions.version + 1)
            return self._conditions

    @property
    def conditions(self) -> Conditions:
        with self._lock:
            return self._conditions

    def has_pending(self) -> bool:
        with self._lock:
            return self._pending is not None

    def oldest_pending_time(self) -> float:
        with self._lock:
            return self._pending.received_at if self._pending else float("inf")

    def take(self) -> tuple[PendingFrame, Conditions] | None:
        with self._lock:
            frame, self._pending = self._pending, None
            return (frame, self._conditions) if frame else None


class BatchPolicy(abc.ABC):
    """Chooses which ready streams go into the next batched call (one `select` per call)."""

    @abc.abstractmethod
    def select(self, ready: list[FrameSlot], max_batch: int) -> list[FrameSlot]: ...


class OldestFirst(BatchPolicy):
    """The streams whose pending frame waited longest, up to max_batch: no stream starves."""

    def select(self, ready: list[FrameSlot], max_batch: int) -> list[FrameSlot]:
        return sorted(ready, key=FrameSlot.oldest_pending_time)[:max_batch]


@dataclass
class BatchStats:
    """The observer's view of one batched call."""

    size: int
    seconds: float
    failed_frames: int = 0
    skipped_frames: int = 0


@dataclass
class _Running:
    slot: FrameSlot
    pending: PendingFrame
    conditions: Conditions
    pixels: np.ndarray | None = None
    error: BaseException | None = None
    result: EditResult | None = field(default=None)


class EngineCore:
    """The batching loop's body without threads: streams register their slots; `run(select())` edits one batch."""

    def __init__(
        self, editor: BatchEditor, max_batch: int = DEFAULT_MAX_BATCH, policy: BatchPolicy | None = None
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.editor = editor
        self.max_batch = max_batch
        self.policy = policy or OldestFirst()
        self.slots: dict[str, FrameSlot] = {}
        self.batches = 0

    @property
    def resolution(self) -> int:
        return self.editor.resolution

    def ready(self) -> list[FrameSlot]:
        return [s for s in self.slots.values() if s.has_pending()]

    def select(self) -> list[FrameSlot]:
        """The policy's choice of ready streams for the next call (empty when no stream has a frame)."""
        ready = self.ready()
        return self.policy.select(ready, self.max_batch) if ready else []

    def run(self, chosen: list[FrameSlot]) -> tuple[list[tuple[FrameSlot, FrameOutcome]], BatchStats]:
        """Take one frame from each chosen stream, edit them in one call, and return each stream's outcome."""
        running: list[_Running] = []
        for slot in chosen:
            taken = slot.take()
            if taken is not None:
                running.append(_Running(slot, taken[0], taken[1]))
        for item in running:
            try:
                item.pixels = item.pending.pixels()
            except Exception as exc:  # an undecodable frame fails alone
                item.error = exc
        good = [r for r in running if r.error is None]
        started = time.perf_counter()
        self._edit(good)
        seconds = time.perf_counter() - started
        self.batches += 1
        outcomes = []
        for item in running:
            failed = item.error is not None or item.result is None
            frame = item.pixels if failed else item.result.frame  # type: ignore[union-attr]
            if frame is None:
                frame = np.zeros((self.resolution, self.resolution, 3), np.uint8)
            outcome = FrameOutcome(
                frame=frame,
                pending=item.pending,
                skipped=bool(item.result and item.result.skipped),
                error=item.error if failed else None,
                batch_size=len(running),
                conditions_version=item.conditions.version,
            )
            outcomes.append((item.slot, outcome))
        stats = BatchStats(
            size=len(good),
            seconds=seconds,
            failed_frames=sum(r.error is not None for r in running),
            skipped_frames=sum(bool(r.result and r.result.skipped) for r in running),
        )
        return outcomes, stats

    def _edit(self, items: list[_Running]) -> None:
        """One batched call; if it raises, each frame is retried alone so only the culprit fails."""
        if not items:
            return
        try:
            results = self.editor.edit([self._request(r) for r in items])
            for item, result in zip(items, results, strict=True):
                item.result = result
            return
        except Exception as exc:
            if len(items) == 1:
                items[0].error = exc
                log.warning("stream %s: frame failed in the engine: %r", items[0].slot.stream_id, exc)
                return
        for item in items:
            self._edit([item])

    @staticmethod
    def _request(item: _Running) -> EditRequest:
        assert item.pixels is not None
        return EditRequest(item.pixels, item.conditions.context, item.conditions.params, item.slot.state)


class EngineWorker:
    """A daemon thread that runs an EngineCore for every registered stream, handing outcomes to their slots."""

    def __init__(
        self,
        editor: BatchEditor,
        max_batch: int = DEFAULT_MAX_BATCH,
        policy: BatchPolicy | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        prompt_jobs: int = 8,
        prompt_cpu_share: float = PROMPT_CPU_SHARE,
    ) -> None:
        self.core = EngineCore(editor, max_batch, policy)
        self.on_batch = on_batch or (lambda stats: None)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        # Prompt encoding is model work too: its own thread keeps it off both the event loop and the batch loop.
        self.prompts = PromptWorker(editor.prepare_prompts, prompt_jobs, prompt_cpu_share)
        self.exited = threading.Event()

    @property
    def editor(self) -> BatchEditor:
        return self.core.editor

    @property
    def max_batch(self) -> int:
        return self.core.max_batch

    @property
    def batches(self) -> int:
        return self.core.batches

    @property
    def resolution(self) -> int:
        return self.core.resolution

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.prompts.stop()

    def add(self, slot: FrameSlot) -> None:
        def wake() -> None:
            with self._cond:
                self._cond.notify()

        slot._wake = wake
        with self._cond:
            self.core.slots[slot.stream_id] = slot

    def remove(self, stream_id: str) -> None:
        with self._cond:
            slot = self.core.slots.pop(stream_id, None)
        if slot is not None:
            slot._wake = lambda: None

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self.core.ready():
                        self._cond.wait(timeout=0.5)
                    if self._stop:
                        return
                    chosen = self.core.select()
                outcomes, stats = self.core.run(chosen)
                for slot, outcome in outcomes:
                    try:
                        slot.on_outcome(outcome)
                    except Exception:
                        log.exception("result callback of stream %s failed", slot.stream_id)
                self.on_batch(stats)
        except Exception:  # pragma: no cover - a bug in the loop itself, not in a frame
            log.exception("engine worker loop crashed")
        finally:
            log.info("engine worker thread exited")
            self.exited.set()
