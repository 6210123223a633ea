"""The download manager's decisions, with no I/O: values in, values out.

What CernVM-FS decides, as in its download manager: servers are tried in fail-over order
(``CVMFS_SERVER_URL``; groups load-balanced inside, as hep-exec's ``--proxy`` lists of
hep-proxies are), forward proxies in groups (``CVMFS_HTTP_PROXY``: ``;`` fails over, ``|``
load-balances, ``DIRECT`` is no proxy).  A failure is held against the server (HTTP errors
from the server, a broken direct connection) or the proxy (a proxy's own error, a broken
connection through it), which is then avoided for ``host_reset_after`` /
``proxy_reset_after`` seconds: tried last, not never (a request that gets through after
failures says "switched to …").  A 404 blames nobody (another server may have it).  Bytes
that fail their check are asked for once more with caches bypassed (``Cache-Control:
no-cache``): through the same forward proxy once (its cache may be stale), and from every
route after; the server is blamed.  After every route failed, the request goes round again
``retries`` times after a jittered back-off, unless every server said 404.  Every answer
has a size limit by what it is (``body_limit``) and an overall deadline (``deadline``)
besides the idle timeout.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from cvmfs_format.errors import FormatError
from cvmfs_format.objects import Suffix, parse_object_path
from cvmfs_format.proxies import ProxyGroups

if TYPE_CHECKING:
    import random

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


class Settings(NamedTuple):
    """One set of defaults for every tool (each may set its own from its configuration)."""

    timeout: float = 10.0  # idle: this long with no byte is a failure
    connect_timeout: float = 5.0
    retries: int = 1  # extra rounds over every route once all have failed
    backoff_init: float = 0.5  # seconds before the first extra round (jittered, doubling)
    backoff_max: float = 5.0
    host_reset_after: float = 1800.0  # a failed server is tried last for this long
    proxy_reset_after: float = 300.0  # a failed proxy likewise
    min_rate: float = 64 * KiB  # bytes/s an answer must keep up on average (its deadline)
    max_time: float | None = None  # and no attempt longer than this (hep-proxy's fill)
    max_connections: int = 32
    pipeline: int = 1  # requests one connection may carry at once (1: no HTTP pipelining)
    user_agent: str = "hep-cvmfs-hpc (cvmfs-compatible)"


class Kind(enum.Enum):
    """What is fetched: decides how big an answer may be."""

    MANIFEST = "manifest"
    WHITELIST = "whitelist"
    CERTIFICATE = "certificate"
    CATALOG = "catalog"
    OBJECT = "object"


def kind_of_path(path: str) -> Kind:
    """What a repository file is, by its name in the Stratum-1 layout."""
    name = path.rsplit("/", 1)[-1]
    if name == ".cvmfspublished":
        return Kind.MANIFEST
    if name == ".cvmfswhitelist":
        return Kind.WHITELIST
    at = path.find("data/")
    if at >= 0:
        try:
            suffix = parse_object_path(path[at:]).suffix
        except FormatError:
            return Kind.OBJECT
        if suffix is Suffix.CATALOG:
            return Kind.CATALOG
        if suffix is Suffix.CERTIFICATE:
            return Kind.CERTIFICATE
    return Kind.OBJECT


SMALL_LIMIT = 4 * MiB  # .cvmfspublished, .cvmfswhitelist, a certificate: a few KiB each
# Sizes unknown (hep-proxy's upstream fill: a client asks for a name, not a size): a catalog
# (CernVM-FS advises well under a million entries, some 100 MiB compressed), an object (a
# publisher chunks files above a few MiB; only a repository published without chunking has
# whole-file objects near this).
CATALOG_LIMIT = 512 * MiB
OBJECT_LIMIT = 1 * GiB


def body_limit(kind: Kind, size: int | None = None) -> int:
    """The most bytes an answer for ``kind`` may have: ``size`` is the uncompressed size the
    catalog gives (stored objects are zlib-compressed or not, never much larger), or None."""
    if kind in (Kind.MANIFEST, Kind.WHITELIST, Kind.CERTIFICATE):
        return SMALL_LIMIT
    if size is None or size < 0:
        return CATALOG_LIMIT if kind is Kind.CATALOG else OBJECT_LIMIT
    return 2 * size + 64 * KiB  # zlib adds at most 0.03% + a few bytes; margin for headers


def deadline(settings: Settings, size: int | None, limit: int) -> float:
    """Seconds one attempt may take in all: connect, first byte, and the expected bytes at
    ``min_rate`` (a trickle of one byte every few seconds never ends otherwise)."""
    expected = size if size is not None and size >= 0 else min(limit, 64 * MiB)
    allowed = settings.connect_timeout + settings.timeout + expected / settings.min_rate
    return allowed if settings.max_time is None else min(allowed, settings.max_time)


def backoff_delay(attempt: int, init: float, cap: float, rng: random.Random) -> float:
    """Jittered exponential back-off: uniform in [0, min(cap, init * 2**attempt)]."""
    return rng.uniform(0, min(cap, init * (2**attempt)))


class Blame(enum.Enum):
    """Whom a failed attempt is held against."""

    NOBODY = "nobody"  # 404: the next server, nobody avoided
    HOST = "host"  # the server: the next server, this one avoided
    PROXY = "proxy"  # the forward proxy: the next proxy, this one avoided
    DATA = "data"  # wrong or too many bytes: once more bypassing caches, then the server


def classify_status(status: int, headers: dict[str, str], via_proxy: bool) -> Blame | None:
    """None for success; else whom an HTTP status blames (``headers`` lower-case keys).  As
    CernVM-FS (download.cc): 5xx, 400, 429 and redirects are the server's, any other status
    is the proxy's when there is one; a status a proxy made itself (``X-Squid-Error``,
    ``Proxy-Status: …error=``) is the proxy's.  404 switches servers as in CernVM-FS but
    blames nobody: a file one server lacks says nothing about the server (and hep-exec asks
    for names that do not exist)."""
    if 200 <= status < 300:
        return None
    proxy_said = via_proxy and (
        "x-squid-error" in headers or "error=" in headers.get("proxy-status", "")
    )
    if proxy_said:
        return Blame.PROXY
    if status == 404:
        return Blame.NOBODY
    if status >= 500 or status in (400, 429, 301, 302, 303, 307, 308):
        return Blame.HOST
    return Blame.PROXY if via_proxy else Blame.HOST


class Route(NamedTuple):
    """One way to ask: a server's base URL, through a forward proxy (None: DIRECT)."""

    server: str
    proxy: str | None

    def url(self, path: str) -> str:
        return self.server.rstrip("/") + "/" + path.lstrip("/")

    def describe(self, path: str) -> str:
        u = self.url(path)
        return u if self.proxy is None else f"{u} via {self.proxy}"


