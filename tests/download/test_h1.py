"""The lean HTTP/1.1 transport (cvmfs_download.h1), byte by byte.

Two kinds of server: a parser fed by hand (every split of a byte stream, with no timing in
the way), and a scripted raw-socket server on 127.0.0.1 that says exactly the bytes a test
gives it, closes where it is told, and records what each connection was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from cvmfs_download.client import Downloader
from cvmfs_download.core import Blame, Route, Settings
from cvmfs_download.h1 import H1Transport, _Conn, _Exchange, make_transport
from cvmfs_download.http import HttpTransport
from cvmfs_download.wire import Failed
from cvmfs_format.hashes import Algorithm, ContentHash

FAST = Settings(timeout=1.0, connect_timeout=1.0, retries=0)
PIPE = Settings(timeout=1.0, connect_timeout=1.0, retries=0, max_connections=1, pipeline=4)
CLOSE = None  # an answer that closes the connection instead


def ok(body: bytes, *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in ("HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra))
    return head.encode() + b"\r\n" + body


def chunked(body: bytes, size: int = 7) -> bytes:
    parts = [b"%x;ext=1\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
             for i in range(0, len(body), size)]  # fmt: skip
    return (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(parts)
        + (b"0\r\nX-Trailer: yes\r\n\r\n")
    )


def body_of(path: str) -> bytes:
    """A body no other path has: a request that got another's bytes shows at once."""
    return (path.encode() + b"|") * 50


Answer = Callable[[int, int, str], "bytes | list[bytes] | None"]


@dataclass
class Scripted:
    """Answers request ``n`` of connection ``conn`` for ``path`` with ``answer(conn, n,
    path)``: bytes, pieces of bytes sent 5 ms apart, or CLOSE."""

    answer: Answer
    requests: list[tuple[int, bytes]] = field(default_factory=list)  # (connection, head)
    connections: int = 0
    port: int = 0
    _server: asyncio.AbstractServer | None = None

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        n = 0
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                self.requests.append((conn, head))
                out = self.answer(conn, n, head.split(b" ")[1].decode())
                n += 1
                if out is CLOSE:  # what else was asked on it, unanswered, is recorded too
                    with contextlib.suppress(TimeoutError):
                        rest = await asyncio.wait_for(r.read(1 << 16), 0.05)
                        self.requests += [(conn, b"GET " + h) for h in rest.split(b"GET ")[1:]]
                    break
                pieces = [out] if isinstance(out, bytes) else out
                for i, piece in enumerate(pieces):
                    if i:
                        await asyncio.sleep(0.005)
                    w.write(piece)
                    await w.drain()
        w.close()

    def route(self, proxy: bool = False) -> Route:
        base = f"http://127.0.0.1:{self.port}"
        if proxy:
            return Route("http://origin.example:8000/cvmfs/r.org", base)
        return Route(f"{base}/cvmfs/r.org", None)

    def heads(self, conn: int | None = None) -> list[bytes]:
        return [h for c, h in self.requests if conn is None or c == conn]


@contextlib.asynccontextmanager
async def scripted(answer: Answer) -> AsyncIterator[Scripted]:
    s = Scripted(answer)
    server = await asyncio.start_server(s._serve, "127.0.0.1", 0)
    s.port = server.sockets[0].getsockname()[1]
    try:
        yield s
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


async def get(t: H1Transport, route: Route, path: str, limit: int = 1 << 20, **kw: object) -> bytes:
    got: list[bytes] = []
    n = await t.request(route, path, got.append, limit=limit, deadline=5.0, **kw)  # type: ignore[arg-type]
    data = b"".join(got)
    assert n == len(data)
    return data


# -- the parser, fed by hand ----------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True


async def feed(stream: bytes, splits: list[int], methods: list[str]) -> list[object]:
    """Send len(methods) requests on one fed connection, give it ``stream`` cut at
    ``splits``; each request's outcome (its body, or the exception)."""
    loop = asyncio.get_running_loop()
    owner = H1Transport(FAST)
    conn = _Conn(owner, ("127.0.0.1", 1), loop)
    fake = FakeTransport()
    conn.connection_made(fake)  # type: ignore[arg-type]
    bodies: list[list[bytes]] = [[] for _ in methods]
    exs = [
        _Exchange(b"GET / HTTP/1.1\r\n\r\n", m, bodies[i].append, 1 << 20, False, 5.0,
                  loop.time() + 5, loop.create_future())
        for i, m in enumerate(methods)
    ]  # fmt: skip
    for ex in exs:
        conn.send(ex)
    cuts = [0, *splits, len(stream)]
    for a, b in itertools.pairwise(cuts):
        if b > a:
            conn.data_received(stream[a:b])
    if not fake.aborted:
        conn.connection_lost(None)
    out: list[object] = []
    for i, ex in enumerate(exs):
        try:
            await ex.fut
            out.append(b"".join(bodies[i]))
        except Exception as e:
            out.append(e)
    return out


