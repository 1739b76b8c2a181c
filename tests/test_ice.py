"""ICE plumbing: pinned host candidates, no public STUN by default, and no off-loopback checks when loopback-bound."""

from __future__ import annotations

import aioice.ice

import server.ice
from server.ice import keep_reachable_candidates, pin_host_addresses, rtc_configuration
from server.settings import IceServer, Settings

OFFER = (
    "\r\n".join(
        [
            "v=0",
            "m=video 9 UDP/TLS/RTP/SAVPF 96",
            "a=candidate:1 1 udp 2122260223 192.0.2.2 50000 typ host",
            "a=candidate:2 1 udp 2122260223 127.0.0.1 50001 typ host",
            "a=candidate:3 1 udp 2122260223 3f0c8a1e-0000-4000-8000-000000000000.local 50002 typ host",
            "a=end-of-candidates",
        ]
    )
    + "\r\n"
)


def test_loopback_servers_keep_only_loopback_remote_candidates() -> None:
    kept = keep_reachable_candidates(OFFER, ["127.0.0.1"])
    assert "127.0.0.1 50001" in kept
    assert "192.0.2.2" not in kept and ".local" not in kept
    assert "a=end-of-candidates" in kept and kept.startswith("v=0\r\n")
    assert keep_reachable_candidates(OFFER, None) == OFFER  # a public deployment leaves offers alone
    assert keep_reachable_candidates(OFFER, ["203.0.113.7"]) == OFFER


def test_host_addresses_follow_the_bind_address_unless_pinned() -> None:
    assert Settings(host="127.0.0.1").host_addresses() == ["127.0.0.1"]
    assert Settings(host="0.0.0.0").host_addresses() is None
    assert Settings(host="0.0.0.0", ice_host_addresses=["203.0.113.7"]).host_addresses() == ["203.0.113.7"]


def test_pinning_replaces_aioice_gathering_and_unpinning_restores_it() -> None:
    # aioice's own gathering, as server.ice found it on import (an earlier test's client may have pinned since)
    original = server.ice._original_get_host_addresses
    assert original.__module__ == "aioice.ice"
    pin_host_addresses(["127.0.0.1", "::1"])
    try:
        assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1", "::1"]
    finally:
        pin_host_addresses(None)
    assert aioice.ice.get_host_addresses is original


def test_no_ice_servers_means_an_explicit_empty_list() -> None:
    assert rtc_configuration([]).iceServers == []  # None would make aiortc use a public STUN server
    config = rtc_configuration([IceServer(urls="turn:turn.example.com:3478", username="u", credential="p")])
    assert config.iceServers[0].username == "u"
