"""hep-proxy against a real server process on loopback: layout, headers, HEAD, keep-alive,
absolute URIs, 404s, traversal on raw sockets, the access log. (Metrics: test_proxy_metrics;
shutdown and keep-alive timeouts: test_proxy_lifecycle.)"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from cvmfs_format.objects import Suffix
from cvmfs_format.store import REPLICA_MARKER
from tests.support.proxy_process import (
    ProxyProcess,
    Response,
    raw_exchange,
    read_response,
    start_proxy,
    status_of,
)
from tests.support.repos import Repo, fixture_missing, publish_tree
from tests.support.waiting import wait_until

DEMO = "demo.example.org"
TRAP = "trap.example.org"
SECRET = b"TOPSECRET-0123456789"
EXACT_HEADERS = {"server", "content-type", "cache-control", "content-length", "date"}
ROOT_FILES = [".cvmfspublished", ".cvmfswhitelist"]


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
    return repo


@pytest.fixture(scope="module")
def trap(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """A repository of its own whose store has symlinks leading out of it, under valid object
    names (a symlinked object, a symlinked ``data/XX``) and as its replica marker, and a secret
    file next to it."""
    base = tmp_path_factory.mktemp("trap")
    src = base / "src"
    src.mkdir()
    (src / "bait.txt").write_text("nothing to see\n")
    repo, _ = publish_tree(src, base / "store", TRAP, base / "keys")
    (base / "secret.txt").write_bytes(SECRET)
    outside = base / "outside"
    outside.mkdir()
    data = repo.dir / "data"
    empty_dirs = [d for d in sorted(data.glob("??")) if not any(d.iterdir())]
    (data / empty_dirs[0].name / ("a" * 38)).symlink_to(base / "secret.txt")
    (outside / ("b" * 38)).write_bytes(SECRET)
    empty_dirs[1].rmdir()
    empty_dirs[1].symlink_to(outside)
    (repo.dir / REPLICA_MARKER).unlink()
    (repo.dir / REPLICA_MARKER).symlink_to(base / "secret.txt")
    return repo


@pytest.fixture(scope="module")
def server(
    demo: Repo, trap: Repo, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ProxyProcess]:
    """Serves demo and trap, and the 2015 repository where ../shared has it (without it only
    the tests that read that repository skip)."""
    stores = ["--store", str(demo.store), "--store", str(trap.store)]
    if fixture_missing() is None:
        stores += ["--store", str(request.getfixturevalue("fixture_repo").store)]
    p = start_proxy(tmp_path_factory.mktemp("proxy"), *stores, workers=2)
    yield p
    assert p.stop() == 0
    assert "Traceback" not in p.errors(), p.errors()


def _connect(server: ProxyProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _get(
    sock: socket.socket, buf: bytearray, target: str, method: str = "GET", extra: str = ""
) -> Response:
    sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: s1\r\n{extra}\r\n".encode())
    return read_response(sock, buf, head=method == "HEAD")


def _check_headers(resp: Response, relpath: str, body: bytes) -> None:
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
    server: ProxyProcess, demo: Repo, which: str, request: pytest.FixtureRequest
) -> None:
    repo: Repo = demo if which == "demo" else request.getfixturevalue("fixture_repo")
    files = ROOT_FILES + repo.objects()
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
    files = ROOT_FILES + demo.objects()
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
    rel = demo.objects()[-1]
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
        "/cvmfs/unknown.example.org/.cvmfs_master_replica",
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


def test_replica_marker_only_where_the_store_has_it(
    server: ProxyProcess, demo: Repo, fixture_repo: Repo
) -> None:
    """hep-publish marks what it writes, and the 2015 repository came with the mark
    cvmfs_server left: both are served (empty bodies) with the root files' headers, also to
    absolute URIs; once a repository's marker is gone it is a 404 at once."""
    with _connect(server) as s:
        buf = bytearray()
        for repo in (demo, fixture_repo):
            body = (repo.dir / REPLICA_MARKER).read_bytes()
            for target in (
                f"/cvmfs/{repo.fqrn}/{REPLICA_MARKER}",
                f"http://cvmfs-s1.example.org/cvmfs/{repo.fqrn}/{REPLICA_MARKER}",
            ):
                resp = _get(s, buf, target)
                _check_headers(resp, REPLICA_MARKER, body)
                assert resp.body == body == b""
                _check_headers(_get(s, buf, target, "HEAD"), REPLICA_MARKER, body)
        marker = demo.dir / REPLICA_MARKER
        marker.unlink()  # as preload does before it makes the store partial
        try:
            assert _get(s, buf, f"/cvmfs/{DEMO}/{REPLICA_MARKER}").status == 404
            assert _get(s, buf, f"/cvmfs/{DEMO}/{REPLICA_MARKER}", "HEAD").status == 404
        finally:
            marker.write_bytes(b"")
        assert _get(s, buf, f"/cvmfs/{DEMO}/{REPLICA_MARKER}").status == 200