STREAM = ok(b"first body") + chunked(b"second, chunked, body!" * 3) + ok(b"third")
EXPECT = [b"first body", b"second, chunked, body!" * 3, b"third"]


async def test_pipelined_answers_split_at_every_byte_boundary() -> None:
    for i in range(len(STREAM) + 1):
        assert await feed(STREAM, [i], ["GET"] * 3) == EXPECT, i


async def test_pipelined_answers_one_byte_at_a_time() -> None:
    assert await feed(STREAM, list(range(len(STREAM))), ["GET"] * 3) == EXPECT


async def test_no_body_for_head_204_304_and_interim_answers_are_skipped() -> None:
    stream = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 123\r\n\r\n"  # HEAD: no body despite the length
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"
    ) + ok(b"after")
    for i in range(len(stream) + 1):
        got = await feed(stream, [i], ["HEAD", "GET", "GET", "GET"])
        assert got[:2] == [b"", b""] and got[3] == b"after", i
        assert isinstance(got[2], Failed) and got[2].status == 304  # not 2xx: the server's


@pytest.mark.parametrize(
    ("stream", "words"),
    [
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "headers longer than 64 KiB"),
        (b"HTTP/2 200\r\n\r\n", "invalid status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "invalid header line"),
        (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "invalid header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "conflicting"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY\r\n", "no line end"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switching protocols"),
        (ok(b"x") + b"extra bytes", None),  # nobody asked: the answer stands, the line goes
    ],
)
async def test_strict_parsing_fails_the_answer_as_a_bad_response(
    stream: bytes, words: str | None
) -> None:
    (got,) = await feed(stream, [len(stream) // 2], ["GET"])
    if words is None:
        assert got == b"x"
        return
    assert isinstance(got, Failed) and got.blame is Blame.HOST, got
    assert got.reason.startswith("bad HTTP response (") and words in got.reason, got.reason


async def test_a_body_past_its_limit_or_cut_short() -> None:
    loop = asyncio.get_running_loop()
    owner = H1Transport(FAST)
    for stream, words in (
        (ok(b"x" * 100), "100 bytes announced, more than the 10 bytes it may have"),
        (chunked(b"x" * 100), "sent, more than the 10 bytes it may have"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100, "sent, more than the 10 bytes it may have"),
    ):
        conn = _Conn(owner, ("127.0.0.1", 1), loop)
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
        ex = _Exchange(b"", "GET", lambda _c: None, 10, False, 5.0, loop.time() + 5,
                       loop.create_future())  # fmt: skip
        conn.send(ex)
        conn.data_received(stream)
        with pytest.raises(Failed, match=words) as e:
            await ex.fut
        assert e.value.blame is Blame.DATA
    (got,) = await feed(ok(b"0123456789")[:-3], [], ["GET"])
    assert isinstance(got, Failed) and got.reason == "the response body was cut short"
    (got,) = await feed(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", [20], ["GET"])
    assert got == b"until the end"  # no length, not chunked: the body ends with the connection


# -- real connections -----------------------------------------------------------------------


async def test_request_bytes_as_the_aiohttp_transport_sends_them() -> None:
    async with scripted(lambda c, n, p: ok(b"x")) as s:
        t = H1Transport(FAST)
        try:
            await get(t, s.route(), "data/ab/c d")
            await get(t, s.route(proxy=True), "/data/ab/cd", no_cache=True)
            await get(t, s.route(), ".cvmfspublished", revalidate=True)
        finally:
            await t.close()
    host = f"127.0.0.1:{s.port}"
    ua = FAST.user_agent
    assert s.heads() == [
        f"GET /cvmfs/r.org/data/ab/c%20d HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {ua}\r\n"
        "Pragma: \r\nAccept: */*\r\n\r\n".encode(),
        "GET http://origin.example:8000/cvmfs/r.org/data/ab/cd HTTP/1.1\r\n"
        f"Host: origin.example:8000\r\nUser-Agent: {ua}\r\nPragma: no-cache\r\n"
        "Cache-Control: no-cache\r\nAccept: */*\r\n\r\n".encode(),
        f"GET /cvmfs/r.org/.cvmfspublished HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {ua}\r\n"
        "Pragma: \r\nCache-Control: max-age=0\r\nAccept: */*\r\n\r\n".encode(),
    ]
    assert s.connections == 1  # all three on one kept-alive connection


async def test_answers_in_pieces_chunked_and_errors_keep_the_connection() -> None:
    def answer(c: int, n: int, path: str) -> bytes | list[bytes]:
        if path.endswith("missing"):
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot here\n"
        data = chunked(body_of(path), 13) if "chunked" in path else ok(body_of(path))
        return [data[i : i + 11] for i in range(0, len(data), 11)]

    async with scripted(answer) as s:
        t = H1Transport(FAST)
        try:
            assert await get(t, s.route(), "a") == body_of("/cvmfs/r.org/a")
            with pytest.raises(Failed, match=r"^not found \(HTTP 404\)$") as e:
                await get(t, s.route(), "missing")
            assert e.value.blame is Blame.NOBODY and e.value.status == 404
            assert await get(t, s.route(), "chunked") == body_of("/cvmfs/r.org/chunked")
        finally:
            await t.close()
    assert s.connections == 1


async def test_connection_close_between_pipelined_answers_resends_the_unanswered() -> None:
    """Connection 0 answers its first request and closes with two more asked on it: those
    go again on a new connection, and each gets its own bytes."""

    def answer(c: int, n: int, path: str) -> bytes | None:
        if c == 0 and n == 1:
            return CLOSE
        return ok(body_of(path))

    async with scripted(answer) as s:
        t = H1Transport(PIPE)
        try:
            assert await get(t, s.route(), "warm") == body_of("/cvmfs/r.org/warm")
            paths = [f"p{i}" for i in range(3)]
            got = await asyncio.gather(*(get(t, s.route(), p) for p in paths))
        finally:
            await t.close()
    assert got == [body_of(f"/cvmfs/r.org/{p}") for p in paths]
    assert len(s.heads(0)) == 4  # pipelined: all asked on connection 0 before any answer
    assert s.connections >= 2


async def test_a_close_in_the_middle_of_a_pipelined_answer() -> None:
    """The answer being read when the connection drops fails (cut short); those queued
    behind it, not begun, are sent again and succeed."""

    def answer(c: int, n: int, path: str) -> bytes | None:
        if c == 0 and n == 1:
            return ok(body_of(path))[:40]  # then the connection closes (next: CLOSE)
        if c == 0 and n == 2:
            return CLOSE
        return ok(body_of(path))

    async with scripted(answer) as s:
        t = H1Transport(PIPE)
        try:
            await get(t, s.route(), "warm")
            got = await asyncio.gather(
                *(get(t, s.route(), p) for p in ("p0", "p1", "p2")), return_exceptions=True
            )
        finally:
            await t.close()
    assert isinstance(got[0], Failed) and got[0].reason == "the response body was cut short"
    assert got[1:] == [body_of("/cvmfs/r.org/p1"), body_of("/cvmfs/r.org/p2")]


async def test_a_kept_alive_connection_closed_under_a_request_is_not_a_failure() -> None:
    def answer(c: int, n: int, path: str) -> bytes | None:
        return CLOSE if (c, n) == (0, 1) else ok(body_of(path))

    async with scripted(answer) as s:
        t = H1Transport(FAST)
        try:
            await get(t, s.route(), "a")
            assert await get(t, s.route(), "b") == body_of("/cvmfs/r.org/b")
        finally:
            await t.close()
    assert s.connections == 2


async def test_a_fresh_connection_closed_without_an_answer_fails() -> None:
    async with scripted(lambda c, n, p: CLOSE) as s:
        t = H1Transport(FAST)
        try:
            with pytest.raises(Failed, match="^the server closed the connection$"):
                await get(t, s.route(), "a")
        finally:
            await t.close()


async def test_connection_close_and_http_1_0_answers_are_not_reused() -> None:
    def answer(c: int, n: int, path: str) -> bytes:
        if n:
            raise AssertionError("a second request on a connection that was to close")
        if path.endswith("old"):
            return b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
        return ok(b"ok", "Connection: close")

    async with scripted(answer) as s:
        t = H1Transport(FAST)
        try:
            for p in ("a", "old", "b"):
                assert await get(t, s.route(), p) == b"ok"
        finally:
            await t.close()
    assert s.connections == 3


async def test_the_connection_limit_holds_and_waiters_get_their_turn() -> None:
    def answer(c: int, n: int, path: str) -> list[bytes]:
        data = ok(body_of(path))
        return [data[:10], data[10:]]

    async with scripted(answer) as s:
        limited = Settings(timeout=1.0, connect_timeout=1.0, retries=0, max_connections=3)
        t = H1Transport(limited)
        try:
            paths = [f"x{i}" for i in range(20)]
            got = await asyncio.gather(*(get(t, s.route(), p) for p in paths))
        finally:
            await t.close()
    assert got == [body_of(f"/cvmfs/r.org/{p}") for p in paths]
    assert s.connections <= 3


async def test_idle_timeout_and_deadline() -> None:
    def stall(c: int, n: int, path: str) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"]  # and nothing more

    async with scripted(stall) as s:
        t = H1Transport(FAST)
        try:
            with pytest.raises(Failed, match="^no data for 1 s$"):
                await get(t, s.route(), "a")
            got: list[bytes] = []
            with pytest.raises(Failed, match=r"^no data for 0\.3 s$"):
                await t.get(s.route(), "b", got.append, limit=100, deadline=0.3)
        finally:
            await t.close()


async def test_cannot_connect_and_not_a_url() -> None:
    t = H1Transport(FAST)
    try:
        with pytest.raises(Failed, match=r"^cannot connect \(connection refused\)$"):
            await get(t, Route("http://127.0.0.1:9/cvmfs/r", None), "a")
        with pytest.raises(Failed, match=r"^cannot connect to the proxy \(connection refused\)"):
            await get(t, Route("http://s/cvmfs/r", "http://127.0.0.1:9"), "a")
        with pytest.raises(Failed, match="^not a valid URL$"):
            await get(t, Route("http://:80/cvmfs/r", None), "a")
        # https://: aiohttp's transport inside, the same words
        with pytest.raises(Failed, match=r"^cannot connect \(connection refused\)$"):
            await get(t, Route("https://127.0.0.1:9/cvmfs/r", None), "a")
        assert isinstance(t._fallback, HttpTransport)
    finally:
        await t.close()


async def test_a_cancelled_request_closes_its_connection() -> None:
    def stall(c: int, n: int, path: str) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"]

    async with scripted(stall) as s:
        t = H1Transport(FAST)
        got: list[bytes] = []
        task = asyncio.ensure_future(t.get(s.route(), "a", got.append, limit=100, deadline=5))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert got == [b"12345"]
        assert t._open == 0
        await t.close()


async def test_downloader_over_the_lean_transport_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = b"the right bytes\n" * 100
    good = ContentHash(Algorithm.SHA1, hashlib.sha1(body).digest())
    async with scripted(lambda c, n, p: ok(body)) as s:
        d = Downloader([[s.route().server]], settings=FAST)
        try:
            assert isinstance(d.transport, H1Transport)
            assert await d.get("data/ab/cdef", expected=good) == body
        finally:
            await d.close()
    monkeypatch.setenv("CVMFS_DOWNLOAD_TRANSPORT", "aiohttp")
    assert isinstance(make_transport(FAST), HttpTransport)


async def test_a_cancelled_request_queued_behind_another_spoils_nothing() -> None:
    """Pipelined: the request behind is cancelled while the one ahead is being answered; the
    one ahead gets its bytes, the cancelled one's answer is read for nobody."""

    def answer(c: int, n: int, path: str) -> list[bytes]:
        data = ok(body_of(path))
        return [data[:30], data[30:]] if path.endswith("ahead") else [data]

    async with scripted(answer) as s:
        t = H1Transport(PIPE)
        try:
            await get(t, s.route(), "warm")
            ahead = asyncio.ensure_future(get(t, s.route(), "ahead"))
            await asyncio.sleep(0)
            behind = asyncio.ensure_future(get(t, s.route(), "behind"))
            await asyncio.sleep(0)
            behind.cancel()
            assert await ahead == body_of("/cvmfs/r.org/ahead")
            with pytest.raises(asyncio.CancelledError):
                await behind
            assert await get(t, s.route(), "after") == body_of("/cvmfs/r.org/after")
        finally:
            await t.close()
    assert s.connections == 1
