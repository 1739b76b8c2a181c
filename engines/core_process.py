"""The engine process: loads the editor, keeps the stream table, and runs EngineCore batches behind a ROUTER socket.

One thread runs the loop: drain control messages, run one batch if any stream has a frame, publish outcomes.
Loading happens on a second thread so the loop answers Beats (not ready yet) meanwhile, and prompts are encoded
on a third (engines.prompts.PromptWorker): a stream keeps its old conditions until its new prompt is ready, and
the loop swaps them in between two batches; a newer prompt for the same stream supersedes one still waiting.
The stream table (session → media worker, slot, conditions) lives here, so admission counts every worker's
sessions and a call that lands on the wrong worker is carried to the right one.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import zmq

from engines import messages as m
from engines.client import EditorFactory, PromptReading
from engines.client_thread import load_and_warm
from engines.frame_table import FrameTable, FrameTableLayout
from engines.params import EditParams
from engines.prompts import SUPERSEDED, PreparedPrompt, PromptResult, PromptWorker
from engines.spec import EngineSpec
from engines.worker import Conditions, EngineCore, FrameSlot, PendingFrame

log = logging.getLogger("engines.core_process")

BEAT_INTERVAL_S = 0.25
#: how long before the running batch should end its streams are asked for their next frame: enough for a
#: media worker to convert one and say so (about a millisecond each), little enough that it is still fresh
WANT_LEAD_S = 0.008
#: weight of the newest batch in the running estimate of a batch's duration
STEP_EMA = 0.3
#: how long past its expected arrival a frame the engine asked for may hold the next batch back, so that
#: streams converted one after another still share a batch instead of the first one running alone
GATHER_S = 0.004
#: a media worker silent this long is gone: its streams are closed and their slots freed (an exited worker is
#: seen at once, when a send to it fails; this is for one whose event loop is stuck)
WORKER_TIMEOUT_S = 10.0


@dataclass
class _Stream:
    owner: bytes
    slot: int
    frame_slot: FrameSlot
    reading: PromptReading | None = None  # the edits its prompt is read as (Editor.read_prompt)


@dataclass
class _Preparing:
    """A stream that holds a slot while its prompt is encoded (opened, or taken back from a worker's Hello)."""

    owner: bytes
    slot: int


@dataclass
class _PendingUpdate:
    """The newest Update of a stream whose prompt is being encoded: answered when it applies or is superseded."""

    sender: bytes
    call: int
    params: EditParams


#: an Update's answers (Reply.body "outcome"): its params apply from the next frame on, or a newer Update of the
#: same stream came before its prompt was ready and replaces it (frames never saw it)
APPLIED, SUPERSEDED_UPDATE = "applied", "superseded"
#: seconds a PATCH turned away by a full prompt worker is told to wait (an encoding takes ~10 ms)
PROMPTS_BUSY_RETRY_S = 1


class EngineServer:
    """The engine's side of the control channel, around one EngineCore."""

    def __init__(self, sock: zmq.Socket, table: FrameTable, spec: EngineSpec, incarnation: int) -> None:
        self.sock = sock
        self.table = table
        self.spec = spec
        self.incarnation = incarnation
        self.core: EngineCore | None = None
        self.error: str | None = None
        self.streams: dict[str, _Stream] = {}
        self.free = set(range(table.layout.slots))
        self.claims: dict[str, bytes] = {}  # sessions still connecting → the worker holding them (no slot)
        self.workers: dict[bytes, float] = {}  # identity → last heard
        # our call id → (asking worker, its call id, the worker holding the session)
        self.routes: dict[int, tuple[bytes, int, bytes]] = {}
        self._call_ids = itertools.count(1)
        self.batch_seconds: dict[int, float] = {}  # running estimate of a batch's duration, by its size
        self.want_at = 0.0  # when the frames after the running batch should be converted
        self.awaiting: dict[str, float] = {}  # streams asked for a frame → until when the next batch waits for it
        self.prompts: PromptWorker | None = None  # started with the core
        self.preparing: dict[str, _Preparing] = {}  # streams holding a slot until their prompt is encoded
        self.pending_updates: dict[str, _PendingUpdate] = {}
        self.welcoming: set[bytes] = set()  # workers whose Hello waits for its streams' prompts
        # Prompt results come back on the prompt thread; the loop runs them, woken through a pipe it polls.
        self._finished: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def start_core(self, core: EngineCore) -> None:
        """The editor is loaded: frames and prompts may be taken from now on."""
        spec = self.spec
        self.prompts = PromptWorker(core.editor.prepare_prompts, spec.max_prompt_encodings, spec.prompt_cpu_share)
        self.core = core

    def on_loop(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop, between two batches (from any thread)."""
        self._finished.append(fn)
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups the loop has not read yet: it will wake

    def run_finished(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._finished:
            fn = self._finished.popleft()
            try:
                fn()
            except Exception:
                log.exception("applying a prepared prompt failed")

    def prepare(self, lane: str, prompts: list[str], then: Callable[[PromptResult], None], bounded: bool) -> bool:
        """Prompts prepared off the loop, `then` called on the loop with the result; at once where all are
        cached. False (nothing queued) when the prompt worker is full and `bounded`."""
        assert self.core is not None and self.prompts is not None
        cached = [self.core.editor.cached_prompt(p) for p in prompts]
        if all(c is not None for c in cached):
            then(cached)  # type: ignore[arg-type]
            return True
        return self.prompts.submit(lane, prompts, lambda result: self.on_loop(lambda: then(result)), bounded)

    # -- sending ---------------------------------------------------------------------------------------------
    def send(self, to: bytes, msg: msgspec.Struct) -> bool:
        """Send now or not at all; False only when the worker is gone (ROUTER_MANDATORY says so at once)."""
        try:
            self.sock.send_multipart([to, m.encoder.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            log.warning("message to %r dropped: %s", to, exc)  # flooded: it re-syncs through Hello
        return True

    def reply(self, to: bytes, call: int, status: int, body: dict[str, Any] | None = None, error: str = "") -> None:
        self.send(to, m.Reply(call, status, body, error or None))

    # -- the loop --------------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_beat = 0.0
        while True:
            now = time.monotonic()
            ready = len(self.core.ready()) if self.core is not None else 0
            gather_until = max(self.awaiting.values(), default=now)
            if not ready:
                timeout_ms = BEAT_INTERVAL_S * 1000 / 2
            elif ready >= self.core.max_batch or gather_until <= now:  # type: ignore[union-attr]
                timeout_ms = 0
            else:  # a frame that was asked for is on its way: let it join this batch
                timeout_ms = max(1.0, (gather_until - now) * 1000)
            if poller.poll(int(timeout_ms)):
                self.drain()
                self.run_finished()
            if self.core is not None and self.batch_is_due():
                self.step()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + BEAT_INTERVAL_S
                self.beat(now)

    def batch_is_due(self) -> bool:
        """A stream has a frame, and the batch is full or no frame that was asked for is still due."""
        assert self.core is not None
        ready = len(self.core.ready())
        now = time.monotonic()
        return ready > 0 and (ready >= self.core.max_batch or all(t <= now for t in self.awaiting.values()))

    def drain(self) -> None:
        while True:
            try:
                identity, data = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.workers[identity] = time.monotonic()
            try:
                msg = m.to_engine.decode(data)
            except msgspec.DecodeError:
                log.warning("undecodable message from %r", identity)
                continue
            try:
                self.handle(identity, msg)
            except Exception:
                log.exception("handling %s from %r failed", type(msg).__name__, identity)

    def beat(self, now: float) -> None:
        for identity, heard in list(self.workers.items()):
            if now - heard > WORKER_TIMEOUT_S:
                self.forget_worker(identity)
        ready = self.core is not None
        reason = None if ready else (self.error or "engine loading")
        beat = m.Beat(self.incarnation, ready, reason, len(self.free))
        for identity in list(self.workers):
            if not self.send(identity, beat):
                self.forget_worker(identity)  # its connection is closed: the process is gone

    def forget_worker(self, identity: bytes, said_goodbye: bool = False) -> None:
        if said_goodbye:  # a clean stop, which every Ctrl-C of the service makes
            log.info("media worker %r stopped: closing its %d streams", identity, self.owned_by(identity))
        else:
            log.warning("media worker %r is gone: closing its %d streams", identity, self.owned_by(identity))
        self.workers.pop(identity, None)
        for session_id, stream in list(self.streams.items()):
            if stream.owner == identity:
                self.drop(session_id)
        for session_id, preparing in list(self.preparing.items()):
            if preparing.owner == identity:
                self.drop(session_id)
        for session_id, owner in list(self.claims.items()):
            if owner == identity:
                del self.claims[session_id]
        self.welcoming.discard(identity)
        for call, (asker, asker_call, holder) in list(self.routes.items()):
            if asker == identity:
                del self.routes[call]
            elif holder == identity:
                del self.routes[call]
                self.reply(asker, asker_call, 404, error="the session's media worker is gone")

    def owned_by(self, identity: bytes) -> int:
        return sum(s.owner == identity for s in self.streams.values())

    # -- control messages ------------------------------------------------------------------------------------
    def handle(self, sender: bytes, msg: msgspec.Struct) -> None:
        if isinstance(msg, m.FrameReady):
            self.frame_ready(sender, msg)
        elif isinstance(msg, m.Ping):
            pass
        elif isinstance(msg, m.Goodbye):
            self.forget_worker(sender, said_goodbye=True)
        elif isinstance(msg, m.Hello):
            self.hello(sender, msg)
        elif isinstance(msg, m.Claim):
            self.claims.setdefault(msg.session_id, sender)
            self.reply(sender, msg.call, 200)
        elif isinstance(msg, m.Open):
            self.open(sender, msg)
        elif isinstance(msg, m.Update):
            self.update(sender, msg)
        elif isinstance(msg, m.Close):
            self.drop(msg.session_id)
        elif isinstance(msg, m.Route):
            self.route(sender, msg)
        elif isinstance(msg, m.RouteReply):
            asker = self.routes.pop(msg.call, None)
            if asker is not None:
                self.send(asker[0], m.Reply(asker[1], msg.status, msg.body, None, msg.retry_after))

    def hello(self, sender: bytes, msg: m.Hello) -> None:
        if self.core is None or sender in self.welcoming:
            return  # not ready (the worker says Hello again on our next Beat), or its last Hello is being prepared
        for session_id in msg.claims:
            self.claims.setdefault(session_id, sender)
        taken: list[tuple[str, _Preparing, EditParams]] = []
        for session_id, slot, params in msg.streams:
            known = self.streams.get(session_id)
            if known is not None and known.owner == sender:
                continue
            if known is not None or session_id in self.preparing or slot not in self.free:
                self.send(sender, m.Lost(session_id))
                continue
            self.free.discard(slot)
            preparing = self.preparing[session_id] = _Preparing(sender, slot)
            taken.append((session_id, preparing, EditParams.model_validate(params)))

        def welcome(result: PromptResult) -> None:
            self.welcoming.discard(sender)
            for (session_id, preparing, params), prepared in zip(taken, _each(result, len(taken)), strict=True):
                if self.preparing.get(session_id) is not preparing:
                    continue  # closed meanwhile, or its worker is gone
                del self.preparing[session_id]
                if prepared is None:
                    self.free.add(preparing.slot)
                    self.send(sender, m.Lost(session_id))
                else:
                    self.register(sender, session_id, preparing.slot, params, prepared)
            if sender not in self.workers:
                return
            readings = {sid: stream.reading for sid, stream in self.streams.items() if stream.owner == sender}
            self.send(sender, m.Welcome(self.incarnation, readings))
            for session_id, stream in self.streams.items():
                if stream.owner == sender:
                    self.send(sender, m.Want(session_id))

        # A restarted engine reads the prompts of the streams it takes back in one pass; until then the worker is
        # not welcomed and its frames pass through unedited, as they did while no engine was there.
        self.welcoming.add(sender)
        self.prepare(f"hello:{sender.hex()}", [params.prompt for _, _, params in taken], welcome, bounded=False)

    def open(self, sender: bytes, msg: m.Open) -> None:
        if self.core is None:
            self.reply(sender, msg.call, 503, error=self.error or "the engine is still loading")
            return
        session_id = msg.session_id
        if session_id in self.streams or session_id in self.preparing or self.claims.get(session_id, sender) != sender:
            self.reply(sender, msg.call, 409, error=f"session {session_id!r} is open already")
            return
        if not self.free:
            self.reply(sender, msg.call, 503, error=f"server full: {self.table.layout.slots} sessions are open")
            return
        params = EditParams.model_validate(msg.params)
        slot = min(self.free)
        self.free.discard(slot)
        preparing = self.preparing[session_id] = _Preparing(sender, slot)

        def opened(result: PromptResult) -> None:
            if self.preparing.get(session_id) is not preparing:
                return  # closed while its prompt was encoded: drop() gave the slot back
            del self.preparing[session_id]
            prepared = _each(result, 1)[0]
            if prepared is None:
                self.free.add(slot)
                self.reply(sender, msg.call, 500, error=f"could not encode the prompt: {result!r}")
                return
            self.register(sender, session_id, slot, params, prepared)
            self.claims.pop(session_id, None)
            self.reply(sender, msg.call, 200, {"slot": slot, "reading": prepared.reading})
            self.send(sender, m.Want(session_id))

        # Unbounded: opens are bounded by the slots, and a connected peer must not be turned away for a busy encoder.
        self.prepare(f"open:{session_id}", [params.prompt], opened, bounded=False)

    def register(self, owner: bytes, session_id: str, slot: int, params: EditParams, prepared: PreparedPrompt) -> None:
        assert self.core is not None
        frame_slot = FrameSlot(session_id, Conditions(params, prepared.context), on_outcome=lambda outcome: None)
        self.streams[session_id] = _Stream(owner, slot, frame_slot, prepared.reading)
        self.core.slots[session_id] = frame_slot

    def update(self, sender: bytes, msg: m.Update) -> None:
        stream = self.streams.get(msg.session_id)
        if self.core is None or stream is None:
            self.reply(sender, msg.call, 404 if self.core else 503, error=f"no stream {msg.session_id!r}")
            return
        session_id = msg.session_id
        params = EditParams.model_validate(msg.params)
        older = self.pending_updates.pop(session_id, None)
        if older is not None:  # latest wins: the waiting one never applies
            self.reply(older.sender, older.call, 200, {"outcome": SUPERSEDED_UPDATE, "reading": None})
        conditions = stream.frame_slot.conditions
        editor = self.core.editor
        if editor.prompt_key(params.prompt) == editor.prompt_key(conditions.params.prompt):
            stream.frame_slot.set_conditions(params, conditions.context)  # guidance or seed only: no encoding
            self.reply(sender, msg.call, 200, {"outcome": APPLIED, "reading": stream.reading})
            return
        pending = self.pending_updates[session_id] = _PendingUpdate(sender, msg.call, params)

        def ready(result: PromptResult) -> None:
            if self.pending_updates.get(session_id) is not pending:
                return  # superseded (answered then) or closed
            del self.pending_updates[session_id]
            current = self.streams.get(session_id)
            prepared = _each(result, 1)[0]
            if current is None:
                self.reply(sender, msg.call, 404, error=f"no stream {session_id!r}")
            elif prepared is None:
                self.reply(sender, msg.call, 500, error=f"could not encode the prompt: {result!r}")
            else:  # between two batches: the next frame taken has the new prompt and params together
                current.frame_slot.set_conditions(params, prepared.context)
                current.reading = prepared.reading
                self.reply(sender, msg.call, 200, {"outcome": APPLIED, "reading": prepared.reading})

        if not self.prepare(session_id, [params.prompt], ready, bounded=True):
            del self.pending_updates[session_id]
            busy = self.prompts.max_jobs if self.prompts is not None else 0
            self.reply(
                sender,
                msg.call,
                503,
                {"retry_after": PROMPTS_BUSY_RETRY_S},
                error=f"{busy} prompt encodings are in flight already: retry shortly",
            )

    def drop(self, session_id: str) -> None:
        self.awaiting.pop(session_id, None)
        self.claims.pop(session_id, None)
        pending = self.pending_updates.pop(session_id, None)
        if pending is not None:
            self.reply(pending.sender, pending.call, 404, error=f"session {session_id!r} closed")
        preparing = self.preparing.pop(session_id, None)
        if preparing is not None:
            self.free.add(preparing.slot)
        stream = self.streams.pop(session_id, None)
        if stream is None:
            return
        if self.core is not None:
            self.core.slots.pop(session_id, None)
        self.free.add(stream.slot)

    def route(self, sender: bytes, msg: m.Route) -> None:
        stream = self.streams.get(msg.session_id)
        owner = stream.owner if stream is not None else self.claims.get(msg.session_id)
        if owner is None or owner == sender:
            self.reply(sender, msg.call, 404, error=f"no session {msg.session_id!r}")
            return
        call = next(self._call_ids)
        self.routes[call] = (sender, msg.call, owner)
        if not self.send(owner, m.Routed(call, msg.op, msg.session_id, msg.authorization, msg.body)):
            self.forget_worker(owner)

    def frame_ready(self, sender: bytes, msg: m.FrameReady) -> None:
        stream = self.streams.get(msg.session_id)
        if stream is None or stream.owner != sender:
            return
        self.awaiting.pop(msg.session_id, None)
        slot, session_id, owner = stream.slot, msg.session_id, stream.owner

        def pixels() -> np.ndarray:
            # Copied out as the engine takes it; the worker may write the next frame once asked.
            frame = self.table.read_input(slot)
            self.send(owner, m.Want(session_id, self.want_at))
            self.awaiting[session_id] = max(self.want_at, time.monotonic()) + WANT_LEAD_S + GATHER_S
            return frame

        stream.frame_slot.offer(PendingFrame(pixels=pixels, received_at=msg.received_at, meta=msg.seq))

    # -- the batch -------------------------------------------------------------------------------------------
    def step(self) -> None:
        assert self.core is not None
        chosen = self.core.select()
        if not chosen:
            return
        size = len(chosen)
        started = time.monotonic()
        # The streams in this batch are asked for their next frame now, to be converted as it ends.
        self.want_at = started + self.batch_seconds.get(size, 0.0) - WANT_LEAD_S
        outcomes, stats = self.core.run(chosen)
        first = True
        for frame_slot, outcome in outcomes:
            stream = self.streams.get(frame_slot.stream_id)
            if stream is None:  # closed while its frame was in the batch
                continue
            seq = int(outcome.pending.meta)
            self.table.write_output(stream.slot, seq, outcome.frame)
            error = None if outcome.error is None else repr(outcome.error)
            seconds = stats.seconds if first and stats.size else 0.0
            first = False
            self.send(
                stream.owner,
                m.Outcome(frame_slot.stream_id, seq, outcome.skipped, error, outcome.batch_size, seconds),
            )
        took = time.monotonic() - started
        previous = self.batch_seconds.get(size)
        self.batch_seconds[size] = took if previous is None else (1 - STEP_EMA) * previous + STEP_EMA * took


def _each(result: PromptResult, n: int) -> list[PreparedPrompt | None]:
    """A prompt job's result as one prepared prompt (or None: failed or superseded) for each of its n prompts."""
    if isinstance(result, list):
        return list(result)
    if result is not SUPERSEDED:
        log.warning("preparing prompts failed: %r", result)
    return [None] * n


def run_engine(
    spec: EngineSpec,
    address: str,
    layout: FrameTableLayout,
    incarnation: int,
    editor_factory: EditorFactory | None,
    log_level: int,
) -> None:
    """The engine process's entry point (multiprocessing spawn target)."""
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s engine[{incarnation}] %(name)s: %(message)s"
    )
    # tqdm (model loading's progress bars) would make a multiprocessing lock, a semaphore that outlives a
    # killed engine in the resource tracker; a thread lock does for one process.
    from tqdm.auto import tqdm

    tqdm.set_lock(threading.RLock())
    table = FrameTable.attach(layout)
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a worker whose connection closed fails at once
    sock.bind(address)
    server = EngineServer(sock, table, spec, incarnation)

    def load() -> None:
        try:
            editor = load_and_warm(spec, editor_factory)
        except Exception as exc:
            log.exception("engine failed to load")
            server.error = f"engine failed to load: {exc}"
            return
        finally:
            log.info("engine loader thread exited")
        if editor.resolution != layout.resolution:
            server.error = f"the editor runs at {editor.resolution}px, the frame table holds {layout.resolution}px"
            return
        server.start_core(EngineCore(editor, spec.max_batch))
        log.info("engine ready at %dpx, %d stream slots, max batch %d", layout.resolution, layout.slots, spec.max_batch)

    threading.Thread(target=load, name="engine-loader", daemon=True).start()
    try:
        server.serve_forever()
    finally:
        log.info("engine loop exited")
