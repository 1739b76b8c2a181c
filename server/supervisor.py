"""`streamedit serve` as processes: one engine process and N media workers sharing the HTTP port, restarted if they die.

Each media worker is a uvicorn server with its own event loop, peer connections and sessions. They listen
on the same port through SO_REUSEPORT, so the kernel spreads new connections over them; the engine process
owns the session table, so a call that lands on a worker that does not hold the session is carried to the
one that does, and admission counts every worker's sessions.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn
from prometheus_client.multiprocess import mark_process_dead

from engines.client import EngineAddress, connect_engine, launch_engine
from server.metrics import MULTIPROCESS_ENV
from server.settings import Settings

log = logging.getLogger("server.supervisor")

#: how long a media worker gets to close its sessions on shutdown before it is killed
STOP_GRACE_S = 10.0


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT, so every media worker can bind the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class SupervisedServer(uvicorn.Server):
    """uvicorn stopped by its supervisor alone (SIGTERM). Ctrl-C sends SIGINT to the terminal's whole process group;
    the supervisor turns it into one orderly stop (workers close their sessions, then the engine), where a worker
    that also obeyed it would hear two signals and re-raise the SIGINT as a KeyboardInterrupt traceback."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        previous = signal.signal(signal.SIGTERM, self.handle_exit)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


def run_media_worker(settings: Settings, address: EngineAddress, index: int) -> None:
    """A media worker process: the app on its own event loop, connected to the shared engine."""
    from server.app import create_app
    from server.cli import configure_logging
    from streamedit.process_name import name_this_process

    name_this_process(f"se-media-{index}")

    configure_logging(settings, f"media[{index}]")
    engine = connect_engine(settings.engine_spec(), address)
    app = create_app(settings, engine=engine, worker_name=str(index))
    sock = listening_socket(settings.host, settings.port)
    sock.listen(2048)
    config = uvicorn.Config(app, loop="asyncio", log_level=settings.log_level)
    try:
        SupervisedServer(config).run(sockets=[sock])
    finally:
        log.info("media worker %d exited", index)


class Supervisor:
    """Starts the engine and the media workers, restarts any media worker that exits, stops all on a signal."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self.workers: dict[int, BaseProcess] = {}
        self._spawn = multiprocessing.get_context("spawn")

    def _start_worker(self, index: int, address: EngineAddress) -> None:
        process = self._spawn.Process(
            target=run_media_worker,
            args=(self.settings, address, index),
            name=f"streamedit-media-{index}",
        )
        process.start()
        self.workers[index] = process
        log.info("media worker %d started (pid %s)", index, process.pid)

    def run(self) -> int:
        # Fail early, with a message, if the port is taken by something that is not one of ours.
        listening_socket(self.settings.host, self.settings.port).close()
        metrics_dir = tempfile.mkdtemp(prefix="streamedit-metrics-")
        if self.settings.media_workers > 1:  # every worker's metrics add up in one scrape (server/metrics.py)
            os.environ[MULTIPROCESS_ENV] = metrics_dir
        launcher = launch_engine(self.settings.engine_spec(), self.settings.max_sessions)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        try:
            for index in range(self.settings.media_workers):
                self._start_worker(index, launcher.address)
            while not self.stopping.is_set():
                sentinels: list[Any] = [p.sentinel for p in self.workers.values()]
                multiprocessing.connection.wait(sentinels, timeout=0.5)
                for index, process in list(self.workers.items()):
                    if process.is_alive() or self.stopping.is_set():
                        continue
                    log.error(
                        "media worker %d (pid %s) exited with code %s: its sessions are gone; starting another",
                        index,
                        process.pid,
                        process.exitcode,
                    )
                    if process.pid is not None:  # its live gauges leave the sum; its counters stay
                        mark_process_dead(process.pid, metrics_dir)
                    time.sleep(0.5)  # a worker that cannot start at all must not spin
                    self._start_worker(index, launcher.address)
        finally:
            self._stop_workers()
            launcher.stop()
            shutil.rmtree(metrics_dir, ignore_errors=True)
            log.info("supervisor exited")
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        self.stopping.set()

    def _stop_workers(self) -> None:
        for process in self.workers.values():
            if process.is_alive():
                process.terminate()  # uvicorn shuts down gracefully on SIGTERM: sessions are closed
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
