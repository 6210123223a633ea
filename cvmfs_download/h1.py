"""The lean transport: HTTP/1.1 GETs for plain ``http://`` on raw asyncio, the same bounds and
the same one-line failures as the aiohttp transport (which still does ``https://``).

Why: per object, aiohttp's request machinery cost more Python than everything else preload
does (URL objects, header multidicts, a stream reader and a task wake-up per chunk).  Here
one request is one header block written to a pooled keep-alive connection, and its
answer is parsed where it arrives (``data_received``), the body handed to the sink there: the
waiting coroutine wakes once, when the answer is complete.

Bounds, as in :class:`cvmfs_download.http.HttpTransport`: the body may not exceed ``limit``
(announced or sent), no byte for ``settings.timeout`` seconds fails the attempt, and so does
the whole attempt taking longer than ``deadline``; a response head longer than 64 KiB is a
bad response.  Parsing is strict: a status line ``HTTP/1.x NNN``, header lines of a token, a
colon and a value, CRLF line ends, one Content-Length or chunked transfer coding; anything
else fails the attempt as a bad response (blamed like a broken connection).

Connections are pooled per address connected to (the server's, or the forward proxy's, which
then gets absolute-URI requests), at most ``settings.max_connections`` in all.  With
``settings.pipeline`` above 1, small GETs may queue on a busy connection when no other can be
had (HTTP/1.1 pipelining; off by default: at preload's 16 connections it measured no faster);
requests whose answer had not begun when a connection closed are sent again on a new one
(once), so no request ever gets another's bytes.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from cvmfs_download.core import Blame, Route, Settings, classify_status
from cvmfs_download.errors import network_reason
from cvmfs_download.heap import reuse_big_buffers
from cvmfs_download.wire import Failed, Sink, Transport, read_file, secs, too_big

if TYPE_CHECKING:
    from cvmfs_download.http import HttpTransport

KiB = 1 << 10
MAX_HEAD = 64 * KiB  # status line and headers of one response
MAX_CHUNK_LINE = 4 * KiB  # a chunk-size line with its extensions
DRAIN = 64 * KiB  # an error answer's body up to this is read, to keep its connection
PIPELINE_LIMIT = 1 << 20  # only answers bounded by this may queue behind another
KEEPALIVE = 60.0  # an idle connection is closed after this long
RETRIES = 1  # a request unanswered when its connection closed is sent again this often

_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [\t !-~\x80-\xff]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# header lines: a token, a colon, a value of tabs, spaces, visible and obs-text bytes; CRLF
_HEADERS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t \x21-\x7e\x80-\xff]*\r\n)*")
_FIELD = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[\t ]*(.*?)[\t ]*\r\n")
_UNSAFE = re.compile(r"[^A-Za-z0-9\-._~/%:@!$&'()*+,;=?]")

# parser states
_HEAD, _LENGTH, _SIZE, _DATA, _DATA_END, _TRAILER, _UNTIL_CLOSE = range(7)


class _Bad(Exception):
    """A response that is not HTTP/1.1 as it must be (the words go after 'bad HTTP response')."""


class _Retry(Exception):
    """The connection closed before this request's answer began: send it again elsewhere."""


def make_transport(settings: Settings) -> Transport:
    """The transport for a client: the lean one (``https://`` through aiohttp inside it), or
    aiohttp's alone when ``CVMFS_DOWNLOAD_TRANSPORT=aiohttp`` (to compare, or as a way out).
    The process's heap is tuned for downloads here (cvmfs_download.heap): every tool that
    downloads makes a transport first."""
    reuse_big_buffers()
    if os.environ.get("CVMFS_DOWNLOAD_TRANSPORT", "") == "aiohttp":
        from cvmfs_download.http import HttpTransport

        return HttpTransport(settings)
    return H1Transport(settings)


