"""`streamedit fleet`: N replicas, the nginx proxy that routes by replica name, and a coturn relay, on loopback.

Each replica is a whole `streamedit serve` (its engine process, its media workers) with its own HTTP port, UDP
port range and `--replica` name; nginx runs the configuration `fleet.routing` writes; coturn relays media for
clients that can only reach a TURN server. All of them are children of this process and stop with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fleet.routing import Replica, local_nginx_config

SETUP_SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "local" / "setup.sh"
NGINX = Path("/usr/sbin/nginx")
TURNSERVER = Path("/usr/bin/turnserver")


@dataclass(frozen=True)
class FleetConfig:
    """Where everything listens. Replica i serves HTTP on first_replica_port + i and media on its own UDP range."""

    replicas: int = 2
    host: str = "127.0.0.1"
    port: int = 8080
    first_replica_port: int = 8101
    first_udp_port: int = 40000
    udp_ports_per_replica: int = 100
    turn_port: int = 3478
    turn_relay_ports: tuple[int, int] = (49160, 49200)
    turn_user: str = "streamedit"
    turn_password: str = "streamedit-local"
    replica_args: list[str] = field(default_factory=list)

    def replica_name(self, index: int) -> str:
        return f"streamedit-{index}"

    def turn_server(self) -> dict[str, object]:
        """The TURN entry replicas and clients use (an `ice_servers` item)."""
        return {
            "urls": [f"turn:{self.host}:{self.turn_port}?transport=udp"],
            "username": self.turn_user,
            "credential": self.turn_password,
        }


def coturn_config(config: FleetConfig, workdir: Path) -> str:
    """A turnserver.conf for loopback: long-term credentials, UDP only, loopback peers allowed."""
    low, high = config.turn_relay_ports
    return "\n".join(
        [
            f"listening-ip={config.host}",
            f"relay-ip={config.host}",
            f"listening-port={config.turn_port}",
            f"min-port={low}",
            f"max-port={high}",
            "lt-cred-mech",
            f"user={config.turn_user}:{config.turn_password}",
            "realm=streamedit.local",
            "fingerprint",
            "no-tls",
            "no-dtls",
            "no-tcp-relay",
            "no-cli",
            "no-multicast-peers",
            # Everything here is on 127.0.0.1: without this, coturn refuses to relay to loopback peers.
            "allow-loopback-peers",
            "log-file=stdout",
            f"pidfile={workdir / 'turnserver.pid'}",
            "",
        ]
    )


class LocalFleet:
    """Starts the replicas, coturn and nginx; `stop()` (or leaving the `with` block) ends them all."""

    def __init__(self, config: FleetConfig, workdir: Path | None = None, log_dir: Path | None = None) -> None:
        self.config = config
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="streamedit-fleet-"))
        self.log_dir = Path(log_dir or self.workdir)
        self.replicas: dict[str, subprocess.Popen[bytes]] = {}
        self.addresses: dict[str, str] = {}  # replica name -> host:port
        self.nginx: subprocess.Popen[bytes] | None = None
        self.coturn: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def replica_url(self, name: str) -> str:
        return f"http://{self.addresses[name]}"

    def __enter__(self) -> LocalFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        # A process group of its own: stopping a replica stops its engine and media workers too.
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, ready_timeout_s: float = 180.0) -> None:
        ensure_proxy_tools()
        c = self.config
        (self.workdir / "nginx-temp").mkdir(parents=True, exist_ok=True)
        turn_conf = self.workdir / "turnserver.conf"
        turn_conf.write_text(coturn_config(c, self.workdir))
        self.coturn = self._spawn("coturn", [str(TURNSERVER), "-c", str(turn_conf)])
        for i in range(c.replicas):
            name = c.replica_name(i)
            port = c.first_replica_port + i
            low = c.first_udp_port + i * c.udp_ports_per_replica
            argv = [
                sys.executable,
                "-m",
                "streamedit.cli",
                "serve",
                "--host",
                c.host,
                "--port",
                str(port),
                "--replica",
                name,
                "--udp-ports",
                f"{low}-{low + c.udp_ports_per_replica - 1}",
                "--ice-servers",
                json.dumps([c.turn_server()]),
                *c.replica_args,
            ]
            self.replicas[name] = self._spawn(name, argv)
            self.addresses[name] = f"{c.host}:{port}"
        nginx_conf = self.workdir / "nginx.conf"
        nginx_conf.write_text(
            local_nginx_config(
                [Replica(name, address) for name, address in self.addresses.items()],
                f"{c.host}:{c.port}",
                str(self.workdir / "nginx.pid"),
                str(self.workdir / "nginx-temp"),
            )
        )
        self.nginx = self._spawn("nginx", [str(NGINX), "-p", str(self.workdir), "-c", str(nginx_conf), "-e", "stderr"])
        deadline = time.monotonic() + ready_timeout_s
        for name in self.replicas:
            self._wait_ready(name, deadline)

    def _wait_ready(self, name: str, deadline: float) -> None:
        url = f"{self.replica_url(name)}/readyz"
        while True:
            process = self.replicas[name]
            if process.poll() is not None:
                raise RuntimeError(f"replica {name} exited with {process.returncode}: see {self.log_dir / name}.log")
            for other, p in (("nginx", self.nginx), ("coturn", self.coturn)):
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"{other} exited with {p.returncode}: see {self.log_dir / other}.log")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {name} not ready in time: see {self.log_dir / name}.log")
            time.sleep(0.25)

    def kill(self, name: str) -> None:
        """SIGKILL one replica's whole process group (its engine and media workers too): a crashed machine."""
        process = self.replicas[name]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        processes = [p for p in (self.nginx, self.coturn, *self.replicas.values()) if p is not None]
        for process in processes:
            if process.poll() is None:
                # The group's leader alone: a replica's supervisor stops its media workers (closing their sessions)
                # and then its engine, where a SIGTERM to the whole group had the engine die under the workers.
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):  # whatever of its group outlived it
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        if self._own_workdir and self.log_dir != self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def ensure_proxy_tools() -> None:
    """Install nginx and coturn from Debian's packages if missing (deploy/local/setup.sh)."""
    if NGINX.exists() and TURNSERVER.exists():
        return
    done = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"nginx/coturn could not be installed ({SETUP_SCRIPT}):\n{done.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="streamedit fleet",
        description=__doc__,
        epilog="Arguments after `--` go to every replica's `streamedit serve`, e.g. -- --max-sessions 2.",
    )
    # The defaults are FleetConfig's own: one truth for where a local fleet listens.
    parser.add_argument("--replicas", type=int, default=FleetConfig.replicas, help="replicas to start (%(default)s)")
    parser.add_argument("--port", type=int, default=FleetConfig.port, help="the proxy's port: the fleet's one URL")
    parser.add_argument("--first-replica-port", type=int, default=FleetConfig.first_replica_port)
    parser.add_argument("--first-udp-port", type=int, default=FleetConfig.first_udp_port)
    parser.add_argument("--turn-port", type=int, default=FleetConfig.turn_port)
    parser.add_argument("--log-dir", type=Path, default=None, help="where each process logs (default: a temp dir)")
    argv = list(sys.argv[1:] if argv is None else argv)
    replica_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, replica_args = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    config = FleetConfig(
        replicas=args.replicas,
        port=args.port,
        first_replica_port=args.first_replica_port,
        first_udp_port=args.first_udp_port,
        turn_port=args.turn_port,
        replica_args=replica_args,
    )
    fleet = LocalFleet(config, log_dir=args.log_dir)
    try:
        fleet.start()
    except (RuntimeError, TimeoutError) as exc:
        fleet.stop()
        print(f"streamedit fleet: {exc}", file=sys.stderr)
        return 1
    print(f"StreamEdit fleet on {fleet.url}: {', '.join(fleet.replicas)}; TURN turn:{config.host}:{config.turn_port}")
    print(f"logs in {fleet.log_dir}; Ctrl-C stops everything", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            dead = [n for n, p in fleet.replicas.items() if p.poll() is not None]
            if dead:
                print(f"streamedit fleet: replica {', '.join(dead)} exited; nginx routes around it", flush=True)
                for name in dead:
                    del fleet.replicas[name]
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C or SIGTERM must not cut the shutdown short and leave replicas running.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        fleet.stop()
    return 0