class _Member:
    """A server or proxy of a fail-over group.  Not a dataclass: every job's start defines
    it, and the generated methods of one cost ~0.5 ms there."""

    __slots__ = ("avoid_until", "group", "url")

    def __init__(self, url: str | None, group: int, avoid_until: float = 0.0) -> None:
        self.url = url
        self.group = group
        self.avoid_until = avoid_until


def _members(groups: Sequence[Sequence[str | None]]) -> list[_Member]:
    return [_Member(m, i) for i, group in enumerate(groups) for m in group]


def _in_order(members: list[_Member], now: float, rng: random.Random) -> list[_Member]:
    """Live members group by group, each group shuffled (load-balancing: request after
    request spreads over the group), then avoided ones, soonest back first."""
    live: list[_Member] = []
    for i in sorted({m.group for m in members}):
        group = [m for m in members if m.group == i and m.avoid_until <= now]
        rng.shuffle(group)
        live += group
    avoided = sorted((m for m in members if m.avoid_until > now), key=lambda m: m.avoid_until)
    return live + avoided


class Failover:
    """The servers and proxies of one client, shared by all its requests: their order and
    which are being avoided."""

    def __init__(
        self,
        servers: Sequence[Sequence[str]],
        proxies: ProxyGroups | None = None,
        settings: Settings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings or Settings()
        if rng is None:
            import random  # (here: not on the start of every job)

            rng = random.Random()
        self.rng = rng
        self._servers = _members(servers)
        if not self._servers:
            raise ValueError("no server to download from")
        groups = proxies.groups if proxies is not None else ((None,),)
        self._proxies = _members(groups)
        # one member per group (no load-balancing to shuffle): while nobody is avoided, every
        # request gets the same routes, computed once (the per-request cost of preload)
        fixed = all(len(g) == 1 for g in (*servers, *groups))
        self._fixed: list[Route] | None = None
        self._cacheable = fixed
        self._calm_after = 0.0  # from then on nobody is avoided

    @property
    def server_urls(self) -> list[str]:
        return [str(m.url) for m in self._servers]

    @property
    def proxy_urls(self) -> list[str | None]:
        return [m.url for m in self._proxies]

    def routes(self, now: float) -> list[Route]:
        """Every route, in the order one request tries them: each server (live ones first)
        with each proxy (live ones first)."""
        if self._fixed is not None and now >= self._calm_after:
            return self._fixed
        proxies = [m.url for m in _in_order(self._proxies, now, self.rng)]
        servers = _in_order(self._servers, now, self.rng)
        routes = [Route(str(s.url), p) for s in servers for p in proxies]
        if self._cacheable and now >= self._calm_after:
            self._fixed = routes  # read-only from here on: Attempts only indexes it
        return routes

    def avoided_until(self, url: str) -> float:
        """Until when a server or proxy is tried last (0: it is not)."""
        for m in (*self._servers, *self._proxies):
            if m.url == url:
                return m.avoid_until
        return 0.0

    def blame(self, route: Route, blame: Blame, now: float) -> None:
        """Hold a failure against a server or a proxy: tried last for a while."""
        if blame is Blame.PROXY and route.proxy is not None:
            pool, url, reset = self._proxies, route.proxy, self.settings.proxy_reset_after
        elif blame in (Blame.HOST, Blame.DATA, Blame.PROXY):  # DIRECT: the server's fault
            pool, url, reset = self._servers, route.server, self.settings.host_reset_after
        else:
            return
        for m in pool:
            if m.url == url:
                m.avoid_until = now + reset
                self._calm_after = max(self._calm_after, m.avoid_until)
                self._fixed = None


class Attempts:
    """One request's walk over the routes (``next`` until None), with what each failure
    implies for the rest of it and for the client (``failed``).  A plain class with slots:
    one is made per request, and most requests succeed on their first route."""

    __slots__ = (
        "_again",
        "_all_not_found",
        "_burnt_proxies",
        "_burnt_servers",
        "_data_retried",
        "_i",
        "_plan",
        "bad_data",
        "failover",
        "failures",
        "no_cache",
        "now",
        "round",
    )

    def __init__(self, failover: Failover, now: float) -> None:
        self.failover = failover
        self.now = now
        self.failures: list[str] = []
        self.no_cache = False  # ask caches to revalidate (after bytes that failed their check)
        self.round = 0
        self.bad_data = False  # some answer had wrong or too many bytes
        self._plan = failover.routes(now)
        self._i = 0
        self._burnt_servers: set[str] = set()
        self._burnt_proxies: set[str] = set()
        self._again: Route | None = None
        self._all_not_found = True
        self._data_retried = False

    @property
    def not_found(self) -> bool:
        """Every attempt so far was a 404."""
        return self._all_not_found and bool(self.failures)

    def switched(self, route: Route) -> str | None:
        """After a success on ``route``: a line to log if earlier routes failed."""
        if not self.failures or not self._plan:
            return None
        first = self._plan[0]
        if route.server != first.server:
            what = f"server {route.server}"
        elif route.proxy != first.proxy:
            what = f"proxy {route.proxy or 'DIRECT'}"
        else:
            return None
        return f"switched to {what} after: {'; '.join(dict.fromkeys(self.failures))}"

    def next(self, now: float) -> tuple[Route, float] | None:
        """The next route and how long to wait before trying it; None when all is tried."""
        if self._again is not None:
            route, self._again = self._again, None
            return route, 0.0
        while True:
            while self._i < len(self._plan):
                route = self._plan[self._i]
                self._i += 1
                if self.failures:  # nothing is burnt before the first failure
                    if route.server in self._burnt_servers:
                        continue
                    if route.proxy is not None and route.proxy in self._burnt_proxies:
                        continue
                return route, 0.0
            if self._all_not_found or self.round >= self.failover.settings.retries:
                return None
            self.round += 1
            self._plan, self._i = self.failover.routes(now), 0
            self._burnt_servers = set()
            self._burnt_proxies = set()
            s = self.failover.settings
            delay = backoff_delay(self.round - 1, s.backoff_init, s.backoff_max, self.failover.rng)
            nxt = self.next(now)
            return None if nxt is None else (nxt[0], delay)

    def failed(self, route: Route, blame: Blame, reason: str, path: str, now: float) -> None:
        self.failures.append(f"{route.describe(path)}: {reason}")
        if blame is not Blame.NOBODY:
            self._all_not_found = False
        if blame is Blame.DATA:
            self.bad_data = True
            self.no_cache = True  # from now on, ask caches on the way to revalidate
            if route.proxy is not None and not self._data_retried:
                self._data_retried = True
                self._again = route  # the proxy's cache may be stale: once more through it
                return
        self.failover.blame(route, blame, now)
        if blame is Blame.PROXY and route.proxy is not None:
            self._burnt_proxies.add(route.proxy)
        else:
            self._burnt_servers.add(route.server)
