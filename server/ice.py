"""ICE plumbing: which local addresses aioice offers, and the RTCConfiguration every peer connection gets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

from server.settings import IceServer

_original_get_host_addresses: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses


def pin_host_addresses(addresses: list[str] | None) -> None:
    """Make aioice offer exactly `addresses` as host candidates (None restores its own gathering).

    aioice gathers host candidates from every interface but leaves 127.0.0.1 out, so a server bound to
    loopback would offer nothing reachable; behind NAT a deployment wants only its public address.
    aioice reads this module-level function for every connection, so the pin is process-wide.
    """
    if addresses is None:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return
    pinned = list(addresses)

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in pinned if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses


def rtc_configuration(ice_servers: list[IceServer]) -> RTCConfiguration:
    """An explicit server list, even when empty: aiortc falls back to a public STUN server on None."""
    return RTCConfiguration(
        iceServers=[RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in ice_servers]
    )


def restrict_udp_ports(loop: asyncio.AbstractEventLoop, first: int, last: int) -> None:
    """Make ICE sockets on `loop` bind inside [first, last] (a firewall or container publishes only that range).

    aioice binds its host candidates to port 0 (any port); this wraps the loop's datagram endpoint factory
    so such a bind takes the first free port of the range instead. Other binds pass through unchanged.
    """
    if not 0 < first <= last <= 65535:
        raise ValueError(f"bad UDP port range {first}-{last}")
    original = loop.create_datagram_endpoint

    async def create_datagram_endpoint(protocol_factory: Any, local_addr: Any = None, **kwargs: Any) -> Any:
        if local_addr is None or local_addr[1] != 0:
            return await original(protocol_factory, local_addr=local_addr, **kwargs)
        for port in range(first, last + 1):
            try:
                return await original(protocol_factory, local_addr=(local_addr[0], port), **kwargs)
            except OSError:
                continue
        raise OSError(f"no free UDP port in {first}-{last} on {local_addr[0]}")

    loop.create_datagram_endpoint = create_datagram_endpoint  # type: ignore[method-assign]


def parse_port_range(text: str) -> tuple[int, int]:
    """'40000-40100' → (40000, 40100)."""
    first, sep, last = text.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError(f"a UDP port range looks like 40000-40100, not {text!r}")
    return int(first), int(last)


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "localhost")


def keep_reachable_candidates(sdp: str, local_addresses: list[str] | None) -> str:
    """Drop remote candidates a loopback-only server could never reach.

    A browser offers candidates on every interface (and mDNS names); when the server offers only loopback
    addresses, checking those would send packets off the loopback, which a loopback deployment (and every
    test here) must not do. With other local addresses the offer is left as it is.
    """
    if not local_addresses or not all(is_loopback(a) for a in local_addresses):
        return sdp
    kept = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            fields = line.split()
            if len(fields) > 4 and not is_loopback(fields[4]):
                continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"