class _Exchange:
    """One request on the wire and what is known of its answer."""

    __slots__ = (
        "allowed",
        "answered",
        "broken",
        "deadline_at",
        "fut",
        "got",
        "head",
        "limit",
        "method",
        "sink",
        "tries",
        "via_proxy",
    )

    def __init__(
        self,
        head: bytes,
        method: str,
        sink: Sink,
        limit: int,
        via_proxy: bool,
        allowed: float,
        deadline_at: float,
        fut: asyncio.Future[int],
    ) -> None:
        self.head = head
        self.method = method
        self.sink = sink
        self.limit = limit
        self.via_proxy = via_proxy
        self.broken = Blame.PROXY if via_proxy else Blame.HOST
        self.allowed = allowed
        self.deadline_at = deadline_at
        self.fut = fut
        self.got = 0  # body bytes handed to the sink
        self.answered = False  # some byte of its answer arrived
        self.tries = 0

    def fail(self, error: BaseException) -> None:
        if not self.fut.done():
            self.fut.set_exception(error)

    def overdue(self) -> Failed:
        if not self.got:  # nothing at all: a stall, whichever clock saw it first
            return Failed(self.broken, f"no data for {secs(self.allowed)} s")
        return Failed(self.broken, f"took longer than {secs(self.allowed)} s ({self.got} bytes)")


