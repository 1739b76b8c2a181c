"""The engine process: loads the editor, keeps the stream table, and runs EngineCore batches behind a ROUTER socket.

One thread runs the loop: drain control messages, run one batch if any stream has a frame, publish outcomes.
Loading happens on a second thread so the loop answers Beats (not ready yet) meanwhile. The stream table
(session → media worker, slot, conditions) lives here, so admission counts every worker's sessions and a
call that lands on the wrong worker is carried to the right one.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
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
        for session_id, owner in list(self.claims.items()):
            if owner == identity:
                del self.claims[session_id]
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
                self.reply(asker[0], asker[1], msg.status, msg.body)

    def hello(self, sender: bytes, msg: m.Hello) -> None:
        if self.core is None:
            return  # not ready: the worker says Hello again on our next Beat
        for session_id in msg.claims:
            self.claims.setdefault(session_id, sender)
        for session_id, slot, params in msg.streams:
            known = self.streams.get(session_id)
            if known is not None and known.owner == sender:
                continue
            if known is not None or slot not in self.free:
                self.send(sender, m.Lost(session_id))
                continue
            self.free.discard(slot)
            self.register(sender, session_id, slot, EditParams.model_validate(params))
        readings = {sid: stream.reading for sid, stream in self.streams.items() if stream.owner == sender}
        self.send(sender, m.Welcome(self.incarnation, readings))
        for session_id, stream in self.streams.items():
            if stream.owner == sender:
                self.send(sender, m.Want(session_id))

    def open(self, sender: bytes, msg: m.Open) -> None:
        if self.core is None:
            self.reply(sender, msg.call, 503, error=self.error or "the engine is still loading")
            return
        if msg.session_id in self.streams or self.claims.get(msg.session_id, sender) != sender:
            self.reply(sender, msg.call, 409, error=f"session {msg.session_id!r} is open already")
            return
        if not self.free:
            self.reply(sender, msg.call, 503, error=f"server full: {self.table.layout.slots} sessions are open")
            return
        slot = min(self.free)
        self.free.discard(slot)
        try:
            self.register(sender, msg.session_id, slot, EditParams.model_validate(msg.params))
        except Exception as exc:
            self.free.add(slot)
            self.reply(sender, msg.call, 500, error=f"could not open the stream: {exc!r}")
            return
        self.claims.pop(msg.session_id, None)
        self.reply(sender, msg.call, 200, {"slot": slot, "reading": self.streams[msg.session_id].reading})
        self.send(sender, m.Want(msg.session_id))

    def register(self, owner: bytes, session_id: str, slot: int, params: EditParams) -> None:
        assert self.core is not None
        context = self.core.editor.encode_prompt(params.prompt)
        reading = self.core.editor.read_prompt(params.prompt)
        frame_slot = FrameSlot(session_id, Conditions(params, context), on_outcome=lambda outcome: None)
        self.streams[session_id] = _Stream(owner, slot, frame_slot, reading)
        self.core.slots[session_id] = frame_slot

    def update(self, sender: bytes, msg: m.Update) -> None:
        stream = self.streams.get(msg.session_id)
        if self.core is None or stream is None:
            self.reply(sender, msg.call, 404 if self.core else 503, error=f"no stream {msg.session_id!r}")
            return
        params = EditParams.model_validate(msg.params)
        conditions = stream.frame_slot.conditions
        context = conditions.context
        if params.prompt != conditions.params.prompt:
            context = self.core.editor.encode_prompt(params.prompt)
            stream.reading = self.core.editor.read_prompt(params.prompt)
        stream.frame_slot.set_conditions(params, context)
        self.reply(sender, msg.call, 200, {"reading": stream.reading})

    def drop(self, session_id: str) -> None:
        self.awaiting.pop(session_id, None)
        self.claims.pop(session_id, None)
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
        server.core = EngineCore(editor, spec.max_batch)
        log.info("engine ready at %dpx, %d stream slots, max batch %d", layout.resolution, layout.slots, spec.max_batch)

    threading.Thread(target=load, name="engine-loader", daemon=True).start()
    try:
        server.serve_forever()
    finally:
        log.info("engine loop exited")
