"""Prompt work off the frame path: prepared prompts (context and reading from one encoder pass), their LRU cache,
and the thread that prepares them, latest first, so text encoding never runs between two batches.

A new prompt costs a text-encoder pass (MiniLM: ~10 ms on a CPU core); run inline on the engine loop, a neighbour
PATCHing new prompts 50 times a second took three quarters of every other session's frames (issue 34). Here the
loop hands the prompt to a PromptWorker and goes on batching with the stream's old conditions; the worker's answer
is swapped in between two batches.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engines.client import PromptReading
from engines.spec import PROMPT_CPU_SHARE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedPrompt:
    """What the engine needs of a prompt: the (tokens, dim) context the UNet reads and how it was read (None where
    the model feeds prompts as they are)."""

    context: torch.Tensor
    reading: PromptReading | None


class PromptCache:
    """An LRU of prepared prompts by their normalised text, shared by every stream; safe across threads."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a prompt cache holds at least one prompt, not {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[str, PreparedPrompt] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> PreparedPrompt | None:
        with self._lock:
            prepared = self._entries.get(key)
            if prepared is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return prepared

    def put(self, key: str, prepared: PreparedPrompt) -> None:
        with self._lock:
            self._entries[key] = prepared
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


#: What a PromptWorker hands back for a job: its prompts prepared, the error preparing them raised, or SUPERSEDED
#: when a newer job of the same lane took its place before it started.
PromptResult = list[PreparedPrompt] | BaseException | None
SUPERSEDED = None
PromptDone = Callable[[PromptResult], None]


@dataclass
class _Job:
    prompts: list[str]
    done: PromptDone


class PromptWorker:
    """One thread that prepares prompts for the engine, with a bounded queue and a bounded share of the CPU.

    Jobs wait in lanes (one a stream): a job submitted to a lane whose job has not started replaces it, and the
    replaced job is answered SUPERSEDED, so a stream storming new prompts costs at most one encoding in progress
    and one waiting. `max_jobs` bounds the jobs queued or running across all lanes (past it, submit says no).
    The thread runs at a lower priority (nice +10), on one intra-op thread, and, after a job that took t seconds,
    rests until the jobs have used no more than `cpu_share` of its time: text encoding may slow the frames,
    never take them over.
    `done` is called on this thread, with the result; the caller moves it to where it is needed.
    """

    #: nice increment of the worker thread (and of the OpenMP threads it starts, which inherit it)
    NICE = 10

    def __init__(
        self,
        prepare: Callable[[list[str]], list[PreparedPrompt]],
        max_jobs: int = 8,
        cpu_share: float = PROMPT_CPU_SHARE,
        name: str = "prompt-worker",
    ) -> None:
        if max_jobs < 1 or not 0 < cpu_share <= 1:
            raise ValueError(f"need max_jobs >= 1 and 0 < cpu_share <= 1, got {max_jobs}, {cpu_share}")
        self.prepare = prepare
        self.max_jobs = max_jobs
        self.cpu_share = cpu_share
        self.jobs_done = 0
        self.busy_s = 0.0  # seconds spent preparing prompts
        self._queued: OrderedDict[str, _Job] = OrderedDict()
        self._running = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def in_flight(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._queued) + self._running

    def submit(self, lane: str, prompts: list[str], done: PromptDone, bounded: bool = True) -> bool:
        """Queue `prompts` in `lane`, replacing its job that has not started; False when `max_jobs` are in
        flight already and the job is `bounded` (nothing is queued then). Unbounded jobs are those whose number
        something else bounds (a stream's first prompt: one a slot)."""
        with self._cond:
            if self._stop:
                return False
            replaced = self._queued.pop(lane, None)
            if bounded and replaced is None and len(self._queued) + self._running >= self.max_jobs:
                return False
            self._queued[lane] = _Job(prompts, done)
            self._cond.notify()
        if replaced is not None:
            replaced.done(SUPERSEDED)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            dropped = list(self._queued.values())
            self._queued.clear()
            self._cond.notify_all()
        for job in dropped:
            job.done(SUPERSEDED)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            # Linux keeps a nice value per thread; raising it needs no privilege.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.NICE)
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            log.info("prompt worker: could not lower its priority")
        # One intra-op thread: with OpenMP the setting is this thread's own (the frames keep theirs), and an
        # encoder team as wide as the frames' would oversubscribe the cores and stall every batch's parallel
        # regions behind its spinning threads; a prompt is small enough that one core encodes it in time.
        torch.set_num_threads(1)
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._queued:
                        self._cond.wait()
                    if self._stop:
                        return
                    _, job = self._queued.popitem(last=False)
                    self._running += 1
                started = time.perf_counter()
                try:
                    result: PromptResult = self.prepare(job.prompts)
                except Exception as exc:  # a prompt that fails to encode fails its own job only
                    log.warning("preparing %d prompts failed: %r", len(job.prompts), exc)
                    result = exc
                took = time.perf_counter() - started
                self.busy_s += took
                self.jobs_done += 1
                with self._cond:
                    self._running -= 1
                try:
                    job.done(result)
                except Exception:
                    log.exception("a prompt job's callback failed")
                rest = took * (1 - self.cpu_share) / self.cpu_share
                if rest > 0:
                    with self._cond:
                        self._cond.wait_for(lambda: self._stop, timeout=rest)
        finally:
            log.info("prompt worker thread exited")
