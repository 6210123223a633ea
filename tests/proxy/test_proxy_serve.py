"""hep-proxy against a real server process on loopback: layout, headers, HEAD, keep-alive,
absolute URIs, 404s, traversal on raw sockets, metrics, access log, shutdown."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_format.objects import make_object
from tests.support.proxy_process import (
    ProxyProcess,
    raw_exchange,
    read_response,
    start_proxy,
    status_of,
)
from tests.support.repos import Repo, publish_tree

DEMO = "demo.example.org"
SECRET = b"TOPSECRET-0123456789"
EXACT_HEADERS = {"server", "content-type", "cache-control", "content-length", "date"}


def _store_files(repo_dir: Path) -> list[str]:
    """Every file a client may fetch: root files and all objects under data/."""
    out = [".cvmfspublished", ".cvmfswhitelist"]
    for p in sorted((repo_dir / "data").glob("??/*")):
        if p.is_file() and not p.is_symlink() and not p.parent.is_symlink():
            out.append(str(p.relative_to(repo_dir)))
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """A published repository with small files and a chunked 9 MiB file (P objects)."""
    base = tmp_path_factory.mktemp("demo")
    src = base / "src"
    (src / "sw" / "lib").mkdir(parents=True)
    (src / "sw" / "hello.txt").write_text("hello from the proxy tests\n")
    (src / "sw" / "lib" / "libbig.so").write_bytes(os.urandom(9 << 20))
    (src / "sw" / "small.bin").write_bytes(os.urandom(3000))
    (src / "empty").write_bytes(b"")
    repo, _ = publish_tree(src, base / "store", DEMO, base / "keys")
    (base / "secret.txt").write_bytes(SECRET)
    outside = base / "outside"
    outside.mkdir()
    # symlinks inside the store that lead out of it, under valid object names
    data = repo.dir / "data"
    empty_dirs = [d for d in sorted(data.glob("??")) if not any(d.iterdir())]
    (data / empty_dirs[0].name / ("a" * 38)).symlink_to(base / "secret.txt")
    (outside / ("b" * 38)).write_bytes(SECRET)
    empty_dirs[1].rmdir()
    empty_dirs[1].symlink_to(outside)
    return repo


@pytest.fixture(scope="module")
def server(
    demo: Repo, fixture_repo: Repo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    p = start_proxy(
        tmp_path_factory.mktemp("proxy"),
        "--store", str(demo.store), "--store", str(fixture_repo.store),
        workers=2,
    )  # fmt: skip
    yield p
    assert p.stop() == 0
    assert "Traceback" not in p.errors(), p.errors()


def _connect(server: ProxyProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _get(sock: socket.socket, buf: bytearray, target: str, method: str = "GET", extra: str = ""):
    sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: s1\r\n{extra}\r\n".encode())
    return read_response(sock, buf, head=method == "HEAD")


def _check_headers(resp, relpath: str, body: bytes) -> None:
    assert resp.status == 200, relpath
    assert resp.names == EXACT_HEADERS, (relpath, resp.headers)
    assert resp.header("Content-Length") == str(len(body))
    if relpath.startswith(".cvmfs"):
        assert resp.header("Content-Type") == "application/x-cvmfs"
        assert resp.header("Cache-Control") == "max-age=61"
    else:
        assert resp.header("Content-Type") == "application/octet-stream"
        assert resp.header("Cache-Control") == "max-age=259200"


@pytest.mark.parametrize("which", ["demo", "fixture"])
def test_every_layout_path_on_one_keepalive_connection(
    server: ProxyProcess, demo: Repo, fixture_repo: Repo, which: str
) -> None:
    repo = demo if which == "demo" else fixture_repo
    files = _store_files(repo.dir)
    suffixes = {f[-1] for f in files if f.startswith("data/")}
    assert "C" in suffixes and "X" in suffixes
    if which == "demo":
        assert "P" in suffixes
    else:
        assert "H" in suffixes
    with _connect(server) as s:
        buf = bytearray()
        for _ in range(2):  # second round: served from the memory cache
            for rel in files:
                body = (repo.dir / rel).read_bytes()
                resp = _get(s, buf, f"/cvmfs/{repo.fqrn}/{rel}")
                _check_headers(resp, rel, body)
                assert resp.body == body, rel
                head = _get(s, buf, f"/cvmfs/{repo.fqrn}/{rel}", "HEAD")
                _check_headers(head, rel, body)
                assert head.body == b""


def test_pipelined_requests_answered_in_order(server: ProxyProcess, demo: Repo) -> None:
    files = _store_files(demo.dir)
    big = max(files[2:], key=lambda f: (demo.dir / f).stat().st_size)
    order = [".cvmfspublished", big, files[-1], ".cvmfswhitelist", big]
    raw = b"".join(
        f"GET /cvmfs/{DEMO}/{rel} HTTP/1.1\r\nHost: s1\r\n\r\n".encode() for rel in order
    )
    with _connect(server) as s:
        s.sendall(raw)
        buf = bytearray()
        for rel in order:
            resp = read_response(s, buf)
            assert resp.status == 200 and resp.body == (demo.dir / rel).read_bytes(), rel


def test_absolute_uri_requests(server: ProxyProcess, demo: Repo) -> None:
    rel = _store_files(demo.dir)[-1]
    body = (demo.dir / rel).read_bytes()
    with _connect(server) as s:
        buf = bytearray()
        for target in (
            f"http://cvmfs-s1.example.org/cvmfs/{DEMO}/{rel}",
            f"http://cvmfs-s1.example.org:8000/cvmfs/{DEMO}/{rel}",
        ):
            resp = _get(s, buf, target)
            _check_headers(resp, rel, body)
            assert resp.body == body
    # a client configured with the proxy as its HTTP proxy (as cvmfs does with curl)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": server.url("")}))
    with opener.open(f"http://cvmfs-s1.example.org/cvmfs/{DEMO}/.cvmfspublished") as r:
        assert r.read() == (demo.dir / ".cvmfspublished").read_bytes()


@pytest.mark.parametrize(
    "target",
    [
        f"/cvmfs/{DEMO}/data/00/00000000000000000000000000000000000000",
        f"/cvmfs/{DEMO}/data/00/00000000000000000000000000000000000000C",
        f"/cvmfs/{DEMO}/data/00/00000000000000000000000000000000000000-rmd160P",
        f"/cvmfs/{DEMO}/.cvmfswhitelist.pkcs7",
        "/cvmfs/unknown.example.org/.cvmfspublished",
        "/cvmfs/legacy_aufs.cern.ch/.cvmfs_master_replica",
    ],
)
def test_missing_objects_are_404(server: ProxyProcess, target: str) -> None:
    with _connect(server) as s:
        buf = bytearray()
        resp = _get(s, buf, target)
        assert resp.status == 404
        assert resp.header("Last-Modified") is None and resp.header("ETag") is None
        # the connection stays usable after a 404
        assert _get(s, buf, "/healthz").status == 200


def _traversal_targets(demo: Repo) -> list[str]:
    data = demo.dir / "data"
    links = [p for p in data.glob("??") if p.is_symlink()]
    files = [p for p in data.glob("??/*") if p.is_symlink()]
    assert links and files
    rel = _store_files(demo.dir)[-1]
    return [
        f"/cvmfs/{DEMO}/{files[0].relative_to(demo.dir)}",  # symlink object -> outside
        f"/cvmfs/{DEMO}/data/{links[0].name}/{'b' * 38}",  # symlinked data/XX -> outside
        f"/cvmfs/{DEMO}/../secret.txt",
        f"/cvmfs/{DEMO}/../../secret.txt",
        f"/cvmfs/{DEMO}/data/../../secret.txt",
        f"/cvmfs/{DEMO}/data/00/../../../secret.txt",
        f"/cvmfs/{DEMO}/%2e%2e/secret.txt",
        f"/cvmfs/{DEMO}/%2E%2E/%2E%2E/secret.txt",
        f"/cvmfs/{DEMO}/data%2f..%2f..%2fsecret.txt",
        f"/cvmfs/{DEMO}/data/%252e%252e/%252e%252e/secret.txt",
        f"/cvmfs/{DEMO}/data/%c0%ae%c0%ae/%c0%ae%c0%ae/secret.txt",
        f"/cvmfs/{DEMO}/..%2fsecret.txt",
        f"/cvmfs/{DEMO}/..%5csecret.txt",
        f"/cvmfs/{DEMO}/data\\..\\..\\secret.txt",
        f"/cvmfs/{DEMO}/{rel}%00.txt",
        f"/cvmfs/{DEMO}/{rel}/../../../../secret.txt",
        f"/cvmfs/{DEMO}/{rel}/",
        f"/cvmfs/{DEMO}/.cvmfspublished/../../secret.txt",
        f"/cvmfs/{DEMO}/data/txn",
        f"/cvmfs/{DEMO}/data/",
        f"/cvmfs/{DEMO}/",
        f"/cvmfs/{DEMO}",
        f"/cvmfs/{DEMO}%2f..%2fsecret.txt",
        "/cvmfs/../secret.txt",
        "/cvmfs/%2e%2e/secret.txt",
        "/cvmfs/./" + DEMO + "/.cvmfspublished",
        "/cvmfs//etc/passwd",
        f"/cvmfs/{DEMO}//etc/passwd",
        f"/cvmfs/{DEMO}/" + "/".join([".."] * 30) + "/etc/passwd",
        "/etc/passwd",
        "//etc/passwd",
        "/proc/self/environ",
        f"/{demo.store.parent}/secret.txt",
        f"/cvmfs/{DEMO}/{demo.store.parent}/secret.txt",
        f"http://s1/cvmfs/{DEMO}/../secret.txt",
        f"http://s1/cvmfs/{DEMO}/%2e%2e/secret.txt",
        "http://s1/../../secret.txt",
        "https://s1/cvmfs/" + DEMO + "/.cvmfspublished",
        "file:///etc/passwd",
        "secret.txt",
        "../secret.txt",
        "*",
    ]


def test_traversal_tricks_on_the_wire(server: ProxyProcess, demo: Repo) -> None:
    wrong = []
    for target in _traversal_targets(demo):
        for method in ("GET", "HEAD"):
            raw = f"{method} {target} HTTP/1.1\r\nHost: s1\r\nConnection: close\r\n\r\n"
            out = raw_exchange(server.port, raw.encode())
            assert SECRET not in out and b"root:" not in out
            if status_of(out) != 404:
                wrong.append((method, target, out[:80]))
    assert not wrong
    # request lines that are not HTTP at all: refused by the parser (400), never served
    for raw_line in (
        b"GET /cvmfs/" + DEMO.encode() + b"/../secret.txt\x00 HTTP/1.1\r\n\r\n",
        b"GET /cvmfs/" + DEMO.encode() + b"/ ../secret.txt HTTP/1.1\r\n\r\n",
        b"GET /cvmfs/\xc3\xa9/../secret.txt HTTP/1.1\r\n\r\n",
        b"GET\t/../secret.txt HTTP/1.1\r\n\r\n",
        b"\r\n\r\n",
    ):
        out = raw_exchange(server.port, raw_line + b"Connection: close\r\n\r\n")
        assert not out or status_of(out) in (400, 404), (raw_line, out[:200])
        assert SECRET not in out


def test_other_methods_rejected(server: ProxyProcess) -> None:
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        raw = (
            f"{method} /cvmfs/{DEMO}/.cvmfspublished HTTP/1.1\r\nHost: s1\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        out = raw_exchange(server.port, raw.encode())
        assert status_of(out) == 405 and b"Allow: GET, HEAD" in out


def test_repositories_json(server: ProxyProcess) -> None:
    import json

    with urllib.request.urlopen(server.url("/cvmfs/info/v1/repositories.json")) as r:
        names = [x["name"] for x in json.load(r)["repositories"]]
    assert names == [DEMO, "legacy_aufs.cern.ch"]


def test_metrics_and_access_log(server: ProxyProcess, demo: Repo) -> None:
    target = f"/cvmfs/{DEMO}/.cvmfspublished"
    with urllib.request.urlopen(
        urllib.request.Request(server.url(target), headers={"User-Agent": "cvmfs Fuse 2.11.2"})
    ) as r:
        r.read()
    rel = _store_files(demo.dir)[-1]
    size = (demo.dir / rel).stat().st_size
    with _connect(server) as s:  # the second answer comes from the memory cache
        buf = bytearray()
        assert _get(s, buf, "/cvmfs/nothing.here/x").status == 404
        for _ in range(2):
            _get(s, buf, f"/cvmfs/{DEMO}/{rel}", extra='User-Agent: say "hi"\r\n')
    time.sleep(1.2)  # workers publish their counters twice a second
    with urllib.request.urlopen(server.url("/metrics")) as r:
        text = r.read().decode()
    for name in (
        "hep_proxy_requests_total",
        "hep_proxy_response_bytes_total",
        "hep_proxy_cache_total",
        "hep_proxy_request_duration_seconds_bucket",
        "hep_proxy_store_misses_total",
    ):
        assert name in text
    m = re.search(r'hep_proxy_requests_total\{kind="manifest",status="200"\} (\d+)', text)
    assert m and int(m.group(1)) >= 1
    assert re.search(r'hep_proxy_requests_total\{kind="other",status="404"\} (\d+)', text)
    log = server.access_log.read_text()
    line = re.compile(
        r"^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "
        r'"GET /cvmfs/demo\.example\.org/\.cvmfspublished HTTP/1\.1" 200 \d+ "-" '
        r'"cvmfs Fuse 2\.11\.2"$',
        re.M,
    )
    assert line.search(log), log[-2000:]
    data_line = re.compile(
        rf'^127\.0\.0\.1 - - \[[^]]+\] "GET /cvmfs/demo\.example\.org/{rel} HTTP/1\.1" '
        rf'200 {size} "-" "say \\"hi\\""$',
        re.M,
    )
    assert len(data_line.findall(log)) >= 2, log[-2000:]


def test_graceful_shutdown_finishes_inflight_response(demo: Repo, tmp_path: Path) -> None:
    # bigger than any socket buffers, so the response is still being sent at SIGTERM
    digest, body = make_object(os.urandom(32 << 20))
    big = digest.object_path()
    demo.local.write_object(big, body)
    p = start_proxy(tmp_path, "--store", str(demo.store), workers=2)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.settimeout(30)
        s.connect(("127.0.0.1", p.port))
        s.sendall(f"GET /cvmfs/{DEMO}/{big} HTTP/1.1\r\nHost: s1\r\n\r\n".encode())
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert p.proc.poll() is None  # still finishing our response
        buf = bytearray(first)
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
            if len(buf) >= len(body) + 100 and buf.endswith(body[-100:]):
                break
        _, _, got = bytes(buf).partition(b"\r\n\r\n")
        assert got == body
    assert p.proc.wait(30) == 0
    # and the port is closed for new connections
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", p.port), timeout=2).close()
