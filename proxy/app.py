"""The aiohttp side: request handler, connection guard, and one worker's serve loop.

Thin adapter around the cores: :func:`proxy.routing.route` decides what a request names,
:class:`proxy.cache.ObjectCache` holds small hot objects, :mod:`proxy.stores` opens files,
:class:`proxy.upstream.Filler` fills misses. Small objects go out from memory, large ones
with sendfile; ``.cvmfs*`` files are re-read when their inode or mtime changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import InvalidURLError
from aiohttp.web_protocol import RequestHandler

from cvmfs_format.errors import IntegrityError
from cvmfs_format.objects import verify_stored
from proxy.access import ClientFilter, RateLimiter
from proxy.accesslog import AccessLog, logger_class
from proxy.accesslog import quote as _log_quote
from proxy.cache import ObjectCache
from proxy.config import ProxyConfig
from proxy.fastpath import SimpleRequest, has_body_headers, parse_simple
from proxy.metrics import CONTENT_TYPE as METRICS_TYPE
from proxy.metrics import Metrics
from proxy.routing import Kind, Reject, Target, route
from proxy.sendfile import SendTimeout, sendfile
from proxy.stores import RepoDir, open_file, read_file
from proxy.upstream import Filler, UpstreamError

log = logging.getLogger("hep-proxy")

SERVER = "hep-proxy"
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')  # kept out of quoted header parameters
FORBIDDEN = (
    b"HTTP/1.1 403 Forbidden\r\nServer: hep-proxy\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 26\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    b"client network not allowed"
)


def _no_cache(request: web.BaseRequest) -> bool:
    h = request.headers
    return "no-cache" in h.get("Cache-Control", "") or "no-cache" in h.get("Pragma", "")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A parsed simple request for a data object, with its access-log line parts."""

    request: SimpleRequest
    key: tuple[str, str]
    log_head: str
    log_tail: str


