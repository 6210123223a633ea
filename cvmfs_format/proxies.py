"""Server and proxy lists in CVMFS configuration syntax, and the fail-over order they imply.

``CVMFS_SERVER_URL``: ``;``-separated base URLs with ``@fqrn@`` / ``@org@``.
``CVMFS_HTTP_PROXY``: ``;`` separates fail-over groups, ``|`` load-balances inside a group,
``DIRECT`` means no proxy.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import SplitResult, urlsplit

from cvmfs_format.errors import FormatError

if TYPE_CHECKING:
    import random

DIRECT = "DIRECT"


def expand_server_url(template: str, fqrn: str) -> str:
    """Replace ``@fqrn@`` and ``@org@`` (first label); other ``@x@`` stay as they are."""
    return template.replace("@fqrn@", fqrn).replace("@org@", fqrn.split(".", 1)[0]).rstrip("/")


def _check_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "file") or (
        parts.scheme != "file" and not parts.hostname
    ):
        raise FormatError(f"{what}: not an http(s):// or file:// URL: {url!r}")
    return url


_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


def _host_and_port_ok(netloc: str, parts: SplitResult) -> bool:
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return False
    host = netloc.rsplit("@", 1)[-1]
    host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return bool(parts.hostname) and _HOST.fullmatch(host) is not None


def check_proxy_url(item: str) -> str:
    """A forward proxy as CVMFS names one: ``http://host:port`` (``host:port`` also taken),
    no path; FormatError says what is wrong with anything else."""
    url = item if "://" in item else "http://" + item
    parts = urlsplit(url)
    if parts.scheme != "http" or not _host_and_port_ok(parts.netloc, parts):
        raise FormatError(f"proxy {item!r}: expected http://host:port or DIRECT")
    if parts.path.strip("/") or parts.query:
        raise FormatError(
            f"proxy {item!r}: a forward proxy is http://host:port without a path "
            "(a server, such as http://host:port/cvmfs/@fqrn@, is a server URL)"
        )
    return url.rstrip("/")


def is_server_like(item: str) -> bool:
    """An entry of a proxy list that is really a server (it has a ``/cvmfs/…`` path)."""
    parts = urlsplit(item if "://" in item else "http://" + item)
    return bool(parts.path.strip("/"))


ServerGroups = tuple[tuple[str, ...], ...]


def parse_server_templates(text: str | list[str]) -> ServerGroups:
    """``CVMFS_SERVER_URL`` for a client of several repositories: ``;`` fails over (and
    ``|`` load-balances, as hep-exec's lists of hep-proxies did); ``@fqrn@``/``@org@`` stay
    to be expanded per repository.  A bare ``http://host:port`` means
    ``http://host:port/cvmfs/@fqrn@`` (where hep-proxy and every Stratum-1 serve them)."""
    items = text if isinstance(text, list) else text.split(";")
    groups: list[tuple[str, ...]] = []
    for group_text in items:
        members = []
        for item in group_text.split("|"):
            item = item.strip()
            if not item:
                continue
            url = item.rstrip("/")
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https", "file") or (
                parts.scheme != "file" and not _host_and_port_ok(parts.netloc, parts)
            ):
                raise FormatError(f"server {item!r}: not an http(s):// or file:// URL")
            if parts.scheme != "file" and not parts.path.strip("/"):
                url += "/cvmfs/@fqrn@"
            members.append(url)
        if members:
            groups.append(tuple(members))
    if not groups:
        raise FormatError("server list is empty")
    return tuple(groups)


def expand_servers(groups: ServerGroups, fqrn: str) -> list[list[str]]:
    """The server groups of one repository."""
    return [[expand_server_url(u, fqrn) for u in g] for g in groups]


def parse_server_urls(text: str | list[str], fqrn: str) -> list[str]:
    items = text if isinstance(text, list) else text.split(";")
    urls = [expand_server_url(u.strip(), fqrn) for u in items if u.strip()]
    if not urls:
        raise FormatError("server list is empty")
    return [_check_url(u, "server") for u in urls]


class ProxyGroups(NamedTuple):
    """Fail-over groups of load-balanced proxies; ``None`` stands for DIRECT."""

    groups: tuple[tuple[str | None, ...], ...]

    def order(self, rng: random.Random | None = None) -> list[str | None]:
        """One attempt order: groups in sequence, members of a group shuffled."""
        if rng is None:
            import random  # (here: not on the start of every job)

            rng = random.Random()
        out: list[str | None] = []
        for group in self.groups:
            members = list(group)
            rng.shuffle(members)
            out.extend(members)
        return out

    def __str__(self) -> str:
        return ";".join("|".join(p or DIRECT for p in g) for g in self.groups)


def parse_proxies(text: str | None) -> ProxyGroups:
    """Parse ``p1|p2;p3;DIRECT``; empty or None means DIRECT only."""
    if text is None or not text.strip():
        return ProxyGroups(((None,),))
    groups: list[tuple[str | None, ...]] = []
    for group_text in text.split(";"):
        members: list[str | None] = []
        for item in group_text.split("|"):
            item = item.strip()
            if not item:
                continue
            if item.upper() == DIRECT:
                members.append(None)
                continue
            members.append(check_proxy_url(item))
        if members:
            groups.append(tuple(members))
    if not groups:
        raise FormatError(f"proxy list {text!r} names no proxy")
    return ProxyGroups(tuple(groups))
