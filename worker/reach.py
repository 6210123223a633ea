"""Can this job reach anything at all?  Asked once at start, so that a server list whose every
entry fails stops hep-exec with one line (exit 2) before the command runs, instead of failing
the command in the middle of its work.

Only the first hop is tried, and only with a TCP connect (no request, no HTTP library): the
forward proxies, and the servers themselves where ``DIRECT`` is among the routes.  One
answering first hop is enough; the fail-over of each request does the rest.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from cvmfs_download.errors import network_reason
from cvmfs_format.proxies import ProxyGroups, ServerGroups


def first_hops(servers: ServerGroups, proxies: ProxyGroups) -> list[str]:
    """The URLs a request goes to first (pure): proxies, and servers where DIRECT is a route."""
    members = [p for g in proxies.groups for p in g]
    hops = [p for p in members if p is not None]
    if None in members:
        hops += [u for g in servers for u in g]
    return list(dict.fromkeys(hops))


def _connect(host: str, port: int, timeout: float) -> None:
    """socket.create_connection, but an ASCII name goes to getaddrinfo as bytes: as a str it
    would import the idna codec (~1 ms of every job's start)."""
    name = host.encode() if host.isascii() else host
    error: OSError = OSError(f"{host}: no address")
    for family, kind, proto, _name, address in socket.getaddrinfo(
        name, port, 0, socket.SOCK_STREAM
    ):
        with socket.socket(family, kind, proto) as s:
            s.settimeout(timeout)
            try:
                s.connect(address)
            except OSError as e:
                error = e
            else:
                return
    raise error


def _try(url: str, timeout: float, out: dict[str, str | None]) -> None:
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = Path(parts.path.split("@", 1)[0])  # up to a template's @fqrn@
        out[url] = None if path.parent.exists() else "no such directory"
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _connect(parts.hostname or "", port, timeout)
    except OSError as e:
        out[url] = network_reason(e)
    else:
        out[url] = None


def unreachable(servers: ServerGroups, proxies: ProxyGroups, timeout: float) -> str | None:
    """None if some first hop accepts a connection, else one line naming each and why."""
    hops = first_hops(servers, proxies)
    if not hops:
        return None
    out: dict[str, str | None] = {}
    threads = [threading.Thread(target=_try, args=(u, timeout, out), daemon=True) for u in hops]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 1)
        if any(v is None for v in out.values()):
            return None
    if any(out.get(u, "x") is None for u in hops):
        return None
    why = "; ".join(f"{u.split('/cvmfs/', 1)[0]} ({out.get(u) or 'timed out'})" for u in hops)
    return f"no server or proxy can be reached: {why}"
