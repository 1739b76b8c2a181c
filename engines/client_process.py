"""The engine in its own process: a launcher that keeps one running, and the media worker's client of it.

The client talks to the engine over a ZeroMQ DEALER socket and moves pixels through the FrameTable. It
converts a camera frame only when the engine has asked for the stream's next one, so no converted frame is
dropped. It knows the engine is gone the moment the socket's connection closes (a socket monitor), and until a
new engine has taken its streams back, every camera frame goes straight back unedited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from engines import messages as m
from engines.client import (
    BatchReport,
    EditorFactory,
    EngineAddress,
    EngineBusy,
    EngineClient,
    EngineFull,
    EngineHealth,
    EngineOutcome,
    EngineStream,
    EngineUnavailable,
    OutcomeHandler,
    PromptReading,
    RoutedCall,
    RoutedReply,
    RouteHandler,
    StreamNotFound,
    StreamUpdate,
    to_reading,
)
from engines.frame_table import FrameTable
from engines.params import EditParams
from engines.spec import EngineSpec, ModelInfo

log = logging.getLogger(__name__)

PING_INTERVAL_S = 0.25
#: no Beat for this long: the engine is hung even though its socket is still open (its exit is seen at once
#: by the socket monitor; this is generous so that a loaded machine's slow batch is not taken for a hang)
BEAT_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 10.0
#: how long a call waits for the engine's Welcome when this worker is connected but not yet welcomed
WELCOME_WAIT_S = 2.0
#: a Hello the engine has not answered (it was still loading) is said again after this long
HELLO_REPEAT_S = 1.0
#: an engine that dies sooner than this after starting is restarted after a growing pause
QUICK_DEATH_S = 10.0
#: how long closing waits for the Goodbye to leave (the engine then forgets this worker without a warning)
GOODBYE_LINGER_MS = 200


def _engine_main(*args: Any) -> None:
    """The engine process's entry point; imported there, so the launching process never loads torch."""
    # Ctrl-C reaches the terminal's whole process group. The launching process stops the engine itself, after the
    # media workers have closed their sessions; an engine that died of the same SIGINT first would print a
    # KeyboardInterrupt traceback and have every worker log it as lost.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from engines.core_process import run_engine
    from streamedit.process_name import name_this_process

    name_this_process("se-engine")

    run_engine(*args)


class EngineLauncher:
    """Owns the frame table and the engine process, and starts a new engine process whenever one exits."""

    def __init__(
        self, spec: EngineSpec, resolution: int, slots: int, editor_factory: EditorFactory | None = None
    ) -> None:
        self.spec = spec
        self.editor_factory = editor_factory
        self.table = FrameTable.create(slots, resolution)
        self._dir = tempfile.mkdtemp(prefix="streamedit-engine-")
        self.address = EngineAddress(f"ipc://{self._dir}/engine.sock", self.table.layout)
        self.incarnation = 0
        self.process: multiprocessing.process.BaseProcess | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._keep_running, name="engine-launcher", daemon=True)
            self._watcher.start()

    def _spawn(self) -> multiprocessing.process.BaseProcess:
        self.incarnation += 1
        process = multiprocessing.get_context("spawn").Process(
            target=_engine_main,
            args=(
                self.spec,
                self.address.endpoint,
                self.table.layout,
                self.incarnation,
                self.editor_factory,
                logging.getLogger().getEffectiveLevel(),
            ),
            name=f"streamedit-engine-{self.incarnation}",
            daemon=True,
        )
        process.start()
        log.info("engine process %d started (pid %s)", self.incarnation, process.pid)
        return process

    def _keep_running(self) -> None:
        pause = 0.0
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                self.process = self._spawn()
                self.process.join()
                if self._stopping.is_set():
                    break
                lived = time.monotonic() - started
                log.error(
                    "engine process %d (pid %s) exited with code %s after %.1f s: starting another",
                    self.incarnation,
                    self.process.pid,
                    self.process.exitcode,
                    lived,
                )
                pause = min(max(pause * 2, 0.5), 30.0) if lived < QUICK_DEATH_S else 0.0
                self._stopping.wait(pause)
        finally:
            log.info("engine launcher thread exited")

    def stop(self) -> None:
        self._stopping.set()
        process = self.process
        if process is not None and process.is_alive():
            process.terminate()
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        if self._watcher is not None:
            self._watcher.join(5)
        self.table.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@dataclass