class ProxyApp:
    """Per-worker state and the request handler."""

    def __init__(self, cfg: ProxyConfig, repos: dict[str, RepoDir], metrics: Metrics) -> None:
        self.cfg = cfg
        self.repos = repos
        self.metrics = metrics
        self.tally = metrics.tally
        self.cache = ObjectCache(cfg.memory_cache_mb << 20, cfg.memory_object_kb << 10)
        self.filter = ClientFilter(cfg.allow)
        self.health_filter = ClientFilter(cfg.health_networks)  # /healthz and /metrics
        self.limiter = RateLimiter(cfg.rate_limit, cfg.burst)
        self.filler = Filler(metrics, cfg.upstream_timeout, proxies=cfg.upstream_proxy)
        self.access = AccessLog(cfg.access_log)
        self.connections: set[GuardedHandler] = set()
        self._routes: dict[tuple[str, str], Target | Reject] = {}
        self._prepared: dict[bytes, Prepared | None] = {}
        self._root_files: dict[tuple[str, str], tuple[tuple[int, int, int], bytes]] = {}
        self._root_headers = {
            "Server": SERVER,
            "Content-Type": "application/x-cvmfs",
            "Cache-Control": f"max-age={cfg.manifest_max_age}",
        }
        self._data_headers = {
            "Server": SERVER,
            "Content-Type": "application/octet-stream",
            "Cache-Control": f"max-age={cfg.data_max_age}",
        }
        self._data_head = "".join(f"{k}: {v}\r\n" for k, v in self._data_headers.items()).encode()
        self._loop = asyncio.get_running_loop()
        self._date_second = -1
        self._date = b""

    # -- shared helpers ------------------------------------------------------------------

    def route(self, method: str, target: str) -> Target | Reject:
        """:func:`route`, memoised (it is pure and the repository set is fixed per worker)."""
        key = (method, target)
        decision = self._routes.get(key)
        if decision is None:
            decision = route(method, target, self.repos)
            if len(self._routes) >= 65536:
                self._routes.clear()
            self._routes[key] = decision
        return decision

    def _error(
        self, status: int, text: str, kind: str = "other", headers: dict[str, str] | None = None
    ) -> web.Response:
        self.tally.answered(kind, status, 0, 0.0)
        hdrs = {"Server": SERVER, "Cache-Control": "no-store", **(headers or {})}
        return web.Response(status=status, text=text + "\n", headers=hdrs)

    # -- fast path: memory-cache hits answered straight from data_received ---------------

    def prepare(self, data: bytes) -> Prepared | None:
        """Parse and route a simple request; memoised on the raw bytes (clients repeat them)."""
        try:
            return self._prepared[data]
        except KeyError:
            pass
        req = parse_simple(data, self.cfg.max_line_size, self.cfg.max_headers)
        prepared = None
        if req is not None and not req.no_cache:
            t = self.route(req.method, req.target)
            if isinstance(t, Target) and t.kind is Kind.DATA:
                q = _log_quote
                tail = f'"{q(req.method + " " + req.target + " HTTP/1.1")}" 200 '
                extra = f' "{q(req.referer)}" "{q(req.user_agent)}"\n'
                prepared = Prepared(req, (t.fqrn, t.relpath), tail, extra)
        if len(data) <= 2048:  # bounded memo: at most 4096 entries of at most 2 KiB
            if len(self._prepared) >= 4096:
                self._prepared.clear()
            self._prepared[data] = prepared
        return prepared

    def fast(self, p: Prepared, peer: str) -> tuple[bytes, ...] | None:
        """Response buffers for a simple request whose object is in memory, else None."""
        body = self.cache.get(p.key)
        if body is None:
            return None
        req = p.request
        now = self._loop.time()
        if self.limiter.enabled and not self.limiter.allow(peer, now):
            return None  # the general path answers 429 (a refused request costs no token)
        wall = time.time()
        sec = int(wall)
        if sec != self._date_second:
            self._date_second = sec
            self._date = formatdate(sec, usegmt=True).encode()
        size = 0 if req.method == "HEAD" else len(body)
        head = b"".join(
            (
                b"HTTP/1.1 200 OK\r\n",
                self._data_head,
                b"Content-Length: %d\r\nDate: %s\r\n" % (len(body), self._date),
                b"Connection: close\r\n\r\n" if req.close else b"\r\n",
            )
        )
        tally = self.tally
        tally.cache["hit"] += 1
        tally.answered("data", 200, size, self._loop.time() - now)
        if self.access.enabled:
            self.access.write(
                f"{peer} - - [{self.access.stamp(wall)}] {p.log_head}{size or '-'}{p.log_tail}"
            )
        return (head, body) if size else (head,)

    # -- general path --------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        start = self._loop.time()
        proto = request.protocol
        if isinstance(proto, GuardedHandler):
            proto.partial_since = None
        if self.limiter.enabled and not self.limiter.allow(request.remote or "", start):
            return self._error(429, "too many requests", headers={"Retry-After": "1"})
        decision = self.route(request.method, request.raw_path)
        if not self._allowed(proto, decision, request.remote):
            self.metrics.rejected.labels("not_allowed").inc()
            return self._error(403, "client network not allowed", headers={"Connection": "close"})
        if isinstance(decision, Reject):
            extra = {"Allow": "GET, HEAD"} if decision.status == 405 else None
            return self._error(decision.status, decision.reason, headers=extra)
        kind = decision.kind.value
        self.metrics.inflight.inc()
        status, sent = 500, 0
        try:
            resp, sent = await self._serve(request, decision)
            status = resp.status
            return resp
        except UpstreamError as e:
            if e.status == 404:
                log.info("%s", e)
                status = 404
                return self._error(404, "not found", kind)
            log.warning("%s", e)
            status = 502
            details = _UNSAFE.sub("_", str(e))[:200]
            return self._error(
                502,
                "upstream fill failed",
                kind,
                {"Proxy-Status": f'{SERVER}; error=http_response_incomplete; details="{details}"'},
            )
        except ConnectionError:
            self.metrics.errors.labels("client_gone").inc()
            raise  # nothing left to answer; aiohttp closes the connection
        except OSError as e:
            self.metrics.errors.labels("io").inc()
            where = self.repos[decision.fqrn].prefix if decision.fqrn else ""
            log.error("%s%s: %s", where, decision.relpath, e.strerror or e)
            return self._error(
                500,
                "cannot read object",
                kind,
                {"Proxy-Status": f"{SERVER}; error=proxy_internal_error"},
            )
        finally:
            self.metrics.inflight.dec()
            if status < 400:
                self.tally.answered(kind, status, sent, self._loop.time() - start)

    def _allowed(self, proto: object, decision: Target | Reject, remote: str | None) -> bool:
        """/healthz and /metrics have their own allow rule (``health_allow``); a connection
        let in only by that rule gets nothing else."""
        if isinstance(decision, Target) and decision.kind in (Kind.HEALTH, Kind.METRICS):
            return self.health_filter.allowed(remote)
        return not (isinstance(proto, GuardedHandler) and proto.health_only)

    def _ok(self, body: bytes, headers: dict[str, str], head: bool) -> tuple[web.Response, int]:
        if not body:  # aiohttp leaves "Content-Length: 0" out of HEAD answers (the marker)
            headers = {**headers, "Content-Length": "0"}
        return web.Response(body=body, headers=headers), 0 if head else len(body)

    async def _serve(self, request: web.BaseRequest, t: Target) -> tuple[web.StreamResponse, int]:
        head = request.method == "HEAD"
        if t.kind is Kind.DATA:
            return await self._data(request, t, head)
        if t.kind in (Kind.MANIFEST, Kind.WHITELIST, Kind.ROOT_FILE):
            repo = self.repos[t.fqrn]
            if t.kind is Kind.MANIFEST and repo.upstream:
                await self.filler.refresh_manifest(repo, self.cfg.manifest_max_age)
            body = self._root_file(repo, t.relpath)
            if body is None:
                return self._error(404, "not found", t.kind.value), 0
            return self._ok(body, self._root_headers, head)
        plain = {"Server": SERVER, "Cache-Control": "no-store"}
        if t.kind is Kind.HEALTH:
            return self._ok(b"ok\n", {**plain, "Content-Type": "text/plain"}, head)
        if t.kind is Kind.METRICS:
            return self._ok(self.metrics.render(), {**plain, "Content-Type": METRICS_TYPE}, head)
        listing = {
            "schema": 1,
            "repositories": [{"name": n, "url": f"/cvmfs/{n}"} for n in sorted(self.repos)],
            "replicas": [],
        }
        hdrs = {**self._root_headers, "Content-Type": "application/json"}
        return self._ok(json.dumps(listing).encode(), hdrs, head)

    def _root_file(self, repo: RepoDir, relpath: str) -> bytes | None:
        """Small mutable root files: re-read only when inode, mtime or size change."""
        key = (repo.fqrn, relpath)
        try:
            st = os.lstat(repo.prefix + relpath)
        except FileNotFoundError:
            return None
        ident = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._root_files.get(key)
        if cached is not None and cached[0] == ident:
            return cached[1]
        body = read_file(repo, relpath)
        if body is not None:
            self._root_files[key] = (ident, body)
        return body

    async def _data(
        self, request: web.BaseRequest, t: Target, head: bool
    ) -> tuple[web.StreamResponse, int]:
        key = (t.fqrn, t.relpath)
        verify = _no_cache(request)
        if not verify:
            body = self.cache.get(key)
            if body is not None:
                self.tally.cache["hit"] += 1
                return self._ok(body, self._data_headers, head)
        self.tally.cache["miss"] += 1
        repo = self.repos[t.fqrn]
        opened = open_file(repo, t.relpath)
        if opened is None and repo.upstream:
            assert t.object is not None
            await self.filler.fetch_object(repo, t.relpath, t.object.hash)
            opened = open_file(repo, t.relpath)
        if opened is None:
            self.metrics.store_misses.inc()
            return self._error(404, "not found", Kind.DATA.value), 0
        fd, size = opened
        try:
            if verify:
                body = await self._verified(repo, t, fd, size)
                if body is None:
                    hdr = {
                        "Proxy-Status": f"{SERVER}; error=proxy_internal_error; "
                        'details="stored object fails its hash check"'
                    }
                    return self._error(502, "stored object is corrupt", "data", hdr), 0
                return self._ok(body, self._data_headers, head)
            if size <= self.cache.max_object:
                body = os.pread(fd, size, 0)
                self.cache.put(key, body)
                return self._ok(body, self._data_headers, head)
            return await self._send_large(request, fd, size, head)
        finally:
            os.close(fd)

    async def _verified(self, repo: RepoDir, t: Target, fd: int, size: int) -> bytes | None:
        """Client asked for no-cache: re-read from disk and check the hash (refetch if we can)."""
        assert t.object is not None
        if size > 1 << 20:
            body = await asyncio.to_thread(os.pread, fd, size, 0)
        else:
            body = os.pread(fd, size, 0)
        try:
            verify_stored(body, t.object.hash, f"{repo.prefix}{t.relpath}")
        except IntegrityError as e:
            self.metrics.errors.labels("corrupt_store").inc()
            log.error("%s", e)
            if not repo.upstream:
                return None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(repo.prefix + t.relpath)
            await self.filler.fetch_object(repo, t.relpath, t.object.hash)
            refetched = read_file(repo, t.relpath)
            if refetched is None:
                return None
            body = refetched
        self.cache.put((t.fqrn, t.relpath), body)
        return body

    async def _send_large(
        self, request: web.BaseRequest, fd: int, size: int, head: bool
    ) -> tuple[web.StreamResponse, int]:
        resp = web.StreamResponse(headers=self._data_headers)
        resp.content_length = size
        await resp.prepare(request)
        if not head:
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("connection lost")
            try:
                await sendfile(transport, fd, 0, size, self.cfg.send_timeout)
            except SendTimeout:
                transport.abort()
                raise ConnectionResetError("client stalled") from None
        await resp.write_eof()
        return resp, 0 if head else size

    # -- connection guard ----------------------------------------------------------------

    async def sweep(self) -> None:
        """Close connections that took longer than header_timeout to send a request head."""
        limit = self.cfg.header_timeout
        while True:
            await asyncio.sleep(min(1.0, max(0.05, limit / 4)))
            now = self._loop.time()
            for conn in list(self.connections):
                since = conn.partial_since
                if since is not None and now - since > limit:
                    self.metrics.rejected.labels("header_timeout").inc()
                    conn.force_close()
                    self.connections.discard(conn)

    async def close(self) -> None:
        await self.filler.close()
        self.metrics.flush()
        self.access.close()


