"""An ASGI middleware that names the media worker (and the replica) that answered, in every response's headers."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from server.limits import ASGIApp, Message, Receive, Scope, Send


class WorkerHeaders:
    """Adds X-StreamEdit-Worker (and X-StreamEdit-Replica when set) to each HTTP response as it starts.

    Plain ASGI rather than Starlette's @app.middleware("http"): that one runs every request through a task and a
    memory stream, which cost more than the rest of a 429 when a client storms PATCHes (issue 34)."""

    def __init__(self, app: ASGIApp, worker: str, replica: str = "") -> None:
        self.app = app
        self.extra = [(b"x-streamedit-worker", worker.encode("latin-1"))]
        if replica:
            self.extra.append((b"x-streamedit-replica", replica.encode("latin-1")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = _with_headers(message, self.extra)
            await send(message)

        await self.app(scope, receive, named_send)


def _with_headers(message: Message, extra: list[tuple[bytes, bytes]]) -> MutableMapping[str, Any]:
    return {**message, "headers": [*message.get("headers", []), *extra]}
