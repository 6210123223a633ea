"""hep-proxy for a newcomer, on the real process: /healthz and /metrics have their own allow
rule (loopback and the allow-list by default, ``--health-allow``/``health_allow:`` to change
it), ``--workers 0`` is refused, ``--log-level`` is taken."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy_process import (
    ProxyProcess,
    raw_exchange,
    read_response,
    run_cli,
    start_proxy,
    status_of,
)
from tests.support.repos import Repo, publish_tree

FQRN = "health.example.org"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    base = tmp_path_factory.mktemp("health")
    src = base / "src"
    src.mkdir()
    (src / "f.txt").write_text("hello\n")
    r, _ = publish_tree(src, base / "store", FQRN, base / "keys")
    return r


@pytest.fixture
def started() -> Iterator[list[ProxyProcess]]:
    procs: list[ProxyProcess] = []
    yield procs
    for p in procs:
        assert p.stop() == 0
        assert "Traceback" not in p.errors(), p.errors()


def _get(port: int, path: str, source: str) -> int:
    req = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    return status_of(raw_exchange(port, req, source=source))


MANIFEST = f"/cvmfs/{FQRN}/.cvmfspublished"


def test_health_from_loopback_outside_the_allow_list(
    repo: Repo, tmp_path: Path, started: list[ProxyProcess]
) -> None:
    """The host's own name often resolves to 127.0.1.1: a health check from there is answered
    although only the compute network may fetch."""
    p = start_proxy(tmp_path, "--store", str(repo.store), "--allow", "10.0.0.0/8")
    started.append(p)
    for source in ("127.0.0.1", "127.0.1.1"):
        assert _get(p.port, "/healthz", source) == 200
        assert _get(p.port, "/metrics", source) == 200
        assert _get(p.port, MANIFEST, source) == 403
    # let in for health only: nothing else on the same connection either
    with socket.create_connection(("127.0.0.1", p.port), source_address=("127.0.1.1", 0)) as s:
        s.settimeout(10)
        buf = bytearray()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s, buf).status == 200
        s.sendall(f"GET {MANIFEST} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        denied = read_response(s, buf)
        assert denied.status == 403 and denied.body == b"client network not allowed\n"


def test_health_allow_replaces_the_default(
    repo: Repo, tmp_path: Path, started: list[ProxyProcess]
) -> None:
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"stores: [{repo.store}]\nallow: [127.0.0.2/32]\nhealth-allow: [127.0.0.1/32]\n")
    p = start_proxy(tmp_path, "--config", str(cfg))
    started.append(p)
    assert _get(p.port, "/healthz", "127.0.0.1") == 200  # the monitoring host
    assert _get(p.port, MANIFEST, "127.0.0.1") == 403
    assert _get(p.port, MANIFEST, "127.0.0.2") == 200  # a client: data, no health
    assert _get(p.port, "/healthz", "127.0.0.2") == 403
    assert _get(p.port, "/metrics", "127.0.0.2") == 403
    assert _get(p.port, "/healthz", "127.0.0.3") == 403  # neither: cut off at connect
    # the flag wins over the file
    q = start_proxy(tmp_path / "q", "--config", str(cfg), "--health-allow", "127.0.0.0/8")
    started.append(q)
    assert _get(q.port, "/healthz", "127.0.0.2") == 200


def test_workers_zero_is_refused(repo: Repo, tmp_path: Path) -> None:
    r = run_cli("serve", "--store", str(repo.store), "--workers", "0")
    assert r.returncode == 2
    assert r.stderr == "hep-proxy: --workers must be 1 or more (default: one per core)\n"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"stores: [{repo.store}]\nworkers: 0\n")
    r = run_cli("serve", "--config", str(cfg))
    assert r.returncode == 2
    assert r.stderr == f"hep-proxy: {cfg}: workers must be 1 or more (default: one per core)\n"


def test_log_level(repo: Repo, tmp_path: Path, started: list[ProxyProcess]) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"stores: [{repo.store}]\nlog-level: loud\n")
    r = run_cli("serve", "--config", str(cfg))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"{cfg}: log-level: 'loud' is not one of debug, info, warning, error" in r.stderr
    p = start_proxy(tmp_path, "--store", str(repo.store), "--log-level", "info")
    started.append(p)
    assert _get(p.port, MANIFEST, "127.0.0.1") == 200