class _Conn(asyncio.Protocol):
    """One keep-alive connection: requests go out in order, answers are parsed as they come."""

    def __init__(
        self, owner: H1Transport, key: tuple[str, int], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.owner = owner
        self.key = key
        self.loop = loop
        self.counted = False  # holds a place in the transport's connection limit
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[_Exchange] = collections.deque()
        self.served = 0  # answers completed on it
        self.closed = False
        self.reusable = True  # no answer said it is the last one
        self.idle_since = 0.0
        self.last = 0.0  # when a byte last came (or the wait for one began)
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        # the answer being parsed (for queue[0])
        self.state = _HEAD
        self.buf = bytearray()
        self.remaining = 0
        self.budget = 0  # the most body bytes this answer may have
        self.drain = False  # an error answer read only to keep the connection
        self.keep = True  # the connection may carry another answer after this one

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio and uvloop both set TCP_NODELAY: a request goes out at once (uvloop's
        # transport is no subclass of asyncio.Transport, hence no isinstance check)
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last = self.loop.time()
        try:
            self._feed(data)
        except _Bad as e:
            if self.queue:
                ex = self.queue[0]
                ex.fail(Failed(ex.broken, f"bad HTTP response ({e})"))
            self.abort()
        except Failed as f:
            if self.queue:
                self.queue[0].fail(f)
            self.abort()
        except Exception as e:  # the sink's (a full disk): the caller's, raised as it is
            if self.queue:
                self.queue[0].fail(e)
            self.abort()

    def eof_received(self) -> bool:
        return False  # close: what was parsed until now is judged in connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed, self.closed = self.closed, True
        self._stop_timer()
        self.owner._forget(self)
        if was_closed and not self.queue:
            return
        for i, ex in enumerate(self.queue):
            if ex.fut.done():
                continue
            if i == 0 and ex.answered and self.state == _UNTIL_CLOSE and exc is None:
                ex.fut.set_result(ex.got)  # a body that ends where the connection does
            elif not ex.answered and (i > 0 or self.served > 0) and ex.tries <= RETRIES:
                ex.fail(_Retry())  # a kept-alive connection closed under it: not its fault
            elif not ex.answered:
                why = "the server closed the connection" if exc is None else network_reason(exc)
                ex.fail(Failed(ex.broken, why))
            elif i == 0 and self.state == _HEAD:
                ex.fail(Failed(ex.broken, "the server closed the connection"))
            else:
                ex.fail(Failed(ex.broken, "the response body was cut short"))
        self.queue.clear()

    # -- requests -------------------------------------------------------------------------

    def send(self, ex: _Exchange) -> None:
        assert self.transport is not None
        # One timer per connection, never later than the soonest moment something may be due
        # (it re-checks when it fires): in the steady state it is not re-armed per request.
        if not self.queue:
            self.last = self.loop.time()
            due = min(self.last + self.owner.settings.timeout, ex.deadline_at)
            if self.timer is None or self.timer_at > due:
                self._arm(due)
        elif ex.deadline_at < self.timer_at:
            self._arm(ex.deadline_at)
        self.queue.append(ex)
        self.transport.write(ex.head)

    def abort(self) -> None:
        """Close now; answers not complete are judged in connection_lost."""
        if not self.closed:
            self.closed = True
            self.owner._forget(self)
            if self.transport is not None:
                self.transport.abort()

    def can_queue(self, depth: int) -> bool:
        """Whether one more small GET may wait behind the answers in flight."""
        return (
            not self.closed
            and self.reusable
            and 0 < len(self.queue) < depth
            and self.state != _UNTIL_CLOSE
        )

    # -- timers ---------------------------------------------------------------------------

    def _arm(self, at: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = at
        self.timer = self.loop.call_at(at, self._tick)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _tick(self) -> None:
        self.timer = None
        if self.closed:
            return
        now = self.loop.time()
        if not self.queue:  # idle in the pool
            if now - self.idle_since >= KEEPALIVE:
                self.abort()
            else:
                self._arm(self.idle_since + KEEPALIVE)
            return
        late = [ex for ex in self.queue if ex.deadline_at <= now and not ex.fut.done()]
        timeout = self.owner.settings.timeout
        if late:
            for ex in late:
                ex.fail(ex.overdue())
            self.abort()
        elif now - self.last >= timeout:
            ex = self.queue[0]
            ex.fail(Failed(ex.broken, f"no data for {timeout:g} s"))
            self.abort()
        else:
            soonest = min(ex.deadline_at for ex in self.queue)
            self._arm(min(self.last + timeout, soonest))

    # -- parsing --------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        while data and not self.closed:
            if not self.queue:
                raise _Bad("bytes nobody asked for")
            ex = self.queue[0]
            ex.answered = True
            state = self.state
            if state == _LENGTH:
                data = self._take(ex, data)
                if not self.remaining:
                    self._complete(ex)
            elif state == _HEAD:
                buf = self.buf
                if not buf:  # the usual case: a whole head at the start of the bytes
                    end = data.find(b"\r\n\r\n", 0, MAX_HEAD)
                    if end >= 0:
                        head, data = data[:end], data[end + 4 :]
                        self._head(ex, head)
                        continue
                start = max(0, len(buf) - 3)
                buf += data
                end = buf.find(b"\r\n\r\n", start)
                if end < 0 or end + 4 > MAX_HEAD:
                    if len(buf) > MAX_HEAD:
                        raise _Bad("headers longer than 64 KiB")
                    return
                head = bytes(buf[:end])
                data = bytes(buf[end + 4 :])
                buf.clear()
                self._head(ex, head)
            elif state == _UNTIL_CLOSE:
                self._body(ex, data)
                data = b""
            else:
                data = self._chunked(ex, data)

    def _chunked(self, ex: _Exchange, data: bytes) -> bytes:
        """One step of a chunked body; the bytes left for the next step."""
        state = self.state
        if state == _DATA:
            data = self._take(ex, data)
            if not self.remaining:
                self.state = _DATA_END
            return data
        buf = self.buf
        start = max(0, len(buf) - 1)
        buf += data
        end = buf.find(b"\r\n", start)
        if end < 0:
            if len(buf) > (MAX_HEAD if state == _TRAILER else MAX_CHUNK_LINE):
                raise _Bad("chunk line too long" if state != _TRAILER else "trailers too long")
            return b""
        line = bytes(buf[:end])
        rest = bytes(buf[end + 2 :])
        buf.clear()
        if state == _DATA_END:
            if line:
                raise _Bad("no line end after a chunk")
            self.state = _SIZE
        elif state == _SIZE:
            size = line.split(b";", 1)[0].strip(b" \t")
            if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                raise _Bad("invalid chunk size")
            n = int(size, 16)
            if n:
                self.remaining = n
                self.state = _DATA
            else:
                self.state = _TRAILER
        else:  # _TRAILER: lines until an empty one
            self.remaining += len(line) + 2
            if self.remaining > MAX_HEAD:
                raise _Bad("trailers too long")
            if not line:
                self._complete(ex)
        return rest

    def _take(self, ex: _Exchange, data: bytes) -> bytes:
        """Up to ``remaining`` bytes of ``data`` as body; the bytes after them."""
        n = self.remaining
        if len(data) <= n:
            chunk, data = data, b""
        else:
            chunk, data = data[:n], data[n:]
        self.remaining = n - len(chunk)
        self._body(ex, chunk)
        return data

    def _body(self, ex: _Exchange, chunk: bytes) -> None:
        if self.drain:
            self.budget -= len(chunk)
            if self.budget < 0:  # too much to read for nothing: the connection goes
                raise _Bad("an error answer too long to drain")
            return
        got = ex.got + len(chunk)
        if got > ex.limit:
            raise Failed(Blame.DATA, too_big(got, ex.limit, "sent"))
        ex.got = got
        if not ex.fut.done():  # a caller that went away gets nothing more
            ex.sink(chunk)

    def _head(self, ex: _Exchange, head: bytes) -> None:
        first, _, rest = head.partition(b"\r\n")
        m = _STATUS.fullmatch(first)
        if m is None:
            raise _Bad("invalid status line")
        status = int(m[2])
        headers: dict[str, str] = {}
        if rest:
            block = rest + b"\r\n"
            if _HEADERS.fullmatch(block) is None:  # one pass in C for the common case
                for line in rest.split(b"\r\n"):  # which line, for the message
                    name, colon, value = line.partition(b":")
                    if not colon or _TOKEN.fullmatch(name) is None:
                        raise _Bad("invalid header line")
                raise _Bad("invalid header value")
            for name, value in _FIELD.findall(block.decode("latin-1")):
                k = name.lower()
                if k in headers:
                    if k == "content-length" and headers[k] != value:
                        raise _Bad("conflicting Content-Length")
                    value = headers[k] + ", " + value
                headers[k] = value
        if 100 <= status < 200:
            if status == 101:
                raise _Bad("switching protocols")
            return  # informational: the real answer follows
        tokens = headers.get("connection", "").lower()
        if m[1] == b"1":
            keep = "close" not in tokens
        else:
            keep = "keep-alive" in tokens and "close" not in tokens
        te = headers.get("transfer-encoding")
        length: int | None
        if ex.method == "HEAD" or status in (204, 304):
            length = 0
        elif te is not None:
            chunked = te.rsplit(",", 1)[-1].strip().lower() == "chunked"
            length = -1 if chunked else None  # not chunked last: until the connection closes
            if "content-length" in headers:  # both: never trust the connection again
                keep = False
        elif "content-length" in headers:
            values = {v.strip() for v in headers["content-length"].split(",")}
            cl = values.pop()
            if values or not cl.isdigit() or not cl.isascii() or len(cl) > 19:
                raise _Bad("invalid Content-Length")
            length = int(cl)
        else:
            length = None  # until the connection closes
            keep = False
        self.keep = keep
        if not keep:
            self.reusable = False
        blame = classify_status(status, headers, ex.via_proxy)
        if blame is not None:
            what = "not found" if status == 404 else "answered"
            ex.fail(Failed(blame, f"{what} (HTTP {status})", status))
            if length is None or length > DRAIN:
                raise Failed(blame, "")  # not worth reading: close (the caller has its answer)
            self.drain = True
            self.budget = DRAIN
        elif length is not None and length > ex.limit:
            raise Failed(Blame.DATA, too_big(length, ex.limit))
        else:
            self.drain = False
        if length == 0:
            self._complete(ex)
        elif length is None:
            self.state = _UNTIL_CLOSE
        elif length < 0:
            self.state = _SIZE
            self.remaining = 0
        else:
            self.state = _LENGTH
            self.remaining = length

    def _complete(self, ex: _Exchange) -> None:
        """The answer of queue[0] is whole: the next one may begin."""
        self.queue.popleft()
        self.served += 1
        self.state = _HEAD
        self.drain = False
        if not ex.fut.done():
            ex.fut.set_result(ex.got)
        if not self.keep:
            self.abort()  # whatever was queued behind is sent again on another connection
        elif not self.queue:  # the timer, due before the keep-alive ends, re-checks then
            self.idle_since = self.last
            self.owner._release(self)
        else:  # the timer is due no later than what the next answer may take
            self.last = self.loop.time()


class _Target:
    """A server's base URL, split once: where to connect and what to ask."""

    __slots__ = ("base", "host_header", "key", "origin")

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(url)
        port = u.port or 80  # raises ValueError for a port out of range
        self.key = (u.hostname, port)
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        self.host_header = host if port == 80 else f"{host}:{port}"
        self.origin = f"http://{self.host_header}"
        self.base = (u.path or "/").rstrip("/")


class H1Transport:
    """GETs over pooled keep-alive HTTP/1.1 connections (made on first use, in the running
    event loop); ``https://`` servers or proxies go through aiohttp's transport."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pipeline = max(1, settings.pipeline)
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._busy: dict[tuple[str, int], set[_Conn]] = {}
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._targets: dict[str, _Target | None] = {}
        self._fallback: HttpTransport | None = None
        self._closing = False

    async def close(self) -> None:
        self._closing = True
        for conns in (*self._idle.values(), *self._busy.values()):
            for c in list(conns):
                c.abort()
        self._idle.clear()
        self._busy.clear()
        if self._fallback is not None:
            await self._fallback.close()
            self._fallback = None
        self._closing = False

    def _target(self, url: str) -> _Target | None:
        try:
            return self._targets[url]
        except KeyError:
            pass
        try:
            t: _Target | None = _Target(url)
        except ValueError:
            t = None
        if len(self._targets) < 1024:
            self._targets[url] = t
        return t

    def _http(self) -> HttpTransport:
        if self._fallback is None:
            from cvmfs_download.http import HttpTransport

            self._fallback = HttpTransport(self.settings)
        return self._fallback

    async def get(
        self,
        route: Route,
        path: str,
        sink: Sink,
        *,
        limit: int,
        deadline: float,
        no_cache: bool = False,
        revalidate: bool = False,
    ) -> int:
        """Stream one answer into ``sink``; its size.  Raises Failed.  ``no_cache``: caches
        must not answer (after wrong bytes); ``revalidate``: they must check first."""
        return await self.request(
            route,
            path,
            sink,
            limit=limit,
            deadline=deadline,
            no_cache=no_cache,
            revalidate=revalidate,
        )

    async def request(
        self,
        route: Route,
        path: str,
        sink: Sink,
        *,
        limit: int,
        deadline: float,
        no_cache: bool = False,
        revalidate: bool = False,
        method: str = "GET",
    ) -> int:
        """:meth:`get`, or another method without a body (HEAD)."""
        server = route.server
        if server.startswith("file://"):
            return await asyncio.to_thread(read_file, route.url(path), sink, limit)
        proxy = route.proxy
        target = self._target(server)
        hop = target if proxy is None else self._target(proxy)
        if target is None or hop is None:
            if method != "GET" or not _other_scheme(server, proxy):
                raise Failed(Blame.HOST, "not a valid URL")
            return await self._http().get(
                route,
                path,
                sink,
                limit=limit,
                deadline=deadline,
                no_cache=no_cache,
                revalidate=revalidate,
            )
        head = _request_head(
            method, target, proxy is not None, path, self.settings.user_agent, no_cache, revalidate
        )
        loop = asyncio.get_running_loop()
        ex = _Exchange(
            head,
            method,
            sink,
            limit,
            proxy is not None,
            deadline,
            loop.time() + deadline,
            loop.create_future(),
        )
        while True:
            ex.tries += 1
            conn = self._idle_conn(hop.key)
            if conn is None:
                conn = await self._slow_conn(hop.key, ex, loop)
            if conn.closed:  # lost between being made or picked and now: once more
                if ex.tries > RETRIES:
                    raise Failed(ex.broken, "the server closed the connection")
                continue
            conn.send(ex)
            try:
                return await ex.fut
            except _Retry:
                ex.fut = loop.create_future()
                ex.answered = False
                continue
            except asyncio.CancelledError:
                # its answer would be read for nobody: close, unless answers ahead of it (other
                # requests') are still coming; then its own is read and dropped when it comes
                if not conn.closed and conn.queue and conn.queue[0] is ex:
                    conn.abort()
                raise

    # -- the pool -------------------------------------------------------------------------

    def _idle_conn(self, key: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            c = idle.pop()
            if not c.closed:
                self._busy.setdefault(key, set()).add(c)
                return c
        return None

    async def _slow_conn(
        self, key: tuple[str, int], ex: _Exchange, loop: asyncio.AbstractEventLoop
    ) -> _Conn:
        """A connection when none is idle: a new one, a queue behind a busy one, or a wait
        for one to come free (within the attempt's deadline)."""
        while True:
            left = ex.deadline_at - loop.time()
            if left <= 0:
                raise ex.overdue()
            if self._open < self.settings.max_connections or self._close_other_idle(key):
                return await self._connect(key, ex, left, loop)
            if self.pipeline > 1 and ex.limit <= PIPELINE_LIMIT:
                busy = [c for c in self._busy.get(key, ()) if c.can_queue(self.pipeline)]
                if busy:
                    return min(busy, key=lambda c: len(c.queue))
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            handle = loop.call_later(left, _wake, waiter)
            try:
                await waiter
            finally:
                handle.cancel()
                if not waiter.done():
                    waiter.cancel()
            c = self._idle_conn(key)
            if c is not None:
                return c

    def _close_other_idle(self, key: tuple[str, int]) -> bool:
        """At the limit: close an idle connection to another address to make room."""
        for k, idle in self._idle.items():
            while k != key and idle:
                c = idle.pop(0)
                if not c.closed:
                    c.abort()
                    return True
        return False

    async def _connect(
        self, key: tuple[str, int], ex: _Exchange, left: float, loop: asyncio.AbstractEventLoop
    ) -> _Conn:
        self._open += 1
        conn = _Conn(self, key, loop)
        s = self.settings
        try:
            async with asyncio.timeout(min(s.connect_timeout, left)):
                await loop.create_connection(lambda: conn, key[0], key[1])
        except TimeoutError:
            self._open -= 1
            self._wake_one()
            if ex.deadline_at <= loop.time():
                raise ex.overdue() from None
            raise Failed(
                ex.broken, f"cannot connect (no answer in {s.connect_timeout:g} s)"
            ) from None
        except OSError as e:
            self._open -= 1
            self._wake_one()
            where = "cannot connect to the proxy" if ex.via_proxy else "cannot connect"
            raise Failed(ex.broken, f"{where} ({network_reason(e)})") from None
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        conn.counted = True
        self._busy.setdefault(key, set()).add(conn)
        if conn.closed:  # lost before it was handed out: its place is given back now
            self._forget(conn)
        return conn

    def _release(self, conn: _Conn) -> None:
        """An answer complete, nothing queued: the connection is free for the next request."""
        busy = self._busy.get(conn.key)
        if busy is not None:
            busy.discard(conn)
        if self._closing:
            conn.abort()
            return
        self._idle.setdefault(conn.key, []).append(conn)
        self._wake_one()

    def _forget(self, conn: _Conn) -> None:
        """A connection closed: its place in the limit goes to a waiter."""
        busy = self._busy.get(conn.key)
        if busy is not None and conn in busy:
            busy.discard(conn)
        else:
            idle = self._idle.get(conn.key)
            if idle is not None and conn in idle:
                idle.remove(conn)
        if conn.counted:
            conn.counted = False
            self._open -= 1
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _other_scheme(server: str, proxy: str | None) -> bool:
    """A URL that is not plain http:// but one aiohttp may take (https://)."""
    return any(u is not None and u.startswith("https://") for u in (server, proxy))


def _request_head(
    method: str,
    target: _Target,
    via_proxy: bool,
    path: str,
    user_agent: str,
    no_cache: bool,
    revalidate: bool,
) -> bytes:
    """The request line and headers, as the aiohttp transport sends them."""
    where = target.base + "/" + path.lstrip("/")
    if _UNSAFE.search(where):
        where = quote(where, safe="/%:@!$&'()*+,;=?-._~")
    if via_proxy:
        where = target.origin + where
    cache = (
        "Pragma: no-cache\r\nCache-Control: no-cache\r\n"
        if no_cache
        else "Pragma: \r\nCache-Control: max-age=0\r\n"
        if revalidate
        else "Pragma: \r\n"
    )
    return (
        f"{method} {where} HTTP/1.1\r\nHost: {target.host_header}\r\n"
        f"User-Agent: {user_agent}\r\n{cache}Accept: */*\r\n\r\n"
    ).encode("latin-1")
