"""Who sent a request that came through our own proxies (X-Forwarded-For).

The webhook and the staff page both sit behind TLS proxies (docs/tls.md).
A proxy appends the address it saw to the header; everything to the left of
the hops our own proxies wrote was written by the client and proves nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def within(address: str | None, nets: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address((address or "").strip())
    except ValueError:
        return False
    return any(ip in network for network in nets)


def client(remote: str | None, forwarded_for: Sequence[str],
           trusted: tuple[Network, ...]) -> str | None:
    """The client's address: the header (``forwarded_for``, each of its lines) counts
    only when ``remote`` is a trusted proxy.

    Walk the forwarded chain from the right, past our own proxies; the first
    address that is not one of them is the client.
    """
    if not trusted or not within(remote, trusted):
        return remote
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        if not within(hop, trusted):
            return hop
    return remote
