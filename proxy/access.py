"""Who may talk to the proxy and how fast: client-network allow-list and per-client rate limit.

Sans-I/O: addresses and clock values in, decisions out.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings (``10.0.0.0/8``, ``::1``) → networks; ValueError names the bad item."""
    out: list[Network] = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"allow-list entry {item!r} is not an IP network (CIDR)") from None
    return tuple(out)


class ClientFilter:
    """Allow-list of client networks; an empty list allows everyone."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        self._seen: dict[str, bool] = {}

    def allowed(self, address: str | None) -> bool:
        if not self.networks:
            return True
        if address is None:
            return False
        hit = self._seen.get(address)
        if hit is not None:
            return hit
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        ok = any(ip.version == n.version and ip in n for n in self.networks)
        if len(self._seen) > 65536:
            self._seen.clear()
        self._seen[address] = ok
        return ok


class RateLimiter:
    """Token bucket per client address: ``rate`` requests/s sustained, ``burst`` at once.

    ``rate <= 0`` disables limiting. Memory is bounded by ``max_clients`` (least recently
    seen clients are forgotten, which only ever makes the limiter more lenient).
    """

    def __init__(self, rate: float, burst: float, max_clients: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, client: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return ok
