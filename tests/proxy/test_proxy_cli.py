"""hep-proxy CLI and policies against the real process: one-line errors, config file, allow-list,
rate and header limits, no-cache re-verification."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy_process import (
    ProxyProcess,
    proxy_env,
    raw_exchange,
    read_response,
    run_cli,
    start_proxy,
    status_of,
)
from tests.support.repos import Repo, publish_tree
from tests.support.waiting import wait_until

DEMO = "cli.example.org"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    base = tmp_path_factory.mktemp("cli")
    src = base / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}.txt").write_text(f"file {i}\n" * 100)
    r, _ = publish_tree(src, base / "store", DEMO, base / "keys")
    return r


@pytest.fixture
def started() -> Iterator[list[ProxyProcess]]:
    procs: list[ProxyProcess] = []
    yield procs
    for p in procs:
        assert p.stop() == 0
        assert "Traceback" not in p.errors(), p.errors()


def _one_line_error(result, *needles: str) -> None:
    err = result.stderr.strip()
    assert result.returncode != 0
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_missing_store(tmp_path: Path) -> None:
    r = run_cli("serve", "--store", str(tmp_path / "nope"), "--listen", "127.0.0.1:0")
    _one_line_error(r, str(tmp_path / "nope"), "does not exist")


def test_store_without_repositories(tmp_path: Path) -> None:
    r = run_cli("serve", "--store", str(tmp_path), "--listen", "127.0.0.1:0")
    _one_line_error(r, str(tmp_path), "no repositories")


def test_store_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    r = run_cli("serve", "--store", str(tmp_path / "f"), "--listen", "127.0.0.1:0")
    _one_line_error(r, "not a directory")


def test_port_in_use(repo: Repo) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("serve", "--store", str(repo.store), "--listen", f"127.0.0.1:{port}")
    _one_line_error(r, f"127.0.0.1:{port}", "address already in use")


def test_port_in_use_by_another_hep_proxy(repo: Repo, tmp_path: Path, started) -> None:
    first = start_proxy(tmp_path, "--store", str(repo.store), workers=2)
    started.append(first)
    r = run_cli("serve", "--store", str(repo.store), "--listen", f"127.0.0.1:{first.port}")
    _one_line_error(r, "address already in use")


def test_unwritable_access_log(repo: Repo, tmp_path: Path) -> None:
    log = tmp_path / "no" / "such" / "dir" / "access.log"
    r = run_cli("serve", "--store", str(repo.store), "--access-log", str(log))
    _one_line_error(r, str(log), "cannot open access log")


def test_config_errors_are_one_line(repo: Repo, tmp_path: Path) -> None:
    r = run_cli("serve", "--store", str(repo.store), "--config", str(tmp_path / "none.yaml"))
    _one_line_error(r, "none.yaml", "cannot read config")
    r = run_cli("serve", "--store", str(repo.store), "--config", str(tmp_path))
    _one_line_error(r, "cannot read config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [1, 2\n")
    r = run_cli("serve", "--store", str(repo.store), "--config", str(bad))
    _one_line_error(r, "bad.yaml", "not valid YAML")
    r = run_cli("serve", "--store", str(repo.store), "--upstream", "nonsense")
    _one_line_error(r, "--upstream", "FQRN=URL")


def test_config_file_with_flags_winning(repo: Repo, tmp_path: Path, started) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"stores: [{repo.store}]\nmanifest_max_age: 5\ndata_max_age: 3600\nworkers: 1\n")
    p = start_proxy(tmp_path, "--config", str(cfg), "--manifest-max-age", "7")
    started.append(p)
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        buf = bytearray()
        for rel, want in ((".cvmfspublished", "max-age=7"), (repo.objects()[0], "max-age=3600")):
            s.sendall(f"GET /cvmfs/{DEMO}/{rel} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert read_response(s, buf).header("Cache-Control") == want


def test_allow_list(repo: Repo, tmp_path: Path, started) -> None:
    # (--health-allow: other loopback addresses may not even ask /healthz; test_proxy_health)
    p = start_proxy(
        tmp_path, "--store", str(repo.store), "--allow", "127.0.0.1/32",
        "--health-allow", "127.0.0.1/32",
    )  # fmt: skip
    started.append(p)
    req = f"GET /cvmfs/{DEMO}/.cvmfspublished HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ok = raw_exchange(p.port, req.encode(), source="127.0.0.1")
    assert status_of(ok) == 200
    denied = raw_exchange(p.port, req.encode(), source="127.0.0.2")
    assert status_of(denied) == 403
    assert (repo.dir / ".cvmfspublished").read_bytes() not in denied
    # a denied client is cut off even if it never sends a request
    with socket.create_connection(("127.0.0.1", p.port), source_address=("127.0.0.3", 0)) as s:
        s.settimeout(5)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert status_of(data) == 403


def test_rate_limit_per_client(repo: Repo, tmp_path: Path, started) -> None:
    p = start_proxy(tmp_path, "--store", str(repo.store), "--rate-limit", "2")
    started.append(p)
    rel = repo.objects()[0]
    statuses = []
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        buf = bytearray()
        for _ in range(20):
            s.sendall(f"GET /cvmfs/{DEMO}/{rel} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            resp = read_response(s, buf)
            statuses.append(resp.status)
            if resp.status == 429:
                assert resp.header("Retry-After") == "1"
    assert statuses[:3] == [200] * 3  # burst = 2 s worth = 4, one went to /healthz
    assert statuses.count(429) >= 5
    # another client address has its own budget
    req = f"GET /cvmfs/{DEMO}/{rel} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert status_of(raw_exchange(p.port, req.encode(), source="127.0.0.5")) == 200


def test_header_limits(repo: Repo, tmp_path: Path, started) -> None:
    cfg = tmp_path / "limits.yaml"
    cfg.write_text("max_field_size: 1024\nmax_line_size: 1024\nmax_headers: 10\n")
    p = start_proxy(tmp_path, "--store", str(repo.store), "--config", str(cfg))
    started.append(p)
    big = "X-Junk: " + "a" * 4000 + "\r\n"
    out = raw_exchange(p.port, f"GET /healthz HTTP/1.1\r\n{big}\r\n".encode())
    assert status_of(out) in (400, 431)
    many = "".join(f"X-H{i}: v\r\n" for i in range(40))
    out = raw_exchange(p.port, f"GET /healthz HTTP/1.1\r\n{many}\r\n".encode())
    assert status_of(out) in (400, 431)
    long_target = "/cvmfs/" + "a" * 5000
    out = raw_exchange(p.port, f"GET {long_target} HTTP/1.1\r\n\r\n".encode())
    assert status_of(out) in (400, 404, 414)
    # the server is still fine
    ok = raw_exchange(p.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(ok) == 200


def test_no_cache_reverifies_from_disk(tmp_path: Path, started) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("original content\n" * 50)
    repo, _ = publish_tree(src, tmp_path / "store", DEMO, tmp_path / "keys")
    p = start_proxy(tmp_path, "--store", str(repo.store))
    started.append(p)
    rel = next(r for r in repo.objects() if not r.endswith(("C", "X")))
    target = f"/cvmfs/{DEMO}/{rel}"
    good = (repo.dir / rel).read_bytes()
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        buf = bytearray()
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert read_response(s, buf).body == good
        os.chmod(repo.dir / rel, 0o644)
        (repo.dir / rel).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # bit rot
        s.sendall(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nPragma: no-cache\r\n"
            "Cache-Control: no-cache\r\n\r\n".encode()
        )
        resp = read_response(s, buf)
        assert resp.status == 502
        assert "error=" in (resp.header("Proxy-Status") or "")
    assert "hash mismatch" in p.errors() or "content hash" in p.errors()


def test_workers_share_the_port_and_are_restarted(repo: Repo, tmp_path: Path, started) -> None:
    p = start_proxy(tmp_path, "--store", str(repo.store), workers=2)
    started.append(p)
    pids = p.worker_pids()
    assert len(pids) == 2 and p.proc.pid not in pids
    for _ in range(20):
        req = f"GET /cvmfs/{DEMO}/.cvmfspublished HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert status_of(raw_exchange(p.port, req.encode())) == 200
    os.kill(pids[0], signal.SIGKILL)

    def replaced() -> list[int]:
        now = p.worker_pids()
        return now if len(now) == 2 and pids[0] not in now else []

    now = wait_until(replaced, 10, what="the killed worker replaced by a new one")
    assert pids[1] in now  # the other worker was left alone
    for _ in range(20):
        with urllib.request.urlopen(p.url("/healthz"), timeout=5) as r:
            assert r.status == 200
    assert "restarting it" in p.errors()


def test_ipv6_loopback(repo: Repo, tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = 0
    with socket.socket(socket.AF_INET6) as s:
        try:
            s.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--store", str(repo.store),
         "--listen", f"[::1]:{port}", "--workers", "1", "--access-log", "off"],
        env=proxy_env(), stderr=subprocess.PIPE,
    )  # fmt: skip

    def listening() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            socket.create_connection(("::1", port), timeout=2).close()
        except ConnectionRefusedError:
            return False
        return True

    try:
        wait_until(listening, 15, what=f"hep-proxy listening on [::1]:{port}", interval=0.05)
        with socket.create_connection(("::1", port), timeout=5) as c:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert c.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
