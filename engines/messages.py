"""The control messages between media workers and the engine process (msgspec structs over ZeroMQ).

Only small typed messages travel here; pixels go through the FrameTable. Media worker → engine: Hello,
Ping, Claim, Open, Update, Close, FrameReady, Route, RouteReply, Goodbye. Engine → media worker: Beat, Welcome, Reply,
Want, Outcome, Routed, Lost.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Hello(msgspec.Struct, tag=True):
    """A media worker (re)joins an engine: the streams it holds, so a restarted engine takes them back."""

    streams: list[tuple[str, int, dict[str, Any]]]  # (session id, slot, params)
    claims: list[str] = []  # sessions it holds that have no stream yet


class Claim(msgspec.Struct, tag=True):
    """A session this media worker holds before it has a stream (its peer is still connecting): the engine
    routes calls for it here, but gives it no slot."""

    call: int
    session_id: str


class Ping(msgspec.Struct, tag=True):
    """The media worker is alive (the engine frees a silent worker's slots)."""


class Goodbye(msgspec.Struct, tag=True):
    """The media worker is stopping on purpose: the engine closes its streams and forgets it without the warning
    it gives a worker that vanished."""


class Open(msgspec.Struct, tag=True):
    call: int
    session_id: str
    params: dict[str, Any]


class Update(msgspec.Struct, tag=True):
    call: int
    session_id: str
    params: dict[str, Any]


class Close(msgspec.Struct, tag=True):
    session_id: str


class FrameReady(msgspec.Struct, tag=True):
    """The stream's next frame is in its slot's input."""

    session_id: str
    seq: int
    received_at: float


class Route(msgspec.Struct, tag=True):
    """A REST call on a session held by another media worker, to be carried to it."""

    call: int
    op: str
    session_id: str
    authorization: str | None
    body: dict[str, Any]


class RouteReply(msgspec.Struct, tag=True):
    """The holder's answer to a Routed call."""

    call: int
    status: int
    body: dict[str, Any] | None
    retry_after: int | None = None  # seconds, the Retry-After of a 429 or 503


class Beat(msgspec.Struct, tag=True):
    """The engine is alive; `ready` once loaded and warm."""

    incarnation: int
    ready: bool
    reason: str | None
    capacity_left: int


class Welcome(msgspec.Struct, tag=True):
    """The engine took a worker's Hello; streams it could not take back follow as Lost. `readings`: how it read
    the prompt of each stream it holds for the worker (a prompt changed while no engine was there is read here)."""

    incarnation: int
    readings: dict[str, list[tuple[str, float]] | None] = {}


class Reply(msgspec.Struct, tag=True):
    call: int
    status: int
    body: dict[str, Any] | None = None
    error: str | None = None
    retry_after: int | None = None  # a routed call's Retry-After (RouteReply)


class Want(msgspec.Struct, tag=True):
    """The engine took the stream's last frame (or just admitted it): send the next one, converted no earlier
    than `not_before` (time.monotonic()), when the batch now running is about to end, so it is fresh."""

    session_id: str
    not_before: float = 0.0


class Outcome(msgspec.Struct, tag=True):
    """Frame `seq` of a stream is done; the edited pixels are in its slot's output."""

    session_id: str
    seq: int
    skipped: bool
    error: str | None
    batch_size: int
    batch_seconds: float  # > 0 on the first row of a batch only, so a batch is reported once


class Routed(msgspec.Struct, tag=True):
    """A call another media worker received for a session this one holds."""

    call: int
    op: str
    session_id: str
    authorization: str | None
    body: dict[str, Any]


class Lost(msgspec.Struct, tag=True):
    """The engine could not take a stream back (its slot went to another): close the session."""

    session_id: str


ToEngine = Hello | Ping | Claim | Open | Update | Close | FrameReady | Route | RouteReply | Goodbye
ToWorker = Beat | Welcome | Reply | Want | Outcome | Routed | Lost

encoder = msgspec.msgpack.Encoder()
to_engine = msgspec.msgpack.Decoder(ToEngine)
to_worker = msgspec.msgpack.Decoder(ToWorker)
