"""ICE plumbing: which local addresses aioice offers, and the RTCConfiguration every peer connection gets."""

from __future__ import annotations

from collections.abc import Callable

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