def _traversal_targets(trap: Repo) -> list[str]:
    data = trap.dir / "data"
    links = [p for p in data.glob("??") if p.is_symlink()]
    files = [p for p in data.glob("??/*") if p.is_symlink()]
    assert links and files
    rel = trap.verified_manifest().root_catalog.object_path(Suffix.CATALOG)  # a real object
    return [
        f"/cvmfs/{TRAP}/{files[0].relative_to(trap.dir)}",  # symlink object -> outside
        f"/cvmfs/{TRAP}/data/{links[0].name}/{'b' * 38}",  # symlinked data/XX -> outside
        f"/cvmfs/{TRAP}/../secret.txt",
        f"/cvmfs/{TRAP}/../../secret.txt",
        f"/cvmfs/{TRAP}/data/../../secret.txt",
        f"/cvmfs/{TRAP}/data/00/../../../secret.txt",
        f"/cvmfs/{TRAP}/%2e%2e/secret.txt",
        f"/cvmfs/{TRAP}/%2E%2E/%2E%2E/secret.txt",
        f"/cvmfs/{TRAP}/data%2f..%2f..%2fsecret.txt",
        f"/cvmfs/{TRAP}/data/%252e%252e/%252e%252e/secret.txt",
        f"/cvmfs/{TRAP}/data/%c0%ae%c0%ae/%c0%ae%c0%ae/secret.txt",
        f"/cvmfs/{TRAP}/..%2fsecret.txt",
        f"/cvmfs/{TRAP}/..%5csecret.txt",
        f"/cvmfs/{TRAP}/data\\..\\..\\secret.txt",
        f"/cvmfs/{TRAP}/{rel}%00.txt",
        f"/cvmfs/{TRAP}/{rel}/../../../../secret.txt",
        f"/cvmfs/{TRAP}/{rel}/",
        f"/cvmfs/{TRAP}/.cvmfspublished/../../secret.txt",
        f"/cvmfs/{TRAP}/{REPLICA_MARKER}",  # symlink -> outside
        f"/cvmfs/{TRAP}/{REPLICA_MARKER}/../../secret.txt",
        f"/cvmfs/{TRAP}/data/txn",
        f"/cvmfs/{TRAP}/data/",
        f"/cvmfs/{TRAP}/",
        f"/cvmfs/{TRAP}",
        f"/cvmfs/{TRAP}%2f..%2fsecret.txt",
        "/cvmfs/../secret.txt",
        "/cvmfs/%2e%2e/secret.txt",
        "/cvmfs/./" + TRAP + "/.cvmfspublished",
        "/cvmfs//etc/passwd",
        f"/cvmfs/{TRAP}//etc/passwd",
        f"/cvmfs/{TRAP}/" + "/".join([".."] * 30) + "/etc/passwd",
        "/etc/passwd",
        "//etc/passwd",
        "/proc/self/environ",
        f"/{trap.store.parent}/secret.txt",
        f"/cvmfs/{TRAP}/{trap.store.parent}/secret.txt",
        f"http://s1/cvmfs/{TRAP}/../secret.txt",
        f"http://s1/cvmfs/{TRAP}/%2e%2e/secret.txt",
        "http://s1/../../secret.txt",
        "https://s1/cvmfs/" + TRAP + "/.cvmfspublished",
        "file:///etc/passwd",
        "secret.txt",
        "../secret.txt",
        "*",
    ]