_INTERNALS = ("_request_count", "_next_keepalive_close_time", "_keepalive_timeout", "_close")


class GuardedHandler(RequestHandler):
    """aiohttp's protocol plus the allow-list check, a timer for slow request heads, and the
    fast path for memory-cache hits.

    The fast path only runs when aiohttp holds no request of this connection (``_pending``)
    and no partial data (everything handed to aiohttp so far ended on a request boundary),
    so responses can never be reordered.
    """

    app: ProxyApp
    partial_since: float | None = None
    health_only = False  # let in by health_allow alone: /healthz and /metrics only
    _pending = 0
    _fast = True
    _peer = "-"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # the fast path relies on these aiohttp internals; without them, aiohttp does it all
        self._fast = all(hasattr(self, a) for a in _INTERNALS)
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if peer else "-"
        address = peer[0] if peer else None
        if not self.app.filter.allowed(address):
            if self.app.health_filter.allowed(address):
                self.health_only, self._fast = True, False
            else:
                self.app.metrics.rejected.labels("not_allowed").inc()
                # uvloop transports do not subclass asyncio.Transport: duck typing
                cast(asyncio.Transport, transport).write(FORBIDDEN)
                self.force_close()
                return
        self.partial_since = self.app._loop.time()
        self.app.connections.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.app.connections.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if (
            self._fast
            and not self._pending
            and transport is not None
            and not self._force_close
            and not self._close
        ):
            prepared = self.app.prepare(data)
            if prepared is not None:
                out = self.app.fast(prepared, self._peer)
                if out is not None:
                    transport.writelines(out)
                    req = prepared.request
                    self.partial_since = None
                    self._next_keepalive_close_time = (
                        self.app._loop.time() + self._keepalive_timeout
                    )
                    if req.close:
                        self._fast = False
                        self.force_close()
                    return
        if not data.endswith(b"\r\n\r\n") or has_body_headers(data):
            self._fast = False
        if self.partial_since is None:
            self.partial_since = self.app._loop.time()
        before = self._request_count
        super().data_received(data)
        self._pending += self._request_count - before

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Unparseable requests: one log line, our headers, and 404 for unservable targets.

        aiohttp's own version logs a traceback for every bad request and answers with its
        server banner; malformed input is routine for a public-facing service.
        """
        if isinstance(exc, ConnectionError):
            log.info("%s: connection lost: %s", request.remote, exc)
        elif status >= 500:
            log.error("error handling request from %s", request.remote, exc_info=exc)
        else:
            log.info("bad request from %s: %s", request.remote, exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        if isinstance(exc, InvalidURLError):
            status, text = 404, "not found"
        else:
            text = "bad request" if status < 500 else "internal error"
        self.app.tally.answered("other", status, 0, 0.0)
        resp = web.Response(
            status=status,
            text=text + "\n",
            headers={"Server": SERVER, "Cache-Control": "no-store", "Connection": "close"},
        )
        resp.force_close()
        return resp

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        self._pending = max(0, self._pending - 1)
        super().log_access(request, response, time)


class GuardedServer(web.Server):
    """web.Server that builds GuardedHandler connections bound to our ProxyApp."""

    def __init__(self, app: ProxyApp, **kwargs: Any) -> None:
        super().__init__(app.handle, **kwargs)
        self.app = app

    def __call__(self) -> RequestHandler:
        handler = GuardedHandler(self, loop=self._loop, **self._kwargs)
        handler.app = self.app
        return handler


async def run_worker(cfg: ProxyConfig, repos: dict[str, RepoDir], sock: socket.socket) -> None:
    """Serve on ``sock`` until SIGTERM/SIGINT, then finish in-flight responses and return."""
    loop = asyncio.get_running_loop()
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper()),
        stream=sys.stderr,
        format=f"hep-proxy[{os.getpid()}]: %(levelname)s: %(message)s",
    )
    metrics = Metrics()
    app = ProxyApp(cfg, repos, metrics)
    access = app.access
    server = GuardedServer(
        app,
        keepalive_timeout=cfg.keepalive_timeout,
        max_line_size=cfg.max_line_size,
        max_field_size=cfg.max_field_size,
        max_headers=cfg.max_headers,
        access_log_class=logger_class(access),
        access_log=log if access.enabled else None,
    )
    runner = web.ServerRunner(server, shutdown_timeout=cfg.shutdown_timeout)
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=cfg.backlog)
    await site.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def flush_log() -> None:
        while True:
            await asyncio.sleep(0.5)
            access.flush()
            metrics.flush()

    tasks = [asyncio.ensure_future(app.sweep()), asyncio.ensure_future(flush_log())]
    try:
        await stop.wait()
    finally:
        try:
            # aiohttp waits up to shutdown_timeout for running handlers and then as long again
            # for the ones it cancelled; the whole drain is bounded by shutdown_timeout here,
            # and what is still running then is cut (cancelled with the loop's other tasks)
            await asyncio.wait_for(runner.cleanup(), cfg.shutdown_timeout)
        except TimeoutError:
            log.warning("responses still in flight after %g s; cutting them", cfg.shutdown_timeout)
        for task in tasks:
            task.cancel()
        await app.close()
        sys.stdout.flush()