class _Frame:
    pixels: Callable[[], np.ndarray]
    received_at: float
    meta: Any


@dataclass
class _ShmStream(EngineStream):
    """A stream's media-side state: its slot, the newest unconverted frame, and whether the engine wants one."""

    client: ProcessEngineClient
    session_id: str
    slot: int
    params: EditParams
    on_outcome: OutcomeHandler
    pending: _Frame | None = None
    wanted: bool = False
    seq: int = 0
    in_flight: dict[int, _Frame] = field(default_factory=dict)
    closed: bool = False
    reading: PromptReading | None = None

    def submit(self, pixels: Callable[[], np.ndarray], received_at: float, meta: Any) -> bool:
        if self.closed:
            return False
        frame = _Frame(pixels, received_at, meta)
        if not self.client.welcomed:
            self._pass_through(frame)
            return False
        replaced = self.pending is not None
        self.pending = frame
        if self.wanted:
            self.publish()
        return replaced

    def _pass_through(self, frame: _Frame) -> None:
        """The engine is down: the camera frame goes back unedited, so the viewer still sees themselves."""
        try:
            pixels = frame.pixels()
        except Exception as exc:
            self.on_outcome(EngineOutcome(self.client.blank, frame.received_at, frame.meta, error=repr(exc)))
            return
        self.on_outcome(EngineOutcome(pixels, frame.received_at, frame.meta, unedited=True))

    def want(self, incarnation: int) -> None:
        """The engine may take a frame now: publish the newest, or the next to come."""
        if self.closed or not self.client.welcomed or incarnation != self.client.incarnation:
            return  # a Want from an engine that is gone since
        self.wanted = True
        if self.pending is not None:
            self.publish()

    def publish(self) -> None:
        """Convert the newest frame into the slot and tell the engine: the engine asked for it."""
        frame, self.pending = self.pending, None
        if frame is None or self.closed:
            return
        try:
            pixels = frame.pixels()
        except Exception as exc:  # an undecodable frame fails alone; the engine still wants the next one
            self.on_outcome(EngineOutcome(self.client.blank, frame.received_at, frame.meta, error=repr(exc)))
            return
        self.seq += 1
        self.client.table.write_input(self.slot, self.seq, pixels)
        self.in_flight[self.seq] = frame
        self.wanted = False
        if not self.client.send(m.FrameReady(self.session_id, self.seq, frame.received_at)):
            self.in_flight.pop(self.seq, None)
            self._pass_through(frame)

    def done(self, msg: m.Outcome) -> None:
        frame = self.in_flight.pop(msg.seq, None)
        for older in [s for s in self.in_flight if s < msg.seq]:
            del self.in_flight[older]
        if frame is None or self.closed:
            return
        pixels = self.client.table.read_output(self.slot, msg.seq)
        if pixels is None:
            return  # superseded by a newer output of this stream, whose Outcome follows
        self.on_outcome(
            EngineOutcome(
                pixels, frame.received_at, frame.meta, skipped=msg.skipped, error=msg.error, batch_size=msg.batch_size
            )
        )

    def engine_lost(self) -> None:
        """The frame the engine held will never come back: hand it back unedited, stop waiting for a Want."""
        for frame in self.in_flight.values():
            self._pass_through(frame)
        self.in_flight.clear()
        self.wanted = False