def test_traversal_tricks_on_the_wire(server: ProxyProcess, trap: Repo) -> None:
    wrong = []
    for target in _traversal_targets(trap):
        for method in ("GET", "HEAD"):
            raw = f"{method} {target} HTTP/1.1\r\nHost: s1\r\nConnection: close\r\n\r\n"
            out = raw_exchange(server.port, raw.encode())
            assert SECRET not in out and b"root:" not in out
            if status_of(out) != 404:
                wrong.append((method, target, out[:80]))
    assert not wrong
    # request lines that are not HTTP at all: refused by the parser (400), never served
    for raw_line in (
        b"GET /cvmfs/" + TRAP.encode() + b"/../secret.txt\x00 HTTP/1.1\r\n\r\n",
        b"GET /cvmfs/" + TRAP.encode() + b"/ ../secret.txt HTTP/1.1\r\n\r\n",
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
    with urllib.request.urlopen(server.url("/cvmfs/info/v1/repositories.json")) as r:
        names = [x["name"] for x in json.load(r)["repositories"]]
    legacy = ["legacy_aufs.cern.ch"] if fixture_missing() is None else []  # from ../shared
    assert names == [DEMO, *legacy, TRAP]


def test_access_log_combined_format(server: ProxyProcess, demo: Repo) -> None:
    """One Combined Log Format line per request, whichever way it was answered (aiohttp's path,
    the memory-cache fast path, HEAD, a 404); quotes in fields escaped."""
    token = uuid.uuid4().hex  # in every request of ours: the lines this test owns
    agent = f"cvmfs Fuse 2.11.2 {token}"
    with urllib.request.urlopen(
        urllib.request.Request(
            server.url(f"/cvmfs/{DEMO}/.cvmfspublished"), headers={"User-Agent": agent}
        )
    ) as r:
        r.read()
    rel = next(r for r in demo.objects() if (demo.dir / r).stat().st_size < 64 << 10)
    size = (demo.dir / rel).stat().st_size
    quoted = f'User-Agent: say "hi" {token}\r\n'
    with _connect(server) as s:  # one connection: later requests are memory-cache hits
        buf = bytearray()
        assert _get(s, buf, f"/cvmfs/nothing.here/x?{token}").status == 404
        for method in ("GET", "GET", "HEAD"):
            assert _get(s, buf, f"/cvmfs/{DEMO}/{rel}", method, extra=quoted).status == 200

    def mine() -> list[str]:
        lines = [line for line in server.log_lines() if token in line]
        return lines if len(lines) >= 5 else []

    lines = wait_until(mine, 10, what="five access-log lines of this test")
    assert len(lines) == 5, lines
    stamp = r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\]"
    start = rf"^127\.0\.0\.1 - - {stamp} "
    manifest = [line for line in lines if ".cvmfspublished" in line]
    assert len(manifest) == 1, lines
    manifest_size = (demo.dir / ".cvmfspublished").stat().st_size
    assert re.match(
        rf'{start}"GET /cvmfs/demo\.example\.org/\.cvmfspublished HTTP/1\.1" '
        rf'200 {manifest_size} "-" "cvmfs Fuse 2\.11\.2 {token}"$',
        manifest[0],
    ), manifest
    # one connection, one worker: its lines in the order of its requests
    expected = [
        rf'{start}"GET /cvmfs/nothing\.here/x\?{token} HTTP/1\.1" 404 \d+ "-" "-"$',
        *[
            rf'{start}"{method} /cvmfs/demo\.example\.org/{rel} HTTP/1\.1" '
            rf'200 {size if method == "GET" else "-"} "-" "say \\"hi\\" {token}"$'
            for method in ("GET", "GET", "HEAD")
        ],
    ]
    connection = [line for line in lines if ".cvmfspublished" not in line]
    for pattern, line in zip(expected, connection, strict=True):
        assert re.match(pattern, line), (pattern, line)
