"""Shared fixtures: the real shipped editor (loaded once), a real uvicorn server on 127.0.0.1, clip frames."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from aiortc import RTCConfiguration, RTCPeerConnection

from engines.client import EditorFactory
from engines.editor import Editor
from engines.loader import EngineSpec, load_editor
from loadtest.client import ClipTrack, EditSession, load_clip, pin_loopback_candidates
from server.app import create_app
from server.settings import Settings

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
if not MEDIA.is_dir():  # a checkout elsewhere: shared/ beside the repo root, or inside it
    MEDIA = Path(__file__).resolve().parents[1] / "shared" / "media"


def media_clip(name: str = "asl_book.mkv") -> Path:
    path = MEDIA / name
    if not path.is_file():
        pytest.skip(f"real clips not found at {MEDIA} (shared/media beside the checkout)")
    return path


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads stall each other
    (test_engine_loading.py: 5 s with one thread, 90 s with two, under load from other processes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def editor() -> Editor:
    """The shipped default editor on the torch backend (no export step; the fastest to load)."""
    return load_editor(EngineSpec(backend="torch", threads=2))


@pytest.fixture(scope="session")
def clip_frames() -> list[np.ndarray]:
    return load_clip(media_clip(), 320, 240, max_frames=90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RunningServer:
    """A real uvicorn server running the app in this event loop, and an HTTP client for it."""

    def __init__(self, url: str, http: httpx.AsyncClient, app: Any) -> None:
        self.url = url
        self.http = http
        self.app = app
        self.sessions: list[EditSession] = []

    async def open_session(
        self, frames: list[np.ndarray], fps: float = 30.0, edit: dict[str, Any] | None = None, keep_images: int = 1
    ) -> EditSession:
        session = EditSession(self.url, ClipTrack(frames, fps), self.http, keep_images=keep_images)
        self.sessions.append(session)
        response = await session.open(edit)
        assert response.status_code == 201, response.text
        return session

    @property
    def registry(self) -> Any:
        return self.app.state.registry


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def unanswered_offer(frames: list) -> tuple[RTCPeerConnection, str]:
    """A real offer whose client will never apply the answer: the server's peer never connects."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(ClipTrack(frames))
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


@contextlib.asynccontextmanager
async def running_server(
    editor_factory: EditorFactory | None = None, wait_ready: bool = True, **overrides: Any
) -> AsyncIterator[RunningServer]:
    """Serve create_app on a free loopback port until the block ends: the engine in its own process (unless
    `engine="thread"`), the shipped editor on the torch backend unless `editor_factory` (picklable) says else."""
    port = free_port()
    overrides = {"backend": "torch", "threads": 2, **overrides}
    settings = Settings(host="127.0.0.1", port=port, **overrides)
    app = create_app(settings, editor_factory=editor_factory)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="asyncio", log_level="warning"))
    task = asyncio.create_task(server.serve())
    pin_loopback_candidates()
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=20) as http:
        running = RunningServer(url, http, app)
        try:
            await wait_for(lambda: server.started, 20, "uvicorn to start")
            if wait_ready:
                await wait_for(lambda: app.state.engine.health().ready, 90, "the engine to load")
            yield running
        finally:
            for session in running.sessions:
                with contextlib.suppress(Exception):
                    await session.close(delete=False)
            server.should_exit = True
            await asyncio.wait_for(task, 20)
