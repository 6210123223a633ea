"""Server and proxy lists in CVMFS configuration syntax, and the fail-over order they imply.

``CVMFS_SERVER_URL``: ``;``-separated base URLs with ``@fqrn@`` / ``@org@``.
``CVMFS_HTTP_PROXY``: ``;`` separates fail-over groups, ``|`` load-balances inside a group,
``DIRECT`` means no proxy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from urllib.parse import urlsplit

from cvmfs_format.errors import FormatError

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


def parse_server_urls(text: str | list[str], fqrn: str) -> list[str]:
    items = text if isinstance(text, list) else text.split(";")
    urls = [expand_server_url(u.strip(), fqrn) for u in items if u.strip()]
    if not urls:
        raise FormatError("server list is empty")
    return [_check_url(u, "server") for u in urls]


@dataclass(frozen=True)
class ProxyGroups:
    """Fail-over groups of load-balanced proxies; ``None`` stands for DIRECT."""

    groups: tuple[tuple[str | None, ...], ...]

    def order(self, rng: random.Random | None = None) -> list[str | None]:
        """One attempt order: groups in sequence, members of a group shuffled."""
        rng = rng or random.Random()
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
            if "://" not in item:
                item = "http://" + item
            parts = urlsplit(item)
            if parts.scheme != "http" or not parts.hostname:
                raise FormatError(f"proxy {item!r}: expected http://host:port or DIRECT")
            members.append(item.rstrip("/"))
        if members:
            groups.append(tuple(members))
    if not groups:
        raise FormatError(f"proxy list {text!r} names no proxy")
    return ProxyGroups(tuple(groups))
