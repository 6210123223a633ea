"""hep-proxy's connection and process life cycle against the real server: graceful shutdown
(in-flight response completes, new connections refused, exit 0), ``shutdown_timeout`` (a
response still in flight is cut then, and the process exits), ``keepalive_timeout`` (an idle
keep-alive connection is closed by the server after it, not long before)."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from pathlib import Path

import pytest

from cvmfs_format.objects import make_object
from tests.support.proxy_process import ProxyProcess, read_response, start_proxy
from tests.support.repos import Repo, publish_tree
from tests.support.waiting import wait_until

# every test here runs many real processes: left out of the fast subset (-m 'not slow')
pytestmark = pytest.mark.slow

FQRN = "life.example.org"
SHUTDOWN_TIMEOUT = 2.0
KEEPALIVE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, str, bytes]:
    """A store of its own holding one 32 MiB object: bigger than any socket buffers, so its
    response is still being sent when the test wants it to be."""
    base = tmp_path_factory.mktemp("life")
    src = base / "src"
    src.mkdir()
    (src / "small.txt").write_text("small\n" * 100)
    repo, _ = publish_tree(src, base / "store", FQRN, base / "keys")
    digest, stored = make_object(os.urandom(32 << 20))
    rel = digest.object_path()
    repo.local.write_object(rel, stored)
    return repo, rel, stored


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _start_big_download(p: ProxyProcess, rel: str) -> tuple[socket.socket, bytearray]:
    """A client that asks for the big object and reads only the response head (its receive
    buffer kept small, so the server is soon blocked on it)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.settimeout(30)
    s.connect(("127.0.0.1", p.port))
    s.sendall(f"GET /cvmfs/{FQRN}/{rel} HTTP/1.1\r\nHost: s1\r\n\r\n".encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        assert chunk, "connection closed before the response head"
        buf += chunk
    assert buf.startswith(b"HTTP/1.1 200"), bytes(buf[:200])
    _, _, rest = bytes(buf).partition(b"\r\n\r\n")
    return s, bytearray(rest)


def _read_to_eof(s: socket.socket, buf: bytearray) -> bytes:
    while True:
        try:
            chunk = s.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


@pytest.mark.parametrize("workers", [1, 2])
def test_graceful_shutdown_finishes_inflight_response(
    big: tuple[Repo, str, bytes], tmp_path: Path, workers: int
) -> None:
    repo, rel, body = big
    p = start_proxy(tmp_path, "--store", str(repo.store), workers=workers)
    try:
        s, buf = _start_big_download(p, rel)
        with s:
            p.proc.send_signal(signal.SIGTERM)
            # the port stops taking connections while our response is still on its way
            wait_until(lambda: _refused(p.port), 10, what="new connections refused after SIGTERM")
            assert p.proc.poll() is None  # still finishing our response
            # all of it arrives, then the server closes the connection (no keep-alive now)
            assert _read_to_eof(s, buf) == body
        assert p.proc.wait(30) == 0
    finally:
        if p.proc.poll() is None:
            p.stop()
    assert "Traceback" not in p.errors(), p.errors()
    assert _refused(p.port)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_shutdown_timeout_cuts_a_stalled_response(
    big: tuple[Repo, str, bytes], tmp_path: Path, workers: int
) -> None:
    repo, rel, body = big
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"shutdown_timeout: {SHUTDOWN_TIMEOUT}\n")
    p = start_proxy(tmp_path, "--store", str(repo.store), "--config", str(cfg), workers=workers)
    try:
        s, buf = _start_big_download(p, rel)
        with s:  # the client stops reading: the response cannot finish
            started = time.monotonic()
            p.proc.send_signal(signal.SIGTERM)
            status = p.proc.wait(SHUTDOWN_TIMEOUT + 30)
            took = time.monotonic() - started
            got = _read_to_eof(s, buf)
    finally:
        if p.proc.poll() is None:
            p.stop()
    assert status == 0, p.errors()
    assert len(got) < len(body)  # cut, not completed
    # the in-flight response had its shutdown_timeout, and the process exited about then
    assert SHUTDOWN_TIMEOUT - 0.2 <= took <= SHUTDOWN_TIMEOUT + 1.5, took
    assert "Traceback" not in p.errors(), p.errors()


@pytest.mark.slow
def test_keepalive_timeout_closes_idle_connections(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("kept alive\n" * 100)
    repo, _ = publish_tree(src, tmp_path / "store", FQRN, tmp_path / "keys")
    rel = next(r for r in repo.objects() if not r.endswith(("C", "X")))
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"keepalive_timeout: {KEEPALIVE_TIMEOUT}\n")
    p = start_proxy(tmp_path, "--store", str(repo.store), "--config", str(cfg))
    sel = selectors.DefaultSelector()
    conns: list[socket.socket] = []
    try:
        # one connection per way of answering: aiohttp's path (a root file, an object not yet
        # in memory) and the fast path (the same object again, now a memory-cache hit)
        answered: dict[str, float] = {}
        for name, target in (
            ("manifest", f"/cvmfs/{FQRN}/.cvmfspublished"),
            ("object miss", f"/cvmfs/{FQRN}/{rel}"),
            ("object hit", f"/cvmfs/{FQRN}/{rel}"),
        ):
            s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
            conns.append(s)
            for _ in range(2):  # two requests: the connection is kept alive in between
                s.sendall(f"GET {target} HTTP/1.1\r\nHost: s1\r\n\r\n".encode())
                assert read_response(s, bytearray()).status == 200
            answered[name] = time.monotonic()
            sel.register(s, selectors.EVENT_READ, name)
        closed: dict[str, float] = {}
        deadline = time.monotonic() + KEEPALIVE_TIMEOUT + 10
        while len(closed) < len(answered) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(100)
                except ConnectionResetError:
                    data = b""
                assert data == b"", (key.data, data)  # nothing but the close
                closed[key.data] = time.monotonic() - answered[key.data]
                sel.unregister(sock)
        assert closed.keys() == answered.keys(), closed
        for name, idle in closed.items():
            assert KEEPALIVE_TIMEOUT - 0.25 <= idle <= KEEPALIVE_TIMEOUT + 1.5, (name, idle)
    finally:
        sel.close()
        for s in conns:
            s.close()
        assert p.stop() == 0
    assert "Traceback" not in p.errors(), p.errors()
