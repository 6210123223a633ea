"""A hostile Stratum-1 on 127.0.0.1: right in every answer but the ones a rule poisons.

The download clients (preload, hep-proxy's upstream fill, hep-exec) must survive a server that
misbehaves the way broken middleboxes, half-dead disks and malicious mirrors do: a body that
never ends, one that drips, one ten times too long, headers then silence, a body cut short.
aiohttp-based test servers cannot say most of these (they frame every response correctly), so
this one writes HTTP/1.1 by hand on raw asyncio streams. Everything a rule does not select is
served exactly as a static web server would serve the store (Content-Length, keep-alive), so
a client gets through the manifest, whitelist and catalogs to the one answer under test.

It runs its own event loop in a daemon thread (like :class:`tests.support.store_server.
StoreServer`), so a test can start a client process and watch it while the server feeds it.
It counts requests and body bytes per path: the bytes it managed to hand to a client are the
measure of whether the client capped what it read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cvmfs_format.store import MANIFEST

# A path predicate, on the repository-relative path (".cvmfspublished", "data/ab/cdef…C").
Selects = Callable[[str], bool]

BLOCK = 256 * 1024  # one write of an endless or long body; drain() after each
MAX_HEAD = 64 * 1024  # a request head longer than this is not a client under test
GiB = 1 << 30


class Misbehaviour(enum.Enum):
    ENDLESS = "endless"  # 200, no Content-Length, not chunked: the body ends only at close
    TRICKLE = "trickle"  # 200, right Content-Length, then one byte every `trickle_interval`
    TENFOLD = "tenfold"  # 200, Content-Length and body 10x the file: its bytes, then filler
    STALL = "stall"  # status line and headers (right Content-Length), then silence
    SHORT = "short"  # Content-Length of the whole file, half of it sent, then close


@dataclass(frozen=True)
class Rule:
    """Answer the requests ``selects`` picks with ``misbehaviour``; ``what`` names them."""

    misbehaviour: Misbehaviour
    selects: Selects
    what: str


def the_manifest(rel: str) -> bool:
    return rel == MANIFEST


def every_object(rel: str) -> bool:
    return rel.startswith("data/")


def a_catalog(rel: str) -> bool:
    return rel.startswith("data/") and rel.endswith("C")


def object_named(name: str) -> Selects:
    """The object ``data/XX/NAME`` (repository-relative), and nothing else."""
    return lambda rel: rel == name


class HostileServer:
    """Serves ``<root>/<fqrn>/…`` under ``/cvmfs/<fqrn>/…``, except what ``rules`` poison.

    ``valve`` bounds the body of one endless answer: a client that never stops reading would
    otherwise make the test run until the disk is full. Reaching it is counted in
    :attr:`valve_hits` (a client that caps its reads never gets there), then the connection
    is closed.
    """

    def __init__(
        self,
        root: Path,
        rules: Iterable[Rule] = (),
        *,
        trickle_interval: float = 0.5,
        valve: int = 4 * GiB,
    ) -> None:
        self.root = Path(root)
        self.rules = list(rules)
        self.trickle_interval = trickle_interval
        self.valve = valve
        self.requests: collections.Counter[str] = collections.Counter()  # url path -> requests
        self.sent: collections.Counter[str] = collections.Counter()  # url path -> body bytes
        self.poisoned: collections.Counter[str] = collections.Counter()  # answered by a rule
        self.valve_hits = 0
        self.open_connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._stopping: asyncio.Event | None = None
        self.port = 0
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("hostile server did not start")

    @property
    def url(self) -> str:
        """The base URL: hep-exec's ``--proxy``; ``{url}/cvmfs/@fqrn@`` a Stratum-1's."""
        return f"http://127.0.0.1:{self.port}"

    def repository_url(self, fqrn: str) -> str:
        return f"{self.url}/cvmfs/{fqrn}"

    def sent_for(self, fqrn: str, rel: str) -> int:
        """Body bytes handed to clients (all requests together) for one repository path."""
        return self.sent[f"/cvmfs/{fqrn}/{rel}"]

    def requests_for(self, fqrn: str, rel: str) -> int:
        return self.requests[f"/cvmfs/{fqrn}/{rel}"]

    # -- lifecycle ------------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._stopping = asyncio.Event()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", 0, limit=MAX_HEAD)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        """Close the listener and every connection (stalled and endless answers too)."""

        async def shutdown() -> None:
            assert self._server is not None and self._stopping is not None
            self._server.close()
            self._stopping.set()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

        if not self._loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- one connection -------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.open_connections += 1
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away or sent nonsense: either way this connection is over
        except asyncio.CancelledError:
            pass  # stop(): ended here, not re-raised into asyncio's stream callback (it logs)
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request and its answer; whether the connection may carry another."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = [*lines[0].split(" "), "", "", ""][:3]
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)
        }
        if target.startswith("http://"):  # absolute form: the client takes us for its proxy
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        path = target.split("?", 1)[0]
        self.requests[path] += 1
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if method not in ("GET", "HEAD"):
            await self._plain(writer, 405, "Method Not Allowed", b"", close=True)
            return False
        body = self._file(path)
        if body is None:
            await self._plain(writer, 404, "Not Found", b"", head=method == "HEAD", close=not keep)
            return keep
        rel = path.split("/", 3)[3]
        rule = next((r for r in self.rules if r.selects(rel)), None)
        if rule is None or method == "HEAD":
            await self._plain(writer, 200, "OK", body, path, head=method == "HEAD", close=not keep)
            return keep
        self.poisoned[path] += 1
        answer = {
            Misbehaviour.ENDLESS: self._endless,
            Misbehaviour.TRICKLE: self._trickle,
            Misbehaviour.TENFOLD: self._tenfold,
            Misbehaviour.STALL: self._stall,
            Misbehaviour.SHORT: self._short,
        }[rule.misbehaviour]
        return await answer(reader, writer, path, body)

    def _file(self, path: str) -> bytes | None:
        """The stored bytes a static server would send for ``path``, or None (404)."""
        parts = path.split("/", 3)
        if len(parts) != 4 or parts[1] != "cvmfs" or not parts[2] or not parts[3]:
            return None
        fqrn, rel = parts[2], parts[3]
        if fqrn.startswith(".") or any(p in ("", ".", "..") for p in rel.split("/")):
            return None
        f = self.root / fqrn / rel
        try:
            return f.read_bytes() if f.is_file() else None
        except OSError:
            return None

    # -- answers --------------------------------------------------------------------------

    @staticmethod
    def _head(status: int, reason: str, length: int | None, close: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/octet-stream"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def _send(self, writer: asyncio.StreamWriter, path: str, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        self.sent[path] += len(data)

    async def _plain(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        reason: str,
        body: bytes,
        path: str = "",
        *,
        head: bool = False,
        close: bool = False,
    ) -> None:
        writer.write(self._head(status, reason, len(body), close))
        if body and not head:
            await self._send(writer, path, body)
        await writer.drain()

    async def _endless(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
    ) -> bool:
        # The real bytes first (a client that parses as it reads sees a valid start), then
        # lines of filler, for as long as the client reads: drain() is the client's pace.
        writer.write(self._head(200, "OK", None, close=True))
        await self._send(writer, path, body)
        filler = (b"#" * 63 + b"\n") * (BLOCK // 64)
        sent = len(body)
        while sent < self.valve:
            await self._send(writer, path, filler)
            sent += len(filler)
        self.valve_hits += 1
        return False

    async def _trickle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
    ) -> bool:
        writer.write(self._head(200, "OK", len(body), close=False))
        for i in range(len(body)):
            await self._send(writer, path, body[i : i + 1])
            await asyncio.sleep(self.trickle_interval)
        return True

    async def _tenfold(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
    ) -> bool:
        writer.write(self._head(200, "OK", 10 * len(body), close=False))
        await self._send(writer, path, body)
        left = 9 * len(body)
        while left:
            n = min(left, BLOCK)
            await self._send(writer, path, b"\0" * n)
            left -= n
        return True

    async def _stall(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
    ) -> bool:
        # Headers promise the whole body; then nothing, until the client hangs up (what a
        # client with an idle timeout does) or the server stops.
        writer.write(self._head(200, "OK", len(body), close=False))
        await writer.drain()
        while await reader.read(65536):
            pass
        return False

    async def _short(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
    ) -> bool:
        writer.write(self._head(200, "OK", len(body), close=False))
        await self._send(writer, path, body[: len(body) // 2])
        writer.close()  # an orderly close (FIN): the only sign of trouble is the missing half
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        return False