class ProcessEngineClient(EngineClient):
    """A media worker's connection to the engine process (and, if `owned`, the launcher it starts)."""

    def __init__(self, info: ModelInfo, address: EngineAddress, owned: EngineLauncher | None = None) -> None:
        super().__init__(info)
        self.address = address
        self.launcher = owned
        self.table = FrameTable.attach(address.layout) if owned is None else owned.table
        self.blank = np.zeros((address.layout.resolution,) * 2 + (3,), np.uint8)
        self.identity = f"media-{os.getpid()}-{id(self):x}".encode()
        self.welcomed = False  # the engine took this worker's streams: frames go to it
        self._welcome = asyncio.Event()  # set while welcomed
        self.connected = False
        self.incarnation = 0
        self.first_incarnation: int | None = None
        self.last_beat: m.Beat | None = None
        self.last_heard_at = 0.0  # when the engine last said anything (a Beat, a Welcome, a Reply, ...)
        self._hello_sent_at = 0.0
        self._capacity = 0  # the engine's free slots at its last Beat, less what this worker took since
        self._streams: dict[str, _ShmStream] = {}
        self._claims: set[str] = set()
        self._calls: dict[int, asyncio.Future[m.Reply]] = {}
        self._call_ids = itertools.count(1)
        self._route_handler: RouteHandler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._shut_down = False
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.launcher is not None:
            self.launcher.start()
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        # Queue nothing for an engine that is not connected: a restarted engine must not get a dead one's mail.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 200)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.address.endpoint)
        self._sock, self._monitor = sock, monitor
        for name, coro in (("reader", self._read(sock)), ("monitor", self._watch(monitor)), ("pinger", self._ping())):
            self._tasks.append(asyncio.create_task(self._logged(name, coro)))

    @staticmethod
    async def _logged(name: str, coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("engine client task %s crashed", name)
        finally:
            log.info("engine client task %s exited", name)

    async def shutdown(self) -> None:
        if self._shut_down:  # once: a second call must not close the frame table again
            return
        self._shut_down = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_calls("the service is shutting down")
        if self._sock is not None:
            goodbye = self.send(m.Goodbye())
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            # A moment to deliver the Goodbye (nothing is queued without a connected engine: IMMEDIATE).
            self._sock.close(linger=GOODBYE_LINGER_MS if goodbye else 0)
        if self._monitor is not None:
            self._monitor.close(0)
        if self._ctx is not None:
            self._ctx.term()
        self._sock = self._monitor = self._ctx = None
        if self.launcher is not None:
            await asyncio.to_thread(self.launcher.stop)
        else:
            self.table.close()

    # -- the channel -----------------------------------------------------------------------------------------
    def send(self, msg: msgspec.Struct) -> bool:
        """Send now or not at all (False: no engine connected)."""
        if self._sock is None:
            return False
        sent = self._sock.send(m.encoder.encode(msg), zmq.NOBLOCK)
        return sent.exception() is None if sent.done() else True

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            data = await sock.recv()
            try:
                msg = m.to_worker.decode(data)
            except msgspec.DecodeError:
                log.warning("undecodable message from the engine")
                continue
            self._handle(msg)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = await recv_monitor_message(monitor)
            # Not EVENT_CONNECTED: with IMMEDIATE a message sent before the handshake is done is dropped, and a
            # Hello lost so waited for the engine's next Beat to be said again (a second or more of 503s).
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                self._send_hello()
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected = False
                self._lose_engine("the engine process exited")

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            self.send(m.Ping())
            if self.engine_silent(time.monotonic()):
                self._lose_engine(f"no word from the engine for {BEAT_TIMEOUT_S:g} s")

    def engine_silent(self, now: float) -> bool:
        """Whether the engine that took this worker's streams has said nothing for BEAT_TIMEOUT_S."""
        return self.welcomed and now - self.last_heard_at > BEAT_TIMEOUT_S

    def _send_hello(self) -> None:
        self._hello_sent_at = time.monotonic()
        streams = [(s.session_id, s.slot, s.params.model_dump()) for s in self._streams.values()]
        self.send(m.Hello(streams, sorted(self._claims)))

    def _lose_engine(self, why: str) -> None:
        if self.welcomed:
            self.on_engine_lost(why)
            log.error("engine lost (%s): %d streams pass through until it is back", why, len(self._streams))
        self.welcomed = False
        self._welcome.clear()
        self.last_beat = None
        for stream in self._streams.values():
            stream.engine_lost()
        self._fail_calls(why)

    def _fail_calls(self, why: str) -> None:
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineUnavailable(why))
        self._calls.clear()

    def _handle(self, msg: msgspec.Struct) -> None:
        # Any message is word from the engine. A restarted worker's Welcome can come before the engine's first Beat,
        # and counting Beats alone took that worker's engine for silent since the epoch: "engine lost" at startup.
        self.last_heard_at = time.monotonic()
        if isinstance(msg, m.Outcome):
            stream = self._streams.get(msg.session_id)
            if stream is not None:
                stream.done(msg)
            if msg.batch_seconds > 0:
                self.on_batch(BatchReport(msg.batch_size, msg.batch_seconds))
        elif isinstance(msg, m.Want):
            stream = self._streams.get(msg.session_id)
            if stream is not None:
                wait = msg.not_before - time.monotonic()
                if wait > 0:  # convert the newest frame as the engine's batch ends, not now
                    asyncio.get_running_loop().call_later(wait, stream.want, self.incarnation)
                else:
                    stream.want(self.incarnation)
        elif isinstance(msg, m.Reply):
            future = self._calls.pop(msg.call, None)
            if future is not None and not future.done():
                future.set_result(msg)
        elif isinstance(msg, m.Beat):
            self.last_beat = msg
            self._capacity = msg.capacity_left
            if self.first_incarnation is None and msg.ready:
                self.first_incarnation = msg.incarnation
            stale = not self.welcomed or msg.incarnation != self.incarnation
            if msg.ready and stale and time.monotonic() - self._hello_sent_at > HELLO_REPEAT_S:
                self.welcomed = False
                self._welcome.clear()
                self._send_hello()
        elif isinstance(msg, m.Welcome):
            if not self.welcomed:
                log.info("engine %d took back %d streams", msg.incarnation, len(self._streams))
            self.welcomed, self.incarnation = True, msg.incarnation
            for session_id, reading in msg.readings.items():
                if (stream := self._streams.get(session_id)) is not None:
                    stream.reading = to_reading(reading)
            self._welcome.set()
            if self.first_incarnation is None:
                self.first_incarnation = msg.incarnation
        elif isinstance(msg, m.Routed):
            asyncio.create_task(self._answer_routed(msg))
        elif isinstance(msg, m.Lost):
            stream = self._streams.pop(msg.session_id, None)
            if stream is not None:
                stream.closed = True
                stream.on_outcome(EngineOutcome(self.blank, time.monotonic(), None, error="the engine lost the stream"))

    async def _answer_routed(self, msg: m.Routed) -> None:
        reply = RoutedReply(404, {"detail": f"no session {msg.session_id!r}"})
        if self._route_handler is not None:
            try:
                reply = await self._route_handler(
                    RoutedCall(msg.op, msg.session_id, msg.authorization, msg.body)  # type: ignore[arg-type]
                )
            except Exception as exc:
                log.exception("routed %s of session %s failed", msg.op, msg.session_id)
                reply = RoutedReply(500, {"detail": f"internal error: {type(exc).__name__}"})
        self.send(m.RouteReply(msg.call, reply.status, reply.body, reply.retry_after))

    async def _call(self, make: Callable[[int], msgspec.Struct]) -> m.Reply:
        if not self.welcomed and self.connected:
            # A media worker that has just started, or whose engine just came back, is welcomed within
            # milliseconds: a call that arrives first waits for it rather than failing.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._welcome.wait(), WELCOME_WAIT_S)
        if not self.welcomed:
            raise EngineUnavailable(self.health().reason or "the engine is not ready")
        call = next(self._call_ids)
        future: asyncio.Future[m.Reply] = asyncio.get_running_loop().create_future()
        self._calls[call] = future
        if not self.send(make(call)):
            self._calls.pop(call, None)
            raise EngineUnavailable("the engine is not connected")
        try:
            return await asyncio.wait_for(future, CALL_TIMEOUT_S)
        except TimeoutError:
            self._calls.pop(call, None)
            raise EngineUnavailable(f"the engine did not answer in {CALL_TIMEOUT_S:g} s") from None

    # -- EngineClient ----------------------------------------------------------------------------------------
    async def claim(self, session_id: str) -> None:
        self._claims.add(session_id)
        # Answered, so that a call for the session through another media worker, which may reach the engine
        # before this worker's own messages do, finds it. An engine that is down gets it again with Hello.
        with contextlib.suppress(EngineUnavailable):
            await self._call(lambda call: m.Claim(call, session_id))

    async def open_stream(self, session_id: str, params: EditParams, on_outcome: OutcomeHandler) -> EngineStream:
        reply = await self._call(lambda call: m.Open(call, session_id, params.model_dump()))
        if reply.status != 200 or reply.body is None:
            error = EngineFull if "full" in (reply.error or "") else EngineUnavailable
            raise error(reply.error or f"the engine refused the stream ({reply.status})")
        # The engine wants its first frame at once (its Want may be read before this coroutine resumes).
        stream = _ShmStream(self, session_id, int(reply.body["slot"]), params, on_outcome, wanted=True)
        stream.reading = to_reading(reply.body.get("reading"))
        self._streams[session_id] = stream
        self._claims.discard(session_id)
        self._capacity -= 1
        return stream

    async def update_stream(self, session_id: str, params: EditParams) -> StreamUpdate:
        stream = self._streams.get(session_id)
        if stream is None:
            raise StreamNotFound(f"no session {session_id!r}")
        # The newest params are what a restarted engine takes back with the stream, applied or still encoding.
        previous, stream.params = stream.params, params
        if not self.welcomed:
            if params.prompt != previous.prompt:
                stream.reading = None  # read by the next engine, which is not here to say how
            return StreamUpdate(True, stream.reading)  # the next engine takes them with the stream
        try:
            reply = await self._call(lambda call: m.Update(call, session_id, params.model_dump()))
        except EngineUnavailable:
            if stream.params is params:
                stream.params = previous
            raise
        body = reply.body or {}
        if reply.status != 200:
            if stream.params is params:
                stream.params = previous
            if reply.status == 503 and "retry_after" in body:
                raise EngineBusy(reply.error or "the prompt encoder is busy", int(body["retry_after"]))
            raise EngineUnavailable(reply.error or f"the engine refused the update ({reply.status})")
        if body.get("outcome") == "superseded":
            return StreamUpdate(False, stream.reading)
        stream.reading = to_reading(body.get("reading"))
        return StreamUpdate(True, stream.reading)

    async def close_stream(self, session_id: str) -> None:
        stream = self._streams.pop(session_id, None)
        if stream is not None:
            stream.closed = True
            stream.in_flight.clear()
            self._capacity += 1
        if stream is not None or session_id in self._claims:
            self._claims.discard(session_id)
            self.send(m.Close(session_id))

    def health(self) -> EngineHealth:
        restarts = 0 if self.first_incarnation is None else self.incarnation - self.first_incarnation
        beat = self.last_beat
        if self.welcomed and beat is not None:
            return EngineHealth(True, None, max(self._capacity, 0), restarts)
        if beat is not None and beat.reason:
            reason = beat.reason
        elif self.first_incarnation is None:
            reason = "engine loading"
        else:
            reason = "the engine is restarting"
        return EngineHealth(False, reason, 0, restarts)

    def serve_routed(self, handler: RouteHandler) -> None:
        self._route_handler = handler

    async def route(self, call: RoutedCall) -> RoutedReply:
        reply = await self._call(lambda n: m.Route(n, call.op, call.session_id, call.authorization, call.body))
        if reply.status == 404 and reply.body is None:
            raise StreamNotFound(reply.error or f"no session {call.session_id!r}")
        return RoutedReply(reply.status, reply.body, reply.retry_after)
