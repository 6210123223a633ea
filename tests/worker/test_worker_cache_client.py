"""CacheClient against a scripted service on a real socketpair: objects by name, bad names."""

from __future__ import annotations

import array
import os
import socket
import threading
from pathlib import Path

import pytest

from cvmfs_format.hashes import ContentHash
from worker.node.cache_client import CacheClient
from worker.node.cache_protocol import ObjectSpec, decode, encode
from worker.ram.ramfiles import RamFiles, RamFilesError


@pytest.fixture(scope="module")
def files() -> RamFiles:
    try:
        return RamFiles("tmpfs")
    except RamFilesError as e:
        pytest.skip(f"no private tmpfs on this machine: {e}")


def _serve_one_open(sock: socket.socket, name: str, fd: int, size: int) -> None:
    """What the service does for one ``open``: reply with the object's fd and name."""
    msg = decode(sock.recv(1 << 16))
    assert msg["op"] == "open"
    key = ObjectSpec.from_wire(msg["object"]).key
    reply = encode({"op": "open", "ok": True, "key": key, "size": size, "name": name})
    sock.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def _client(files: RamFiles, tmp_path: Path) -> tuple[CacheClient, socket.socket]:
    ours, service = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert files.shared_dir is not None
    client = CacheClient(ours, os.getpid(), tmp_path, 1 << 20, os.dup(files.shared_dir))
    return client.start(), service


def test_service_objects_are_opened_by_name(files: RamFiles, tmp_path: Path) -> None:
    f = files.make("obj", b"payload")
    client, service = _client(files, tmp_path)
    spec = ObjectSpec("x.org", "/a", 7, False, ContentHash.of(b"payload"))
    try:
        t = threading.Thread(target=_serve_one_open, args=(service, f.name, f.fd, 7))
        t.start()
        obj = client.open(spec)
        t.join()
        assert obj is not None and obj.by_name
        assert obj.path == f"/proc/{os.getpid()}/fd/{client.names_dir}/{f.name}"
        assert Path(obj.path).read_bytes() == b"payload"
        client.release(obj)
    finally:
        client.close()
        service.close()
        files.discard(f.fd, f.name)


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ""])
def test_a_name_that_is_not_one_file_ends_the_connection(
    files: RamFiles, tmp_path: Path, bad: str
) -> None:
    """A confused service cannot make us hand tracees a path outside its directory: the
    connection is dropped and the job falls back to its private cache (open -> None)."""
    f = files.make("obj", b"payload")
    client, service = _client(files, tmp_path)
    spec = ObjectSpec("x.org", "/a", 7, False, ContentHash.of(b"payload"))
    try:
        t = threading.Thread(target=_serve_one_open, args=(service, bad, f.fd, 7))
        t.start()
        assert client.open(spec) is None
        t.join()
        assert client.gone
    finally:
        client.close()
        service.close()
        files.discard(f.fd, f.name)


def _reply_in_memfd(service: socket.socket, msg: dict[str, object], body: bytes) -> None:
    """What the service does for a ``meta``, ``catalog`` or ``answers`` request: the bytes in
    a memfd."""
    fd = os.memfd_create("reply")
    os.write(fd, body)
    service.sendmsg(
        [encode({**msg, "ok": True, "size": len(body)})],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
    )
    os.close(fd)


def test_a_file_asked_for_ahead_is_one_request_and_reaches_meta(
    files: RamFiles, tmp_path: Path
) -> None:
    """A mount asks for the whitelist with the manifest (meta_ahead): the service sees one
    request for it, and meta() later gets its reply, whether it came before or after."""
    client, service = _client(files, tmp_path)
    body = b"20261205211306\nE20270104211306\nNx.org\n"
    try:
        for late in (False, True):
            client.meta_ahead("x.org", ".cvmfswhitelist")
            client.meta_ahead("x.org", ".cvmfswhitelist")  # still one request
            msg = decode(service.recv(1 << 16))
            assert msg == {"op": "meta", "fqrn": "x.org", "path": ".cvmfswhitelist"}

            if late:  # meta() waits for the reply of the request made ahead
                threading.Timer(0.2, _reply_in_memfd, (service, msg, body)).start()
            else:
                _reply_in_memfd(service, msg, body)
            assert client.meta("x.org", ".cvmfswhitelist") == body
            service.setblocking(False)
            with pytest.raises(BlockingIOError):  # meta() asked for nothing more
                service.recv(1 << 16)
            service.setblocking(True)
    finally:
        client.close()
        service.close()


def test_a_catalog_and_answers_asked_for_ahead_are_one_request_each(
    files: RamFiles, tmp_path: Path
) -> None:
    """A mount asks for the root catalog and the node's answers for it as soon as the manifest
    names them: catalog() and answers() then take those replies, and ask for nothing more."""
    client, service = _client(files, tmp_path)
    root = "ab" * 20
    body = b"SQLite format 3\0" + bytes(100)
    try:
        client.catalog_ahead("x.org", f"data/ab/{root[2:]}C")
        client.answers_ahead("x.org", root)
        asked = [decode(service.recv(1 << 16)) for _ in range(2)]
        assert [m["op"] for m in asked] == ["catalog", "answers"]
        for msg in asked:
            _reply_in_memfd(service, msg, body)
        catalog = client.catalog("x.org", f"data/ab/{root[2:]}C")
        answers = client.answers("x.org", root)
        assert catalog is not None and answers is not None
        assert catalog[:] == body and answers[:] == body
        service.setblocking(False)
        with pytest.raises(BlockingIOError):
            service.recv(1 << 16)
    finally:
        client.close()
        service.close()


def test_service_args_rebuild_what_the_service_uses(tmp_path: Path) -> None:
    """A service started as a fresh interpreter gets the job's settings back from its argv."""
    from worker.config import parse_exec_args
    from worker.node.cache_client import service_args

    argv = ["--server", "http://a:1|http://b:2;http://c:3", "--proxy", "http://sq:3128;DIRECT"]
    argv += ["--ram", "3G", "--ram-files", "memfd", "--cvmfs-config", "none"]
    argv += ["--timeout", "7", "--retries", "3", "--cache-idle", "9", "--", "true"]
    job = parse_exec_args(argv, {})
    service = parse_exec_args([*service_args(job, tmp_path), "--cache-daemon"], {})
    for field in (
        "servers",
        "proxies",
        "cvmfs_config",
        "ram_bytes",
        "ram_files",
        "timeout",
        "retries",
        "cache_idle",
    ):
        assert getattr(service, field) == getattr(job, field), field
    assert service.cache_dir == tmp_path
